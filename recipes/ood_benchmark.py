"""The paper's three OOD settings on the embedded world, every method side by side (CLIPood §4).

Runs in-process on tensors from :func:`clipood_plugin.world.images.make_tensors` (no shards) with
the cached tiny CLIP of :func:`clipood_plugin.world.tiny_clip.load_pretrained`. Only the image
tower trains; the text side is frozen (class text embeddings computed once).

Settings (K = 24 classes; base = the first ⌈K/2⌉ sorted labels, ``base_new_labels``):

- ``domain_shift``: leave one domain out, target ``sketch``; train on the other four domains'
  ``train`` split (all classes); report K-way test accuracy on sketch and the sources' mean.
- ``open_class``: train on the base classes of all five domains; test base images among the
  base names, new images among the new names, and their harmonic mean H (CoCoOp).
- ``in_the_wild``: train on the base classes of the four source domains; test on sketch with
  all K names: base, new and total accuracy.

Methods: zero-shot; CE with a trainable linear head initialised from the text embeddings (new
classes keep their text rows); CE on the frozen text head; WiSE-FT (α = 0.5 between zero-shot
and the frozen-head CE tower); MMS (Eq. 3–4); MMS + EMA; MMS + BMA (Eq. 5–7, CLIPood); CAR-FT
(frozen-head CE + context KL, default context bank, λ_ctx = 1). MMS, its EMA and its BMA come
from one trajectory, WiSE-FT from the CE run: four trainings per setting and seed.

The learning rate is picked on *source* validation data only (domain shift, seed 0, BMA
weights), then used for every method and setting. Usage::

    python recipes/ood_benchmark.py [--seeds 3] [--steps 300] [--quick] [--output benchmarks/ood]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipood_plugin._io import atomic_path
from clipood_plugin.averaging import BetaMovingAverage, ExponentialMovingAverage, beta_weights
from clipood_plugin.carft import CARFTLoss, ContextBank, HeadCrossEntropy
from clipood_plugin.mms import MMSLoss
from clipood_plugin.protocols.base_to_new import base_new_labels, harmonic_mean
from clipood_plugin.text_head import TextHead
from clipood_plugin.wise import interpolate_weights
from clipood_plugin.world.images import CLASS_PROMPT, SPLITS, WorldSpec, make_tensors
from clipood_plugin.world.tiny_clip import class_text_embeddings, load_pretrained, to_model_input

TARGET = "sketch"
SETTINGS: tuple[str, ...] = ("domain_shift", "open_class", "in_the_wild")
METRICS: dict[str, tuple[str, ...]] = {
    "domain_shift": ("target", "sources"),
    "open_class": ("base", "new", "H"),
    "in_the_wild": ("base", "new", "total"),
}
METHODS: dict[str, str] = {
    "zero_shot": "Zero-shot",
    "ce_linear": "CE (linear head)",
    "ce_frozen": "CE (frozen text head)",
    "wise_ft": "WiSE-FT (α=0.5)",
    "mms": "MMS",
    "mms_ema": "MMS + EMA",
    "mms_bma": "MMS + BMA (CLIPood)",
    "carft": "CAR-FT",
}
SWEEP_LRS: tuple[float, ...] = (3e-5, 1e-4, 3e-4)


@dataclass(frozen=True)
class Config:
    """Everything a run depends on; stored in ``results.json``."""

    seeds: int = 3
    steps: int = 300
    batch_size: int = 36
    lr: float = 1e-4
    sweep: bool = True
    weight_decay: float = 0.1
    lam: float = 0.3
    beta: float = 0.5
    ema_decay: float = 0.99
    carft_weight: float = 1.0
    wise_alpha: float = 0.5
    train_per_class_domain: int = 40
    eval_per_class_domain: int = 20
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("seeds", "steps", "batch_size", "train_per_class_domain", "eval_per_class_domain", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")


QUICK = Config(seeds=1, steps=30, sweep=False, train_per_class_domain=8, eval_per_class_domain=4)


@dataclass
class Task:
    """One setting's data: training pool and the class subset it trains on (labels relabelled)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    train_classes: list[int]
    val_x: Tensor
    val_y: Tensor


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _select(images: Tensor, labels: Tensor, domains: Tensor, *, domain_ids: Sequence[int],
            classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Images of the given domains and classes, labels relabelled to positions in ``classes``."""
    relabel = torch.full((int(labels.max()) + 1,), -1, dtype=torch.int64)
    relabel[torch.tensor(list(classes))] = torch.arange(len(classes))
    keep = torch.isin(domains, torch.tensor(list(domain_ids))) & (relabel[labels] >= 0)
    return images[keep], relabel[labels[keep]]


def build_tasks(spec: WorldSpec, cfg: Config) -> tuple[dict[str, Task], Any, list[int], list[int]]:
    """The three settings' training/validation data, plus the test pool and the base/new classes."""
    train = make_tensors(spec, SPLITS["train"], samples_per_class_domain=cfg.train_per_class_domain)
    val = make_tensors(spec, SPLITS["val"], samples_per_class_domain=cfg.eval_per_class_domain)
    test = make_tensors(spec, SPLITS["test"], samples_per_class_domain=cfg.eval_per_class_domain)
    k = len(spec.classes)
    base, new = base_new_labels(range(k))
    everything = list(range(len(spec.domains)))
    sources = [i for i, d in enumerate(spec.domains) if d != TARGET]
    plan = {"domain_shift": (sources, list(range(k))), "open_class": (everything, base),
            "in_the_wild": (sources, base)}
    tasks = {}
    for name, (doms, classes) in plan.items():
        tx, ty = _select(train.images, train.labels, train.domains, domain_ids=doms, classes=classes)
        vx, vy = _select(val.images, val.labels, val.domains, domain_ids=doms, classes=classes)
        tasks[name] = Task(name, tx, ty, list(classes), vx, vy)
    return tasks, test, base, new


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """Trainable cosine classifier ``s · normalize(f) @ Wᵀ`` initialised from the text embeddings."""

    def __init__(self, text: Tensor, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(text.detach().clone())
        self.scale = float(scale)

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * F.normalize(features, dim=-1) @ self.weight.T


def _optimizer(params: Sequence[tuple[str, nn.Parameter]], lr: float, wd: float) -> torch.optim.AdamW:
    # No decay on gains, biases and embeddings' 1-D parameters, as open_clip's training script.
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}],
                             lr=lr)


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Index batches for ``steps`` steps: reshuffled epochs, order fixed by ``seed`` alone."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.int64)
    out = []
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def train_tower(tower0: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
                cfg: Config, lr: float, seed: int, *, extra: nn.Module | None = None,
                on_step: Callable[[nn.Module], None] | None = None,
                make_averages: Callable[[nn.Module], list[nn.Module]] | None = None,
                advance: Callable[[], None] | None = None) -> tuple[nn.Module, list[nn.Module]]:
    """Fine-tune a copy of ``tower0`` for ``cfg.steps`` AdamW steps (cosine, no warm-up).

    ``loss_fn(features, labels, indices)``; ``extra`` holds further trainable parameters (the
    linear head); ``make_averages`` builds weight averages from the tower before its first step,
    each updated after every step. Returns the final tower and the averages.
    """
    tower = copy.deepcopy(tower0).train().requires_grad_(True)
    averages = make_averages(tower) if make_averages else []
    params = list(tower.named_parameters()) + (list(extra.named_parameters()) if extra is not None else [])
    opt = _optimizer(params, lr, cfg.weight_decay)
    sched = _cosine(opt, cfg.steps)
    for idx in _batches(x.shape[0], cfg.batch_size, cfg.steps, seed):
        loss = loss_fn(tower(x[idx]), y[idx], idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for avg in averages:
            avg.update_parameters(tower)
        if advance is not None:
            advance()
    return tower.eval(), averages


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def features(tower: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """L2-normalised image features of already-normalised images, eval mode."""
    was = tower.training
    tower.eval()
    out = torch.cat([F.normalize(tower(x[i:i + batch_size]), dim=-1) for i in range(0, x.shape[0], batch_size)])
    tower.train(was)
    return out


def _acc(feats: Tensor, labels: Tensor, weight: Tensor) -> float:
    if feats.shape[0] == 0:
        raise ValueError("empty evaluation set")
    return 100.0 * int(((feats @ weight.T).argmax(dim=1) == labels).sum()) / feats.shape[0]


def evaluate(setting: str, feats: Tensor, test: Any, weight: Tensor, spec: WorldSpec, base: list[int],
             new: list[int]) -> dict[str, float]:
    """The setting's metrics (percent) from test-pool features and a K-row classifier ``weight``."""
    labels, domains = test.labels, test.domains
    target = spec.domains.index(TARGET)
    if setting == "domain_shift":
        on = domains == target
        src = [_acc(feats[domains == d], labels[domains == d], weight) for d in range(len(spec.domains)) if d != target]
        return {"target": _acc(feats[on], labels[on], weight), "sources": sum(src) / len(src)}
    is_base = torch.isin(labels, torch.tensor(base))
    if setting == "open_class":
        relabel = torch.empty(len(spec.classes), dtype=torch.int64)
        relabel[torch.tensor(base)] = torch.arange(len(base))
        relabel[torch.tensor(new)] = torch.arange(len(new))
        b = _acc(feats[is_base], relabel[labels[is_base]], weight[base])
        n = _acc(feats[~is_base], relabel[labels[~is_base]], weight[new])
        return {"base": b, "new": n, "H": harmonic_mean(b, n)}
    on = domains == target
    return {"base": _acc(feats[on & is_base], labels[on & is_base], weight),
            "new": _acc(feats[on & ~is_base], labels[on & ~is_base], weight),
            "total": _acc(feats[on], labels[on], weight)}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


class Bench:
    """Holds the pretrained model, data and frozen text side; runs one setting × seed at a time."""

    def __init__(self, cfg: Config, spec: WorldSpec) -> None:
        self.cfg, self.spec = cfg, spec
        self.model, _, self.tokenizer = load_pretrained(spec, progress=True)
        self.model.eval().requires_grad_(False)
        self.tower0 = self.model.visual
        self.tasks, self.test, self.base, self.new = build_tasks(spec, cfg)
        self.test_x = to_model_input(self.test.images, self.model)
        for task in self.tasks.values():
            task.train_x = to_model_input(task.train_x, self.model)
            task.val_x = to_model_input(task.val_x, self.model)
        names = list(spec.classes)
        # Same embeddings zero_shot_accuracy uses: evaluation goes through these K rows.
        self.text = class_text_embeddings(self.model, self.tokenizer, names, CLASS_PROMPT)
        self.head = TextHead.from_open_clip(self.model, self.tokenizer, names, templates=CLASS_PROMPT)
        self.scale = float(self.head.scale)
        self.zs_test = features(self.tower0, self.test_x)
        self._banks: dict[str, ContextBank] = {}
        self._f0: dict[str, Tensor] = {}

    def bank(self, task: Task) -> ContextBank:
        if task.name not in self._banks:
            names = [self.spec.classes[c] for c in task.train_classes]
            self._banks[task.name] = ContextBank.from_open_clip(self.model, self.tokenizer, names, progress=False)
            self._f0[task.name] = features(self.tower0, task.train_x)
        return self._banks[task.name]

    def val_acc(self, tower: nn.Module, task: Task, weight: Tensor | None = None) -> float:
        w = self.text[task.train_classes] if weight is None else weight
        return _acc(features(tower, task.val_x), task.val_y, w)

    def run_mms(self, task: Task, lr: float, seed: int, advance: Callable[[], None]) -> dict[str, nn.Module]:
        mms = MMSLoss(self.head.subset(task.train_classes), lam=self.cfg.lam, check_inputs=False)
        tower, (ema, bma) = train_tower(
            self.tower0, task.train_x, task.train_y, lambda f, y, _: mms(f, y), self.cfg, lr, seed,
            make_averages=lambda t: [ExponentialMovingAverage(t, self.cfg.ema_decay),
                                     BetaMovingAverage(t, self.cfg.steps, beta=self.cfg.beta)],
            advance=advance)
        return {"mms": tower, "mms_ema": ema.module.eval(), "mms_bma": bma.module.eval()}

    def run_all(self, task: Task, lr: float, seed: int, advance: Callable[[], None],
                mms_towers: dict[str, nn.Module] | None = None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """Train the four runs of one setting and seed; return test metrics and source-val accuracy."""
        cfg, head = self.cfg, self.head.subset(task.train_classes)
        towers: dict[str, nn.Module] = {"zero_shot": self.tower0}
        linear = LinearHead(self.text[task.train_classes], self.scale)
        towers["ce_linear"], _ = train_tower(
            self.tower0, task.train_x, task.train_y, lambda f, y, _: F.cross_entropy(linear(f), y), cfg, lr, seed,
            extra=linear, advance=advance)
        ce = HeadCrossEntropy(head)
        towers["ce_frozen"], _ = train_tower(self.tower0, task.train_x, task.train_y, lambda f, y, _: ce(f, y),
                                             cfg, lr, seed, advance=advance)
        wise = copy.deepcopy(self.tower0)
        wise.load_state_dict(interpolate_weights(self.tower0, towers["ce_frozen"], cfg.wise_alpha))
        towers["wise_ft"] = wise.eval()
        towers.update(mms_towers if mms_towers is not None else self.run_mms(task, lr, seed, advance))
        carft = CARFTLoss(HeadCrossEntropy(head), self.bank(task), weight=cfg.carft_weight)
        f0 = self._f0[task.name]
        towers["carft"], _ = train_tower(
            self.tower0, task.train_x, task.train_y, lambda f, y, i: carft(f, y, pretrained_features=f0[i]),
            cfg, lr, seed, advance=advance)

        results, val = {}, {}
        for key in METHODS:
            weight = self.text
            val_weight = None
            if key == "ce_linear":  # trained rows for the training classes, text rows for the rest
                weight = self.text.clone()
                weight[task.train_classes] = linear.weight.detach()
                val_weight = linear.weight.detach()
            feats = self.zs_test if key == "zero_shot" else features(towers[key], self.test_x)
            results[key] = evaluate(task.name, feats, self.test, weight, self.spec, self.base, self.new)
            val[key] = self.val_acc(towers[key], task, val_weight)
        return results, val


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def run(cfg: Config, spec: WorldSpec | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run the sweep (optional) and every setting × seed; return the JSON-ready results."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch.set_num_threads(cfg.threads)
    spec = spec or WorldSpec()
    start = time.perf_counter()
    bench = Bench(cfg, spec)
    sweep_lrs = SWEEP_LRS if cfg.sweep else ()
    trainings = len(sweep_lrs) + len(SETTINGS) * cfg.seeds * 4 - (1 if cfg.sweep else 0)
    sweep: dict[str, float] = {}
    lr = cfg.lr
    sweep_towers: dict[float, dict[str, nn.Module]] = {}
    raw: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {m: {k: [] for k in METRICS[s]} for m in METHODS} for s in SETTINGS}
    val: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METHODS} for s in SETTINGS}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        job = bar.add_task("fine-tuning steps", total=trainings * cfg.steps)

        def advance() -> None:
            bar.advance(job)

        for candidate in sweep_lrs:
            bar.update(job, description=f"lr sweep: MMS, lr={candidate:g}")
            sweep_towers[candidate] = bench.run_mms(bench.tasks["domain_shift"], candidate, 0, advance)
            sweep[f"{candidate:g}"] = bench.val_acc(sweep_towers[candidate]["mms_bma"], bench.tasks["domain_shift"])
        if sweep:
            lr = max(sweep_lrs, key=lambda c: sweep[f"{c:g}"])
        for setting in SETTINGS:
            for seed in range(cfg.seeds):
                bar.update(job, description=f"{setting}, seed {seed}")
                reuse = sweep_towers.get(lr) if (setting == "domain_shift" and seed == 0) else None
                res, v = bench.run_all(bench.tasks[setting], lr, seed, advance, reuse)
                for m in METHODS:
                    for k in METRICS[setting]:
                        raw[setting][m][k].append(res[m][k])
                    val[setting][m].append(v[m])
    wall = time.perf_counter() - start
    summary = {s: {m: {k: _summary(raw[s][m][k]) for k in METRICS[s]} for m in METHODS} for s in SETTINGS}
    return {
        "settings": {
            "domain_shift": f"train on {[d for d in spec.domains if d != TARGET]} (all classes), test on {TARGET} "
                            "(K-way) and the sources' test split (mean of per-domain accuracy)",
            "open_class": "train on base classes of all domains; base among base names, new among new names, H",
            "in_the_wild": f"train on base classes of {[d for d in spec.domains if d != TARGET]}; test on {TARGET} "
                           "with all K names: base, new, total",
            "base_classes": [spec.classes[c] for c in bench.base],
            "new_classes": [spec.classes[c] for c in bench.new],
        },
        "methods": METHODS,
        "metrics": METRICS,
        "config": asdict(cfg),
        "hyperparameters": {
            "lr": lr, "lr_selection": ("MMS on domain_shift, seed 0; best source-val accuracy of the BMA weights; "
                                       "used for every method and setting") if sweep else "fixed (no sweep)",
            "lr_sweep_source_val_bma": sweep, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "optimizer": "AdamW (no decay on 1-D params)", "weight_decay": cfg.weight_decay,
            "schedule": "cosine to 0, no warm-up", "mms_lambda": cfg.lam, "bma_beta": cfg.beta,
            "ema_decay": cfg.ema_decay, "carft_weight": cfg.carft_weight, "carft_head": "frozen text head",
            "wise_alpha": cfg.wise_alpha, "wise_from": "ce_frozen", "trained": "image tower only (text frozen)",
            "linear_head": "cosine head init from text embeddings, trainable; untrained classes keep text rows",
        },
        "data": {"spec": spec.to_dict(), "split_seeds": {k: SPLITS[k] for k in ("train", "val", "test")},
                 "target": TARGET, "train_per_class_domain": cfg.train_per_class_domain,
                 "eval_per_class_domain": cfg.eval_per_class_domain,
                 "train_sizes": {s: int(t.train_x.shape[0]) for s, t in bench.tasks.items()},
                 "test_size": int(bench.test.labels.shape[0])},
        "seeds": list(range(cfg.seeds)),
        "results": raw,
        "source_val": val,
        "summary": summary,
        "bma_weights": [float(w) for w in beta_weights(cfg.steps, cfg.beta)],
        "wall_time_s": round(wall, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "std": "sample standard deviation over seeds (0 with one seed)",
    }


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _columns() -> list[tuple[str, str]]:
    return [(s, k) for s in SETTINGS for k in METRICS[s]]


def markdown(results: dict[str, Any]) -> str:
    """The Markdown table (rows = methods, columns = setting/metric, mean ± std) with its notes."""
    cols = _columns()
    hp = results["hyperparameters"]
    lines = [
        "# OOD benchmark on the embedded world",
        "",
        f"Tiny CLIP, image tower fine-tuned, text frozen. {len(results['seeds'])} seed(s), mean ± std (percent). "
        f"lr {hp['lr']:g} ({hp['lr_selection']}); {hp['steps']} steps, batch {hp['batch_size']}, AdamW wd "
        f"{hp['weight_decay']}, cosine; λ {hp['mms_lambda']}, β {hp['bma_beta']}, EMA decay {hp['ema_decay']}, "
        f"CAR-FT λ_ctx {hp['carft_weight']}, WiSE-FT α {hp['wise_alpha']}. Wall time {results['wall_time_s']} s.",
        "",
        "| Method | " + " | ".join(f"{s} {k}" for s, k in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m, label in METHODS.items():
        cells = [results["summary"][s][m][k] for s, k in cols]
        lines.append(f"| {label} | " + " | ".join(f"{c['mean']:.1f} ± {c['std']:.1f}" for c in cells) + " |")
    if hp["lr_sweep_source_val_bma"]:
        sweep = ", ".join(f"{k}: {v:.1f}" for k, v in hp["lr_sweep_source_val_bma"].items())
        lines += ["", f"lr sweep (source-val accuracy of MMS + BMA, domain shift, seed 0): {sweep}."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy per method per split (one panel per setting) and the BMA weights α_t."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError('the figure needs matplotlib: pip install "clipood-plugin[bench]"') from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    colours = plt.get_cmap("tab10").colors
    n = len(METHODS)
    for ax, setting in zip(axes.flat[:3], SETTINGS):
        metrics = METRICS[setting]
        width = 0.8 / n
        for j, (m, label) in enumerate(METHODS.items()):
            stats = [results["summary"][setting][m][k] for k in metrics]
            xs = [i + (j - (n - 1) / 2) * width for i in range(len(metrics))]
            ax.bar(xs, [s["mean"] for s in stats], width, yerr=[s["std"] for s in stats], label=label,
                   color=colours[j % len(colours)], capsize=2, edgecolor="black" if m == "mms_bma" else "none")
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(setting.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8, ncol=2, loc="upper right")
    ax = axes.flat[3]
    w = results["bma_weights"]
    ax.plot(range(len(w)), w, color="black")
    ax.set_xlabel("step t")
    ax.set_ylabel("α_t")
    ax.set_title(f"BMA weights, Beta({results['hyperparameters']['bma_beta']}, "
                 f"{results['hyperparameters']['bma_beta']}), T={len(w) - 1}")
    ax.grid(alpha=0.3)
    fig.suptitle(f"CLIPood OOD benchmark on the embedded world ({len(results['seeds'])} seed(s), mean ± std)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(results))
    plot(results, out / "results.png")


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"OOD benchmark ({len(results['seeds'])} seed(s), wall {results['wall_time_s']} s)")
    table.add_column("method")
    cols = _columns()
    short = {"domain_shift": "DS", "open_class": "OC", "in_the_wild": "Wild"}
    for s, k in cols:
        table.add_column(f"{short[s]} {k}", justify="right")
    for m, label in METHODS.items():
        table.add_row(label, *(f"{results['summary'][s][m][k]['mean']:.1f}±{results['summary'][s][m][k]['std']:.1f}"
                               for s, k in cols))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; 30 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps, tiny eval, no lr sweep")
    parser.add_argument("--output", default="benchmarks/ood", help="output folder for results.{json,md,png}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Config()
    overrides = {k: v for k, v in (("seeds", args.seeds), ("steps", args.steps)) if v is not None}
    try:
        cfg = Config(**{**asdict(base), **overrides})
    except ValueError as err:
        parser.error(str(err))
    results = run(cfg, progress=not args.no_progress)
    write_outputs(results, Path(args.output))
    print_table(results)
    print(f"wrote {args.output}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
