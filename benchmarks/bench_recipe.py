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
import json
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
from _common import timed
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


def bench_step(model_name: str, batch: int, rounds: int, device: str = "cpu", numerics: str = "clean",
               amp: str = "none") -> dict[str, float]:
    """Median seconds per optimizer step: plain CE on the frozen head against MMS + BMA, interleaved.

    ``numerics="clean"``: fp32 weights, autocast to ``amp`` (none or bf16), the fp32 BMA.
    ``numerics="official"``: both towers in the official fp16 precision (``to_official_precision``,
    ``OfficialPrecisionStep``), fp16 losses and the fp16 ``storage="param"`` BMA, no autocast.
    """
    import open_clip

    from clipood_plugin.official import OfficialPrecisionStep, to_official_precision

    dev = torch.device(device)
    official = numerics == "official"
    if model_name.startswith("clipood-tiny"):  # the embedded world's tiny CLIP (gpu_suite's CPU dry run)
        from clipood_plugin.world.tiny_clip import register_model_config

        register_model_config()
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    text = F.normalize(torch.randn(1000, model.text_projection.shape[1]), dim=-1).to(dev)
    head = TextHead(text, scale=100.0)
    images = torch.randn(batch, 3, size, size, device=dev)
    labels = torch.randint(0, 1000, (batch,), device=dev)
    towers = {name: open_clip.create_model(model_name, pretrained=None).visual for name in ("ce", "clipood")}
    for tower in towers.values():
        tower.load_state_dict(model.visual.state_dict())
        tower.to(dev)
        if official:
            to_official_precision(tower)
    opt = {name: torch.optim.AdamW(t.parameters(), lr=1e-5, weight_decay=0.1) for name, t in towers.items()}
    steppers = {name: OfficialPrecisionStep(o, towers[name]).step if official else o.step for name, o in opt.items()}
    mms = MMSLoss(text.half(), scale=100.0, precision="input") if official else MMSLoss(head)
    ce_logits = (lambda f: 100.0 * (f / f.norm(dim=-1, keepdim=True)) @ text.half().T) if official else head
    bma = BetaMovingAverage(towers["clipood"], total_steps=10_000, storage="param" if official else "fp32")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16")

    def ce_step() -> None:
        with autocast:
            loss = F.cross_entropy(ce_logits(towers["ce"](images)), labels)
        opt["ce"].zero_grad(set_to_none=True)
        loss.backward()
        steppers["ce"]()

    def clipood_step() -> None:
        with autocast:
            loss = mms(towers["clipood"](images), labels)
        opt["clipood"].zero_grad(set_to_none=True)
        loss.backward()
        steppers["clipood"]()
        bma.update_parameters(towers["clipood"])

    ce_step(), clipood_step()  # warm-up
    times: dict[str, list[float]] = {"plain CE step": [], "CLIPood step (MMS + BMA)": []}
    for r in range(rounds):
        pair = [("plain CE step", ce_step), ("CLIPood step (MMS + BMA)", clipood_step)]
        for name, fn in pair if r % 2 == 0 else reversed(pair):
            times[name].append(timed(fn, dev))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the step benchmark runs (the loader is CPU work)")
    parser.add_argument("--numerics", choices=["clean", "official"], default="clean")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast (clean numerics only)")
    parser.add_argument("--batch", type=int, default=8, help="step benchmark batch size")
    parser.add_argument("--model", default=None, help="open_clip model (default ViT-B-16, ViT-S-16 with --quick)")
    parser.add_argument("--skip-loader", action="store_true", help="only the step benchmark")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.numerics == "official" and args.amp != "none":
        parser.error("official numerics run without autocast")
    import torchvision.transforms as T

    transform = T.Compose([T.RandomResizedCrop(112, scale=(0.7, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    if args.device.startswith("cuda"):
        machine += f"; step on {torch.cuda.get_device_name(torch.device(args.device))}"
    rows = []
    if not args.skip_loader:
        with tempfile.TemporaryDirectory() as tmp:
            pattern = make_shards(Path(tmp), 240 if args.quick else 1200, 128)
            loader = bench_loader(pattern, transform, rounds=2 if args.quick else 3)
        bare = loader["bare decode+transform (1 process)"]
        for name, rate in loader.items():
            rows.append(("loader", name, f"{rate:,.0f} samples/s", f"{rate / bare:.2f}×", ""))
    model_name = args.model or ("ViT-S-16" if args.quick else "ViT-B-16")
    step = bench_step(model_name, batch=args.batch, rounds=3 if args.quick else 7, device=args.device,
                      numerics=args.numerics, amp=args.amp)
    ce = step["plain CE step"]
    mode = f"{args.numerics} numerics" + (f", {args.amp}" if args.amp != "none" else "")
    for name, seconds in step.items():
        rows.append((f"{model_name} step, batch {args.batch}, {mode}", name, f"{seconds * 1e3:,.1f} ms",
                     f"{seconds / ce:.3f}×", "≤ 1.03" if "CLIPood" in name else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))

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
