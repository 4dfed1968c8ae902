"""Weight averages over a fine-tuning trajectory: Beta Moving Average (CLIPood Eq. 5–7).

BMA keeps ``θ_BMA = Σ_t α_t θ_t / Σ_t α_t`` over t = 0..T, where θ_0 is the pretrained model,
θ_t the weights after optimizer step t, and ``α_t = BetaPDF(β, β)((t + 0.5) / (T + 1))``. With
β < 1 the weights are U-shaped: both the zero-shot start and the end of fine-tuning count most,
which is what keeps the average robust out of distribution (β = 0.5 by default; β = 1 is the
uniform average including θ_0).

The incremental form used by the official code, ``avg ← (avg + r·θ_t) / (1 + r)`` with
``r = α_t / W_{t-1}`` and ``W_t = Σ_{s≤t} α_s``, is the same as ``lerp(avg, θ_t, α_t / W_t)``, so
one ``torch._foreach_lerp_`` per step updates the whole model at memory-bandwidth speed.

Where we differ from the official code, on purpose:

- The average is kept in float32 even when the model trains in bf16/fp16. The official code
  stores and updates it in the parameters' fp16 and loses about 10–20 % of the average's
  movement away from θ_0 to rounding (method_reference §3.2).
- Stepping past the horizon T raises. The official rule would silently freeze (the Beta pdf is 0
  beyond x = 1).
- β, T and the step count are saved in ``state_dict()``, so a run resumes exactly; the official
  average cannot resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from clipood_plugin._wrappers import unwrap_model

__all__ = [
    "DEFAULT_BETA",
    "BetaMovingAverage",
    "beta_weights",
    "get_beta_multi_avg_fn",
]

#: β = 0.5 (paper §3.3, "by default β = 0.5"; official `--beta`). The official scripts use 0.1
#: for the open-class setting and for in-the-wild OfficeHome (method_reference §5).
DEFAULT_BETA = 0.5

_FORMAT_VERSION = 1


def _check_horizon(total_steps: int, beta: float) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int (the number of optimizer steps), got {total_steps!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")


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


def _upcast_half(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor


class BetaMovingAverage(AveragedModel):
    """Beta Moving Average of a model's weights over a fine-tuning run (CLIPood Eq. 5–7).

    A :class:`torch.optim.swa_utils.AveragedModel`: ``.module`` holds the averaged copy,
    ``n_averaged`` counts the models averaged, ``forward`` runs the average, and
    ``torch.optim.swa_utils.update_bn(loader, bma)`` works as usual. It averages any
    ``nn.Module``, not only CLIP towers.

    Args:
        model: the model being fine-tuned, *before* its first optimizer step. DDP / DataParallel
            (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers are seen through. Pass
            only what trains (CLIPood averages the image tower), not the whole CLIP model.
        total_steps: T, the number of optimizer steps the run will take. It fixes the weights, so
            it must be known up front (from epochs × steps per epoch).
        beta: β of the symmetric Beta(β, β) weighting (0.5 default; 1 = uniform including θ_0).
        device: where to keep the average (``"cpu"`` keeps it off the GPU, at the price of a
            device-to-host copy per update).
        use_buffers: average buffers too (else copy them from the model each update, as torch).
        include_init: record the model passed here as θ_0 with weight α_0, as the paper does.
            With False the first ``update_parameters`` call records θ_1 and θ_0 is left out.

    Call :meth:`update_parameters` (or its timm-style alias :meth:`update`) once after every
    optimizer step, t = 1..T. A call past T raises. Floating-point weights are averaged in at
    least float32: a bf16/fp16 model gets an fp32 average.

    ``state_dict()`` holds the averaged weights, ``n_averaged`` and, as extra state, β, T and
    ``include_init``; loading into an average built with another β or T raises.
    """

    n_averaged: Tensor

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        beta: float = DEFAULT_BETA,
        device: int | str | torch.device | None = None,
        use_buffers: bool = False,
        include_init: bool = True,
    ) -> None:
        _check_horizon(total_steps, beta)
        model = unwrap_model(model)
        super().__init__(model, device=device, multi_avg_fn=get_beta_multi_avg_fn(beta, total_steps),
                         use_buffers=use_buffers)
        self.module._apply(_upcast_half)
        self.module.requires_grad_(False)
        self.beta = float(beta)
        self.total_steps = total_steps
        self.include_init = include_init
        weights = beta_weights(total_steps, beta)
        if not include_init:
            weights[0] = 0.0
        self._ratios = _lerp_ratios(weights)
        # Mirror of n_averaged kept on the host, so an update never waits on the device.
        self._count = 1 if include_init else 0
        self.n_averaged.fill_(self._count)
        self._checked_model: int | None = None

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps folded in so far (0 right after construction)."""
        return self._count - 1 if self.include_init else self._count

    @property
    def weights(self) -> Tensor:
        """The float64 α_t for t = 0..T this average uses (α_0 = 0 when ``include_init=False``)."""
        weights = beta_weights(self.total_steps, self.beta)
        if not self.include_init:
            weights[0] = 0.0
        return weights

    def extra_repr(self) -> str:
        return f"beta={self.beta}, total_steps={self.total_steps}, steps={self.steps}, include_init={self.include_init}"

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
        self._checked_model = id(model)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Fold the model's current weights in as the next step θ_t (call after optimizer.step())."""
        model = unwrap_model(model)
        step = self.steps + 1
        if step > self.total_steps:
            raise RuntimeError(
                f"BetaMovingAverage got update {step} but its horizon is total_steps={self.total_steps}; "
                "T must equal the number of optimizer steps of the run (the Beta weights are only "
                "defined for steps 0..T)"
            )
        if self._checked_model != id(model):
            self._check_same_structure(model)
        index = self._count if self.include_init else step
        _lerp_into(self._tensors(self.module), self._tensors(model), self._ratios[index])
        if not self.use_buffers:
            for averaged, current in zip(self.module.buffers(), model.buffers()):
                averaged.copy_(current.to(averaged.device))
        self._count += 1
        self.n_averaged.add_(1)

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """timm ``ModelEmaV3``-style alias of :meth:`update_parameters`.

        ``step`` (timm's ``num_updates``: 1 after the first optimizer step) is checked against
        the average's own count, so a skipped or doubled update is an error, not a silent skew.
        """
        if step is not None and step != self.steps + 1:
            raise ValueError(
                f"BetaMovingAverage.update(step={step}) but the average has folded in {self.steps} "
                f"steps, so the next is {self.steps + 1}: update once per optimizer step"
            )
        self.update_parameters(model)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Restart the average from ``model`` (timm ``set`` semantics): it becomes the new θ_0."""
        model = unwrap_model(model)
        self._check_same_structure(model)
        for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            averaged.copy_(current.to(device=averaged.device, dtype=averaged.dtype))
        self._count = 1 if self.include_init else 0
        self.n_averaged.fill_(self._count)

    # -- state ---------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "format": _FORMAT_VERSION,
            "kind": "beta",
            "beta": self.beta,
            "total_steps": self.total_steps,
            "include_init": self.include_init,
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("kind") != "beta":
            raise ValueError(f"not a BetaMovingAverage state (extra state {state!r})")
        saved = (float(state["beta"]), int(state["total_steps"]), bool(state["include_init"]))
        mine = (self.beta, self.total_steps, self.include_init)
        if saved != mine:
            raise ValueError(
                "BMA checkpoint was made with beta={}, total_steps={}, include_init={}; this average has "
                "beta={}, total_steps={}, include_init={}. The Beta weights depend on both, so resuming "
                "with other values would silently change the average".format(*saved, *mine)
            )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._count = int(self.n_averaged)
        if self.steps > self.total_steps or self._count < 0:
            raise ValueError(f"loaded n_averaged={self._count} does not fit total_steps={self.total_steps}")
        self._checked_model = None
        return result
