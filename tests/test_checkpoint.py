"""Checkpoints: atomic writes, weights-only loading, last-N/best bookkeeping, RNG round trips."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from clipood_plugin.training.checkpoint import (
    CheckpointManager,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def test_round_trip_and_no_temporary_files(tmp_path: Path) -> None:
    state = {"state_dict": {"w": torch.randn(3, 4)}, "step": 7, "args": {"lr": 1e-5, "name": "x"}}
    save_checkpoint(tmp_path / "a.pt", state)
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert loaded["step"] == 7 and loaded["args"] == {"lr": 1e-5, "name": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_crash_mid_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def broken_save(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class Gadget:  # a class that would run code on unpickling
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran",))


def test_unsafe_and_truncated_files_are_refused(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"version": 1, "x": Gadget()}, unsafe)
    with pytest.raises(ValueError, match="not a safe, complete checkpoint"):
        load_checkpoint(unsafe)
    raw = tmp_path / "pickle.pt"
    raw.write_bytes(pickle.dumps({"version": 1}, protocol=2) + b"trailing")
    with pytest.raises(ValueError, match="not a safe, complete checkpoint"):
        load_checkpoint(raw)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.randn(1000)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"truncated\.pt"):
        load_checkpoint(truncated)


def test_manager_keeps_last_n_and_best_and_skips_corrupt(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step, metric in [(10, 50.0), (20, 70.0), (30, 60.0)]:
        manager.save(step, {"step": step}, metric=metric)
    assert [s for s, _ in manager.step_files()] == [20, 30]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 30
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 20
    (tmp_path / "checkpoint-30.pt").write_bytes(b"garbage")  # e.g. a disk error
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        assert manager.latest() == tmp_path / "checkpoint-20.pt"
    assert CheckpointManager(tmp_path / "empty").latest() is None


def test_rng_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
