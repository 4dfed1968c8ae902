"""The timm routes run inside timm's *own* ``train.py``, patched with the diffs in ``examples/``.

``train.py`` is not part of the timm package, so these tests need a fetched copy:
``TIMM_TRAIN_PY`` (current main, task API) and ``TIMM_LEGACY_TRAIN_PY`` (tag v1.0.26,
``ModelEmaV3``). Without them the client runs skip, saying so; the changed-line count of every
patch is checked (and printed) regardless.

Per route, on a generated ImageFolder (10 training images of 32 px, 4 classes):

1. ``exact``: 3 epochs of one optimizer step each, so ``checkpoint-0..2`` hold θ_1..θ_3 and the
   initial checkpoint θ_0; the saved average must be Σ α_t θ_t / Σ α_t with α from the Beta pdf
   written in ``tests/reference.py``, and ``timm.models.load_checkpoint(..., use_ema=True)`` must
   load it. For BatchNorm models the average's running statistics must equal an independent
   ``torch.optim.swa_utils.update_bn`` over the same images, not the live model's.
2. ``resume``: ``--resume checkpoint-1.pth.tar`` must end with the same average as the
   uninterrupted run (one full batch per epoch and ``--no-aug`` make the step data identical).
3. ``flags``: ``--grad-accum-steps 2 --mixup 0.2 --smoothing 0.1 --cooldown-epochs 1
   --warmup-epochs 1 --warmup-prefix`` on 5 batches per epoch: T = (1 + 2 + 1) × ceil(5 / 2) = 12
   steps, and the run must fold in exactly that many.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reference import beta_alphas, closed_form

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CLASSES = ("car", "cat", "dog", "tree")  # timm's ImageFolder sorts the folders: this is label order
DIM = 16
TRAIN_PER_CLASS = (3, 3, 2, 2)


@dataclass(frozen=True)
class Route:
    name: str
    patch: str
    env_var: str
    model: str  # as create_model is called in the test (θ_0 and the loader of the average)
    model_kwargs: dict
    clip: bool
    batchnorm: bool


ROUTES = (
    Route("clipood_task", "timm_clipood_task.patch", "TIMM_TRAIN_PY", "test_vit",
          {"num_classes": DIM, "img_size": 32}, clip=True, batchnorm=False),
    Route("bma_task", "timm_bma_task.patch", "TIMM_TRAIN_PY", "resnet10t",
          {"num_classes": len(CLASSES)}, clip=False, batchnorm=True),
    Route("legacy_bma", "timm_legacy_bma.patch", "TIMM_LEGACY_TRAIN_PY", "resnet10t",
          {"num_classes": len(CLASSES)}, clip=False, batchnorm=True),
)


def changed_lines(patch: Path) -> tuple[int, int]:
    """(added, removed) code lines of a unified diff, as diff counts them (blank lines excluded)."""
    added = removed = 0
    in_diff = False
    for line in patch.read_text().splitlines():
        if line.startswith("--- "):
            in_diff = True
            continue
        if not in_diff or line.startswith(("+++ ", "@@")):
            continue
        if line.startswith("+") and line[1:].strip():
            added += 1
        elif line.startswith("-") and line[1:].strip():
            removed += 1
    return added, removed


def header_command(patch: Path) -> list[str]:
    """The ``train.py`` command line the patch header says it was tested with (after ``python``)."""
    lines = patch.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# Tested with"):
            command = lines[i + 1].lstrip("# ").strip()
            words = shlex.split(command)
            assert words[:2] == ["python", "train.py"], command
            return words[2:]
    raise AssertionError(f"{patch.name} has no 'Tested with' line in its header")


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_patch_is_at_most_five_changed_lines(route: Route, capsys: pytest.CaptureFixture[str]) -> None:
    patch = EXAMPLES / route.patch
    added, removed = changed_lines(patch)
    text = patch.read_text()
    assert "Target:" in text.split("--- a/train.py")[0], "the header must name the timm commit or tag"
    assert header_command(patch)
    with capsys.disabled():
        print(f"\n[timm route {route.name}] {patch.name}: {added + removed} changed lines ({added} added, {removed} removed)")
    assert 0 < added + removed <= 5


# ------------------------------------------------------------------------------------------
# Runs of the real train.py
# ------------------------------------------------------------------------------------------


def _train_py(route: Route) -> Path:
    path = os.environ.get(route.env_var)
    if not path:
        pytest.skip(f"{route.env_var} is not set: fetch timm's train.py (see the patch header) to run the {route.name} route")
    if not Path(path).is_file():
        pytest.skip(f"{route.env_var}={path} is not a file")
    return Path(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    gen = torch.Generator().manual_seed(0)
    for split, counts in (("train", TRAIN_PER_CLASS), ("validation", (1, 1, 1, 1))):
        for c, (name, n) in enumerate(zip(CLASSES, counts)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                base = torch.zeros(3, 32, 32)
                base[c % 3] = 0.25 * (c + 1)
                img = (base + 0.3 * torch.rand(3, 32, 32, generator=gen)).clamp(0, 1)
                array = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                Image.fromarray(array).save(folder / f"{split}_{i}.png")
    return root


@dataclass
class Workspace:
    route: Route
    train_py: Path
    data: Path
    init: Path
    head: Path | None
    out: Path

    def run(self, name: str, *extra: str) -> Path:
        args = []
        for word in header_command(EXAMPLES / self.route.patch):
            args.append({"DATA": str(self.data), "OUT": str(self.out), "INIT": str(self.init),
                         "HEAD": str(self.head)}.get(word, word))
        cmd = [sys.executable, str(self.train_py), *args, "--experiment", name, *extra]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, cwd=self.train_py.parent, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"train.py failed ({' '.join(cmd)}):\n{log[-6000:]}"
        (self.out / f"{name}.log").write_text(log)
        return self.out / name


def _load(path: Path) -> dict:
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", params=ROUTES, ids=lambda r: r.name)
def workspace(request: pytest.FixtureRequest, image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    route: Route = request.param
    source = _train_py(route)
    timm = pytest.importorskip("timm")
    from clipood_plugin import TextHead

    work = tmp_path_factory.mktemp(route.name)
    train_py = work / "train.py"
    train_py.write_text(source.read_text())
    patch = subprocess.run(["git", "apply", "-p1", str(EXAMPLES / route.patch)], cwd=work, capture_output=True, text=True)
    assert patch.returncode == 0, f"{route.patch} does not apply to {source}: {patch.stderr}"
    torch.manual_seed(123)
    model = timm.create_model(route.model, pretrained=False, **route.model_kwargs)
    init = work / "init.pth"
    torch.save(model.state_dict(), init)
    head = None
    if route.clip:
        gen = torch.Generator().manual_seed(5)
        head = work / "head.safetensors"
        TextHead(torch.randn(len(CLASSES), DIM, generator=gen), scale=10.0, classnames=list(CLASSES)).save(head)
    return Workspace(route, train_py, image_folder, init, head, work / "out")


def _fresh_model(route: Route) -> torch.nn.Module:
    import timm

    return timm.create_model(route.model, pretrained=False, **route.model_kwargs)


@pytest.fixture(scope="module")
def exact_run(workspace: Workspace) -> Path:
    return workspace.run("exact", "--epochs", "3", "-b", "10")


def test_exact_average_is_the_closed_form_and_loads_with_use_ema(workspace: Workspace, exact_run: Path) -> None:
    from timm.models import load_checkpoint

    route = workspace.route
    theta0 = {k: v.double() for k, v in torch.load(workspace.init, weights_only=True).items()}
    ckpts = [_load(exact_run / f"checkpoint-{e}.pth.tar") for e in range(3)]
    names = [n for n, _ in _fresh_model(route).named_parameters()]
    snaps = [{n: theta0[n] for n in names}] + [{n: c["state_dict"][n].double() for n in names} for c in ckpts]
    ref = closed_form(snaps, beta_alphas(3, 0.5))
    last = _load(exact_run / "last.pth.tar")
    average = last["state_dict_ema"]
    moved = False
    for n in names:
        torch.testing.assert_close(average[n].double(), ref[n], rtol=1e-5, atol=1e-6, msg=n)
        moved |= not torch.allclose(ref[n], snaps[-1][n], atol=1e-5)
    assert moved, "the average equals the last weights: the check could not fail"
    if route.name != "legacy_bma":
        assert int(last["task_state_ema"]["bma"]["n_averaged"]) == 4

    fresh = _fresh_model(route)
    load_checkpoint(fresh, str(exact_run / "last.pth.tar"), use_ema=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, average[key].to(value.dtype)), key

    log = (workspace.out / "exact.log").read_text()
    assert "(EMA)" in log, "train.py did not validate the average"
    if route.clip:
        assert "decay" in log and "ignored" in log, "the --model-ema-decay warning is missing"
    if route.batchnorm:
        _check_bn_recomputed(workspace, last)


def _check_bn_recomputed(workspace: Workspace, last: dict) -> None:
    """The average's BN statistics = update_bn over the 10 training images (32 px, no-aug: exact)."""
    from PIL import Image
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torch.optim.swa_utils import update_bn

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    images = []
    for path in sorted((workspace.data / "train").rglob("*.png")):
        array = torch.from_numpy(__import__("numpy").asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        images.append((array.float() / 255 - mean) / std)
    model = _fresh_model(workspace.route)
    model.load_state_dict(last["state_dict_ema"])
    update_bn([torch.stack(images)], model)
    live = last["state_dict"]
    checked = 0
    for key, value in model.state_dict().items():
        if key.endswith("running_mean") or key.endswith("running_var"):
            torch.testing.assert_close(last["state_dict_ema"][key], value, rtol=1e-4, atol=1e-5, msg=key)
            checked += 1
    assert checked
    assert any(not torch.allclose(last["state_dict_ema"][k], live[k], atol=1e-4) for k in live if k.endswith("running_mean"))


def test_resume_from_timm_checkpoint_continues_the_average(workspace: Workspace, exact_run: Path) -> None:
    resumed = workspace.run("resume", "--epochs", "3", "-b", "10", "--resume", str(exact_run / "checkpoint-1.pth.tar"))
    assert not (resumed / "checkpoint-0.pth.tar").exists(), "the resumed run should start at epoch 2"
    a, b = _load(exact_run / "last.pth.tar"), _load(resumed / "last.pth.tar")
    for key, value in a["state_dict_ema"].items():
        if value.is_floating_point():
            torch.testing.assert_close(b["state_dict_ema"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    if workspace.route.name != "legacy_bma":
        assert b["task_state_ema"]["bma"] == a["task_state_ema"]["bma"]


def test_flags_accumulation_mixup_smoothing_cooldown_warmup_prefix(workspace: Workspace) -> None:
    run = workspace.run(
        "flags", "--epochs", "2", "-b", "2", "--grad-accum-steps", "2", "--mixup", "0.2", "--smoothing", "0.1",
        "--cooldown-epochs", "1", "--warmup-epochs", "1", "--warmup-prefix",
    )
    total = (1 + 2 + 1) * -(-5 // 2)  # (warmup + epochs + cooldown) × ceil(batches / accumulation)
    last = _load(run / "last.pth.tar")
    assert last["epoch"] == 3
    if workspace.route.name == "legacy_bma":
        log = (workspace.out / "flags.log").read_text()
        assert f"T={total}" in log
    else:
        bookkeeping = last["task_state_ema"]["bma"]
        assert int(bookkeeping["n_averaged"]) == total + 1  # θ_0 plus every optimizer step
