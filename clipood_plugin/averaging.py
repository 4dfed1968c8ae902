"""Weight averages over a fine-tuning trajectory: Beta Moving Average (CLIPood Eq. 5–7) and the
exponential and uniform averages it is compared with, all through one API.

BMA keeps ``θ_BMA = Σ_t α_t θ_t / Σ_t α_t`` over t = 0..T, where θ_0 is the pretrained model,
θ_t the weights after optimizer step t, and ``α_t = BetaPDF(β, β)((t + 0.5) / (T + 1))``. With
β < 1 the weights are U-shaped: both the zero-shot start and the end of fine-tuning count most,
which is what keeps the average robust out of distribution (β = 0.5 by default; β = 1 is the
uniform average including θ_0).

The incremental form used by the official code, ``avg ← (avg + r·θ_t) / (1 + r)`` with
``r = α_t / W_{t-1}`` and ``W_t = Σ_{s≤t} α_s``, is the same as ``lerp(avg, θ_t, α_t / W_t)``, so
one ``torch._foreach_lerp_`` per step updates the whole model at memory-bandwidth speed.

Every average here is such a lerp with a per-step weight ``w_t``; the classes differ only in
``w_t``:

- :class:`BetaMovingAverage`: ``w_t = α_t / W_t`` (horizon T required).
- :class:`UniformAverage` (SWA): ``w_t = 1 / n_t``, with ``n_t`` the number of models in the average
  once θ_t is in, so every model counts the same. With ``include_init`` this equals BMA at β = 1.
- :class:`ExponentialMovingAverage`: ``w_t = 1 − decay_t``; ``decay_t`` is constant, or follows the
  warm-up schedule of timm's ``ModelEmaV3`` (see :meth:`ExponentialMovingAverage.get_decay`).

They share the rest: ``update_parameters(model)`` / ``update(model, step=None)`` once per optimizer
step, ``set(model)`` to restart, an fp32 average of a bf16/fp16 model, DDP / ``torch.compile``
wrappers seen through, and a ``state_dict()`` that carries the hyperparameters and the step count,
so a run resumes exactly and loading into an average built with other hyperparameters raises.

Sharded models (FSDP2, ``torch.distributed.fsdp.fully_shard``): built after ``fully_shard``, an
average holds DTensors with the model's mesh and placements, not bare local shards, because
``torch.distributed.checkpoint`` cannot load a state dict of bare shards back ("size mismatch").
Its update is the same lerp on the local shards, with no collective and no gather;
:meth:`_StepAverage.swapped_into` evaluates it inside the sharded model and
:meth:`_StepAverage.full_state_dict` gathers it to rank 0 for export (clipood_plugin._sharding).

Where we differ from the official code, on purpose:

- By default (``storage="fp32"``) the average is kept in float32 even when the model trains in
  bf16/fp16. The official code stores and updates it in the parameters' fp16 and loses about
  10–20 % of the average's movement away from θ_0 to rounding (docs/numerics.md).
  ``storage="param"`` reproduces the official average instead: each tensor in its parameter's own
  dtype, updated with exactly the official expression ``(avg + r·θ) / (1 + r)`` (three roundings
  per element, no fused multiply-add and no lerp: in a synthetic 60-step fp16 trajectory a fused
  add ended up to 45–71 ulp and an fp16 lerp 170–250 ulp away from the official average).
- Stepping past the horizon T raises. The official rule would silently freeze (the Beta pdf is 0
  beyond x = 1).
- β, T and the step count are saved in ``state_dict()``, so a run resumes exactly; the official
  average cannot resume.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from clipood_plugin._sharding import (
    check_same_sharding,
    check_supported,
    is_dtensor,
    is_sharded,
    local_views,
    paired_local_views,
    reshard_all,
    shard_copy,
    shard_like,
)
from clipood_plugin._wrappers import unwrap_model

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_EMA_DECAY",
    "BetaMovingAverage",
    "ExponentialMovingAverage",
    "UniformAverage",
    "beta_weights",
    "get_beta_multi_avg_fn",
]

#: β = 0.5 (paper §3.3, "by default β = 0.5"; official `--beta`). The official scripts use 0.1
#: for the open-class setting and for in-the-wild OfficeHome (docs/official_code.md §5).
DEFAULT_BETA = 0.5
#: timm's ``ModelEmaV3`` default decay (its ``train.py`` flag defaults to 0.9998).
DEFAULT_EMA_DECAY = 0.9999

_FORMAT_VERSION = 1


def check_beta(beta: float) -> float:
    """Validate β of a Beta(β, β) weighting; returns it as a float (shared with the integrations)."""
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return float(beta)


def check_total_steps(total_steps: int | None, *, optional: bool = False) -> int | None:
    """Validate a horizon T (optimizer steps); ``None`` is allowed only when ``optional``."""
    if total_steps is None and optional:
        return None
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        allowed = "None (no horizon) or a positive int" if optional else "a positive int"
        raise ValueError(f"total_steps must be {allowed} (the number of optimizer steps), got {total_steps!r}")
    return total_steps


def _check_horizon(total_steps: int, beta: float) -> None:
    check_total_steps(total_steps)
    check_beta(beta)


def beta_weights(total_steps: int, beta: float = DEFAULT_BETA) -> Tensor:
    """The BMA step weights ``α_t`` for t = 0..T as a float64 tensor of length T + 1 (Eq. 6).

    ``α_t = BetaPDF(β, β)((t + 0.5) / (T + 1))``, evaluated in log space so that small β and
    long horizons stay finite. The abscissae never reach 0 or 1, so the pdf is finite even for
    β < 1. The values equal ``scipy.stats.beta(β, β).pdf`` (no scipy needed); the averaging
    itself only ever uses ratios, so the normalising constant cancels.
    """
    _check_horizon(total_steps, beta)
    t = torch.arange(total_steps + 1, dtype=torch.float64)
    x = (t + 0.5) / (total_steps + 1)
    log_norm = 2.0 * math.lgamma(beta) - math.lgamma(2.0 * beta)  # log B(β, β)
    return torch.exp((beta - 1.0) * (torch.log(x) + torch.log1p(-x)) - log_norm)


def _lerp_ratios(weights: Tensor) -> list[float]:
    """``α_t / W_t`` per step: the lerp weight that folds θ_t into the running average."""
    cumulative = torch.cumsum(weights, dim=0)
    ratios = torch.where(cumulative > 0, weights / cumulative.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return ratios.tolist()


@torch.no_grad()
def _lerp_into(averaged: Sequence[Tensor], current: Sequence[Tensor], weight: float) -> None:
    """``averaged[i] ← lerp(averaged[i], current[i], weight)`` in place; non-float tensors are copied."""
    avg_float: list[Tensor] = []
    cur_float: list[Tensor] = []
    for avg, cur in zip(averaged, current):
        if avg.is_floating_point() or avg.is_complex():
            if cur.dtype != avg.dtype or cur.device != avg.device:
                # non_blocking only host-to-device: a device-to-host copy could be read unfinished
                cur = cur.to(device=avg.device, dtype=avg.dtype, non_blocking=avg.device.type != "cpu")
            avg_float.append(avg)
            cur_float.append(cur)
        else:  # integer state (e.g. BatchNorm's num_batches_tracked) is not averaged
            avg.copy_(cur)
    if avg_float:
        torch._foreach_lerp_(avg_float, cur_float, weight)


def get_beta_multi_avg_fn(
    beta: float, total_steps: int
) -> Callable[[Sequence[Tensor], Sequence[Tensor], Tensor | int], None]:
    """A ``multi_avg_fn`` for :class:`torch.optim.swa_utils.AveragedModel` implementing BMA.

    ``AveragedModel`` copies the model on its first ``update_parameters`` call and then passes
    the number of models averaged so far, which is exactly the step index t of the incoming
    weights. So call ``update_parameters(model)`` once before the first optimizer step (θ_0) and
    once after each of the T steps::

        avg = AveragedModel(model, multi_avg_fn=get_beta_multi_avg_fn(0.5, total_steps))
        avg.update_parameters(model)          # θ_0, the pretrained weights
        for step in range(total_steps):
            ...; optimizer.step()
            avg.update_parameters(model)      # θ_1 .. θ_T

    ``AveragedModel`` hands the count over as a device tensor, so each call costs one host sync;
    :class:`BetaMovingAverage` avoids it and keeps the average in fp32.
    """
    _check_horizon(total_steps, beta)
    ratios = _lerp_ratios(beta_weights(total_steps, beta))

    def beta_update(averaged: Sequence[Tensor], current: Sequence[Tensor], num_averaged: Tensor | int) -> None:
        t = int(num_averaged)
        if t > total_steps:
            raise RuntimeError(
                f"BMA update for step {t} is past the horizon total_steps={total_steps}; "
                "the Beta weights are only defined for steps 0..T"
            )
        _lerp_into(averaged, current, ratios[t])

    return beta_update


#: Where an average keeps its tensors: ``"fp32"`` (at least float32, the default) or ``"param"``
#: (each parameter's own dtype, updated with the official expression; see the module docstring).
STORAGES = ("fp32", "param")


def check_storage(storage: str) -> str:
    """Validate an average's ``storage`` mode (shared with the integrations)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    return storage


