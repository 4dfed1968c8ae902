"""The README's adoption sections run as written.

Every fenced block between ``<!-- adoption -->`` and ``<!-- /adoption -->`` is taken from the
README and:

- ``diff`` blocks must be the patch files in ``examples/`` verbatim (the client tests apply
  those to the real scripts);
- ``python`` blocks run as scripts of their own (a fresh namespace each, in README order, in one
  working folder), so a block cannot use a name it does not define;
- ``bash`` blocks run in a shell.

The only edits are the substitutions below, which swap pretrained models for a tiny random-init
CLIP (an open_clip ``local-dir:`` model, embedding size 16) and GPU-sized settings for CPU-sized
ones. Each must match the README, so a stale entry fails rather than silently doing nothing.
The timm ``train.py`` block and the one loading its output need ``TIMM_TRAIN_PY`` (a fetched
copy of timm's script, as in ``test_timm_train_client.py``) and are skipped without it.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

open_clip = pytest.importorskip("open_clip")

from client_data import CLASSES, class_images, shard_samples, tiny_clip_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: (README text, replacement); ``{tiny}`` is the tiny model folder.
SUBSTITUTIONS: list[tuple[str, str]] = [
    ('"ViT-B-16", pretrained="openai"', '"local-dir:{tiny}"'),
    ('open_clip.get_tokenizer("ViT-B-16")', 'open_clip.get_tokenizer("local-dir:{tiny}")'),
    ('open_clip.create_model("ViT-B-16")', 'open_clip.create_model("local-dir:{tiny}")'),
    ("--model ViT-B-16 --pretrained openai", "--model local-dir:{tiny}"),
    ("train-{000000..000009}.tar", "train-{000000..000001}.tar"),
    ("--batch-size 32 --epochs 10", "--batch-size 8 --epochs 1"),
    ("--workers 2", "--workers 0 --device cpu --precision fp32"),
    ("epoch_10.pt", "epoch_1.pt"),
    ("vit_base_patch16_clip_224.openai --pretrained --num-classes 512",
     "test_vit --model-kwargs img_size=32 --num-classes 16 --img-size 32 --device cpu --no-prefetcher --workers 0 -b 8"),
    ('"vit_base_patch16_clip_224", num_classes=512', '"test_vit", num_classes=16, img_size=32'),
    ("--lr 1e-5 --epochs 10", "--lr 1e-5 --epochs 1"),
]

#: The Hugging Face block continues the reader's script: these are "your model, args and ds".
HF_PRELUDE = '''
import torch
from torch import nn
from transformers import TrainingArguments

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = nn.Sequential(nn.Linear(6, 8), nn.GELU())
        self.classifier = nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.classifier(self.vision_model(x))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}

torch.manual_seed(0)
model = Model()
ds = [{"x": torch.randn(6), "labels": torch.tensor(i % 3)} for i in range(8)]
args = TrainingArguments(output_dir="hf_out", per_device_train_batch_size=4, num_train_epochs=1, save_strategy="epoch",
                         logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
'''


def adoption_blocks() -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block between the adoption markers."""
    text = README.read_text()
    start, end = text.index("<!-- adoption -->"), text.index("<!-- /adoption -->")
    blocks = []
    section = ""
    lines = text[start:end].splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("### "):
            section = line[4:].strip()
        match = re.match(r"^```(\w+)\s*$", line)
        if match:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            blocks.append((section, match.group(1), "\n".join(lines[i + 1 : j]) + "\n"))
            i = j
        i += 1
    return blocks


def test_every_substitution_matches_the_readme() -> None:
    text = README.read_text()
    adoption = text[text.index("<!-- adoption -->") : text.index("<!-- /adoption -->")]
    for old, _ in SUBSTITUTIONS:
        assert old in adoption, f"README no longer contains {old!r}: update SUBSTITUTIONS"
    langs = {lang for _, lang, _ in adoption_blocks()}
    assert langs <= {"python", "bash", "diff"}, langs


def test_diff_blocks_are_the_example_patches() -> None:
    patches = {p.name: "--- a/train.py" + p.read_text().split("--- a/train.py", 1)[1] for p in ROOT.glob("examples/timm_*.patch")}
    diffs = [code for _, lang, code in adoption_blocks() if lang == "diff"]
    assert len(diffs) == len(patches) == 3
    for code in diffs:
        assert code in patches.values(), f"a README diff is not one of {sorted(patches)}:\n{code}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from clipood_plugin.data.make_shards import write_shards

    root = tmp_path_factory.mktemp("readme")
    tiny = tiny_clip_dir(root / "tiny")
    images = class_images(24)
    data = root / "imagefolder"
    for split, chunk in (("train", images[:16]), ("validation", images[16:])):
        for k, (label, img) in enumerate(chunk):
            folder = data / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{k}.png")
    shards = root / "shards"
    write_shards(shard_samples(images[:16], "train"), shards, classnames=CLASSES, split="train", max_samples_per_shard=8, progress=False)
    write_shards(shard_samples(images[16:], "val"), shards, classnames=CLASSES, split="val", max_samples_per_shard=8, progress=False)
    work = root / "work"
    work.mkdir()
    return {"root": root, "tiny": tiny, "data": data, "shards": shards, "work": work}


def _substitute(code: str, tiny: Path) -> str:
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new.replace("{tiny}", str(tiny)))
    return code


def _needs_timm_train_py(section: str, lang: str, code: str) -> bool:
    return section.startswith("timm") and ("train.py" in code or "output/train" in code)


def test_adoption_blocks_run_as_written(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = world["work"]
    env = {"DATA": str(world["data"]), "SHARDS": str(world["shards"]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(work)
    timm_train_py = os.environ.get("TIMM_TRAIN_PY")
    skipped, ran = [], 0
    for section, lang, code in adoption_blocks():
        if lang == "diff":
            continue
        if _needs_timm_train_py(section, lang, code):
            if not timm_train_py:
                skipped.append(code.splitlines()[0])
                continue
            if not (work / "train.py").exists():
                shutil.copy(timm_train_py, work / "train.py")
                patch = subprocess.run(["git", "apply", "-p1", str(ROOT / "examples" / "timm_clipood_task.patch")],
                                       cwd=work, capture_output=True, text=True)
                assert patch.returncode == 0, patch.stderr
        script = _substitute(code, world["tiny"])
        if lang == "python":
            if "transformers import Trainer" in script:
                script = HF_PRELUDE + script
            path = work / f"block{ran}.py"
            path.write_text(script)
            runpy.run_path(str(path), run_name="__main__")
        else:
            if "train.py" in script:
                script = script.replace("python ", f"{sys.executable} ", 1)
            else:
                script = script.replace("python -m", f"{sys.executable} -m", 1)
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"README block failed:\n{script}\n{(proc.stdout + proc.stderr)[-5000:]}"
        ran += 1
    assert (work / "head.safetensors").is_file()
    assert (work / "logs" / "clipood" / "checkpoints" / "epoch_1.pt").is_file()
    assert ran >= 5
    if timm_train_py:
        assert (work / "output" / "train" / "clipood" / "last.pth.tar").is_file()
    if skipped:
        with capsys.disabled():
            print(f"\n[README] blocks skipped without TIMM_TRAIN_PY (timm's train.py): {skipped}")
