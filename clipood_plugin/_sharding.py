"""Seeing FSDP2 shards: the rules the averages need to hold, update and gather a sharded model.

``torch.distributed.fsdp.fully_shard`` (FSDP2) replaces every parameter it manages with a
``DTensor`` sharded over a device mesh (``Shard(0)`` by default) and swaps the module's class for
an ``FSDP<Class>`` subclass whose ``__deepcopy__`` raises. Averaging is elementwise, so an average
of such a model can hold DTensors with the same mesh and placements and update their local
shards with no communication at all. This module has the pieces:

- :func:`is_sharded` / :func:`check_supported`: what a model is (FSDP2, plain) and which sharded
  models are refused with a clear error (FSDP1's flat parameters, DeepSpeed engines and ZeRO-3).
- :func:`shard_copy`: a copy of a sharded module without FSDP's hooks and state, each DTensor
  cloned with its mesh and placements kept (what ``deepcopy`` would give if FSDP allowed it).
- :func:`local_views` / :func:`paired_local_views`: the local shards of a list of tensors (plain
  tensors pass through), on which the foreach kernels run.
- :func:`check_same_sharding`: the pairwise check that an average and a model are sharded alike.
- :func:`shard_like`: full tensors of a state dict cut to the DTensor layout of another (loading
  an unsharded checkpoint into a sharded average).
- :func:`reshard_all`: free any unsharded parameters, so FSDP's next forward gathers the shards.

The trap behind the DTensors: a state dict of plain local-shard tensors saves through
``torch.distributed.checkpoint`` but cannot be loaded back (every rank's shard claims the same
global key with a different size: "size mismatch"). With DTensors DCP knows each shard's place in
the global tensor, so it saves, loads, and reshards to another world size.

Nothing here imports ``torch.distributed`` unless a process group is initialised: a DTensor
cannot exist without one, and an unsharded user never pays for the import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "check_same_sharding",
    "check_supported",
    "is_sharded",
    "local_views",
    "paired_local_views",
    "reshard_all",
    "shard_copy",
    "shard_like",
]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (False without a process group)."""
    if not _distributed():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter or buffer of ``module`` is a DTensor (FSDP2, or tensor parallel)."""
    if not _distributed():
        return False
    return any(is_dtensor(t) for t in (*module.parameters(), *module.buffers()))


def check_supported(module: nn.Module) -> None:
    """Refuse, with an error naming what to do, the sharded models an average cannot see through.

    - A DeepSpeed engine is not seen through (unlike DDP's ``.module``): its ``.module`` is the model,
      but with ZeRO-3 the parameters there are empty placeholders, so an average of them would be
      silently wrong. ZeRO-1/2 keep full parameters: pass ``engine.module``.
    - DeepSpeed ZeRO-3 parameters (``ds_id``) and FSDP1's ``FullyShardedDataParallel`` (flat,
      padded parameters that are views only inside its own context) are refused: use FSDP2.
    """
    if type(module).__name__ == "DeepSpeedEngine":
        raise TypeError(
            "got a DeepSpeed engine: averages do not see through it. With ZeRO stage 0-2 pass "
            "engine.module; ZeRO-3 partitions parameters into placeholders and is not supported (use FSDP2, "
            "torch.distributed.fsdp.fully_shard)"
        )
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            raise TypeError(
                f"parameter {name!r} is a DeepSpeed ZeRO-3 partitioned parameter; averages of ZeRO-3 models are "
                "not supported (use FSDP2, torch.distributed.fsdp.fully_shard)"
            )
        break
    if _distributed():
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
            raise TypeError(
                "FSDP1 (FullyShardedDataParallel) flattens parameters into padded flat buffers; averages support "
                "FSDP2 only: shard the model with torch.distributed.fsdp.fully_shard"
            )


def _original_class(module: nn.Module) -> type:
    """The class ``fully_shard`` replaced (``FSDPLinear`` → ``Linear``); the class itself otherwise."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if not isinstance(module, FSDPModule):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))


def _is_fsdp_attribute(key: str) -> bool:
    # fully_shard's composable-API state and the flags it sets for dynamo
    return key.startswith("__composable_api_state_key") or key in ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