@torch.no_grad()
def _official_update_into(averaged: Sequence[Tensor], current: Sequence[Tensor], relative_weight: float) -> None:
    """``avg ← (avg + r·θ) / (1 + r)`` per tensor, in the average's dtype, as the official code.

    The official ``GeneralMovingAverage.update`` evaluates this expression with a float64 Python
    scalar ``r``: a multiply, an add and a divide, each rounded to the tensor's dtype. We run the
    same three kernels one tensor at a time (a foreach divide, or a fused add, rounds differently
    on some devices), so an fp16 average is bitwise the official one.
    """
    for avg, cur in zip(averaged, current):
        if avg.is_floating_point() or avg.is_complex():
            if cur.dtype != avg.dtype or cur.device != avg.device:
                cur = cur.to(device=avg.device, dtype=avg.dtype)
            scaled = cur * relative_weight
            avg.add_(scaled)
            avg.div_(1.0 + relative_weight)
        else:
            avg.copy_(cur)


def _upcast_half(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor


def _check_optional_horizon(total_steps: int | None) -> None:
    check_total_steps(total_steps, optional=True)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


class _StepAverage(AveragedModel):
    """The update machinery every average here shares; a subclass supplies only ``w_t``.

    State: the averaged copy ``.module`` (floating-point tensors in at least float32 with
    ``storage="fp32"``, in the parameters' own dtypes with ``storage="param"``), the
    ``n_averaged`` buffer (models folded in, θ_0 included when ``include_init``) and a host mirror
    of it, ``_count``, so an update never waits on the device. An update with θ_t is
    ``avg ← lerp(avg, θ_t, w_t)`` over parameters (and buffers with ``use_buffers``), in one
    ``torch._foreach_lerp_`` (``storage="param"``: the official ``(avg + r·θ) / (1 + r)`` with
    ``r = w_t / (1 − w_t)``, see :meth:`_relative_weight`); buffers are otherwise copied from the
    model, as torch does.

    For a model sharded with FSDP2, ``.module`` is a hook-free copy whose parameters are DTensors
    with the model's mesh and placements (``self.sharded`` is True); the update runs on their
    local shards, and ``forward`` raises (use :meth:`swapped_into`).

    Subclasses set ``_kind`` (the tag in the saved extra state), ``_label`` (their name in error
    messages), ``_horizon_reason`` and ``_mismatch_reason`` (the second halves of those errors),
    and implement :meth:`_lerp_weight` and :meth:`_hparams`.
    """

    n_averaged: Tensor
    _kind: ClassVar[str]
    _label: ClassVar[str]
    _horizon_reason: ClassVar[str] = "the average was told the run has that many optimizer steps"
    _mismatch_reason: ClassVar[str] = "Resuming with other values would silently change the average"
    #: name → converter for each hyperparameter saved as extra state (also fixes their order).
    _hparam_types: ClassVar[dict[str, Callable[[Any], Any]]]

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int | None,
        device: int | str | torch.device | None,
        use_buffers: bool,
        include_init: bool,
        storage: str = "fp32",
        multi_avg_fn: Callable[[Sequence[Tensor], Sequence[Tensor], Tensor | int], None] | None = None,
    ) -> None:
        self.storage = check_storage(storage)
        model = unwrap_model(model)
        check_supported(model)
        reshard_all(model)  # parameters FSDP left gathered would be copied as full tensors
        #: the model is sharded (FSDP2): ``.module`` holds DTensors with the model's mesh and placements
        self.sharded = is_sharded(model)
        if self.sharded:  # FSDP forbids deepcopy; AveragedModel gets a stand-in, the copy is ours
            super().__init__(nn.Module(), device=device, multi_avg_fn=multi_avg_fn, use_buffers=use_buffers)
            self.module = shard_copy(model) if device is None else shard_copy(model).to(device)
        else:
            super().__init__(model, device=device, multi_avg_fn=multi_avg_fn, use_buffers=use_buffers)
        if self.storage == "fp32":
            self.module._apply(_upcast_half)
        self.module.requires_grad_(False)
        self.total_steps = total_steps
        self.include_init = include_init
        self._count = 1 if include_init else 0
        self.n_averaged.fill_(self._count)
        self._checked_model: int | None = None

    # -- what a subclass supplies --------------------------------------------------------------

    def _lerp_weight(self, step: int) -> float:
        """``w_t`` for folding in θ_t, t = ``step`` (1-based); ``self._count`` models are in so far."""
        raise NotImplementedError

    def _hparams(self) -> dict[str, Any]:
        """The hyperparameters that fix the weights, in ``_hparam_types`` order."""
        raise NotImplementedError

    def _relative_weight(self, step: int) -> float | None:
        """``r_t`` of the official form ``(avg + r·θ_t) / (1 + r)``; ``None`` means a plain copy.

        The generic ``w / (1 − w)`` is the same update as ``lerp(avg, θ, w)``; a subclass whose
        official rule computes ``r`` directly (BMA: ``α_t / W_{t−1}``) overrides this so the float64
        scalar is bitwise the official one.
        """
        weight = self._lerp_weight(step)
        return None if weight >= 1.0 else weight / (1.0 - weight)

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps folded in so far (0 right after construction)."""
        return self._count - 1 if self.include_init else self._count

    # -- updates -------------------------------------------------------------------------------

    def _tensors(self, module: nn.Module) -> list[Tensor]:
        tensors = list(module.parameters())
        if self.use_buffers:
            tensors.extend(module.buffers())
        return tensors

    def _check_same_structure(self, model: nn.Module) -> None:
        """Name-by-name check, once per source model: the update itself zips by position."""
        mine = [(n, p.shape) for n, p in self.module.named_parameters()]
        theirs = [(n, p.shape) for n, p in model.named_parameters()]
        if self.use_buffers:
            mine += [(n, b.shape) for n, b in self.module.named_buffers()]
            theirs += [(n, b.shape) for n, b in model.named_buffers()]
        if len(mine) != len(theirs):
            raise ValueError(
                f"model has {len(theirs)} tensors to average, the average has {len(mine)}: "
                "pass the same module (e.g. the image tower) that the average was built from"
            )
        for (name_a, shape_a), (name_b, shape_b) in zip(mine, theirs):
            if name_a != name_b or shape_a != shape_b:
                raise ValueError(
                    f"model tensor {name_b!r} {tuple(shape_b)} does not match averaged tensor "
                    f"{name_a!r} {tuple(shape_a)}"
                )
        if self.sharded or is_sharded(model):  # same names and shapes: now the same layout of shards
            names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
            check_same_sharding(names, self._all_tensors(self.module), self._all_tensors(model))
        self._checked_model = id(model)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Fold the model's current weights in as the next step θ_t (call after optimizer.step())."""
        model = unwrap_model(model)
        step = self.steps + 1
        if self.total_steps is not None and step > self.total_steps:
            raise RuntimeError(
                f"{type(self).__name__} got update {step} but its horizon is total_steps={self.total_steps}; "
                f"{self._horizon_reason}"
            )
        if self._checked_model != id(model):
            self._check_same_structure(model)
        averaged, current = self._tensors(self.module), self._tensors(model)
        if self.sharded or (current and is_dtensor(current[0])):  # sharded in place after the check
            averaged, current = self._local_shards(model, self._tensors)
        if self.storage == "fp32":
            _lerp_into(averaged, current, self._lerp_weight(step))
        else:
            relative = self._relative_weight(step)
            if relative is None:
                _lerp_into(averaged, current, 1.0)
            else:
                _official_update_into(averaged, current, relative)
        if not self.use_buffers:
            for averaged, current in zip(self.module.buffers(), model.buffers()):
                averaged.copy_(current.to(averaged.device))
        self._count += 1
        self.n_averaged.add_(1)

    def _all_tensors(self, module: nn.Module) -> list[Tensor]:
        return [*module.parameters(), *module.buffers()]

    def _local_shards(
        self, model: nn.Module, tensors: Callable[[nn.Module], list[Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The local shards the update runs on, after checking the model is still sharded as the average.

        The full layout check runs once per model; this per-update one only asks "DTensor or not".
        A model whose parameters FSDP left gathered (a no-grad forward with
        ``reshard_after_forward=False``) is resharded first; what still differs is an average built
        before ``fully_shard``, and raises.
        """
        averaged = tensors(self.module)
        views = paired_local_views(averaged, tensors(model))
        if views is None:
            reshard_all(model)
            views = paired_local_views(averaged, tensors(model))
        if views is None:
            self._checked_model = None
            self._check_same_structure(model)  # raises, naming the first tensor that differs
            raise AssertionError("unreachable: the layout check found no difference")  # pragma: no cover
        return views

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.sharded:
            raise RuntimeError(
                f"a sharded {type(self).__name__} holds only this rank's shards and cannot run forward itself; "
                "evaluate it in the sharded model: `with average.swapped_into(model): model(x)`"
            )
        return super().forward(*args, **kwargs)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run ``model`` with the averaged weights inside the ``with`` block; its own come back after.

        The way to evaluate a sharded average without gathering the model on one rank: FSDP's
        forward all-gathers whatever the local shards hold, so copying the average's shards into
        the model's (parameters and buffers, no communication) makes ``model(x)`` the averaged
        model. It costs one copy of the local shards as backup. Works for unsharded models too,
        e.g. to evaluate in a DDP or compiled model. Averaged values are cast to the model's
        dtypes (an fp32 average in a bf16 model is rounded to bf16 while swapped in).

        The trap: a root module with ``reshard_after_forward=False`` keeps its gathered parameters
        after a no-grad forward, so a swap would be invisible to it, and a swap back would leave
        averaged weights in it. Every FSDP module is therefore resharded on entry and on exit.
        """
        model = unwrap_model(model)
        reshard_all(model)
        self._check_same_structure(model)
        averaged, current = self._local_shards(model, self._all_tensors)
        with torch.no_grad():
            backup = [t.clone() for t in current]
            for cur, avg in zip(current, averaged):
                cur.copy_(avg)
        try:
            yield model
        finally:
            with torch.no_grad():
                reshard_all(model)
                for cur, saved in zip(current, backup):
                    cur.copy_(saved)

    def full_state_dict(self, *, rank0_only: bool = True) -> dict[str, Tensor]:
        """The averaged weights as full CPU tensors, keyed as the bare model (timm's ``state_dict_ema``).

        What loads into an unsharded model and what a ``safetensors`` file should hold. For a
        sharded average it is a collective: every rank must call it. Tensors are gathered one at
        a time (``DTensor.full_tensor``) and moved to the CPU, so device memory peaks near one
        full parameter. With ``rank0_only`` (default) the other ranks get ``{}``.
        """
        keep = not rank0_only or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        out: dict[str, Tensor] = {}
        for key, value in self.module.state_dict().items():
            full = value.full_tensor() if is_dtensor(value) else value.detach().clone()
            if keep:
                out[key] = full.cpu()
            del full
        return out

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """timm ``ModelEmaV3``-style alias of :meth:`update_parameters`.

        ``step`` (timm's ``num_updates``: 1 after the first optimizer step) is checked against
        the average's own count, so a skipped or doubled update is an error, not a silent skew.
        """
        if step is not None and step != self.steps + 1:
            raise ValueError(
                f"{type(self).__name__}.update(step={step}) but the average has folded in {self.steps} "
                f"steps, so the next is {self.steps + 1}: update once per optimizer step"
            )
        self.update_parameters(model)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Restart the average from ``model`` (timm ``set`` semantics): it becomes the new θ_0."""
        model = unwrap_model(model)
        self._check_same_structure(model)
        averaged = local_views(list(self.module.state_dict().values()))
        for avg, cur in zip(averaged, local_views(list(model.state_dict().values()))):
            avg.copy_(cur.to(device=avg.device, dtype=avg.dtype))
        self._count = 1 if self.include_init else 0
        self.n_averaged.fill_(self._count)

    # -- state ---------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": _FORMAT_VERSION, "kind": self._kind, **self._hparams(), "storage": self.storage}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("kind") != self._kind:
            raise ValueError(f"not a {type(self).__name__} state (extra state {state!r})")
        if int(state.get("format", _FORMAT_VERSION)) > _FORMAT_VERSION:
            raise ValueError(
                f"{self._label} checkpoint has extra-state format {state['format']}; this clipood_plugin "
                f"reads format {_FORMAT_VERSION} and older"
            )
        missing = [name for name in self._hparam_types if name not in state]
        if missing:
            raise ValueError(f"{self._label} checkpoint extra state lacks {missing} (extra state {state!r})")
        saved = {name: convert(state[name]) for name, convert in self._hparam_types.items()}
        mine = self._hparams()
        # the storage mode changes the average's arithmetic; states saved before it existed are fp32
        saved["storage"], mine["storage"] = str(state.get("storage", "fp32")), self.storage
        if saved != mine:
            raise ValueError(
                f"{self._label} checkpoint was made with {_describe(saved)}; this average has {_describe(mine)}. "
                f"{self._mismatch_reason}"
            )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` plus the step count and horizon check.

        A sharded average also loads a full (unsharded) state, e.g. an unsharded run's
        checkpoint: each rank keeps its own slice of every full tensor, with no communication.
        """
        if self.sharded:
            state_dict = shard_like(state_dict, self.state_dict())
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._count = int(self.n_averaged)
        if self._count < 0 or (self.total_steps is not None and self.steps > self.total_steps):
            raise ValueError(f"loaded n_averaged={self._count} does not fit total_steps={self.total_steps}")
        self._checked_model = None
        return result


def _official_relative_weights(weights: Sequence[float]) -> list[float | None]:
    """The official ``r_t = α_t / W_{t−1}`` for t = 1..T (index 0 unused), W summed as it does.

    ``GeneralMovingAverage`` keeps ``weight_sum`` as a float64 that starts at α_0 and grows by
    ``+= α_t`` after each update; the same sequential sum here gives the same scalars. ``None``
    where nothing is in the average yet (α_0 = 0 without θ_0): that update is a copy.
    """
    relative: list[float | None] = [None]
    weight_sum = weights[0]
    for alpha in weights[1:]:
        relative.append(alpha / weight_sum if weight_sum > 0 else None)
        weight_sum += alpha
    return relative


def _describe(hparams: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in hparams.items())


class BetaMovingAverage(_StepAverage):
    """Beta Moving Average of a model's weights over a fine-tuning run (CLIPood Eq. 5–7).

    A :class:`torch.optim.swa_utils.AveragedModel`: ``.module`` holds the averaged copy,
    ``n_averaged`` counts the models averaged, ``forward`` runs the average, and
    ``torch.optim.swa_utils.update_bn(loader, bma)`` works as usual. It averages any
    ``nn.Module``, not only CLIP towers.

    Args:
        model: the model being fine-tuned, *before* its first optimizer step. DDP / DataParallel
            (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers are seen through. Pass
            only what trains (CLIPood averages the image tower), not the whole CLIP model. An
            FSDP2-sharded model gives a sharded average (build it after ``fully_shard``).
        total_steps: T, the number of optimizer steps the run will take. It fixes the weights, so
            it must be known up front (from epochs × steps per epoch).
        beta: β of the symmetric Beta(β, β) weighting (0.5 default; 1 = uniform including θ_0,
            the same average as :class:`UniformAverage` with ``include_init=True``).
        device: where to keep the average (``"cpu"`` keeps it off the GPU, at the price of a
            device-to-host copy per update).
        use_buffers: average buffers too (else copy them from the model each update, as torch).
        include_init: record the model passed here as θ_0 with weight α_0, as the paper does.
            With False the first ``update_parameters`` call records θ_1 and θ_0 is left out.
        storage: ``"fp32"`` (default): floating-point weights are averaged in at least float32,
            so a bf16/fp16 model gets an fp32 average. ``"param"``: the official code's average,
            kept in each parameter's own dtype and updated as ``(avg + r·θ_t) / (1 + r)`` with the
            float64 ``r = α_t / W_{t−1}``, bitwise the official ``GeneralMovingAverage`` (its fp16
            rounding included; use it to reproduce the paper, not to fine-tune well).

    Call :meth:`update_parameters` (or its timm-style alias :meth:`update`) once after every
    optimizer step, t = 1..T. A call past T raises.

    ``state_dict()`` holds the averaged weights, ``n_averaged`` and, as extra state, β, T,
    ``include_init`` and ``storage``; loading into an average built with other values raises.
    """

    _kind = "beta"
    _label = "BMA"
    _horizon_reason = (
        "T must equal the number of optimizer steps of the run (the Beta weights are only "
        "defined for steps 0..T)"
    )
    _mismatch_reason = (
        "The Beta weights depend on both, so resuming with other values would silently change the average"
    )
    _hparam_types: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "beta": float,
        "total_steps": int,
        "include_init": bool,
    }
    total_steps: int

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        beta: float = DEFAULT_BETA,
        device: int | str | torch.device | None = None,
        use_buffers: bool = False,
        include_init: bool = True,
        storage: str = "fp32",
    ) -> None:
        _check_horizon(total_steps, beta)
        super().__init__(
            model,
            total_steps=total_steps,
            device=device,
            use_buffers=use_buffers,
            include_init=include_init,
            storage=storage,
            multi_avg_fn=get_beta_multi_avg_fn(beta, total_steps),
        )
        self.beta = float(beta)
        weights = self.weights
        self._ratios = _lerp_ratios(weights)
        self._relative = _official_relative_weights(weights.tolist())

    @property
    def weights(self) -> Tensor:
        """The float64 α_t for t = 0..T this average uses (α_0 = 0 when ``include_init=False``)."""
        weights = beta_weights(self.total_steps, self.beta)
        if not self.include_init:
            weights[0] = 0.0
        return weights

    def extra_repr(self) -> str:
        return f"beta={self.beta}, total_steps={self.total_steps}, steps={self.steps}, include_init={self.include_init}"

    def _lerp_weight(self, step: int) -> float:
        # α_t / W_t; with include_init=False α_0 = 0, so step 1 gets 1 (a copy)
        return self._ratios[step]

    def _relative_weight(self, step: int) -> float | None:
        return self._relative[step]

    def _hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "total_steps": self.total_steps, "include_init": self.include_init}


