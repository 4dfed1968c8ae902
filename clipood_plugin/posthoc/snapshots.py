"""Read a trajectory recording back and build weighted averages from it after the run.

A recording (:class:`~clipood_plugin.posthoc.TrajectorySnapshots`) holds θ_0, θ_T and segment means
``m_S`` of the steps in between. A weighted average of the trajectory with step weights ``w_t``
(t = 0..T') is approximated by giving each segment the sum of the weights that fall in it::

    θ̂ = (w_0 θ_0 + Σ_S W_S m_S + w_T' θ_T') / Σ_t w_t,      W_S = Σ_{t∈S} w_t

so a segment of one step, θ_0 and θ_T are exact, and any profile that is constant on each segment
(uniform: BMA with β = 1) is exact. :func:`beta_average` uses the BMA weights
``α_t = BetaPDF(β, β)((t + 0.5) / (T' + 1))``; :func:`ema_average` an EMA's; the horizon T' may be
any segment boundary (an early stop; θ_T' is then inside the last segment's mean, not exact).
WiSE-style mixes are :func:`clipood_plugin.wise.interpolate_weights` between
``snapshots.state(0)`` and such an average.

Error bound. Per segment the error is ``Σ_{t∈S} (W_S/L_S − w_t) θ_t``; its weights sum to zero,
so θ_t can be replaced by ``θ_t − θ_{m_S}`` (m_S the middle step of S), and with δ the largest
single-step move ``‖θ_t − θ_{t−1}‖``::

    ‖θ̂ − θ_exact‖ ≤ (δ / Σ_t w_t) · Σ_S Σ_{t∈S} |w_t − w̄_S| · |t − m_S|
                  ≤ (δ / (2 Σ_t w_t)) · Σ_S L_S² · (max_S w − min_S w)

(:func:`error_bound`): quadratic in the segment lengths L_S and linear in how much the weights
vary within a segment. That is why the boundaries are cosine-spaced: the Beta weights with β < 1
vary fastest near both ends, where segments are shortest. The bound is a worst case (every step
of length δ, all in one direction); on the trajectories we measured the error is 8–28× smaller
(benchmarks/RESULTS.md).

Files are read with safetensors (never unpickled), one tensor at a time across all files, so
averaging needs working memory for a few copies of one tensor (besides the averages it returns),
not K copies of the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from clipood_plugin.averaging import beta_weights
from clipood_plugin.posthoc.layout import (
    FORMAT_VERSION,
    KIND,
    MANIFEST,
    decode_meta,
    mean_name,
    point_name,
    segment_spans,
)

__all__ = [
    "Segment",
    "Snapshots",
    "beta_average",
    "ema_average",
    "ema_weights",
    "error_bound",
    "load_snapshots",
    "weighted_average",
    "weighted_averages",
]


@dataclass(frozen=True)
class Segment:
    """The mean of θ_start..θ_end (inclusive), stored in ``path``."""

    start: int
    end: int
    path: Path

    @property
    def length(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class Snapshots:
    """A recording as found on disk: what :func:`load_snapshots` returns.

    ``segments`` are the closed segment means from step 1 on, contiguous; ``points`` the exact
    states by step (0, and T once the run finished). ``recorded_steps`` is how far the recording
    reaches: T when complete, else the end of the last closed segment (a killed run).
    """

    directory: Path
    total_steps: int
    boundaries: tuple[int, ...]
    recording_id: str
    parameters: tuple[str, ...]
    points: Mapping[int, Path]
    segments: tuple[Segment, ...]

    @property
    def complete(self) -> bool:
        return self.total_steps in self.points

    @property
    def recorded_steps(self) -> int:
        if self.complete:
            return self.total_steps
        return self.segments[-1].end if self.segments else 0

    @property
    def horizons(self) -> tuple[int, ...]:
        """The horizons T' an average can end at: segment ends within the recording, and T if complete."""
        ends = [s.end for s in self.segments]
        return tuple(sorted({*ends, *([self.total_steps] if self.complete else [])}))

    def state(self, step: int) -> dict[str, Tensor]:
        """The exact state dict at ``step`` (0, or T of a complete recording)."""
        if step not in self.points:
            raise ValueError(f"no exact state for step {step} in {self.directory}; exact steps: {sorted(self.points)}")
        with safe_open(str(self.points[step]), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def parts(self, horizon: int) -> list[tuple[Path, int, int]]:
        """``(file, first step, last step)`` of every stored piece an average with horizon T' uses."""
        if horizon not in self.horizons:
            raise ValueError(
                f"horizon {horizon} is not available in {self.directory}: an average must end at a segment "
                f"boundary within the recording ({self.recorded_steps} of {self.total_steps} steps recorded); "
                f"available: {_short(self.horizons)}"
            )
        parts = [(self.points[0], 0, 0)]
        parts += [(s.path, s.start, s.end) for s in self.segments if s.end <= horizon]
        if horizon == self.total_steps:
            parts.append((self.points[horizon], horizon, horizon))
        return parts


def _short(values: Sequence[int]) -> str:
    values = list(values)
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:6]))}, …, {values[-1]}]"


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with safe_open(str(path), "pt") as fh:
            return decode_meta(fh.metadata())
    except Exception:  # a truncated or foreign file: not part of the recording
        return None


