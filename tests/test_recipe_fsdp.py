"""The recipe with --fsdp on 2 CPU ranks (torchrun, gloo): trains, resumes exactly after SIGKILL,
exports averages that load into a bare tower.

The killed run is SIGKILLed after its step-6 checkpoint appears, torchrun and its workers alike:
torchrun starts each worker in a session of its own, so killing torchrun's process group would
leave them running (and writing). Compared with an uninterrupted run, the resumed run's final
tower, BMA and EMA must be bitwise equal: same data order, same per-rank RNG, same gloo
reductions, all on CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_recipe import ENV, RECIPE, ROOT, base_args, shards  # noqa: F401  (shards is a fixture)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
EXPORTS = ("tower", "bma_tower", "ema_tower")


def fsdp_args(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    return [*TORCHRUN, str(RECIPE), *base_args(shard_dir, out, "--fsdp", "--total-steps", "8", "--checkpoint-interval",
                                               "3", "--ema-decay", "0.9", "--no-eval-zero-shot", *extra)]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), whatever session it started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("fsdp_reference")
    proc = subprocess.run(fsdp_args(shards, out), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fsdp_run_trains_checkpoints_and_exports_loadable_averages(reference: Path) -> None:
    results = json.loads((reference / "results.json").read_text())
    assert results["step"] == 8 and 0.0 <= results["eval_bma_cartoon_top1"] <= 100.0
    assert "eval_ema_cartoon_top1" in results
    names = [p.name for p in (reference / "checkpoints").iterdir()]
    steps = sorted(int(n.removeprefix("step-")) for n in names if n.startswith("step-"))
    assert len(names) == len(steps) == 3 and steps[-1] == 8, names  # keep_last 3, no hidden .partial/.old left
    meta = json.loads((reference / "checkpoints" / "step-8" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["world_size"] == 2
    assert len(list((reference / "checkpoints" / "step-8").glob("*.distcp"))) == 2  # one shard file per rank
    import open_clip

    from clipood_plugin.world.tiny_clip import register_model_config

    register_model_config()
    bare = open_clip.create_model("clipood-tiny", pretrained=None).visual
    tower = load_file(reference / "tower.safetensors")
    for name in EXPORTS:
        state = load_file(reference / f"{name}.safetensors")
        bare.load_state_dict(state)  # strict: every key, full shapes
        assert all(v.dtype == torch.float32 for v in state.values())
    bma = load_file(reference / "bma_tower.safetensors")
    assert any(not torch.equal(bma[k], tower[k]) for k in tower), "the BMA export is just the final tower"
    # the export (gathered over gloo) equals the last checkpoint's shards read back unsharded by DCP
    from clipood_plugin import BetaMovingAverage
    from clipood_plugin.training.checkpoint import load_sharded_checkpoint

    average = BetaMovingAverage(open_clip.create_model("clipood-tiny", pretrained=None).visual, total_steps=8)
    state = {"averager": average.state_dict()}
    load_sharded_checkpoint(reference / "checkpoints" / "step-8", state)
    average.load_state_dict(state["averager"])
    assert average.steps == 8
    for key, value in average.module.state_dict().items():
        assert torch.equal(value, bma[key]), key


def test_sigkill_then_resume_auto_is_bitwise_the_uninterrupted_run(shards: Path, reference: Path,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(fsdp_args(shards, out), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    target = out / "checkpoints" / "step-6"
    deadline = time.monotonic() + 300
    try:
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for pid in [*descendants(proc.pid), proc.pid]:  # the workers first: they are not in torchrun's group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert target.exists(), "the run never reached step 6"
    assert not (out / "results.json").exists(), "the run finished before it was killed"

    resumed = subprocess.run([*fsdp_args(shards, out), "--resume", "auto"], env=ENV, cwd=ROOT, capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-6" in resumed.stderr
    for name in EXPORTS:
        mine, ref = load_file(out / f"{name}.safetensors"), load_file(reference / f"{name}.safetensors")
        assert mine.keys() == ref.keys()
        for key, value in ref.items():
            assert torch.equal(mine[key], value), (name, key)