class UniformAverage(_StepAverage):
    """Equal-weight average of the weights over a run: SWA's running mean, θ_0 optionally included.

    ``θ_avg = (1/n) Σ θ_t`` over the models folded in, updated as ``lerp(avg, θ_t, 1/n_t)`` where
    ``n_t`` counts the models in the average once θ_t is in. With ``include_init=True`` (default)
    the model passed here is θ_0 and counts like every later step, so after T steps this is the
    same average as ``BetaMovingAverage(beta=1)`` (whose Beta(1, 1) weights are all equal), without
    having to know T. With ``include_init=False`` it is the mean of θ_1..θ_T, which is what
    ``AveragedModel``'s default rule gives when updated after each step.

    Args:
        model: the model being fine-tuned, before its first optimizer step (wrappers seen
            through, as :class:`BetaMovingAverage`).
        total_steps: optional horizon; when given, an update past it raises (a guard for loops
            that must not overrun a planned run). ``None``: no horizon.
        device, use_buffers, include_init, storage: as :class:`BetaMovingAverage`.

    Same conveniences as :class:`BetaMovingAverage`: ``update(model, step=None)``, ``set(model)``,
    an fp32 average for half-precision models, and a resumable ``state_dict()`` (``total_steps``
    and ``include_init`` saved as extra state and checked on load).
    """

    _kind = "uniform"
    _label = "UniformAverage"
    _mismatch_reason = "Resuming with other values would silently change which models the mean counts"
    _hparam_types: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "total_steps": _optional_int,
        "include_init": bool,
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int | None = None,
        device: int | str | torch.device | None = None,
        use_buffers: bool = False,
        include_init: bool = True,
        storage: str = "fp32",
    ) -> None:
        _check_optional_horizon(total_steps)
        super().__init__(
            model,
            total_steps=total_steps,
            device=device,
            use_buffers=use_buffers,
            include_init=include_init,
            storage=storage,
        )

    def extra_repr(self) -> str:
        return f"total_steps={self.total_steps}, steps={self.steps}, include_init={self.include_init}"

    def _lerp_weight(self, step: int) -> float:
        return 1.0 / (self._count + 1)

    def _hparams(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "include_init": self.include_init}


