"""``clipood-posthoc RUN_DIR --beta 0.1 0.25 0.5 1 2 --eval-shards NAME=URLS …``: choose β after the run.

Reads the trajectory recording of a recipe run (``--posthoc-snapshots K``), builds the Beta average
of every β in the grid in one pass over the files (:func:`~clipood_plugin.posthoc.weighted_averages`),
evaluates each with the run's frozen text head, and selects the β with the best top-1 on the set
named by ``--select`` (default: a set named ``val``; a held-out test set is only used to select
when you name it). Writes ``posthoc.json``, ``posthoc.png`` (top-1 against β) and the chosen
average as ``posthoc-bma<β>.pt`` (``state_dict`` key: ``timm.models.load_checkpoint`` reads it),
and prints a table. When the run's last checkpoint holds exact averages for some β of the grid,
each post-hoc average's relative weight error ``‖post-hoc − exact‖ / ‖θ_T − θ_0‖`` is reported;
``--compare-exact`` evaluates the exact averages too.

The model is rebuilt from the run's ``args.yaml`` (open_clip ``--model`` and ``--pretrained``,
``--template``, ``--classnames``); runs with ``--timm-tower`` are not supported here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from clipood_plugin.averaging import beta_weights, check_beta
from clipood_plugin.models import load_classnames
from clipood_plugin.posthoc.snapshots import Snapshots, load_snapshots, weighted_averages

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipood-posthoc", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a recipe run directory (args.yaml, posthoc/, checkpoints/)")
    p.add_argument("--beta", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0], help="the β grid")
    p.add_argument("--horizon", type=int, default=None,
                   help="T' of the averages: the run's T (default) or a recorded segment boundary (early stop)")
    p.add_argument("--eval-shards", action="append", default=[], metavar="NAME=URLS[|CLASSNAMES]",
                   help="an evaluation set (repeatable); default: the run's own --eval-shards")
    p.add_argument("--select", default=None, metavar="NAME",
                   help="the eval set that picks β (source validation); default: the set named 'val', if any")
    p.add_argument("--compare-exact", action="store_true",
                   help="also evaluate the exact averages the run's last checkpoint holds")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--workers", type=int, default=0, help="data-loading workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--output", default=None, help="where posthoc.json, the plot and the chosen checkpoint go "
                                                   "(default: RUN_DIR)")
    return p


# -- the model and the evaluation sets, rebuilt from the run's args.yaml ------------------------


def _build_clip(run: dict[str, Any], device: torch.device) -> tuple[nn.Module, Any, Any]:
    """(model, eval transform, tokenizer) as the run built them, with the *pretrained* weights."""
    from clipood_plugin.models import create_clip

    if run.get("timm_tower"):
        raise ValueError("clipood-posthoc rebuilds open_clip models only; this run used --timm-tower")
    torch.manual_seed(int(run.get("seed", 0)))  # as the recipe: a random-init text tower comes out the same
    model, _, eval_tf, tokenizer = create_clip(run["model"], run.get("pretrained"), device, verbose=False)
    return model.eval(), eval_tf, tokenizer


def _eval_sets(specs: list[str], train_names: list[str]) -> list[tuple[str, str, list[str]]]:
    sets = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        if not rest:
            raise ValueError(f"--eval-shards {spec!r}: expected NAME=URLS[|CLASSNAMES]")
        urls, _, names_file = rest.partition("|")
        sets.append((name, urls, load_classnames(names_file, urls) if names_file else train_names))
    return sets


# -- exact averages from the run's checkpoint ---------------------------------------------------


def _exact_averages(run_dir: Path, betas: list[float], horizon: int) -> dict[str, dict[str, Tensor]]:
    """The run's own BMA weights for those β of the grid it kept (only at the full horizon)."""
    from clipood_plugin.training.checkpoint import load_checkpoint

    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return {}
    state = load_checkpoint(last)
    if state.get("step") != horizon:
        return {}
    args_betas = state.get("args", {}).get("bma_beta", [])
    saved = state.get("averagers") or (
        {f"{float(args_betas[0] if isinstance(args_betas, list) else args_betas):g}": state["averager"]}
        if "averager" in state else {})
    prefix = "module."
    return {f"{b:g}": {k[len(prefix):]: v for k, v in saved[f"{b:g}"].items() if k.startswith(prefix)}
            for b in betas if f"{b:g}" in saved}


def _relative_error(posthoc: dict[str, Tensor], exact: dict[str, Tensor], snapshots: Snapshots) -> float:
    theta0, theta_t = snapshots.state(0), snapshots.state(snapshots.total_steps)
    num = math.sqrt(sum(float((posthoc[k].double() - exact[k].double()).square().sum()) for k in snapshots.parameters))
    den = math.sqrt(sum(float((theta_t[k].double() - theta0[k].double()).square().sum()) for k in snapshots.parameters))
    return num / den if den > 0 else float("nan")


# -- the command ----------------------------------------------------------------------------------


