"""The recipe with several --bma-beta values and --posthoc-snapshots, then clipood-posthoc on its run.

Runs are subprocesses, as in tests/test_recipe.py (whose shards and helpers this file reuses):
one reference run, one killed mid-segment and resumed, one command on the reference run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipe import ENV, ROOT, base_args, run, shards, sigkill_once_written  # noqa: F401 (shards is a fixture)

from clipood_plugin import BetaMovingAverage
from clipood_plugin.posthoc import beta_average, load_snapshots, segment_boundaries
from clipood_plugin.training.checkpoint import load_checkpoint

BETAS = ("0.1", "0.5", "1.0")
T, K = 20, 6  # boundaries 0 1 5 10 15 19 20: checkpoints at 7 and 14 fall inside segments


def multi_args(shards_dir: Path, out: Path) -> list[str]:
    return base_args(shards_dir, out, "--total-steps", str(T), "--checkpoint-interval", "7",
                     "--bma-beta", *BETAS, "--posthoc-snapshots", str(K),
                     "--eval-shards", f"val={shards_dir / 'train-000003.tar'}",
                     "--eval-metric", "eval_bma*_val_top1")


@pytest.fixture(scope="module")
def multi_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("multi")
    proc = run(multi_args(shards, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BMA β=0.1" in proc.stdout and "BMA β=1" in proc.stdout  # one results-table column per β
    return out


def test_every_beta_is_evaluated_checkpointed_and_exact(multi_run: Path) -> None:
    results = json.loads((multi_run / "results.json").read_text())
    for beta in ("0.1", "0.5", "1"):
        for name in ("cartoon", "val"):
            assert 0.0 <= results[f"eval_bma{beta}_{name}_top1"] <= 100.0
    header = (multi_run / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"eval_bma0.1_val_top1", "eval_bma0.5_val_top1", "eval_bma1_val_top1"} <= set(header)
    assert results["eval_metric_selected"].startswith("eval_bma") and results["eval_metric_selected"].endswith("_val_top1")
    state = load_checkpoint(multi_run / "checkpoints" / "last.pt")
    assert set(state["averagers"]) == {"0.1", "0.5", "1"}
    # each saved state loads into an average of its own β (the closed-form check is test_posthoc's)
    import open_clip

    from clipood_plugin.world.tiny_clip import register_model_config

    register_model_config()
    tower = open_clip.create_model("clipood-tiny", pretrained=None).visual
    for key, saved in state["averagers"].items():
        avg = BetaMovingAverage(tower, total_steps=T, beta=float(key))
        avg.load_state_dict(saved)
        assert avg.steps == T
    first = {k[len("module."):]: v for k, v in state["averagers"]["0.1"].items() if k.startswith("module.")}
    other = {k[len("module."):]: v for k, v in state["averagers"]["1"].items() if k.startswith("module.")}
    assert any(not torch.equal(first[k], other[k]) for k in first)  # not one average saved three times
    chosen = state["state_dict_ema_prefix"]
    chosen_beta = chosen[len("eval_bma"):]
    chosen_avg = {k[len("module."):]: v for k, v in state["averagers"][chosen_beta].items() if k.startswith("module.")}
    assert all(torch.equal(state["state_dict_ema"][k], chosen_avg[k]) for k in chosen_avg)


def test_posthoc_reproduces_each_exact_average(multi_run: Path) -> None:
    snapshots = load_snapshots(multi_run)
    assert snapshots.complete and snapshots.boundaries == tuple(segment_boundaries(T, K))
    assert len(list((multi_run / "posthoc").glob("*.safetensors"))) == K - 1 + 2  # K − 1 means (T ≤ 20) + θ_0, θ_T
    state = load_checkpoint(multi_run / "checkpoints" / "last.pt")
    theta0, theta_t = snapshots.state(0), snapshots.state(T)
    assert all(torch.equal(theta_t[k], v) for k, v in state["state_dict"].items())  # θ_T is the trained tower
    scale = math.sqrt(sum(float((theta_t[k].double() - theta0[k].double()).square().sum())
                          for k in snapshots.parameters))
    for key, saved in state["averagers"].items():
        exact = {k[len("module."):]: v for k, v in saved.items() if k.startswith("module.")}
        posthoc = beta_average(snapshots, float(key))
        error = math.sqrt(sum(float((posthoc[k].double() - exact[k].double()).square().sum()) for k in exact)) / scale
        assert error <= 0.01, (key, error)


def test_sigkill_mid_segment_then_resume_auto_records_the_same_trajectory(shards: Path, multi_run: Path,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = multi_args(shards, out)
    target = out / "checkpoints" / "checkpoint-14.pt"  # 14 is inside the segment 11..15
    sigkill_once_written(args, out, target)
    assert load_checkpoint(target)["posthoc"]["count"] == 4  # steps 11..14 open in memory only

    resumed = run([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    ref_files = sorted(p.name for p in (multi_run / "posthoc").glob("*.safetensors"))
    assert ref_files == sorted(p.name for p in (out / "posthoc").glob("*.safetensors"))
    for name in ref_files:  # bitwise: same data order and arithmetic on CPU
        a, b = load_file(multi_run / "posthoc" / name), load_file(out / "posthoc" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    mine, ref = load_checkpoint(out / "checkpoints" / "last.pt"), load_checkpoint(multi_run / "checkpoints" / "last.pt")
    for key in ref["averagers"]:
        assert all(torch.equal(mine["averagers"][key][k], v) for k, v in ref["averagers"][key].items()
                   if isinstance(v, torch.Tensor)), key
    load_snapshots(out)  # one recording: θ_0 retagged to the resumed recording's id


def test_clipood_posthoc_command_on_the_run(multi_run: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "clipood_plugin.posthoc", str(multi_run), "--beta", "0.1", "0.5", "1", "2",
           "--select", "val", "--compare-exact", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "posthoc.json").read_text())
    assert set(summary["posthoc"]) == {"0.1", "0.5", "1", "2"} and summary["selected_on"] == "val"
    assert set(summary["relative_weight_error_vs_exact"]) == {"0.1", "0.5", "1"}
    assert all(e <= 0.01 for e in summary["relative_weight_error_vs_exact"].values())
    results = json.loads((multi_run / "results.json").read_text())
    for beta, per_set in summary["exact"].items():  # the exact averages evaluate as the recipe did
        for name, metrics in per_set.items():
            assert metrics["top1"] == pytest.approx(results[f"eval_bma{beta}_{name}_top1"])
    best = max(summary["posthoc"], key=lambda b: summary["posthoc"][b]["val"]["top1"])
    assert summary["selected_beta"] == float(best)
    assert (tmp_path / "posthoc.png").stat().st_size > 0
    import open_clip
    from timm.models import load_checkpoint as timm_load

    from clipood_plugin.world.tiny_clip import register_model_config

    register_model_config()
    tower = open_clip.create_model("clipood-tiny", pretrained=None).visual
    timm_load(tower, summary["checkpoint"])  # a timm-loadable checkpoint of the chosen average
    chosen = beta_average(load_snapshots(multi_run), summary["selected_beta"])
    assert all(torch.equal(v, chosen[k]) for k, v in tower.state_dict().items())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CLIPOOD_SLOW_TESTS") != "1", reason="pretrains the tiny CLIP; set CLIPOOD_SLOW_TESTS=1")
def test_embedded_world_posthoc_top1_within_0_3_points_of_exact(tmp_path: Path) -> None:
    """The embedded default (pretrained tiny CLIP, 300 steps, five domains), K = 32: post-hoc and
    exact averages of each β agree on every eval set's top-1 to 0.3 points."""
    out = tmp_path / "embedded"
    proc = run(["--bma-beta", "0.1", "0.5", "1", "2", "--posthoc-snapshots", "32", "--output", str(out)],
               timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "clipood_plugin.posthoc", str(out), "--beta", "0.1", "0.5", "1", "2",
           "--compare-exact"]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "posthoc.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert set(summary["exact"]) == {"0.1", "0.5", "1", "2"}
    for beta, per_set in summary["posthoc"].items():
        assert summary["relative_weight_error_vs_exact"][beta] <= 0.01
        for name, metrics in per_set.items():
            exact = results[f"eval_bma{beta}_{name}_top1"]
            assert abs(metrics["top1"] - exact) <= 0.3, (beta, name, metrics["top1"], exact)


def test_clipood_posthoc_early_stop_horizon_and_bad_horizon(multi_run: Path, tmp_path: Path) -> None:
    from clipood_plugin.posthoc.cli import main

    summary = main([str(multi_run), "--beta", "0.5", "--horizon", "10", "--output", str(tmp_path)])
    assert summary["horizon"] == 10 and summary["relative_weight_error_vs_exact"] == {}  # exact BMAs end at T
    assert summary["selected_beta"] == 0.5  # the run's eval sets include one named val
    saved = load_checkpoint(tmp_path / "posthoc-bma0.5.pt")
    expected = beta_average(load_snapshots(multi_run), 0.5, total_steps=10)
    assert saved["horizon"] == 10 and all(torch.equal(saved["state_dict"][k], v) for k, v in expected.items())
    with pytest.raises(SystemExit, match="not a recorded segment boundary"):
        main([str(multi_run), "--beta", "0.5", "--horizon", "11", "--output", str(tmp_path)])
