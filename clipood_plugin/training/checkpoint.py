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

Sharded models (FSDP2) are checkpointed by :class:`ShardedCheckpointManager` instead: every rank
writes its own shards with ``torch.distributed.checkpoint`` (DCP) into a hidden directory that
rank 0 renames to ``step-<step>/`` once every rank has finished, so a step directory exists only
when it is complete. DCP's traps, and what we do about them:

- ``CheckpointException`` (any rank's failure) derives from ``BaseException``: ``except
  Exception`` misses it. We catch it and raise a ``RuntimeError`` / ``ValueError`` naming the
  directory.
- DCP saves a key that every rank holds (the same name) once, from one rank. Per-rank state (the
  RNG, a data position) therefore needs a per-rank key: :func:`per_rank_key`.
- DCP unpickles non-tensor values with ``weights_only=False``; our load planner reads them with
  ``weights_only=True`` first, so a checkpoint holding code is refused, as for single files.

:func:`atomic_path` (a temporary path beside the destination, moved over it on clean exit) and
:func:`atomic_write_bytes` are the atomic writes every file here goes through, public for recipes
and scripts that write their own outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipood_plugin._io import atomic_path, atomic_write_bytes

__all__ = [
    "CheckpointManager",
    "ShardedCheckpointManager",
    "atomic_path",
    "atomic_write_bytes",
    "capture_rng",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "per_rank_key",
    "restore_rng",
    "save_checkpoint",
    "save_sharded_checkpoint",
]

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^checkpoint-(\d+)\.pt$")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_META = "meta.json"


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
        return _newest_readable(self.step_files(), load_checkpoint)


def _newest_readable(found: list[tuple[int, Path]], read: Any) -> Path | None:
    """The newest of ``found`` that ``read`` accepts; each one it rejects (``ValueError``) is a warning."""
    import warnings

    for _, path in reversed(found):
        try:
            read(path)
        except ValueError as exc:
            warnings.warn(f"skipping unreadable checkpoint: {exc}", stacklevel=3)
            continue
        return path
    return None


# -- sharded (DCP) checkpoints ---------------------------------------------------------------------


def per_rank_key(name: str, rank: int) -> str:
    """The key of one rank's own state (``rng`` → ``rng_rank3``): DCP saves equal keys only once."""
    return f"{name}_rank{rank}"


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if (dist := _dist()) is not None:
        dist.barrier()


def _rank() -> int:
    return 0 if (dist := _dist()) is None else dist.get_rank()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_sharded_checkpoint(directory: str | os.PathLike[str], state: dict[str, Any],
                            meta: Mapping[str, Any] | None = None) -> Path:
    """Save ``state`` with DCP into ``directory``, which appears only once complete. A collective.

    Every rank calls it with its own state dict (DTensors for sharded tensors). The shards go to
    a hidden ``.<name>.partial`` beside ``directory``; after DCP's final collective rank 0 adds
    ``meta.json`` (``meta``, plain JSON: step, world size...) and renames the directory into place
    (replacing an older one of the same name). A crash mid-save leaves only the hidden directory,
    which the next save of that name clears. The directory must be on a filesystem every rank sees.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    final = Path(directory)
    partial = final.parent / f".{final.name}.partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    try:
        dcp.save(state, checkpoint_id=str(partial), no_dist=_dist() is None)
    except CheckpointException as exc:  # a BaseException: `except Exception` would let it through
        raise RuntimeError(f"sharded checkpoint {final} failed on some rank: {exc}") from exc
    if _rank() == 0:
        atomic_write_bytes(partial / _META, json.dumps({"version": FORMAT_VERSION, **(meta or {})}).encode())
        if final.exists():
            trash = final.parent / f".{final.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(partial, final)
        _fsync_dir(final.parent)
    _barrier()
    return final


def read_sharded_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a sharded checkpoint; ``ValueError`` when it is not a complete one."""
    path = Path(directory)
    try:
        meta = json.loads((path / _META).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a complete sharded checkpoint (no readable {_META}): {exc}") from exc
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} is not a complete sharded checkpoint (no DCP .metadata)")
    if not isinstance(meta, dict) or int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {meta.get('version')!r}, newer than this version reads")
    return meta


def _weights_only_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, but a non-tensor value that needs code to unpickle is refused."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except Exception as exc:
                raise ValueError(f"checkpoint value {read_item.dest_index.fqn!r} is not plain data: {exc}") from exc
            value.seek(0)
            super().load_bytes(read_item, value)

    return WeightsOnlyLoadPlanner()


def load_sharded_checkpoint(directory: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, Any]:
    """Load a :func:`save_sharded_checkpoint` directory into ``state`` in place; returns its meta. A collective.

    ``state`` is a template with the keys to read: the current state dicts (DTensors are filled
    shard by shard, so a checkpoint saved on another world size reshards where DCP allows).
    Raises ``ValueError`` naming the directory when it is incomplete, holds pickled code, or does
    not fit ``state``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    meta = read_sharded_meta(directory)
    try:
        dcp.load(state, checkpoint_id=str(directory), planner=_weights_only_planner(), no_dist=_dist() is None)
    except CheckpointException as exc:
        raise ValueError(f"{directory} does not load into this run's state: {exc}") from exc
    return meta


class ShardedCheckpointManager:
    """Keep the newest ``keep_last`` DCP step directories ``step-<step>/`` in ``directory``.

    ``save(step, state, meta)`` is :func:`save_sharded_checkpoint` into ``step-<step>`` followed by
    pruning (rank 0); ``latest()`` is the newest complete one (every rank sees the same answer
    on a shared filesystem), for ``--resume auto``; ``load(path, state)`` fills ``state`` in place.
    There is no ``best`` here: pick a step from ``meta.json`` (it holds the evaluation metric).
    """

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def step_dirs(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return sorted(found)

    def save(self, step: int, state: dict[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
        path = save_sharded_checkpoint(self.directory / f"step-{step}", state, {"step": step, **(meta or {})})
        if _rank() == 0:
            for _, old in self.step_dirs()[: -self.keep_last]:
                trash = old.parent / f".{old.name}.old"
                os.replace(old, trash)  # out of sight first, so a half-deleted one is never "latest"
                shutil.rmtree(trash, ignore_errors=True)
        _barrier()
        return path

    def latest(self) -> Path | None:
        """The newest complete step directory (an incomplete one is skipped with a warning)."""
        return _newest_readable(self.step_dirs(), read_sharded_meta)

    def load(self, path: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, Any]:
        return load_sharded_checkpoint(path, state)
