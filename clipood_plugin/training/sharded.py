"""FSDP2 for the recipe: shard a CLIP image tower over all ranks, block by block.

``fully_shard`` on each transformer block and then on the tower (the root keeps the patch and
positional embeddings, the final norm and the projection) is the layout FSDP2's documentation
recommends: a block's parameters are gathered just before it runs and freed after, so memory in
forward is about one block's full weights plus every rank's 1/N shard. Blocks are found where
open_clip (``transformer.resblocks``) and timm (``blocks``) keep them; any other tower is sharded
as one unit, which still splits its weights, gradients and optimizer state, but gathers all of
them for forward.

Only the tower is sharded. The text head is a frozen buffer replicated on every rank.

:func:`local_views` (each DTensor's local shard as a view, plain tensors as they are) is re-exported
for scripts that time or inspect what each rank holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clipood_plugin._sharding import local_views

__all__ = ["ensure_process_group", "export_full", "full_model_state_dict", "local_views", "shard_tower", "tower_blocks"]


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when none is running, so ``--fsdp`` also works without torchrun."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an open_clip or timm vision tower (empty when it has neither)."""
    transformer = getattr(tower, "transformer", None)
    blocks = getattr(transformer, "resblocks", None) if transformer is not None else getattr(tower, "blocks", None)
    return list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else []


def shard_tower(tower: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each block of ``tower`` and then the tower, over a 1-D mesh of every rank.

    In place (FSDP2 swaps the module's class and replaces its parameters by DTensors), so an
    optimizer or average must be built *after* this call. Returns ``tower``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in tower_blocks(tower):
        fully_shard(block, mesh=mesh)
    fully_shard(tower, mesh=mesh)
    return tower


def full_model_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded module's full weights on rank 0's CPU (``{}`` elsewhere), gathered tensor by tensor. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_full(directory: str | os.PathLike[str], sources: Mapping[str, Any]) -> list[Path]:
    """Write ``<name>.safetensors`` on rank 0 for each sharded module or average in ``sources``. A collective.

    A module is gathered with DCP's full state dict, an average with its ``full_state_dict()``;
    ``None`` entries are skipped. Each file is plain tensors keyed as the bare tower, written
    atomically, so ``tower.load_state_dict(safetensors.torch.load_file(path))`` works anywhere.
    """
    from safetensors.torch import save_file

    from clipood_plugin._io import atomic_path

    written: list[Path] = []
    for name, source in sources.items():
        if source is None:
            continue
        full = source.full_state_dict() if hasattr(source, "full_state_dict") else full_model_state_dict(source)
        if dist.get_rank() == 0:
            path = Path(directory) / f"{name}.safetensors"
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in full.items()}, str(tmp))
            written.append(path)
    return written