class ExponentialMovingAverage(_StepAverage):
    """Exponential moving average of the weights, with timm ``ModelEmaV3``'s optional decay warm-up.

    Each update folds θ_t in as ``avg ← decay_t · avg + (1 − decay_t) · θ_t``. Without warm-up
    ``decay_t = decay``. With ``warmup=True`` the decay grows with the number ``n`` of models already
    in the average::

        decay_t = 1 − (1 + n / warmup_gamma) ** (−warmup_power),   clamped to [min_decay, decay]

    so early steps move the average fast and the decay approaches ``decay`` later (with the default
    power 2/3 it reaches 0.999 after about 31.6k steps; 3/4 gets there after about 10k). This is
    the schedule of timm's ``ModelEmaV3`` and diffusers' ``EMAModel``.

    ``n`` is counted the way the models actually are: with ``include_init=True`` (default) θ_0 is
    in the average from the start, so the update at step t uses ``n = t``. With
    ``include_init=False`` the first update copies θ_1 (there is nothing to average with) and step
    t uses ``n = t − 1``; the decays are then exactly those of ``ModelEmaV3.update(model,
    step=t)``, which also starts by copying.

    Args:
        model: the model being fine-tuned, before its first optimizer step (wrappers seen
            through, as :class:`BetaMovingAverage`).
        decay: the (final) decay, in [0, 1]. Default 0.9999, timm's.
        warmup: use the warm-up schedule above.
        warmup_gamma, warmup_power: γ > 0 and p > 0 of the schedule.
        min_decay: lower clamp of the warm-up decay, in [0, decay].
        total_steps: optional horizon (an update past it raises); ``None`` (default): none.
        device, use_buffers, include_init, storage: as :class:`BetaMovingAverage`.

    Same conveniences as :class:`BetaMovingAverage`: ``update(model, step=None)`` (``step`` is
    checked against the average's own count, not used to look the decay up, so a resumed average
    continues its schedule where it stopped), ``set(model)``, an fp32 average for half-precision
    models, and a resumable ``state_dict()`` with the hyperparameters as extra state.
    """

    _kind = "ema"
    _label = "EMA"
    _mismatch_reason = "The decays depend on them, so resuming with other values would silently change the average"
    _hparam_types: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "decay": float,
        "warmup": bool,
        "warmup_gamma": float,
        "warmup_power": float,
        "min_decay": float,
        "total_steps": _optional_int,
        "include_init": bool,
    }

    def __init__(
        self,
        model: nn.Module,
        decay: float = DEFAULT_EMA_DECAY,
        *,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        total_steps: int | None = None,
        device: int | str | torch.device | None = None,
        use_buffers: bool = False,
        include_init: bool = True,
        storage: str = "fp32",
    ) -> None:
        for name, value in (("decay", decay), ("min_decay", min_decay)):
            if not (_is_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if min_decay > decay:
            raise ValueError(f"min_decay={min_decay} is larger than decay={decay}; it must be in [0, decay]")
        for name, value in (("warmup_gamma", warmup_gamma), ("warmup_power", warmup_power)):
            if not (_is_real(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup must be a bool, got {type(warmup).__name__}")
        _check_optional_horizon(total_steps)
        super().__init__(
            model,
            total_steps=total_steps,
            device=device,
            use_buffers=use_buffers,
            include_init=include_init,
            storage=storage,
        )
        self.decay = float(decay)
        self.warmup = warmup
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.min_decay = float(min_decay)

    def get_decay(self, step: int) -> float:
        """The decay ``decay_t`` the update at optimizer step ``step`` (1-based) uses; 0 means a copy."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be a positive int (1 = the first optimizer step), got {step!r}")
        already_in = step if self.include_init else step - 1
        if already_in <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        decay = 1.0 - (1.0 + already_in / self.warmup_gamma) ** (-self.warmup_power)
        return max(self.min_decay, min(decay, self.decay))

    def extra_repr(self) -> str:
        warm = (
            f", warmup_gamma={self.warmup_gamma}, warmup_power={self.warmup_power:.4g}, min_decay={self.min_decay}"
            if self.warmup
            else ""
        )
        return f"decay={self.decay}, warmup={self.warmup}{warm}, steps={self.steps}, include_init={self.include_init}"

    def _lerp_weight(self, step: int) -> float:
        return 1.0 - self.get_decay(step)

    def _hparams(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_gamma": self.warmup_gamma,
            "warmup_power": self.warmup_power,
            "min_decay": self.min_decay,
            "total_steps": self.total_steps,
            "include_init": self.include_init,
        }


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
