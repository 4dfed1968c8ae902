"""Sharded averages: per-rank bytes and time per update of a BMA of an FSDP2 image tower, 1/2/4 ranks.

A script, not a test. For each world size N it starts N processes (gloo on CPU, NCCL on GPU),
builds the open_clip image tower (random init), shards it with the recipe's ``shard_tower``
(``fully_shard`` per block, then the tower) and builds ``BetaMovingAverage`` on it. Each rank
then reports the bytes its average holds (its shards) and the median time of one update, beside
a bare ``torch._foreach_lerp_`` over the same local shards (the bandwidth floor). The ratios are
measured in one run, interleaved round by round, because absolute times drift on shared machines.
With N = 1 it also times the unsharded average of the unsharded tower. Usage::

    python benchmarks/bench_sharded.py                          # ViT-B-16 on 1, 2, 4 CPU ranks
    python benchmarks/bench_sharded.py --device cuda --model ViT-L-14 --ranks 1 2 4 8
    python benchmarks/bench_sharded.py --write                  # and record into RESULTS.md

Expected: the per-rank bytes are about 1/N of the full average (FSDP's Shard(0) pads uneven
rows, so not exactly), and an update costs about 1/N of the unsharded one, with no collective.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import timed
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).with_name("RESULTS.md")


def _rank_main(rank: int, world: int, args: argparse.Namespace, rendezvous: str, out: str) -> None:
    import open_clip

    from clipood_plugin import BetaMovingAverage
    from clipood_plugin.training.sharded import local_views, shard_tower

    torch.set_num_threads(args.threads)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=rendezvous, rank=rank,
                            world_size=world)
    try:
        if args.model.startswith("clipood-tiny"):  # the embedded tiny CLIP: a seconds-long smoke run
            from clipood_plugin.world.tiny_clip import register_model_config

            register_model_config()
        torch.manual_seed(0)
        tower = open_clip.create_model(args.model, pretrained=None).visual.to(device)
        total = args.rounds * 3 + 4
        fns: dict[str, Any] = {}
        if world == 1:
            plain = copy.deepcopy(tower)  # stays unsharded
            unsharded = BetaMovingAverage(plain, total_steps=total)
            fns["unsharded BMA"] = lambda: unsharded.update_parameters(plain)
            full_bytes = sum(t.numel() * t.element_size() for t in unsharded.module.parameters())
        shard_tower(tower, device)
        bma = BetaMovingAverage(tower, total_steps=total)
        mine, theirs = local_views(list(bma.module.parameters())), local_views(list(tower.parameters()))
        fns["sharded BMA"] = lambda: bma.update_parameters(tower)
        fns["foreach_lerp_ floor"] = torch.no_grad()(lambda: torch._foreach_lerp_(mine, theirs, 0.01))
        local_bytes = sum(t.numel() * t.element_size() for t in mine)
        full_bytes = sum(p.numel() * p.element_size() for p in bma.module.parameters())
        for fn in fns.values():  # warm-up (the sharded update also runs its one-time layout check here)
            fn()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(args.rounds):
            for name, fn in (list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))):
                samples[name].append(timed(fn, device))
        with torch.no_grad():
            start = time.perf_counter()
            with bma.swapped_into(tower):
                pass
            swap = time.perf_counter() - start
            start = time.perf_counter()
            bma.full_state_dict()
            gather = time.perf_counter() - start
        row = {"rank": rank, "local_bytes": local_bytes, "full_bytes": full_bytes, "swap_s": swap, "gather_s": gather,
               "median_s": {name: statistics.median(v) for name, v in samples.items()}}
        rows: list[Any] = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_rank_main, args=(world, args, f"file://{tmp}/pg", out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-16", help="open_clip model whose image tower is averaged")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes to run")
    p.add_argument("--rounds", type=int, default=15, help="timed updates per candidate (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args()

    table = Table(title=f"BMA of an FSDP2-sharded {args.model} image tower ({args.device})")
    for col in ("ranks", "average bytes / rank", "× full", "update (ms, slowest rank)", "× floor", "× unsharded",
                "swap in+out (ms)", "gather (ms)"):
        table.add_column(col, justify="right")
    lines = ["| ranks | average bytes / rank (max) | × full | sharded update (ms, slowest rank) | × foreach_lerp_ floor "
             "| × unsharded update | swapped_into in+out (ms) | full_state_dict gather (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    unsharded_s: float | None = None
    for world in args.ranks:
        rows = run_world(world, args)
        full = rows[0]["full_bytes"]
        local = max(r["local_bytes"] for r in rows)
        update = max(r["median_s"]["sharded BMA"] for r in rows)
        floor = max(r["median_s"]["foreach_lerp_ floor"] for r in rows)
        if world == 1:
            unsharded_s = rows[0]["median_s"]["unsharded BMA"]
            cells = ["1 (unsharded)", f"{full:,}", "1.000", f"{unsharded_s * 1e3:,.1f}", "", "1.000", "", ""]
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
        vs = f"{update / unsharded_s:.3f}" if unsharded_s else ""
        cells = [str(world), f"{local:,}", f"{local / full:.3f}", f"{update * 1e3:,.1f}", f"{update / floor:.3f}", vs,
                 f"{max(r['swap_s'] for r in rows) * 1e3:,.1f}", f"{max(r['gather_s'] for r in rows) * 1e3:,.1f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    if args.write:
        head = (f"\n### bench_sharded — {date.today().isoformat()} — {platform.machine()} {args.device}, "
                f"{args.threads} thread(s) per rank, torch {torch.__version__}\n\n")
        with RESULTS.open("a") as fh:
            fh.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