def _plot(path: Path, grid: dict[str, dict[str, dict[str, float]]], selected: str | None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'clipood-plugin[bench]'): no plot", file=sys.stderr)
        return False
    betas = sorted(grid, key=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for set_name in next(iter(grid.values())):
        ax.plot([float(b) for b in betas], [grid[b][set_name]["top1"] for b in betas], marker="o", label=set_name)
    if selected is not None:
        ax.axvline(float(selected), color="grey", linestyle="--", label=f"selected β={selected}")
    ax.set_xscale("log")
    ax.set_xlabel("β of the Beta(β, β) weights")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("post-hoc BMA from trajectory snapshots")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from clipood_plugin._io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    betas = [check_beta(b) for b in args.beta]
    if len({f"{b:g}" for b in betas}) < len(betas):
        raise SystemExit(f"clipood-posthoc: --beta repeats a value: {args.beta}")
    run_dir = Path(args.run_dir)
    if not (run_dir / "args.yaml").is_file():
        raise SystemExit(f"clipood-posthoc: {run_dir} is not a recipe run directory (no args.yaml)")
    run = yaml.safe_load((run_dir / "args.yaml").read_text())
    snapshots = load_snapshots(run_dir)
    horizon = args.horizon if args.horizon is not None else (
        snapshots.total_steps if snapshots.complete else snapshots.recorded_steps)
    if horizon not in snapshots.horizons:
        raise SystemExit(f"clipood-posthoc: --horizon {horizon} is not a recorded segment boundary of {run_dir}; "
                         f"available: {list(snapshots.horizons)}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    out_dir = Path(args.output) if args.output else run_dir

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from clipood_plugin.data.stream import make_eval_loader
    from clipood_plugin.templates import get_templates
    from clipood_plugin.text_head import TextHead
    from clipood_plugin.training.evaluate import evaluate

    model, eval_tf, tokenizer = _build_clip(run, device)
    classnames = load_classnames(run.get("classnames"), run.get("train_shards"))
    eval_sets = _eval_sets(args.eval_shards or list(run.get("eval_shards") or []), classnames)
    if not eval_sets:
        raise SystemExit("clipood-posthoc: no evaluation sets (give --eval-shards NAME=URLS)")
    names = [name for name, _, _ in eval_sets]
    select = args.select if args.select is not None else ("val" if "val" in names else None)
    if select is not None and select not in names:
        raise SystemExit(f"clipood-posthoc: --select {select!r} is not among the eval sets {names}")
    templates = get_templates(run.get("template", "clip"))
    heads = {name: TextHead.from_open_clip(model, tokenizer, set_names, templates, device=device,
                                           cache_dir=run.get("cache_dir"), progress=False,
                                           allow_duplicates=bool(run.get("allow_duplicate_classnames"))).to(device)
             for name, _, set_names in eval_sets}
    tower = model.visual

    averages = weighted_averages(snapshots, {f"{b:g}": beta_weights(horizon, b) for b in betas})
    exact = _exact_averages(run_dir, betas, horizon)
    errors = {b: _relative_error(averages[b], exact[b], snapshots) for b in exact}
    candidates: dict[str, dict[str, Tensor]] = {f"posthoc {b}": avg for b, avg in averages.items()}
    if args.compare_exact:
        candidates.update({f"exact {b}": avg for b, avg in exact.items()})
    results: dict[str, dict[str, dict[str, float]]] = {key: {} for key in candidates}
    with Progress(disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("evaluating", total=len(candidates) * len(eval_sets))
        for set_name, urls, set_names in eval_sets:
            loader = make_eval_loader(urls, batch_size=args.batch_size, transform=eval_tf,
                                      num_classes=len(set_names), workers=args.workers)
            for key, state in candidates.items():
                tower.load_state_dict(state)
                metrics = evaluate(tower, heads[set_name], loader, device)
                results[key][set_name] = {k: v for k, v in metrics.items() if k != "n"}
                bar.advance(task)
    grid = {b: results[f"posthoc {b}"] for b in averages}
    chosen = max(grid, key=lambda b: grid[b][select]["top1"]) if select else None

    table = Table(title=f"post-hoc BMA, horizon {horizon} of {snapshots.total_steps} steps, {run_dir}")
    table.add_column("β", no_wrap=True)
    for name in names:
        table.add_column(f"{name} top-1" + (" (selects)" if name == select else ""), justify="right")
    table.add_column("weight error vs exact", justify="right")
    for b in grid:
        row = [f"{grid[b][n]['top1']:.2f}" for n in names]
        table.add_row(b + (" ← chosen" if b == chosen else ""), *row, f"{100 * errors[b]:.3f} %" if b in errors else "–")
        if f"exact {b}" in results:
            table.add_row(f"{b} exact", *[f"{results[f'exact {b}'][n]['top1']:.2f}" for n in names], "")
    Console(stderr=False).print(table)

    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "horizon": horizon, "total_steps": snapshots.total_steps,
        "segments": len(snapshots.segments), "selected_on": select, "selected_beta": None if chosen is None else float(chosen),
        "posthoc": grid, "relative_weight_error_vs_exact": errors,
        "exact": {k[len("exact "):]: v for k, v in results.items() if k.startswith("exact ")},
    }
    if chosen is not None:
        from clipood_plugin.training.checkpoint import save_checkpoint

        ckpt = out_dir / f"posthoc-bma{chosen}.pt"
        save_checkpoint(ckpt, {"state_dict": averages[chosen], "arch": run["model"], "beta": float(chosen),
                               "horizon": horizon, "selected_on": select})
        summary["checkpoint"] = str(ckpt)
        print(f"chosen β={chosen} (best {select} top-1); saved {ckpt}", file=sys.stderr)
    else:
        print("no --select set and no set named 'val': nothing chosen, no checkpoint saved", file=sys.stderr)
    if _plot(out_dir / "posthoc.png", grid, chosen):
        summary["plot"] = str(out_dir / "posthoc.png")
    from clipood_plugin._io import atomic_write_bytes

    atomic_write_bytes(out_dir / "posthoc.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
