"""Recipe benchmarks: loader throughput and the cost of a CLIPood step over plain fine-tuning.

A script, not a test; ratios are measured side by side in one run. Usage::

    python benchmarks/bench_recipe.py            # ViT-B/16 step at batch 8, 1024 images of 128 px
    python benchmarks/bench_recipe.py --quick    # ViT-S-16 and fewer images (a smoke run)
    python benchmarks/bench_recipe.py --write    # and append the table to RESULTS.md

1. Loader: samples/s of ``make_train_loader`` (shard shuffle, tar grouping, sample shuffle,
   decode, transform, batch) with 1 and 2 workers, against a bare loop over the same tar files
   that only decodes and transforms, in one process.
2. Step: one CLIPood optimizer step (image tower forward, MMSLoss, backward, AdamW, BMA update)
   against a plain cross-entropy fine-tuning step (same tower, head logits, CE, AdamW), same
   batch. Target: at most 3 % overhead.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

from clipood_plugin import BetaMovingAverage, MMSLoss, TextHead
from clipood_plugin.data.stream import make_train_loader

RESULTS = Path(__file__).with_name("RESULTS.md")


def make_shards(root: Path, n: int, size: int) -> str:
    from clipood_plugin.world.images import CLASSNAMES, WorldSpec, write_world_shards

    per = max(1, n // (len(CLASSNAMES) * 5))
    spec = WorldSpec(image_size=size, samples_per_class_domain=per)
    info = write_world_shards(spec, root, "train", max_samples_per_shard=max(1, n // 8), progress=False)
    return info.pattern


def bare_loop(urls: list[str], transform) -> int:  # type: ignore[no-untyped-def]
    """Decode and transform every image in one process, one thread (as a DataLoader worker runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bare_loop(urls, transform)
    finally:
        torch.set_num_threads(threads)


def _bare_loop(urls: list[str], transform) -> int:  # type: ignore[no-untyped-def]
    count = 0
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".png") or member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    transform(image)
                    count += 1
    return count


def bench_loader(pattern: str, transform, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from clipood_plugin.data.urls import expand_urls

    urls = expand_urls(pattern)
    loaders = {w: make_train_loader(pattern, batch_size=32, transform=transform, num_classes=24, workers=w,
                                    seed=0) for w in (1, 2)}
    rates: dict[str, list[float]] = {"bare decode+transform (1 process)": [], "make_train_loader, 1 worker": [],
                                     "make_train_loader, 2 workers": []}
    for r in range(rounds):
        start = time.perf_counter()
        n = bare_loop(urls, transform)
        rates["bare decode+transform (1 process)"].append(n / (time.perf_counter() - start))
        for w, loader in loaders.items():
            loader.set_epoch(r)
            start = time.perf_counter()
            n = sum(len(batch[1]) for batch in loader)
            rates[f"make_train_loader, {w} worker{'s' if w > 1 else ''}"].append(n / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in rates.items()}


def bench_step(model_name: str, batch: int, rounds: int) -> dict[str, float]:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    head = TextHead(F.normalize(torch.randn(1000, model.text_projection.shape[1]), dim=-1), scale=100.0)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))
    towers = {name: open_clip.create_model(model_name, pretrained=None).visual for name in ("ce", "clipood")}
    for tower in towers.values():
        tower.load_state_dict(model.visual.state_dict())
    opt = {name: torch.optim.AdamW(t.parameters(), lr=1e-5, weight_decay=0.1) for name, t in towers.items()}
    mms = MMSLoss(head)
    bma = BetaMovingAverage(towers["clipood"], total_steps=10_000)

    def ce_step() -> None:
        loss = F.cross_entropy(head(towers["ce"](images)), labels)
        opt["ce"].zero_grad(set_to_none=True)
        loss.backward()
        opt["ce"].step()

    def clipood_step() -> None:
        loss = mms(towers["clipood"](images), labels)
        opt["clipood"].zero_grad(set_to_none=True)
        loss.backward()
        opt["clipood"].step()
        bma.update_parameters(towers["clipood"])

    ce_step(), clipood_step()  # warm-up
    times: dict[str, list[float]] = {"plain CE step": [], "CLIPood step (MMS + BMA)": []}
    for r in range(rounds):
        pair = [("plain CE step", ce_step), ("CLIPood step (MMS + BMA)", clipood_step)]
        for name, fn in pair if r % 2 == 0 else reversed(pair):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import torchvision.transforms as T

    transform = T.Compose([T.RandomResizedCrop(112, scale=(0.7, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pattern = make_shards(Path(tmp), 240 if args.quick else 1200, 128)
        loader = bench_loader(pattern, transform, rounds=2 if args.quick else 3)
    bare = loader["bare decode+transform (1 process)"]
    for name, rate in loader.items():
        rows.append(("loader", name, f"{rate:,.0f} samples/s", f"{rate / bare:.2f}×", ""))
    model_name = "ViT-S-16" if args.quick else "ViT-B-16"
    step = bench_step(model_name, batch=8, rounds=3 if args.quick else 7)
    ce = step["plain CE step"]
    for name, seconds in step.items():
        rows.append((f"{model_name} step, batch 8", name, f"{seconds * 1e3:,.0f} ms", f"{seconds / ce:.3f}×",
                     "≤ 1.03" if "CLIPood" in name else ""))

    table = Table(title=f"bench_recipe on {machine}")
    for col in ("what", "case", "measure", "ratio to first row", "target"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if args.write:
        lines = [f"\n### bench_recipe — {date.today().isoformat()} — {machine}" + (" (quick)" if args.quick else ""),
                 "", "| what | case | measure | ratio | target |", "|---|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        with RESULTS.open("a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
