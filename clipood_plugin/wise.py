"""Weight-space ensembling of a zero-shot and a fine-tuned model (WiSE-FT, Wortsman et al., CVPR 2022).

WiSE-FT evaluates the straight line between the two weight vectors::

    θ(α) = (1 − α) · θ_zero-shot + α · θ_fine-tuned

α = 0 is the zero-shot model, α = 1 the fine-tuned one; intermediate α usually keep most of the
fine-tuned in-distribution accuracy and recover much of the zero-shot robustness. It is the
standard post-hoc baseline next to CLIPood's BMA (an average *along* the trajectory) and the
companion the CAR-FT paper combines with its regulariser (docs/official_code.md §8.2).

This module holds the interpolation and an α-sweep helper; loading and evaluating a model stays
with the caller (``evaluate`` below), so nothing here knows about datasets.

Both endpoints are reproduced bit for bit (α = 0 returns the zero-shot tensors, α = 1 the
fine-tuned ones), so the sweep's end rows are exactly the two models it starts from.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clipood_plugin._wrappers import strip_wrapper_prefixes, unwrap_model

__all__ = ["interpolate_weights", "load_interpolated", "wise_sweep"]

StateLike = Mapping[str, Any] | nn.Module
#: Keys listed in a key-mismatch error before the rest is counted.
_MAX_KEYS_SHOWN = 10


def interpolate_weights(
    zero_shot_state: StateLike,
    finetuned_state: StateLike,
    alpha: float,
    *,
    allow_extrapolation: bool = False,
) -> dict[str, Tensor]:
    """WiSE-FT interpolation ``(1 − α) · θ_zs + α · θ_ft`` of two state dicts, key by key.

    Args:
        zero_shot_state: the zero-shot (pretrained) weights: a state dict, or a module whose
            ``state_dict()`` is used. ``module.`` (DDP / DataParallel) and ``_orig_mod.``
            (``torch.compile``) key prefixes are stripped from both sides.
        finetuned_state: the fine-tuned weights, same keys and shapes.
        alpha: the mixing coefficient; must be in [0, 1] unless ``allow_extrapolation``
            (α > 1 goes past the fine-tuned model, α < 0 behind the zero-shot one).

    Returns a new dict with the bare keys in the fine-tuned state's order; every tensor is a new
    tensor with the fine-tuned tensor's dtype and device:

    - floating-point (and complex) tensors are interpolated in at least float32 (float64 stays
      float64) and cast back to the fine-tuned dtype, so a bf16 fine-tune mixed with an fp32
      zero-shot model gives bf16 weights that ``load_state_dict`` takes as they are;
    - α = 0 gives the zero-shot tensor and α = 1 the fine-tuned tensor exactly (no arithmetic
      runs; only the cast to the fine-tuned dtype when the two dtypes differ);
    - integer and bool tensors (``num_batches_tracked``, index buffers) and non-tensor entries
      (e.g. ``_extra_state``) cannot be mixed: they are the zero-shot state's at α = 0 and the
      fine-tuned state's at every other α, so both endpoints are whole states, bit for bit.

    Raises ``ValueError`` when the key sets differ (naming the keys only on either side), when a
    shape differs (naming the key), or for α outside [0, 1] without ``allow_extrapolation``;
    ``TypeError`` for a non-numeric α or a non-mapping state.
    """
    a = _check_alpha(alpha, allow_extrapolation)
    zs, ft = _matched_states(zero_shot_state, finetuned_state)
    return _interpolate(zs, ft, a)


def wise_sweep(
    zero_shot_state: StateLike,
    finetuned_state: StateLike,
    alphas: Iterable[float],
    evaluate: Callable[[dict[str, Tensor]], Mapping[str, float]],
    *,
    allow_extrapolation: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate the WiSE-FT interpolation at each α; return one row ``{"alpha": α, **metrics}`` per α.

    ``evaluate(state_dict)`` receives the interpolated state dict (bare keys, see
    :func:`interpolate_weights`) and returns a mapping of metric names to numbers, typically by
    loading it into a model and running the evaluation sets::

        def evaluate(state):
            model.load_state_dict(state)
            return {"id_acc": accuracy(model, id_loader), "ood_acc": accuracy(model, ood_loader)}

        rows = wise_sweep(zs_state, ft_state, [0.0, 0.25, 0.5, 0.75, 1.0], evaluate)

    Rows come back in the order of ``alphas``. Keys and shapes are matched and every α is
    validated before the first evaluation, so a bad input fails before any time is spent. Only
    one interpolated state is alive at a time. ``progress`` shows a rich progress bar.
    """
    values = [_check_alpha(alpha, allow_extrapolation) for alpha in alphas]
    if not values:
        raise ValueError("alphas is empty: give at least one mixing coefficient")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable (state_dict -> metrics), got {type(evaluate).__name__}")
    zs, ft = _matched_states(zero_shot_state, finetuned_state)
    rows: list[dict[str, Any]] = []
    with _progress(progress, len(values)) as advance:
        for a in values:
            metrics = evaluate(_interpolate(zs, ft, a))
            if not isinstance(metrics, Mapping):
                raise TypeError(
                    f"evaluate must return a mapping of metric names to values, got {type(metrics).__name__} "
                    f"at alpha={a}"
                )
            if "alpha" in metrics:
                raise ValueError("evaluate returned a metric named 'alpha', which would hide the row's alpha")
            rows.append({"alpha": a, **metrics})
            advance()
    return rows


