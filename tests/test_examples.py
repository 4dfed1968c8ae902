"""Run each script in examples/ as a user would (a subprocess), with small step counts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    results = [line for line in proc.stdout.splitlines() if line.startswith("result:")]
    assert len(results) == 1, proc.stdout[-2000:]
    return dict(item.split("=", 1) for item in results[0].removeprefix("result:").split())


def test_mms_open_clip_finetune() -> None:
    pytest.importorskip("open_clip")
    result = run_example("mms_open_clip_finetune.py", "--steps", "8", "--batch-size", "8")
    assert int(result["steps"]) == 8
    first, last = float(result["loss_first"]), float(result["loss_last"])
    assert math.isfinite(first) and math.isfinite(last) and last < first
    for key in ("acc_live", "acc_bma"):
        assert 0.0 <= float(result[key]) <= 1.0


def test_bma_timm_resnet() -> None:
    pytest.importorskip("timm")
    result = run_example("bma_timm_resnet.py", "--model", "test_resnet", "--steps", "4", "--batch-size", "8")
    assert result["model"] == "test_resnet" and int(result["steps"]) == 4
    assert math.isfinite(float(result["loss_last"]))
    for key in ("acc_live", "acc_bma_before_update_bn", "acc_bma"):
        assert 0.0 <= float(result[key]) <= 1.0
