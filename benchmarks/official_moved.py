"""Which image-tower weights the official numerics ever move, by |w|, on the embedded world.

    python benchmarks/official_moved.py [--lrs 5e-6 3e-4] [--steps 300] [--cache-dir DIR] [--json out.json]

Fine-tunes the embedded world's pretrained tiny CLIP on the main job's source domains (photo,
sketch, cartoon, infograph) with MMS in the official numerics (``to_official_precision``, ``OfficialPrecisionStep``,
fp16 MMS logits, AdamW wd 0.1, CosineAnnealingLR over ``--steps``, batch 36) and records, for every
element of the image tower, whether it ever changed at any step. The table gives the fraction of
elements that moved, per |θ_0| bin for the fp16 tensors, and for the fp32 ones (LayerNorms,
embeddings) as a whole. The official run's signature: at small lr, fp16 weights above a |w| that
halves with the lr never move (their AdamW update is below half an ulp), while fp32 ones all do.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from clipood_plugin import MMSLoss
from clipood_plugin.official import OfficialPrecisionStep, official_text_features, to_official_precision

BINS = [0.0, 2**-10, 2**-8, 2**-7, 2**-6, 2**-5, 2**-4, 2**-3, math.inf]


def _label(lo: float, hi: float) -> str:
    def fmt(v: float) -> str:
        return "0" if v == 0 else ("∞" if v == math.inf else f"2^{int(math.log2(v))}")

    return f"[{fmt(lo)}, {fmt(hi)})"


def moved_fractions(lr: float, steps: int, cache_dir: str | None, seed: int = 0, batch: int = 36) -> dict[str, Any]:
    from clipood_plugin.templates import render_template
    from clipood_plugin.world.default import EmbeddedTask
    from clipood_plugin.world.images import CLASS_PROMPT, make_tensors
    from clipood_plugin.world.tiny_clip import load_pretrained, to_model_input

    task = EmbeddedTask()
    model, _, tokenizer = load_pretrained(task.spec, cache_dir=cache_dir, progress=False)
    data = make_tensors(task.spec, domains=list(task.sources))
    images = to_model_input(data.images, model)
    labels = data.labels
    to_official_precision(model)
    tower = model.visual
    names = list(task.spec.classes)
    text = official_text_features(model, tokenizer, [render_template(CLASS_PROMPT, n) for n in names], "cpu")
    loss_fn = MMSLoss(text, lam=0.3, scale=float(model.logit_scale.detach().exp()), precision="input", check_inputs=False)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    stepper = OfficialPrecisionStep(optimizer, tower)
    start = {n: p.detach().clone() for n, p in tower.named_parameters()}
    ever = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in tower.named_parameters()}
    previous = {n: p.detach().clone() for n, p in tower.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        loss = loss_fn(tower(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        stepper.step()
        scheduler.step()
        for n, p in tower.named_parameters():
            ever[n] |= p.detach() != previous[n]
            previous[n].copy_(p.detach())
    rows = []
    for lo, hi in itertools.pairwise(BINS):
        total = moved = 0
        for n, p0 in start.items():
            if p0.dtype != torch.float16:
                continue
            mask = (p0.float().abs() >= lo) & (p0.float().abs() < hi)
            total += int(mask.sum())
            moved += int(ever[n][mask].sum())
        rows.append({"bin": _label(lo, hi), "elements": total, "moved": moved / total if total else float("nan")})
    fp32_total = sum(p.numel() for p in start.values() if p.dtype == torch.float32)
    fp32_moved = sum(int(ever[n].sum()) for n, p in start.items() if p.dtype == torch.float32)
    return {"lr": lr, "steps": steps, "fp16_bins": rows, "fp32_elements": fp32_total,
            "fp32_moved": fp32_moved / fp32_total if fp32_total else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-6, 3e-4])
    p.add_argument("--steps", type=int, default=300, help="T (the embedded default's 300 steps)")
    p.add_argument("--cache-dir", default=None, help="where the pretrained tiny CLIP is cached")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [moved_fractions(lr, args.steps, args.cache_dir) for lr in args.lrs]
    header = "| \\|θ_0\\| (fp16 tensors) | " + " | ".join(f"lr {r['lr']:g}" for r in results) + " |"
    print(header)
    print("|---|" + "---|" * len(results))
    for i, row in enumerate(results[0]["fp16_bins"]):
        cells = " | ".join(f"{r['fp16_bins'][i]['moved']:.1%}" for r in results)
        print(f"| {row['bin']} ({row['elements']:,} elements) | {cells} |")
    print("| fp32 tensors (LayerNorms, embeddings) | " + " | ".join(f"{r['fp32_moved']:.1%}" for r in results) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