def load_snapshots(path: str | os.PathLike[str]) -> Snapshots:
    """Find a recording in ``path`` (the recorder's directory, or a run directory holding ``posthoc/``).

    Only files whose metadata carry the manifest's recording id are used; a stale file left by
    another recording in the same directory is skipped with a warning. The closed segments must
    run contiguously from step 1; the recording may stop early (a killed run): ``recorded_steps``
    and ``horizons`` say how far it reaches.
    """
    root = Path(path)
    directory = root if (root / MANIFEST).is_file() else root / "posthoc"
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no trajectory recording in {root}: neither {root / MANIFEST} nor "
                                f"{root / 'posthoc' / MANIFEST} exists (was the run made with --posthoc-snapshots?)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("kind") != KIND or int(manifest.get("format", 0)) > FORMAT_VERSION:
        raise ValueError(f"{manifest_path} is not a trajectory recording this version reads")
    total, boundaries, rid = int(manifest["total_steps"]), [int(b) for b in manifest["boundaries"]], manifest["id"]
    foreign = 0

    def belongs(file: Path, kind: str, start: int, end: int) -> bool:
        nonlocal foreign
        if not file.is_file():
            return False
        meta = _read_meta(file)
        ok = (meta is not None and meta.get("id") == rid and meta.get("type") == kind and meta.get("start") == start
              and meta.get("end") == end and meta.get("count") == end - start + 1)
        foreign += not ok
        return ok

    points = {step: directory / point_name(step) for step in (0, total)
              if belongs(directory / point_name(step), "point", step, step)}
    if 0 not in points:
        raise ValueError(f"{directory} lacks θ_0 ({point_name(0)}) of recording {rid}")
    segments: list[Segment] = []
    contiguous = True
    for start, end in segment_spans(boundaries):  # every file is checked, so stale ones are reported
        file = directory / mean_name(start, end)
        contiguous = belongs(file, "mean", start, end) and contiguous
        if contiguous:
            segments.append(Segment(start, end, file))
    if total in points and len(segments) < len(segment_spans(boundaries)):
        raise ValueError(f"{directory} has θ_T but lacks segment means after step {segments[-1].end if segments else 0}")
    if foreign:
        warnings.warn(f"{directory}: skipped {foreign} file(s) that do not belong to recording {rid}", stacklevel=2)
    return Snapshots(directory, total, tuple(boundaries), rid, tuple(manifest["parameters"]), points, tuple(segments))


