"""recipes/ood_benchmark.py --quick end to end: complete JSON, valid ranges, zero-shot checked independently.

The zero-shot numbers are recomputed here from freshly generated images with
``tiny_clip.zero_shot_accuracy`` (open_clip's ``encode_image`` path), not with the recipe's code.
Uses the default WorldSpec so the cached tiny CLIP is reused (a cold cache pretrains, ~3 min).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from clipood_plugin.protocols.base_to_new import base_new_labels, harmonic_mean
from clipood_plugin.world.images import SPLITS, WorldSpec, make_tensors
from clipood_plugin.world.tiny_clip import load_pretrained, zero_shot_accuracy

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("zero_shot", "ce_linear", "ce_frozen", "wise_ft", "mms", "mms_ema", "mms_bma", "carft")
METRICS = {"domain_shift": ("target", "sources"), "open_class": ("base", "new", "H"),
           "in_the_wild": ("base", "new", "total")}


def _subset(images: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor, doms: list[int],
            classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = [i for i in range(labels.shape[0]) if int(domains[i]) in doms and int(labels[i]) in classes]
    pos = {c: j for j, c in enumerate(classes)}
    return images[keep], torch.tensor([pos[int(labels[i])] for i in keep])


def test_quick_run_is_complete_and_zero_shot_matches(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "ood_benchmark.py"), "--quick", "--no-progress",
                           "--output", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    res = json.loads((tmp_path / "results.json").read_text())

    assert res["seeds"] == [0] and res["config"]["steps"] == 30
    for setting, metrics in METRICS.items():
        assert set(res["results"][setting]) == set(METHODS)
        for m in METHODS:
            for k in metrics:
                vals = res["results"][setting][m][k]
                assert len(vals) == 1 and all(0.0 <= v <= 100.0 and math.isfinite(v) for v in vals), (setting, m, k)
                assert res["summary"][setting][m][k]["mean"] == vals[0]
        for m in METHODS:  # H is the harmonic mean of the recorded base and new accuracies
            r = res["results"]["open_class"][m]
            assert abs(r["H"][0] - harmonic_mean(r["base"][0], r["new"][0])) < 1e-9
    md = (tmp_path / "results.md").read_text()
    assert md.count("\n| ") == len(METHODS) + 1  # header + one row per method
    w = res["bma_weights"]
    assert len(w) == 31 and abs(w[0] - w[-1]) < 1e-12 and w[15] < w[0]  # U-shaped Beta(0.5, 0.5)

    # Independent zero-shot: regenerate the test split and classify with zero_shot_accuracy.
    data = res["data"]
    spec = WorldSpec(image_size=data["spec"]["image_size"], seed=data["spec"]["seed"])
    assert list(spec.classes) == data["spec"]["classes"] and list(spec.domains) == data["spec"]["domains"]
    test = make_tensors(spec, SPLITS["test"], samples_per_class_domain=data["eval_per_class_domain"])
    model, _, tok = load_pretrained(spec)
    names = list(spec.classes)
    base, new = base_new_labels(range(len(names)))
    sketch = [spec.domains.index("sketch")]
    everything = list(range(len(spec.domains)))
    sources = [d for d in everything if d not in sketch]

    def zs(doms: list[int], classes: list[int], among: list[int]) -> float:
        x, y = _subset(test.images, test.labels, test.domains, doms, classes)
        if among != classes:  # labels index `among`, which contains `classes`
            y = torch.tensor([among.index(classes[int(t)]) for t in y])
        return 100.0 * zero_shot_accuracy(model, tok, x, y, [names[c] for c in among])

    k_all = list(range(len(names)))
    expected = {
        ("domain_shift", "target"): zs(sketch, k_all, k_all),
        ("domain_shift", "sources"): sum(zs([d], k_all, k_all) for d in sources) / len(sources),
        ("open_class", "base"): zs(everything, base, base),
        ("open_class", "new"): zs(everything, new, new),
        ("in_the_wild", "base"): zs(sketch, base, k_all),
        ("in_the_wild", "new"): zs(sketch, new, k_all),
        ("in_the_wild", "total"): zs(sketch, k_all, k_all),
    }
    for (setting, k), value in expected.items():
        got = res["results"][setting]["zero_shot"][k][0]
        assert abs(got - value) < 1e-6, (setting, k, got, value)
    # Fine-tuning must have changed something: not every method can equal zero-shot everywhere.
    ft = [res["results"][s][m][k][0] for s, ks in METRICS.items() for k in ks for m in METHODS if m != "zero_shot"]
    zero = [res["results"][s]["zero_shot"][k][0] for s, ks in METRICS.items() for k in ks]
    assert any(v not in zero for v in ft)
