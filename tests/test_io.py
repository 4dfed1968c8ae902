"""Atomic writes: nothing under the final name until the write succeeds, and a normal file mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clipood_plugin._io import atomic_path, atomic_write_bytes


def test_atomic_write_replaces_and_respects_umask(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    old = os.umask(0o022)
    try:
        atomic_write_bytes(target, b"one")
        atomic_write_bytes(target, b"two")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # as open() would create it, not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"kept")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
