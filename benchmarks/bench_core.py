"""Core benchmarks: MMSLoss against cross-entropy, one BMA update against the bandwidth floor, k averages.

A script, not a test. Every comparison is measured in one run, interleaved round by round, and
printed as a ratio, because absolute times drift on shared machines. Usage::

    python benchmarks/bench_core.py            # full run (ViT-B/16-sized tower, ~1–2 min on a CPU)
    python benchmarks/bench_core.py --quick    # smaller tower, fewer rounds (a smoke run)
    python benchmarks/bench_core.py --device cuda --write   # and record into RESULTS.md

Targets (issue "Core"): MMSLoss forward+backward ≤ 1.10× plain cross-entropy on scaled cosine
logits; one BMA update ≤ 1.15× a bare ``torch._foreach_lerp_`` over the same tensors, and faster
than the official per-parameter rule ``avg = (avg + r·θ) / (1 + r)``.

Issue "Choosing β without a second run": k BMA updates (the recipe's ``--bma-beta 0.1 0.5 1.0``)
cost close to k times one, not more; a ``TrajectorySnapshots`` update inside a segment costs about
one BMA update; a segment close adds one host copy and safetensors write of the tower (K per run).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from _common import sync
from rich.console import Console
from rich.table import Table
from torch import nn

from clipood_plugin import BetaMovingAverage, MMSLoss
from clipood_plugin.posthoc import TrajectorySnapshots

RESULTS = Path(__file__).with_name("RESULTS.md")


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int, device: torch.device) -> dict[str, float]:
    """Median over rounds of the mean time per call; each round runs every candidate once."""
    for fn in fns.values():  # warm-up
        for _ in range(max(1, inner // 4)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns.items())
        if r % 2:
            order.reverse()  # no candidate always runs first
        for name, fn in order:
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(times) for name, times in samples.items()}


def bench_mms(batch: int, classes: int, dim: int, device: torch.device, rounds: int, inner: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1).to(device)
    feats = torch.randn(batch, dim, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    mms = MMSLoss(text, lam=0.3, scale=100.0).to(device)
    mms_unchecked = MMSLoss(text, lam=0.3, scale=100.0, check_inputs=False).to(device)

    def cross_entropy() -> None:
        logits = 100.0 * F.normalize(feats, dim=-1) @ text.t()
        F.cross_entropy(logits, labels).backward()
        feats.grad = None

    def mms_loss() -> None:
        mms(feats, labels).backward()
        feats.grad = None

    def mms_loss_unchecked() -> None:
        mms_unchecked(feats, labels).backward()
        feats.grad = None

    fns = {"cross-entropy": cross_entropy, "MMSLoss": mms_loss, "MMSLoss, check_inputs=False": mms_loss_unchecked}
    return interleaved(fns, rounds, inner, device)


def official_rule(averaged: list[torch.Tensor], current: list[torch.Tensor], r: float) -> None:
    """The official per-parameter update restated: avg ← (avg + r·θ) / (1 + r), out of place."""
    for avg, cur in zip(averaged, current):
        avg.data = (avg.data + r * cur.data) / (1 + r)


def bench_bma(tower: nn.Module, device: torch.device, rounds: int, storage: str = "fp32") -> dict[str, float]:
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    tower = tower.to(device)
    total = 10_000
    bma = BetaMovingAverage(tower, total_steps=total, beta=0.5, storage=storage)
    ema_torch = AveragedModel(tower, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    ema_torch.update_parameters(tower)  # the first call only copies
    ema_timm = ModelEmaV3(tower, decay=0.999)
    floor_avg = [p.detach().clone() for p in tower.parameters()]
    official_avg = [p.detach().clone() for p in copy.deepcopy(tower).parameters()]
    params = [p.detach() for p in tower.parameters()]
    step = {"n": 0}

    def bma_update() -> None:
        if bma.steps >= total:  # long benchmarks: restart rather than pass the horizon
            bma.set(tower)
        bma.update_parameters(tower)

    def timm_update() -> None:
        step["n"] += 1
        ema_timm.update(tower, step=step["n"])

    fns = {
        "foreach_lerp_ floor": lambda: torch._foreach_lerp_(floor_avg, params, 0.01),
        "BetaMovingAverage": bma_update,
        "AveragedModel+EMA": lambda: ema_torch.update_parameters(tower),
        "timm ModelEmaV3": timm_update,
        "official rule": lambda: official_rule(official_avg, params, 0.01),
    }
    return interleaved(fns, rounds, 1, device)


def bench_several(tower: nn.Module, device: torch.device, rounds: int, k: int = 3) -> dict[str, float]:
    """k BMA updates per step (one per β) against one, and a trajectory-recorder update."""
    import tempfile

    tower = tower.to(device)
    total = 10_000
    betas = (0.1, 0.5, 1.0, 2.0, 0.25)[:k]
    one = BetaMovingAverage(tower, total_steps=total, beta=0.5)
    several = [BetaMovingAverage(tower, total_steps=total, beta=b) for b in betas]
    scratch = tempfile.TemporaryDirectory()
    # a long horizon: the first segment spans thousands of steps, so no update below closes one
    recorder = TrajectorySnapshots(tower, total_steps=1_000_000, segments=32, directory=scratch.name)
    recorder.update_parameters(tower)  # the first update of a segment is a copy; time the lerps after it

    def update(avg: BetaMovingAverage) -> None:
        if avg.steps >= total:
            avg.set(tower)
        avg.update_parameters(tower)

    def write_segment() -> None:  # what closing a segment adds: host copy + atomic safetensors write
        from safetensors.torch import save_file

        from clipood_plugin.training.checkpoint import atomic_path

        with atomic_path(Path(scratch.name) / "bench.safetensors") as tmp:
            save_file({n: p.detach().to("cpu").contiguous() for n, p in tower.named_parameters()}, str(tmp))

    fns = {
        "one BMA update": lambda: update(one),
        f"{k} BMA updates": lambda: [update(avg) for avg in several],
        "TrajectorySnapshots update": lambda: recorder.update_parameters(tower),
    }
    times = interleaved(fns, rounds, 1, device)
    times["segment close (write)"] = interleaved({"w": write_segment}, max(3, rounds // 3), 1, device)["w"]
    scratch.cleanup()
    return times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small tower and few rounds (smoke run)")
    parser.add_argument("--write", action="store_true", help=f"append the results to {RESULTS.name}")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "official"], default="fp32",
                        help="the tower's weights: fp32, bf16, or the official fp16 precision (BMA storage='param')")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--averages-only", action="store_true", help="skip the MMSLoss rows")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the averaging comparisons (default 9, 3 with --quick); more on a busy machine")
    args = parser.parse_args()
    device = torch.device(args.device)
    console = Console()
    rows: list[tuple[str, str, float, float, str]] = []

    rounds = 5 if args.quick else 15
    for batch, classes, dim in () if args.averages_only else ((256, 1000, 512), (36, 65, 512)):
        inner = 20 if args.quick else 100
        t = bench_mms(batch, classes, dim, device, rounds, inner)
        for method, target in (("MMSLoss", "≤ 1.10"), ("MMSLoss, check_inputs=False", "")):
            rows.append((f"{method} fwd+bwd B={batch} C={classes} D={dim}", "cross-entropy", t[method] * 1e6,
                         t[method] / t["cross-entropy"], target))

    import open_clip

    name = "ViT-S-16" if args.quick else "ViT-B-16"
    tower = open_clip.create_model(name, pretrained=None).visual
    if args.dtype == "bf16":
        tower = tower.to(torch.bfloat16)
    elif args.dtype == "official":
        from clipood_plugin.official import to_official_precision

        tower = to_official_precision(tower)
    n_params = sum(p.numel() for p in tower.parameters())
    average_rounds = args.rounds or (3 if args.quick else 9)
    t = bench_bma(tower, device, rounds=average_rounds, storage="param" if args.dtype == "official" else "fp32")
    floor = t["foreach_lerp_ floor"]
    label = f"{name} image tower ({n_params / 1e6:.1f}M params, {args.dtype} weights), one update"
    for method in ("BetaMovingAverage", "AveragedModel+EMA", "timm ModelEmaV3", "official rule"):
        target = {"BetaMovingAverage": "≤ 1.15", "official rule": "> BMA"}.get(method, "")
        rows.append((f"{method}: {label}", "foreach_lerp_ floor", t[method] * 1e6, t[method] / floor, target))
    rows.append(("BMA speed-up over the official rule", "", 0.0, t["official rule"] / t["BetaMovingAverage"], "> 1"))
    k = 3
    t = bench_several(tower, device, rounds=average_rounds, k=k)
    base = t["one BMA update"]
    tower_label = f"{name} image tower ({n_params / 1e6:.1f}M params)"
    rows.append((f"{k} BMA updates per step (--bma-beta ×{k}): {tower_label}", "one BMA update", t[f"{k} BMA updates"] * 1e6,
                 t[f"{k} BMA updates"] / base, f"≈ {k} (≤ {1.05 * k:.2f})"))
    rows.append((f"TrajectorySnapshots update inside a segment: {tower_label}", "one BMA update",
                 t["TrajectorySnapshots update"] * 1e6, t["TrajectorySnapshots update"] / base, "≤ 1.15"))
    rows.append((f"segment close, host copy + safetensors write (K per run): {tower_label}", "one BMA update",
                 t["segment close (write)"] * 1e6, t["segment close (write)"] / base, ""))

    table = Table(title=f"bench_core on {device_name(device)}, torch {torch.__version__}")
    for col in ("case", "baseline", "time / call (µs)", "ratio", "target"):
        table.add_column(col)
    for case, base, micros, ratio, target in rows:
        table.add_row(case, base, f"{micros:,.0f}" if micros else "", f"{ratio:.3f}×", target)
    console.print(table)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"device": device_name(device), "dtype": args.dtype, "rows": rows}, indent=2))

    if args.write:
        lines = [
            f"\n### bench_core — {date.today().isoformat()} — {device_name(device)}, torch {torch.__version__}"
            + (" (quick)" if args.quick else ""),
            "",
            "| case | baseline | time / call (µs) | ratio | target |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c} | {b} | {m:,.0f} | {r:.3f}× | {tg} |" if m else f"| {c} | {b} | | {r:.3f}× | {tg} |"
            for c, b, m, r, tg in rows
        ]
        with RESULTS.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
        console.print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