def weighted_averages(snapshots: Snapshots, profiles: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Several weighted averages in one pass over the files: ``{name: state dict}``.

    Each profile is a 1-D tensor of step weights ``w_t`` for t = 0..T' (its length fixes the
    horizon T', which must be in ``snapshots.horizons``); only ratios matter. The averaged
    parameters come back in float32 (accumulated in float64 as deviations from θ_0); the other
    entries of the state dict (buffers) are taken from θ_T for the full horizon, else from θ_0.
    """
    if not profiles:
        raise ValueError("no weight profiles given")
    plans: dict[str, tuple[dict[Path, float], float, int]] = {}
    for name, weights in profiles.items():
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.ndim != 1 or w.numel() < 2 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"profile {name!r}: step weights must be a 1-D, finite, non-negative tensor over "
                             f"t = 0..T' with a positive sum, got shape {tuple(w.shape)}")
        horizon = w.numel() - 1
        parts = {path: float(w[lo:hi + 1].sum()) for path, lo, hi in snapshots.parts(horizon)}
        plans[name] = (parts, float(w.sum()), horizon)
    files = sorted({path for parts, _, _ in plans.values() for path in parts})
    averaged = set(snapshots.parameters)
    out: dict[str, dict[str, Tensor]] = {name: {} for name in plans}
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), "pt")) for path in files}
        theta0 = handles[snapshots.points[0]]
        final = snapshots.points.get(snapshots.total_steps)
        for key in theta0.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if key not in averaged:  # buffers: from θ_T for the full horizon, else from θ_0
                for name, (_, _, horizon) in plans.items():
                    use_final = final is not None and horizon == snapshots.total_steps
                    out[name][key] = (handles[final] if use_final else theta0).get_tensor(key)
                continue
            base = theta0.get_tensor(key).double()
            sums = {name: torch.zeros_like(base) for name in plans}
            for path in files:  # one file's tensor at a time: memory for a few copies of one tensor
                deviation = handles[path].get_tensor(key).double() - base
                for name, (parts, _, _) in plans.items():
                    if parts.get(path):
                        sums[name].add_(deviation, alpha=parts[path])
            for name, (_, total, _) in plans.items():
                out[name][key] = (base + sums[name] / total).float()
    return out


def weighted_average(snapshots: Snapshots, weights: Tensor) -> dict[str, Tensor]:
    """One weighted average (see :func:`weighted_averages`): step weights ``w_t`` for t = 0..T'."""
    return weighted_averages(snapshots, {"average": weights})["average"]


def _horizon(snapshots: Snapshots, total_steps: int | None) -> int:
    if total_steps is not None:
        return total_steps
    if not snapshots.complete:
        raise ValueError(
            f"the recording in {snapshots.directory} stops at step {snapshots.recorded_steps} of "
            f"{snapshots.total_steps}: pass total_steps, one of {_short(snapshots.horizons)}"
        )
    return snapshots.total_steps


def beta_average(snapshots: Snapshots, beta: float, total_steps: int | None = None) -> dict[str, Tensor]:
    """The Beta Moving Average with this β and horizon T' (default: the run's T), as a state dict."""
    return weighted_average(snapshots, beta_weights(_horizon(snapshots, total_steps), beta))


def ema_weights(total_steps: int, decay: float) -> Tensor:
    """Step weights of an EMA with constant ``decay`` started at θ_0: ``d^T'`` for θ_0, ``(1−d)·d^(T'−t)`` after."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    t = torch.arange(total_steps + 1, dtype=torch.float64)
    weights = (1.0 - decay) * torch.tensor(decay, dtype=torch.float64) ** (total_steps - t)
    weights[0] = decay ** total_steps
    return weights


def ema_average(snapshots: Snapshots, decay: float, total_steps: int | None = None) -> dict[str, Tensor]:
    """An EMA-like average (constant ``decay``, θ_0 included) with horizon T', from the recording."""
    return weighted_average(snapshots, ema_weights(_horizon(snapshots, total_steps), decay))


def error_bound(snapshots: Snapshots | Sequence[int], weights: Tensor, max_step: float = 1.0) -> float:
    """The worst-case ‖θ̂ − θ_exact‖ of the module docstring for these step weights.

    ``snapshots``: a recording, or its boundaries; ``max_step``: δ, the largest single-step move
    ‖θ_t − θ_{t−1}‖ (with the default 1.0 the result is the coefficient of δ). Pieces stored
    exactly (θ_0, θ_T, one-step segments) contribute nothing.
    """
    boundaries = list(snapshots.boundaries if isinstance(snapshots, Snapshots) else snapshots)
    w = torch.as_tensor(weights, dtype=torch.float64)
    horizon = w.numel() - 1
    bound = 0.0
    for start, end in segment_spans(boundaries):
        if end > horizon:
            break
        seg = w[start:end + 1]
        middle = start + (end - start) // 2
        distance = (torch.arange(start, end + 1, dtype=torch.float64) - middle).abs()
        bound += float(((seg - seg.mean()).abs() * distance).sum())
    return bound * max_step / float(w.sum())
