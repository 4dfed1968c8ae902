"""Record a fine-tuning trajectory compactly, so Beta averages of any β can be built after the run.

:class:`TrajectorySnapshots` is updated like an average, once per optimizer step, but instead of
one weighted average it keeps θ_0, θ_T and K running segment means (boundaries in
:mod:`~clipood_plugin.posthoc.layout`), and writes each to disk as safetensors when its segment
closes. :func:`~clipood_plugin.posthoc.beta_average` then builds the BMA of any β (and uniform,
EMA-like or early-stopped averages) from those K + 2 files.

Why: BMA needs β and the horizon T before the run starts; a second β, an early stop or a longer
run would otherwise mean a second run.

The trap: the open segment lives only in memory until it closes. Its running mean and counters
are part of :meth:`TrajectorySnapshots.state_dict`, so save that in every checkpoint (plain
tensors and numbers: ``torch.load(weights_only=True)`` reads it) and load it on resume, or the
steps since the last closed segment are lost.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from clipood_plugin._io import atomic_path, atomic_write_bytes
from clipood_plugin._wrappers import unwrap_model
from clipood_plugin.posthoc.layout import (
    DEFAULT_SEGMENTS,
    FORMAT_VERSION,
    KIND,
    MANIFEST,
    encode_meta,
    mean_name,
    point_name,
    segment_boundaries,
    segment_spans,
)

__all__ = ["TrajectorySnapshots"]


def _fingerprint(tensors: list[Tensor]) -> list[float]:
    """Two float64 sums that change when any weight does (to check θ_0 on resume)."""
    total = sum(float(t.detach().double().sum()) for t in tensors)
    squares = sum(float(t.detach().double().square().sum()) for t in tensors)
    return [total, squares]


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _save(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=encode_meta(meta))


class TrajectorySnapshots:
    """θ_0, θ_T and K segment means of a training trajectory, written as safetensors as segments close.

    Args:
        model: the model being fine-tuned, *before* its first optimizer step: it is recorded as θ_0
            here (DDP / ``torch.compile`` wrappers are seen through). As for
            :class:`~clipood_plugin.BetaMovingAverage`, pass only what trains (the image tower).
        total_steps: T, the optimizer steps of the run (it fixes the segment boundaries).
        segments: K, the number of segment means (default 32). Disk cost: up to K + 2 copies of the
            model, means in fp32.
        directory: where the files go (created if needed), e.g. ``<run dir>/posthoc``.
        device: where the open segment's running mean lives (default: with the parameters).

    Call :meth:`update_parameters` (or :meth:`update`) once after every optimizer step, t = 1..T.
    An update costs one ``torch._foreach_lerp_`` over the parameters (the running mean), like one
    BMA update; the step that closes a segment also copies the mean to the host and writes it
    (K writes per run, each about one model's size).

    ``state_dict()`` holds the open segment's mean and the counters (plus T, K and the recording
    id); ``load_state_dict`` into a recorder built the same way, from θ_0, in the same directory
    continues the recording exactly, and raises if T, K or θ_0 differ.
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        segments: int = DEFAULT_SEGMENTS,
        *,
        directory: str | os.PathLike[str] = "posthoc",
        device: str | torch.device | None = None,
    ) -> None:
        model = unwrap_model(model)
        self.total_steps = total_steps
        self.segments = segments
        self.boundaries = segment_boundaries(total_steps, segments)
        self.spans = segment_spans(self.boundaries)
        self.directory = Path(directory)
        self.recording_id = uuid.uuid4().hex
        self._names = [name for name, p in model.named_parameters() if p.is_floating_point()]
        if not self._names:
            raise ValueError("model has no floating-point parameters to record")
        params = self._params(model)
        self._fingerprint = _fingerprint(params)
        self._mean = [
            torch.empty_like(p, dtype=torch.promote_types(p.dtype, torch.float32), device=device or p.device)
            for p in params
        ]
        self._step = 0
        self._count = 0  # steps in the open segment's mean
        self._span = 0  # index of the open segment in self.spans
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_manifest()
        self._write_point(0, _cpu_state(model))

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps recorded so far (0 right after construction)."""
        return self._step

    @property
    def disk_copies(self) -> int:
        """How many model-sized files a complete recording holds (θ_0, θ_T and the means)."""
        return len(self.spans) + 2

    def _params(self, model: nn.Module) -> list[Tensor]:
        named = dict(model.named_parameters())
        missing = [n for n in self._names if n not in named]
        if missing or len(named) < len(self._names):
            raise ValueError(
                f"model lacks recorded parameters {missing[:5]}: pass the same module (e.g. the image tower) "
                "that the recorder was built from"
            )
        return [named[n].detach() for n in self._names]

    def _meta(self, **fields: Any) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "kind": KIND, "id": self.recording_id, "total_steps": self.total_steps,
                **fields}

    def _write_manifest(self) -> None:
        manifest = self._meta(segments=self.segments, boundaries=self.boundaries, parameters=self._names)
        atomic_write_bytes(self.directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())

    def _write_point(self, step: int, state: dict[str, Tensor]) -> None:
        _save(self.directory / point_name(step), state, self._meta(type="point", start=step, end=step, count=1))

    # -- updates -------------------------------------------------------------------------------

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Record the model's current weights as the next step θ_t (call after ``optimizer.step()``)."""
        model = unwrap_model(model)
        step = self._step + 1
        if step > self.total_steps:
            raise RuntimeError(
                f"TrajectorySnapshots got update {step} but total_steps={self.total_steps}: T must equal the "
                "number of optimizer steps of the run"
            )
        if step == self.total_steps:
            self._write_point(step, _cpu_state(model))
        else:
            start, end = self.spans[self._span]
            params = self._params(model)
            if self._count == 0:
                for mean, p in zip(self._mean, params):
                    mean.copy_(p)
            else:
                params = [p.to(device=m.device, dtype=m.dtype) for m, p in zip(self._mean, params)]
                torch._foreach_lerp_(self._mean, params, 1.0 / (self._count + 1))
            self._count += 1
            if step == end:
                tensors = {n: m.to("cpu").contiguous() for n, m in zip(self._names, self._mean)}
                meta = self._meta(type="mean", start=start, end=end, count=self._count)
                _save(self.directory / mean_name(start, end), tensors, meta)
                self._span += 1
                self._count = 0
        self._step = step

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """timm-style alias of :meth:`update_parameters`; ``step`` (1 after the first optimizer step) is checked."""
        if step is not None and step != self._step + 1:
            raise ValueError(
                f"TrajectorySnapshots.update(step={step}) but {self._step} steps are recorded, so the next is "
                f"{self._step + 1}: update once per optimizer step"
            )
        self.update_parameters(model)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters, hyperparameters and the open segment's mean: tensors and plain types only."""
        mean = {n: m.detach().to("cpu", copy=True) for n, m in zip(self._names, self._mean)} if self._count else {}
        return {
            "format": FORMAT_VERSION, "kind": KIND, "id": self.recording_id, "total_steps": self.total_steps,
            "segments": self.segments, "step": self._step, "count": self._count,
            "theta0_fingerprint": list(self._fingerprint), "mean": mean,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the recording saved in ``state`` (from :meth:`state_dict`) in this directory."""
        if not isinstance(state, dict) or state.get("kind") != KIND:
            raise ValueError("not a TrajectorySnapshots state (no kind 'trajectory_snapshots')")
        if int(state.get("format", 0)) > FORMAT_VERSION:
            raise ValueError(f"TrajectorySnapshots state has format {state['format']}, newer than this version reads")
        saved = (int(state["total_steps"]), int(state["segments"]))
        if saved != (self.total_steps, self.segments):
            raise ValueError(
                f"TrajectorySnapshots state was recorded with total_steps={saved[0]}, segments={saved[1]}; this "
                f"recorder has total_steps={self.total_steps}, segments={self.segments}. Resuming with other "
                "values would mix two segment layouts"
            )
        fingerprint = [float(v) for v in state["theta0_fingerprint"]]
        if any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in zip(fingerprint, self._fingerprint)):
            raise ValueError(
                "TrajectorySnapshots state was recorded from another θ_0 than the model this recorder was built "
                "from: build it from the pretrained model, before loading the checkpoint into the model"
            )
        step, count = int(state["step"]), int(state["count"])
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"TrajectorySnapshots state has step {step}, outside 0..{self.total_steps}")
        span = next((i for i, (start, end) in enumerate(self.spans) if start <= step + 1 <= end), len(self.spans))
        expected = step + 1 - self.spans[span][0] if span < len(self.spans) else 0
        if count != expected:
            raise ValueError(f"TrajectorySnapshots state has {count} steps in the open segment at step {step}; "
                             f"the layout says {expected}")
        if count:
            mean = state["mean"]
            missing = [n for n in self._names if n not in mean]
            if missing:
                raise ValueError(f"TrajectorySnapshots state lacks the open mean of {missing[:5]}")
            for name, target in zip(self._names, self._mean):
                target.copy_(mean[name])
        self._step, self._count, self._span = step, count, span
        if state["id"] != self.recording_id:  # adopt the saved recording: its closed segments are on disk
            self.recording_id = str(state["id"])
            self._write_manifest()
            path = self.directory / point_name(0)
            with safe_open(str(path), "pt") as fh:
                theta0 = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            self._write_point(0, theta0)