def shard_copy(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of a sharded module: same classes and names, cloned tensors (DTensors stay DTensors).

    What ``deepcopy`` would do if FSDP allowed it, minus FSDP: every module is rebuilt as its
    original class with fresh (empty) hook dicts, plain attributes shared with the source (they
    are configuration; the copy never runs forward), and parameters and buffers cloned with
    ``requires_grad=False``. Tied modules and tensors stay tied.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    cls = _original_class(module)
    copy = cls.__new__(cls)
    nn.Module.__init__(copy)  # fresh _parameters, _buffers, _modules and hook dicts
    memo[id(module)] = copy
    for key, value in module.__dict__.items():
        if key not in copy.__dict__ and not _is_fsdp_attribute(key):
            copy.__dict__[key] = value
    copy.training = module.training
    copy._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, param in module._parameters.items():
        if param is not None and id(param) not in memo:
            memo[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=False)
        copy._parameters[name] = None if param is None else memo[id(param)]
    for name, buf in module._buffers.items():
        if buf is not None and id(buf) not in memo:
            memo[id(buf)] = buf.detach().clone()
        copy._buffers[name] = None if buf is None else memo[id(buf)]
    for name, child in module._modules.items():
        copy._modules[name] = None if child is None else shard_copy(child, memo)
    return copy


def paired_local_views(averaged: Sequence[Tensor], current: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]] | None:
    """:func:`local_views` of both lists in one pass (the per-update path); ``None`` when a pair
    is a DTensor on one side only."""
    from torch.distributed.tensor import DTensor

    avg_local: list[Tensor] = []
    cur_local: list[Tensor] = []
    for avg, cur in zip(averaged, current):
        avg_d, cur_d = isinstance(avg, DTensor), isinstance(cur, DTensor)
        if avg_d != cur_d:
            return None
        avg_local.append(avg.to_local() if avg_d else avg)
        cur_local.append(cur.to_local() if cur_d else cur)
    return avg_local, cur_local


def local_views(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each DTensor's local shard (a view: in-place ops on it update the DTensor); others as they are."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def describe_sharding(tensor: Tensor) -> str:
    if not is_dtensor(tensor):
        return "a plain (unsharded) tensor"
    return f"a DTensor with placements {tuple(tensor.placements)} on {tensor.device_mesh}"


def check_same_sharding(names: Sequence[str], averaged: Sequence[Tensor], current: Sequence[Tensor]) -> None:
    """Every pair must be sharded alike: both plain, or both DTensors with the same mesh and placements.

    The update zips local shards by position, so a shard of one layout lerped with a shard of
    another would mix unrelated elements (or fail on a shape mismatch far from the cause).
    """
    for name, avg, cur in zip(names, averaged, current):
        avg_d, cur_d = is_dtensor(avg), is_dtensor(cur)
        if avg_d and cur_d and avg.device_mesh == cur.device_mesh and avg.placements == cur.placements:
            continue
        if not avg_d and not cur_d:
            continue
        if cur_d and not avg_d:
            hint = ("the average was built from an unsharded model: build it after fully_shard(model), "
                    "so that it holds the same shards")
        elif avg_d and not cur_d:
            hint = ("the model is not sharded here: it was built before fully_shard, or its parameters are "
                    "gathered (inside forward, or after a no-grad forward with reshard_after_forward=False: call "
                    "model.reshard() first)")
        else:
            hint = "the model is sharded differently from the one the average was built from"
        raise ValueError(
            f"model tensor {name!r} is {describe_sharding(cur)} but the average holds {describe_sharding(avg)}: {hint}"
        )


def shard_like(state: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every full tensor whose ``reference`` entry is a DTensor cut to that layout.

    Each rank takes its own slice of the full tensor it holds (``src_data_rank=None``: no
    scatter), so all ranks must hold the same full tensor, as after loading one file.
    """
    from torch.distributed.tensor import distribute_tensor

    out = dict(state)
    for key, value in state.items():
        like = reference.get(key)
        if is_dtensor(like) and isinstance(value, Tensor) and not is_dtensor(value):
            if tuple(value.shape) != tuple(like.shape):
                raise ValueError(f"state tensor {key!r} has shape {tuple(value.shape)}, the average's is {tuple(like.shape)}")
            value = value.to(device=like.to_local().device, dtype=like.dtype)
            out[key] = distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return out


def reshard_all(module: nn.Module) -> None:
    """``reshard()`` every FSDP2 module under ``module``: unsharded parameters are freed, so the
    next forward all-gathers the shards as they are now (a root with ``reshard_after_forward=False``
    otherwise keeps its gathered parameters after a no-grad forward)."""
    if not _distributed():
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no public FSDP2, so nothing here can be an FSDP2 module
        return
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
