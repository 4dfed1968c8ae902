"""Experiment tracking: the run's scalars to Weights & Biases and/or TensorBoard, from rank 0.

timm's and open_clip's training scripts offer ``--log-wandb`` and TensorBoard; so does our recipe,
through this one small class. Both backends are optional extras (``pip install
clipood-plugin[wandb]`` / ``[tensorboard]``); asking for one that is not installed is an error at
start-up that names the extra, not a crash at the first log call. Only the primary rank logs (every
value the recipe logs is already reduced across ranks or computed on rank 0).

The trap: wandb reads ``WANDB_MODE``, ``WANDB_DIR`` and friends from the environment, so
``WANDB_MODE=offline`` (what our tests use) writes the run under ``WANDB_DIR`` without a network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ExperimentTracker"]


class ExperimentTracker:
    """Log scalar dicts by optimizer step to the backends asked for; a no-op when none is.

    Args:
        wandb_project: a wandb project name to log to (``None``: no wandb).
        tensorboard_dir: a directory for TensorBoard event files (``None``: no TensorBoard).
        config: the run's settings (the recipe's arguments), stored with the run.
        run_name: a name for the run (wandb's display name).
        enabled: ``False`` on non-primary ranks: nothing is imported, created or logged.
    """

    def __init__(self, *, wandb_project: str | None = None, tensorboard_dir: str | Path | None = None,
                 config: Mapping[str, Any] | None = None, run_name: str | None = None, enabled: bool = True) -> None:
        self._wandb: Any = None
        self._tensorboard: Any = None
        if not enabled:
            return
        if wandb_project is not None:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("--log-wandb needs wandb: pip install 'clipood-plugin[wandb]'") from exc
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=dict(config or {}))
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("--tensorboard needs tensorboard: pip install 'clipood-plugin[tensorboard]'") from exc
            self._tensorboard = SummaryWriter(log_dir=str(tensorboard_dir))

    @property
    def active(self) -> bool:
        return self._wandb is not None or self._tensorboard is not None

    def log(self, scalars: Mapping[str, float | int], step: int) -> None:
        """Log finite numeric values at ``step`` (non-numeric and NaN entries are left out)."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._tensorboard is not None:
            for key, value in clean.items():
                self._tensorboard.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
