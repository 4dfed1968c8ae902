"""open_clip's own trainer (``open_clip_train.main``) run with CLIPood through
``python -m clipood_plugin.integrations.open_clip_train``: zero lines of the trainer changed.

A random-init tiny CLIP (an open_clip ``local-dir:`` model) on generated shards, 4 classes:

1. ``exact``: 3 epochs of one optimizer step each (batch = the 16 training samples, crops that
   keep the whole 32 px image), so ``epoch_1..3.pt`` hold θ_1..θ_3 and the model folder θ_0;
   the saved average must be Σ α_t θ_t / Σ α_t with α from ``tests/reference.py``, the text
   tower must not move, the live weights must load with open_clip's own ``load_checkpoint`` and
   the average with :func:`load_average`, and ``results.jsonl`` must hold both accuracies.
2. ``resume``: ``--resume epoch_2.pt`` must end on the same average as the uninterrupted run.
3. ``accum``: ``--accum-freq 2`` on 4 batches per epoch, 2 epochs: T = (4 // 2) × 2 = 4 steps.
4. a checkpoint without the average (plain open_clip) is refused on resume, with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import beta_alphas, closed_form

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train")

from client_data import CLASSES, TINY, class_images, shard_samples, tiny_clip_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from clipood_plugin.data.make_shards import write_shards

    root = tmp_path_factory.mktemp("open_clip_train")
    model_dir = tiny_clip_dir(root / "tiny")
    images = class_images(24)
    shards = root / "shards"
    write_shards(shard_samples(images[:16], "train"), shards, classnames=CLASSES, split="train", max_samples_per_shard=8, progress=False)
    write_shards(shard_samples(images[16:], "val"), shards, classnames=CLASSES, split="val", max_samples_per_shard=8, progress=False)
    return {"root": root, "model": model_dir, "shards": shards}


def run(setup: dict[str, Path], name: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    shards = setup["shards"]
    cmd = [
        sys.executable, "-m", "clipood_plugin.integrations.open_clip_train",
        "--model", f"local-dir:{setup['model']}",
        "--train-data", str(shards / "train-{000000..000001}.tar"), "--val-data", str(shards / "val-000000.tar"),
        "--workers", "0", "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--warmup", "0", "--wd", "0.0",
        "--aug-cfg", "scale=(1.0, 1.0)", "--logs", str(setup["root"] / "logs"), "--name", name,
        "--save-frequency", "1", "--seed", "0", "--log-every-n-steps", "1", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=setup["root"], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"trainer failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def ckpt(setup: dict[str, Path], name: str, epoch: int) -> dict:
    return torch.load(setup["root"] / "logs" / name / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def exact(setup: dict[str, Path]) -> list[dict]:
    run(setup, "exact", "--batch-size", "16", "--epochs", "3")
    return [ckpt(setup, "exact", e) for e in (1, 2, 3)]


def test_average_is_the_closed_form_and_only_the_image_tower_trains(
    setup: dict[str, Path], exact: list[dict], capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    with capsys.disabled():
        print("\n[open_clip_train route] 0 changed lines: the installed open_clip_train runs as is, "
              "through python -m clipood_plugin.integrations.open_clip_train")

    theta0 = {k: v.double() for k, v in load_file(str(setup["model"] / "open_clip_model.safetensors")).items()}
    visual = [k for k in theta0 if k.startswith("visual.") and theta0[k].is_floating_point()]
    snaps = [{k: theta0[k] for k in visual}] + [{k: c["state_dict"][k].double() for k in visual} for c in exact]
    ref = closed_form(snaps, beta_alphas(3, 0.5))
    average = exact[-1]["state_dict_bma"]
    moved = False
    for key in visual:
        torch.testing.assert_close(average[key].double(), ref[key], rtol=1e-5, atol=1e-6, msg=key)
        moved |= not torch.allclose(ref[key], snaps[-1][key], atol=1e-5)
    assert moved, "the average equals the last weights: the check could not fail"
    assert [int(c["clipood"]["bma"]["n_averaged"]) for c in exact] == [2, 3, 4]
    for key, value in exact[-1]["state_dict"].items():  # MMS against a frozen head: the text side is fixed
        if not key.startswith("visual."):
            assert torch.equal(value.double(), theta0[key]), key


def test_checkpoint_layout_loaders_and_results(setup: dict[str, Path], exact: list[dict]) -> None:
    from clipood_plugin.integrations.open_clip_train import load_average

    path = setup["root"] / "logs" / "exact" / "checkpoints" / "epoch_3.pt"
    live = open_clip.CLIP(**TINY)
    open_clip.load_checkpoint(live, str(path))  # open_clip's own loader still reads the live weights
    for key, value in live.state_dict().items():
        assert torch.equal(value, exact[-1]["state_dict"][key]), key
    averaged = open_clip.CLIP(**TINY)
    load_average(averaged, path)
    for key, value in averaged.state_dict().items():
        assert torch.equal(value, exact[-1]["state_dict_bma"][key]), key
    lines = (setup["root"] / "logs" / "exact" / "checkpoints" / "results.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in results] == [1, 2, 3]
    assert all(0.0 <= r["top1"] <= 1.0 and 0.0 <= r["bma_top1"] <= 1.0 and r["num_samples"] == 8 for r in results)
    with pytest.raises(ValueError, match="state_dict_bma"):
        plain = setup["root"] / "plain.pt"
        torch.save({"state_dict": exact[-1]["state_dict"]}, plain)
        load_average(averaged, plain)


def test_resume_continues_the_average(setup: dict[str, Path], exact: list[dict]) -> None:
    resume = setup["root"] / "logs" / "exact" / "checkpoints" / "epoch_2.pt"
    run(setup, "resume", "--batch-size", "16", "--epochs", "3", "--resume", str(resume))
    resumed = ckpt(setup, "resume", 3)
    assert int(resumed["clipood"]["bma"]["n_averaged"]) == 4
    for key, value in exact[-1]["state_dict_bma"].items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed["state_dict_bma"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_accum_freq_counts_optimizer_steps(setup: dict[str, Path]) -> None:
    run(setup, "accum", "--batch-size", "4", "--epochs", "2", "--accum-freq", "2")
    last = ckpt(setup, "accum", 2)
    assert int(last["clipood"]["bma"]["n_averaged"]) == (4 // 2) * 2 + 1
    assert int(last["clipood"]["bma"]["_extra_state"]["total_steps"]) == 4


def test_resume_from_a_checkpoint_without_the_average_is_refused(setup: dict[str, Path], exact: list[dict]) -> None:
    plain = setup["root"] / "plain_epoch_1.pt"
    torch.save({k: v for k, v in exact[0].items() if k not in ("state_dict_bma", "clipood")}, plain)
    proc = run(setup, "refused", "--batch-size", "16", "--epochs", "3", "--resume", str(plain), check=False)
    assert proc.returncode != 0
    assert "no CLIPood average" in proc.stdout + proc.stderr
