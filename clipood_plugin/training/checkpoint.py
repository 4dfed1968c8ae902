"""Training checkpoints: written atomically, loaded without unpickling code, kept last-N plus best.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(weights_only=True)`` reads it: no pickled classes, no code runs on load. Keys follow
timm's ``CheckpointSaver`` so timm readers work: ``state_dict`` (the trained module) and
``state_dict_ema`` (the *averaged* weights, e.g. BMA's ``.module``), plus our own bookkeeping
(``averager`` = the averager's full state, optimizer, scheduler, scaler, step, RNG, data
position, args as a dict).

Layout in a run directory: ``checkpoint-<step>.pt`` (the newest ``keep_last``), ``last.pt`` and
``best.pt``. Every file is written to a temporary name and ``os.replace``d into place, so a crash
or SIGKILL mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipood_plugin._io import atomic_path

__all__ = ["CheckpointManager", "capture_rng", "load_checkpoint", "restore_rng", "save_checkpoint"]

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^checkpoint-(\d+)\.pt$")


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    payload = {"version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: a file that needs code to unpickle is refused.

    Raises ``ValueError`` naming the file when it is not a loadable checkpoint (truncated, not a
    torch file, or holding pickled objects other than plain data).
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError for unsafe content, RuntimeError for truncation
        raise ValueError(f"{path} is not a safe, complete checkpoint: {exc}") from exc
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError(f"{path} is not a clipood-plugin checkpoint (no 'version' key)")
    if state["version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {state['version']}, newer than this version reads")
    return state


def capture_rng() -> dict[str, Any]:
    """The random states of python, numpy and torch (CPU and CUDA) as weights-only-safe data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Keep the newest ``keep_last`` step checkpoints plus ``last.pt`` and ``best.pt`` in ``directory``.

    ``save(step, state, metric)`` writes ``checkpoint-<step>.pt`` atomically, refreshes
    ``last.pt`` (a hard link when the filesystem allows, else a copy, itself atomic) and, when
    ``metric`` beats the best so far, ``best.pt``; then prunes older step files. ``latest()``
    returns the newest checkpoint that loads, skipping a corrupt one, for ``--resume auto``.
    """

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 3, higher_is_better: bool = True) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.higher_is_better = higher_is_better
        self.best_metric: float | None = None

    def step_files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_FILE.match(p.name))]
        return sorted(found)

    def save(self, step: int, state: Mapping[str, Any], metric: float | None = None) -> Path:
        path = save_checkpoint(self.directory / f"checkpoint-{step}.pt", state)
        self._publish(path, "last.pt")
        if metric is not None and self._improves(metric):
            self.best_metric = metric
            self._publish(path, "best.pt")
        for _, old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def _improves(self, metric: float) -> bool:
        if self.best_metric is None:
            return True
        return metric > self.best_metric if self.higher_is_better else metric < self.best_metric

    def _publish(self, source: Path, name: str) -> None:
        with atomic_path(self.directory / name) as tmp:
            tmp.unlink()
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)

    def latest(self) -> Path | None:
        """The newest step checkpoint that loads (a corrupt newest one is skipped with a warning)."""
        import warnings

        for _, path in reversed(self.step_files()):
            try:
                load_checkpoint(path)
            except ValueError as exc:
                warnings.warn(f"skipping unreadable checkpoint: {exc}", stacklevel=2)
                continue
            return path
        return None