def load_interpolated(
    model: nn.Module,
    zero_shot_state: StateLike,
    finetuned_state: StateLike,
    alpha: float,
    *,
    strict: bool = True,
    allow_extrapolation: bool = False,
) -> nn.Module:
    """Load ``(1 − α) · θ_zs + α · θ_ft`` into ``model`` (wrappers seen through); return ``model``.

    ``strict`` is passed to ``load_state_dict``. The weights are copied into the model's existing
    tensors, so they keep the model's dtype and device.
    """
    state = interpolate_weights(
        zero_shot_state, finetuned_state, alpha, allow_extrapolation=allow_extrapolation
    )
    unwrap_model(model).load_state_dict(state, strict=strict)
    return model


# -- internals -----------------------------------------------------------------------------------


def _check_alpha(alpha: Any, allow_extrapolation: bool) -> float:
    if isinstance(alpha, Tensor) and alpha.numel() == 1 and not alpha.dtype.is_complex:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__} {alpha!r}")
    value = float(alpha)
    if not math.isfinite(value):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if not allow_extrapolation and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha={alpha!r} is outside [0, 1] (0 = zero-shot, 1 = fine-tuned); "
            "pass allow_extrapolation=True to extrapolate"
        )
    return value


def _as_state(state: StateLike, name: str) -> dict[str, Any]:
    if isinstance(state, nn.Module):
        state = unwrap_model(state).state_dict()
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{name} must be a state dict (a mapping of names to tensors) or an nn.Module, "
            f"got {type(state).__name__}"
        )
    return strip_wrapper_prefixes(state)


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return f"[{shown}{f', … and {more} more' if more > 0 else ''}]"


def _matched_states(
    zero_shot_state: StateLike, finetuned_state: StateLike
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bare-key state dicts with the same keys and, for tensors, the same shapes (else ValueError)."""
    zs = _as_state(zero_shot_state, "zero_shot_state")
    ft = _as_state(finetuned_state, "finetuned_state")
    only_zs = [k for k in zs if k not in ft]
    only_ft = [k for k in ft if k not in zs]
    if only_zs or only_ft:
        parts = []
        if only_zs:
            parts.append(f"missing from finetuned_state: {_listed(only_zs)}")
        if only_ft:
            parts.append(f"extra in finetuned_state (missing from zero_shot_state): {_listed(only_ft)}")
        raise ValueError("zero-shot and fine-tuned state dicts have different keys; " + "; ".join(parts))
    bad = [
        f"{k!r}: zero-shot {tuple(zs[k].shape)} vs fine-tuned {tuple(v.shape)}"
        for k, v in ft.items()
        if isinstance(v, Tensor) and isinstance(zs[k], Tensor) and zs[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"shape mismatch for {len(bad)} key(s): " + "; ".join(bad[:_MAX_KEYS_SHOWN]))
    for k, v in ft.items():
        if isinstance(v, Tensor) != isinstance(zs[k], Tensor):
            raise ValueError(f"key {k!r} is a tensor on one side only")
    return zs, ft


@torch.no_grad()
def _interpolate(zs: Mapping[str, Any], ft: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, theta_ft in ft.items():
        if not isinstance(theta_ft, Tensor):
            out[key] = zs[key] if alpha == 0.0 else theta_ft
            continue
        theta_ft = theta_ft.detach()
        if not (theta_ft.is_floating_point() or theta_ft.is_complex()):
            # not interpolable: the zero-shot entry at α = 0 (the trap: taking the fine-tuned
            # one there made α = 0 differ from the zero-shot model in num_batches_tracked)
            source = zs[key].detach() if alpha == 0.0 else theta_ft
            out[key] = source.to(device=theta_ft.device, dtype=theta_ft.dtype, copy=True)
            continue
        theta_zs = zs[key].detach()
        if alpha == 1.0:
            out[key] = theta_ft.clone()
        elif alpha == 0.0:
            out[key] = theta_zs.to(device=theta_ft.device, dtype=theta_ft.dtype, copy=True)
        else:
            work = torch.promote_types(torch.promote_types(theta_zs.dtype, theta_ft.dtype), torch.float32)
            mixed = torch.lerp(theta_zs.to(device=theta_ft.device, dtype=work), theta_ft.to(work), alpha)
            out[key] = mixed.to(theta_ft.dtype)
    return out


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callback, backed by a rich progress bar over the α values when enabled."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task("WiSE-FT sweep", total=total)
        yield lambda: bar.advance(task)
