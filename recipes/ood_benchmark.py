"""The paper's three OOD settings on the embedded world, every method side by side (CLIPood §4).

Runs in-process on tensors from :func:`clipood_plugin.world.images.make_tensors` (no shards) with
the cached tiny CLIP of :func:`clipood_plugin.world.tiny_clip.load_pretrained`. Only the image
tower trains; the text side is frozen (class text embeddings computed once, with the world's
prompt ensemble :data:`~clipood_plugin.world.images.CLASS_PROMPTS`).

Settings (K = 24 classes; base = the first ⌈K/2⌉ sorted labels, ``base_new_labels``):

- ``domain_shift``: leave one domain out, **each domain in turn**; train on the other four
  domains' ``train`` split (all classes); report K-way test accuracy on every domain, the
  held-out one (``target``) and the sources' mean (``sources``).
- ``open_class``: the base-to-new protocol of the paper and the official code (CoOp/CoCoOp,
  :func:`~clipood_plugin.protocols.base_to_new.base_to_new_split`): a 16-shot draw per class from
  the five domains' pooled ``train`` split, base classes kept; validation is the protocol's own
  few-shot draw (``min(16, 4)`` per base class) from the ``val`` split; test base images among
  the base names, new images among the new names, and their harmonic mean H (CoCoOp).
  ``Config.open_class_shots = None`` trains on every base image instead (this benchmark's first
  protocol, under which calibration target 4 failed; docs/embedded_world.md §4).
- ``in_the_wild``: train on the base classes of the four domains other than
  :data:`WILD_TARGET`; test on it with all K names: base, new and total accuracy.

Methods: zero-shot; CE with a trainable linear head initialised from the text embeddings (new
classes keep their text rows); CE on the frozen text head; WiSE-FT (α = 0.5 between zero-shot
and the frozen-head CE tower, and the whole α curve for the figure); MMS (Eq. 3–4); MMS + EMA;
MMS + BMA (Eq. 5–7, CLIPood); CAR-FT (frozen-head CE + context KL, default context bank,
λ_ctx = 1). MMS, its EMA and its BMA come from one trajectory, WiSE-FT from the CE run: four
trainings (*families*) per setting, lr and seed.

Protocol: for every setting (each held-out domain is its own setting) and every family, the lr
is chosen from :data:`LRS` (a 30× grid whose smallest value is 1 % of the tiny CLIP's pretraining
peak lr) by accuracy on that setting's *source* validation data (source domains, training
classes) at seed 0; MMS by its BMA weights. Test data never chooses anything. Every other
hyperparameter is fixed in :class:`Config`. ``calibration`` in the results checks, on the
baselines only, the five facts the world was built to reproduce (see :func:`calibration`).
Usage::

    python recipes/ood_benchmark.py [--seeds 3] [--steps 300] [--open-class-shots 16] [--quick] [--output benchmarks/ood]
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipood_plugin.averaging import BetaMovingAverage, ExponentialMovingAverage, beta_weights
from clipood_plugin.carft import CARFTLoss, ContextBank, HeadCrossEntropy
from clipood_plugin.mms import MMSLoss
from clipood_plugin.protocols import ImageRecord, base_new_labels, base_to_new_split, harmonic_mean
from clipood_plugin.protocols.base_to_new import DEFAULT_SHOTS
from clipood_plugin.text_head import TextHead
from clipood_plugin.training.checkpoint import atomic_path
from clipood_plugin.wise import interpolate_weights
from clipood_plugin.world.images import CLASS_PROMPTS, DOMAINS, SPLITS, WorldSpec, make_tensors
from clipood_plugin.world.tiny_clip import PretrainConfig, load_pretrained, to_model_input

#: The held-out domain of the in-the-wild setting.
WILD_TARGET = "painting"
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
#: Training runs: each family is one trajectory; its lr is chosen on source validation.
FAMILIES: dict[str, tuple[str, ...]] = {
    "ce_linear": ("ce_linear",),
    "ce_frozen": ("ce_frozen", "wise_ft"),
    "mms": ("mms", "mms_ema", "mms_bma"),
    "carft": ("carft",),
}
#: Which model of a family its lr is selected by (CLIPood's own output for MMS).
SELECT_BY: dict[str, str] = {"ce_linear": "ce_linear", "ce_frozen": "ce_frozen", "mms": "mms_bma", "carft": "carft"}
#: The lr grid: 30x wide, from 1 % of the pretraining peak lr (2e-3) up.
LRS: tuple[float, ...] = (2e-5, 1e-4, 6e-4)
#: WiSE-FT mixing weights of the recorded curve (0 = zero-shot, 1 = fine-tuned).
WISE_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class Config:
    """Everything a run depends on; stored in ``results.json``."""

    seeds: int = 3
    steps: int = 300
    batch_size: int = 36
    lrs: tuple[float, ...] = LRS
    weight_decay: float = 0.1
    lam: float = 0.3
    beta: float = 0.5
    ema_decay: float = 0.99
    carft_weight: float = 1.0
    wise_alpha: float = 0.5
    train_per_class_domain: int = 40
    eval_per_class_domain: int = 20
    held_out: tuple[str, ...] = DOMAINS
    wild_target: str = WILD_TARGET
    #: Shots per class of the open-class training draw (CoOp's 16); ``None`` = every base image.
    open_class_shots: int | None = DEFAULT_SHOTS
    threads: int = 2
    pretrain: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(float(v) for v in self.lrs))
        object.__setattr__(self, "held_out", tuple(self.held_out))
        for name in ("seeds", "steps", "batch_size", "train_per_class_domain", "eval_per_class_domain", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shots = self.open_class_shots
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
            raise ValueError(f"open_class_shots must be a positive int or None, got {shots!r}")
        if not self.lrs or not all(v > 0 and math.isfinite(v) for v in self.lrs):
            raise ValueError(f"lrs must be positive finite numbers, got {self.lrs!r}")
        unknown = [d for d in (*self.held_out, self.wild_target) if d not in DOMAINS]
        if unknown or not self.held_out:
            raise ValueError(f"held-out domains must be among {list(DOMAINS)}, got {unknown or 'none'}")


#: CI's quick run (2-3 minutes once the tiny CLIP is cached: 120 s and 186 s in two sessions on 2
#: cores): one seed, one lr (the grid's top, which source validation picks for every domain-shift
#: setting of the full run), half the test images, two held-out domains. No selection happens, so
#: calibration target 5 fails here.
QUICK = Config(seeds=1, eval_per_class_domain=10, lrs=(6e-4,), held_out=("photo", "painting"))


@dataclass
class Task:
    """One setting's data: training pool, the class subset it trains on (labels relabelled), its test domain."""

    name: str
    kind: str
    target: str
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


def setting_names(cfg: Config) -> list[str]:
    """``domain_shift/<held-out>`` for each held-out domain, then ``open_class`` and ``in_the_wild``."""
    return [f"domain_shift/{d}" for d in cfg.held_out] + ["open_class", "in_the_wild"]


def build_tasks(spec: WorldSpec, cfg: Config) -> tuple[dict[str, Task], Any, list[int], list[int]]:
    """Every setting's training/validation data, plus the test pool and the base/new classes."""
    train = make_tensors(spec, SPLITS["train"], samples_per_class_domain=cfg.train_per_class_domain)
    val = make_tensors(spec, SPLITS["val"], samples_per_class_domain=cfg.eval_per_class_domain)
    test = make_tensors(spec, SPLITS["test"], samples_per_class_domain=cfg.eval_per_class_domain)
    k = len(spec.classes)
    base, new = base_new_labels(range(k))
    everything = list(range(len(spec.domains)))

    def others(d: str) -> list[int]:
        return [i for i, name in enumerate(spec.domains) if name != d]

    plan: dict[str, tuple[str, str, list[int], list[int]]] = {
        f"domain_shift/{d}": ("domain_shift", d, others(d), list(range(k))) for d in cfg.held_out}
    plan["open_class"] = ("open_class", "", everything, base)
    plan["in_the_wild"] = ("in_the_wild", cfg.wild_target, others(cfg.wild_target), base)
    tasks = {}
    for name, (kind, target, doms, classes) in plan.items():
        tx, ty = _select(train.images, train.labels, train.domains, domain_ids=doms, classes=classes)
        vx, vy = _select(val.images, val.labels, val.domains, domain_ids=doms, classes=classes)
        tasks[name] = Task(name, kind, target, tx, ty, list(classes), vx, vy)
    if cfg.open_class_shots is not None:
        tasks["open_class"] = _few_shot_open_class(train, val, spec, cfg.open_class_shots, base)
    return tasks, test, base, new


def _few_shot_open_class(train: Any, val: Any, spec: WorldSpec, shots: int, base: list[int]) -> Task:
    """The open-class task as the library's base-to-new protocol draws it (few-shot first, seed 0).

    Records carry tensor row indices as paths, so the protocol's own draw picks the rows.
    """
    def records(t: Any) -> list[ImageRecord]:
        return [ImageRecord(str(i), int(y), spec.domains[int(d)]) for i, (y, d) in enumerate(zip(t.labels, t.domains))]

    split = base_to_new_split(records(train), [], classnames=spec.classes, val=records(val), shots=shots, seed=0)
    if split.info["base_labels"] != base:
        raise RuntimeError(f"base classes disagree: protocol {split.info['base_labels']}, benchmark {base}")
    rows = {part: torch.tensor([int(r.path) for r in split.parts[part]]) for part in ("train", "val")}
    labels = {part: torch.tensor([r.label for r in split.parts[part]]) for part in ("train", "val")}
    return Task("open_class", "open_class", "", train.images[rows["train"]], labels["train"], list(base),
                val.images[rows["val"]], labels["val"])


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


def per_domain(feats: Tensor, test: Any, weight: Tensor, spec: WorldSpec) -> dict[str, float]:
    """K-way test accuracy (percent) on each domain."""
    return {d: _acc(feats[test.domains == i], test.labels[test.domains == i], weight) for i, d in enumerate(spec.domains)}


def evaluate(task: Task, feats: Tensor, test: Any, weight: Tensor, spec: WorldSpec, base: list[int],
             new: list[int]) -> dict[str, float]:
    """The setting's metrics (percent) from test-pool features and a K-row classifier ``weight``.

    Domain shift: ``target``, ``sources`` (mean over the other domains) and every domain by name.
    """
    labels, domains = test.labels, test.domains
    if task.kind == "domain_shift":
        accs = per_domain(feats, test, weight, spec)
        src = [v for d, v in accs.items() if d != task.target]
        return {"target": accs[task.target], "sources": sum(src) / len(src), **accs}
    is_base = torch.isin(labels, torch.tensor(base))
    if task.kind == "open_class":
        relabel = torch.empty(len(spec.classes), dtype=torch.int64)
        relabel[torch.tensor(base)] = torch.arange(len(base))
        relabel[torch.tensor(new)] = torch.arange(len(new))
        b = _acc(feats[is_base], relabel[labels[is_base]], weight[base])
        n = _acc(feats[~is_base], relabel[labels[~is_base]], weight[new])
        return {"base": b, "new": n, "H": harmonic_mean(b, n)}
    on = domains == spec.domains.index(task.target)
    return {"base": _acc(feats[on & is_base], labels[on & is_base], weight),
            "new": _acc(feats[on & ~is_base], labels[on & ~is_base], weight),
            "total": _acc(feats[on], labels[on], weight)}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


class Bench:
    """Holds the pretrained model, data and frozen text side; trains one family × setting × lr × seed at a time."""

    def __init__(self, cfg: Config, spec: WorldSpec, *, progress: bool = True) -> None:
        self.cfg, self.spec = cfg, spec
        self.model, _, self.tokenizer = load_pretrained(spec, PretrainConfig(**cfg.pretrain), progress=progress)
        self.model.eval().requires_grad_(False)
        self.tower0 = self.model.visual
        self.tasks, self.test, self.base, self.new = build_tasks(spec, cfg)
        self.test_x = to_model_input(self.test.images, self.model)
        for task in self.tasks.values():
            task.train_x = to_model_input(task.train_x, self.model)
            task.val_x = to_model_input(task.val_x, self.model)
        names = list(spec.classes)
        self.head = TextHead.from_open_clip(self.model, self.tokenizer, names, templates=list(CLASS_PROMPTS))
        self.text = self.head.weight.detach()  # unit rows: evaluation goes through these K rows
        self.scale = float(self.head.scale)
        self.zs_test = features(self.tower0, self.test_x)
        self._banks: dict[str, ContextBank] = {}
        self._f0: dict[str, Tensor] = {}

    def carft_inputs(self, task: Task) -> tuple[ContextBank, Tensor]:
        if task.name not in self._banks:
            names = [self.spec.classes[c] for c in task.train_classes]
            self._banks[task.name] = ContextBank.from_open_clip(self.model, self.tokenizer, names, progress=False)
            self._f0[task.name] = features(self.tower0, task.train_x)
        return self._banks[task.name], self._f0[task.name]

    def train_family(self, family: str, task: Task, lr: float, seed: int,
                     advance: Callable[[], None]) -> tuple[dict[str, nn.Module], Tensor | None]:
        """One trajectory: the family's trained towers (``wise_ft`` is mixed from ``ce_frozen`` by the
        caller, for the chosen lr only) and, for CE with a linear head, its trained rows."""
        cfg, head = self.cfg, self.head.subset(task.train_classes)
        x, y = task.train_x, task.train_y
        if family == "ce_linear":
            linear = LinearHead(self.text[task.train_classes], self.scale)
            tower, _ = train_tower(self.tower0, x, y, lambda f, t, _: F.cross_entropy(linear(f), t), cfg, lr, seed,
                                   extra=linear, advance=advance)
            return {"ce_linear": tower}, linear.weight.detach()
        if family == "ce_frozen":
            ce = HeadCrossEntropy(head)
            tower, _ = train_tower(self.tower0, x, y, lambda f, t, _: ce(f, t), cfg, lr, seed, advance=advance)
            return {"ce_frozen": tower}, None
        if family == "mms":
            mms = MMSLoss(head, lam=cfg.lam, check_inputs=False)
            tower, (ema, bma) = train_tower(
                self.tower0, x, y, lambda f, t, _: mms(f, t), cfg, lr, seed,
                make_averages=lambda t: [ExponentialMovingAverage(t, cfg.ema_decay),
                                         BetaMovingAverage(t, cfg.steps, beta=cfg.beta)],
                advance=advance)
            return {"mms": tower, "mms_ema": ema.module.eval(), "mms_bma": bma.module.eval()}, None
        if family == "carft":
            bank, f0 = self.carft_inputs(task)
            carft = CARFTLoss(HeadCrossEntropy(head), bank, weight=cfg.carft_weight)
            tower, _ = train_tower(self.tower0, x, y, lambda f, t, i: carft(f, t, pretrained_features=f0[i]),
                                   cfg, lr, seed, advance=advance)
            return {"carft": tower}, None
        raise ValueError(f"unknown family {family!r}")

    def wise(self, finetuned: nn.Module, alpha: float) -> nn.Module:
        mixed = copy.deepcopy(self.tower0)
        mixed.load_state_dict(interpolate_weights(self.tower0, finetuned, alpha))
        return mixed.eval()

    def weight_for(self, task: Task, linear_rows: Tensor | None) -> Tensor:
        """The K-row test classifier: text rows, with a linear head's trained rows where it has them."""
        if linear_rows is None:
            return self.text
        weight = self.text.clone()
        weight[task.train_classes] = linear_rows
        return weight

    def val_acc(self, tower: nn.Module, task: Task, linear_rows: Tensor | None = None) -> float:
        rows = self.text[task.train_classes] if linear_rows is None else linear_rows
        return _acc(features(tower, task.val_x), task.val_y, rows)

    def test_metrics(self, tower: nn.Module, task: Task, linear_rows: Tensor | None = None,
                     feats: Tensor | None = None) -> dict[str, float]:
        feats = features(tower, self.test_x) if feats is None else feats
        return evaluate(task, feats, self.test, self.weight_for(task, linear_rows), self.spec, self.base, self.new)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": _mean(values), "std": _std(values)}


def _trainings(cfg: Config) -> int:
    per_setting = len(FAMILIES) * (len(cfg.lrs) + cfg.seeds - 1)
    return per_setting * len(setting_names(cfg))


def run(cfg: Config, spec: WorldSpec | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Select each family's lr on source validation, run every setting × seed; return the JSON-ready results."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch.set_num_threads(cfg.threads)
    spec = spec or WorldSpec()
    start = time.perf_counter()
    bench = Bench(cfg, spec, progress=progress)
    settings = setting_names(cfg)
    results: dict[str, dict[str, dict[str, list[float]]]] = {s: {m: {} for m in METHODS} for s in settings}
    source_val: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METHODS} for s in settings}
    sweep: dict[str, dict[str, dict[str, float]]] = {s: {f: {} for f in FAMILIES} for s in settings}
    chosen: dict[str, dict[str, float]] = {s: {} for s in settings}
    wise_curve: dict[str, list[dict[str, list[float]]]] = {s: [] for s in settings}

    def record(setting: str, method: str, metrics: dict[str, float], val: float) -> None:
        for k, v in metrics.items():
            results[setting][method].setdefault(k, []).append(v)
        source_val[setting][method].append(val)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        job = bar.add_task("fine-tuning steps", total=_trainings(cfg) * cfg.steps)

        def advance() -> None:
            bar.advance(job)

        for setting in settings:
            task = bench.tasks[setting]
            zs_val = bench.val_acc(bench.tower0, task)
            zs_metrics = bench.test_metrics(bench.tower0, task, feats=bench.zs_test)
            for family, members in FAMILIES.items():
                runs: dict[float, tuple[dict[str, nn.Module], Tensor | None]] = {}
                for lr in cfg.lrs:  # seed 0 at every lr: the selection runs, kept for the chosen one
                    bar.update(job, description=f"{setting}: {family}, lr {lr:g} (selection)")
                    runs[lr] = bench.train_family(family, task, lr, 0, advance)
                    towers, rows = runs[lr]
                    sweep[setting][family][f"{lr:g}"] = bench.val_acc(towers[SELECT_BY[family]], task, rows)
                lr = max(cfg.lrs, key=lambda c: sweep[setting][family][f"{c:g}"])
                chosen[setting][family] = lr
                for seed in range(cfg.seeds):
                    if seed == 0:
                        towers, rows = runs[lr]
                    else:
                        bar.update(job, description=f"{setting}: {family}, lr {lr:g}, seed {seed}")
                        towers, rows = bench.train_family(family, task, lr, seed, advance)
                    if family == "ce_frozen":
                        towers = {**towers, "wise_ft": bench.wise(towers["ce_frozen"], cfg.wise_alpha)}
                    metrics = {}
                    for m in members:
                        own_rows = rows if m == "ce_linear" else None
                        metrics[m] = bench.test_metrics(towers[m], task, own_rows)
                        record(setting, m, metrics[m], bench.val_acc(towers[m], task, own_rows))
                    if family == "ce_frozen":  # the α curve; its ends and α = wise_alpha are measured already
                        known = {0.0: zs_metrics, 1.0: metrics["ce_frozen"], cfg.wise_alpha: metrics["wise_ft"]}
                        curve: dict[str, list[float]] = {}
                        for alpha in WISE_ALPHAS:
                            got = known[alpha] if alpha in known else bench.test_metrics(bench.wise(towers["ce_frozen"], alpha), task)
                            for k, v in got.items():
                                curve.setdefault(k, []).append(v)
                        wise_curve[setting].append(curve)
                runs.clear()
            for _ in range(cfg.seeds):  # deterministic: the same value per seed keeps the lists aligned
                record(setting, "zero_shot", zs_metrics, zs_val)
    wall = time.perf_counter() - start
    summary = {s: {m: {k: _summary(v) for k, v in results[s][m].items()} for m in METHODS} for s in settings}
    zero_shot_domains = per_domain(bench.zs_test, bench.test, bench.text, spec)
    out: dict[str, Any] = {
        "settings": {
            **{f"domain_shift/{d}": f"train on {[x for x in spec.domains if x != d]} (all classes); test K-way on "
               f"{d} (target), every domain by name, and the sources' mean" for d in cfg.held_out},
            "open_class": (f"train on base classes of all domains ({cfg.open_class_shots or 'all'} shots per class, "
                           "base-to-new protocol); base among base names, new among new names, H"),
            "in_the_wild": f"train on base classes of {[x for x in spec.domains if x != cfg.wild_target]}; test on "
                           f"{cfg.wild_target} with all K names: base, new, total",
            "base_classes": [spec.classes[c] for c in bench.base],
            "new_classes": [spec.classes[c] for c in bench.new],
        },
        "methods": METHODS,
        "families": {f: list(m) for f, m in FAMILIES.items()},
        "config": asdict(cfg),
        "hyperparameters": {
            "lr": chosen, "lr_grid": list(cfg.lrs), "lr_sweep_source_val": sweep,
            "lr_selection": ("per setting and family, seed 0, best accuracy on the setting's source validation "
                             "data (source domains, training classes; open class: the protocol's few-shot "
                             "val draw); MMS family by its BMA weights"),
            "pretrain_peak_lr": PretrainConfig(**cfg.pretrain).lr,
            "steps": cfg.steps, "batch_size": cfg.batch_size,
            "optimizer": "AdamW (no decay on 1-D params)", "weight_decay": cfg.weight_decay,
            "schedule": "cosine to 0, no warm-up", "mms_lambda": cfg.lam, "bma_beta": cfg.beta,
            "ema_decay": cfg.ema_decay, "carft_weight": cfg.carft_weight, "carft_head": "frozen text head",
            "wise_alpha": cfg.wise_alpha, "wise_from": "ce_frozen", "trained": "image tower only (text frozen)",
            "prompts": list(CLASS_PROMPTS), "numerics": "clean (fp32 weights and average)",
            "linear_head": "cosine head init from text embeddings, trainable; untrained classes keep text rows",
        },
        "data": {"spec": spec.to_dict(), "split_seeds": {k: SPLITS[k] for k in ("train", "val", "test")},
                 "train_per_class_domain": cfg.train_per_class_domain,
                 "eval_per_class_domain": cfg.eval_per_class_domain,
                 "open_class_shots": cfg.open_class_shots,
                 "train_sizes": {s: int(t.train_x.shape[0]) for s, t in bench.tasks.items()},
                 "val_sizes": {s: int(t.val_x.shape[0]) for s, t in bench.tasks.items()},
                 "test_size": int(bench.test.labels.shape[0]), "chance": 100.0 / len(spec.classes)},
        "seeds": list(range(cfg.seeds)),
        "zero_shot_per_domain": zero_shot_domains,
        "results": results,
        "wise_curve": {"alphas": list(WISE_ALPHAS), "per_seed": wise_curve},
        "source_val": source_val,
        "summary": summary,
        "bma_weights": [float(w) for w in beta_weights(cfg.steps, cfg.beta)],
        "wall_time_s": round(wall, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "std": "sample standard deviation over seeds (0 with one seed)",
    }
    out["calibration"] = calibration(out)
    return out


# ---------------------------------------------------------------------------------------------
# Calibration: the published baseline facts, checked on baselines only
# ---------------------------------------------------------------------------------------------


def calibration(res: dict[str, Any]) -> dict[str, Any]:
    """The five calibration targets, each with its measured values and pass/fail.

    Computed from the per-seed numbers in ``res`` alone (zero-shot, CE and WiSE-FT: baselines;
    no CLIPood number enters), so anyone can recompute them from ``results.json``:

    1. zero-shot is at least 10x chance on every domain and at most 85 % on any;
    2. leave-one-domain-out, for at least two held-out domains: frozen-head CE beats zero-shot
       on the held-out domain by >= 2 points (seed mean) and by more than twice the seeds' std of
       its accuracy there, while gaining more on the sources;
    3. WiSE-FT: on some held-out domain, some α in (0, 1) is >= 1 point above both endpoints
       (seed-mean curve);
    4. open class: CE on base classes (frozen and linear head) leaves new-class accuracy below
       zero-shot;
    5. the lr grid spans >= 30x and holds a value within 1.5x of 1 % of the pretraining peak lr,
       and selection used source validation only.
    """
    zs = res["zero_shot_per_domain"]
    chance = res["data"]["chance"]
    t1 = {"value": zs, "bar": f"every domain in [{10 * chance:.1f}, 85.0]",
          "pass": all(10 * chance <= v <= 85.0 for v in zs.values())}

    r, per = res["results"], {}
    for s in (k for k in r if k.startswith("domain_shift/")):
        ce, z = r[s]["ce_frozen"], r[s]["zero_shot"]
        gain = _mean([a - b for a, b in zip(ce["target"], z["target"])])
        src_gain = _mean([a - b for a, b in zip(ce["sources"], z["sources"])])
        std = _std(ce["target"])
        lin = _mean([a - b for a, b in zip(r[s]["ce_linear"]["target"], z["target"])])
        per[s.split("/", 1)[1]] = {"gain": gain, "seed_std": std, "source_gain": src_gain, "ce_linear_gain": lin,
                                   "seeds": len(ce["target"]),
                                   "pass": gain >= 2.0 and gain > 2 * std and src_gain > gain}
    t2 = {"value": per, "bar": ">= 2 held-out domains with CE gain >= 2 points, > 2x seed std, source gain larger",
          "passing_domains": [d for d, v in per.items() if v["pass"]]}
    t2["pass"] = len(t2["passing_domains"]) >= 2

    alphas = res["wise_curve"]["alphas"]
    wise = {}
    for s, curves in res["wise_curve"]["per_seed"].items():
        if not s.startswith("domain_shift/") or not curves:
            continue
        mean = [_mean([c["target"][i] for c in curves]) for i in range(len(alphas))]
        ends = max(mean[0], mean[-1])
        inner = [(mean[i] - ends, alphas[i]) for i in range(1, len(alphas) - 1)]
        margin, alpha = max(inner)
        wise[s.split("/", 1)[1]] = {"best_alpha": alpha, "margin_over_both_endpoints": margin,
                                    "zero_shot": mean[0], "fine_tuned": mean[-1], "best": mean[alphas.index(alpha)],
                                    "pass": margin >= 1.0}
    t3 = {"value": wise, "bar": "some held-out domain with some α in (0, 1) >= 1 point above both endpoints",
          "passing_domains": [d for d, v in wise.items() if v["pass"]]}
    t3["pass"] = bool(t3["passing_domains"])

    oc = r["open_class"]
    new = {m: _mean(oc[m]["new"]) for m in ("zero_shot", "ce_frozen", "ce_linear")}
    t4 = {"value": new, "bar": "new-class accuracy of CE (frozen and linear head) below zero-shot",
          "pass": new["ce_frozen"] < new["zero_shot"] and new["ce_linear"] < new["zero_shot"]}

    hp = res["hyperparameters"]
    grid, peak = hp["lr_grid"], hp["pretrain_peak_lr"]
    near = min(grid, key=lambda v: abs(math.log(v / (0.01 * peak))))
    span = max(grid) / min(grid)
    t5 = {"value": {"lr_grid": grid, "span": span, "pretrain_peak_lr": peak, "closest_to_1pct": near,
                    "closest_ratio_to_peak": near / peak, "selection": hp["lr_selection"]},
          "bar": "span >= 30x, a value within 1.5x of 1 % of the pretraining peak, selection on source validation",
          "pass": span >= 30 * (1 - 1e-9) and abs(math.log(near / (0.01 * peak))) <= math.log(1.5)}
    targets = {"1_zero_shot_range": t1, "2_domain_shift_ce_beats_zero_shot": t2, "3_wise_ft_above_endpoints": t3,
               "4_open_class_new_drops": t4, "5_protocol": t5}
    return {**targets, "all_pass": all(t["pass"] for t in targets.values())}


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _cell(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def _shots(res: dict[str, Any]) -> str:
    shots = res["data"].get("open_class_shots")
    return f"{shots} shots per base class (base-to-new protocol)" if shots else "every base-class image"


def markdown(res: dict[str, Any]) -> str:
    """The Markdown report: calibration, then the tables (rows = methods, mean ± std over seeds)."""
    hp, summ, cal = res["hyperparameters"], res["summary"], res["calibration"]
    ds = [s for s in summ if s.startswith("domain_shift/")]
    held = [s.split("/", 1)[1] for s in ds]
    lines = [
        "# OOD benchmark on the embedded world",
        "",
        f"Tiny CLIP, image tower fine-tuned, text frozen. {len(res['seeds'])} seed(s), mean ± std (percent). "
        f"{hp['steps']} steps, batch {hp['batch_size']}, AdamW wd {hp['weight_decay']}, cosine; λ {hp['mms_lambda']}, "
        f"β {hp['bma_beta']}, EMA decay {hp['ema_decay']}, CAR-FT λ_ctx {hp['carft_weight']}, WiSE-FT α "
        f"{hp['wise_alpha']}; lr per setting and family from {hp['lr_grid']} on source validation (table below). "
        f"Numerics: {hp['numerics']}. Open class: {_shots(res)}. Wall time {res['wall_time_s']} s.",
        "",
        "## Calibration (baselines only)",
        "",
        "| Target | Measured | Bar | Pass |",
        "|---|---|---|---|",
    ]
    t = cal["1_zero_shot_range"]
    lines.append("| 1 zero-shot range | " + ", ".join(f"{d} {v:.1f}" for d, v in t["value"].items())
                 + f" | {t['bar']} | {'yes' if t['pass'] else 'NO'} |")
    t = cal["2_domain_shift_ce_beats_zero_shot"]
    lines.append("| 2 CE beats zero-shot held out | " + "; ".join(
        f"{d} {v['gain']:+.1f} (std {v['seed_std']:.1f}, sources {v['source_gain']:+.1f})" for d, v in t["value"].items())
                 + f" | {t['bar']} | {'yes' if t['pass'] else 'NO'} |")
    t = cal["3_wise_ft_above_endpoints"]
    lines.append("| 3 WiSE-FT above both ends | " + "; ".join(
        f"{d} {v['margin_over_both_endpoints']:+.1f} at α {v['best_alpha']}" for d, v in t["value"].items())
                 + f" | {t['bar']} | {'yes' if t['pass'] else 'NO'} |")
    t = cal["4_open_class_new_drops"]
    lines.append("| 4 open class: new drops | " + ", ".join(f"{m} {v:.1f}" for m, v in t["value"].items())
                 + f" | {t['bar']} | {'yes' if t['pass'] else 'NO'} |")
    t = cal["5_protocol"]
    v = t["value"]
    lines.append(f"| 5 protocol | grid {v['lr_grid']} ({v['span']:.0f}x), {v['closest_to_1pct']:g} = "
                 f"{100 * v['closest_ratio_to_peak']:.1f} % of peak {v['pretrain_peak_lr']:g} | {t['bar']} | "
                 f"{'yes' if t['pass'] else 'NO'} |")
    lines += ["", "Zero-shot per domain: " + ", ".join(f"{d} {a:.1f}" for d, a in res["zero_shot_per_domain"].items())
              + f" (chance {res['data']['chance']:.1f}).", ""]
    for title, key in (("held-out domain accuracy (target)", "target"), ("source accuracy (mean of the other "
                                                                          "domains)", "sources")):
        lines += [f"## Domain shift, leave one domain out: {title}", "",
                  "| Method | " + " | ".join(held) + " | mean |", "|---|" + "---:|" * (len(held) + 1)]
        for m, label in METHODS.items():
            means = [summ[s][m][key]["mean"] for s in ds]
            lines.append(f"| {label} | " + " | ".join(_cell(summ[s][m][key]) for s in ds)
                         + f" | {_mean(means):.1f} |")
        lines.append("")
    cols = [("open_class", k) for k in ("base", "new", "H")] + [("in_the_wild", k) for k in ("base", "new", "total")]
    lines += ["## Open class and in the wild", "", "| Method | " + " | ".join(f"{s} {k}" for s, k in cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for m, label in METHODS.items():
        lines.append(f"| {label} | " + " | ".join(_cell(summ[s][m][k]) for s, k in cols) + " |")
    fams = list(next(iter(hp["lr"].values())))
    lines += ["", "## Chosen lr (source validation, seed 0)", "", "| Setting | " + " | ".join(fams) + " |",
              "|---|" + "---:|" * len(fams)]
    for s, by in hp["lr"].items():
        lines.append(f"| {s} | " + " | ".join(f"{by[f]:g}" for f in fams) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """Held-out against source accuracy per domain-shift setting (WiSE-FT paper style), plus open class.

    The WiSE-FT α curve (zero-shot at α = 0, frozen-head CE at α = 1) is a line; every other
    method is a point with its seed spread (± std on both axes).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError('the figure needs matplotlib: pip install "clipood-plugin[bench]"') from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, curves = res["summary"], res["wise_curve"]["per_seed"]
    panels = [(s, "sources", "target") for s in summ if s.startswith("domain_shift/")] + [("open_class", "base", "new")]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, (s, xk, yk) in zip(axes.flat, panels):
        seeds = curves[s]
        n = len(res["wise_curve"]["alphas"])
        cx = [_mean([c[xk][i] for c in seeds]) for i in range(n)]
        cy = [_mean([c[yk][i] for c in seeds]) for i in range(n)]
        ax.plot(cx, cy, "-", color="grey", lw=1.5, zorder=1, label="WiSE-FT α curve (0 → 1)")
        ax.scatter(cx[1:-1], cy[1:-1], s=8, color="grey", zorder=1)
        for j, (m, label) in enumerate(METHODS.items()):
            sx, sy = summ[s][m][xk], summ[s][m][yk]
            ax.errorbar(sx["mean"], sy["mean"], xerr=sx["std"], yerr=sy["std"], fmt="*" if m == "mms_bma" else "o",
                        ms=11 if m == "mms_bma" else 6, color=colours[j % len(colours)], capsize=2, label=label,
                        zorder=3, mec="black" if m == "mms_bma" else None)
        title = f"held out: {s.split('/', 1)[1]}" if s.startswith("domain_shift/") else "open class (base → new)"
        ax.set_title(title)
        ax.set_xlabel("source accuracy (%)" if xk == "sources" else "base-class accuracy (%)")
        ax.set_ylabel("held-out accuracy (%)" if yk == "target" else "new-class accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"CLIPood on the embedded world: {len(res['seeds'])} seed(s), mean ± std; lr from source validation")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_outputs(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(res))
    plot(res, out / "results.png")


def print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    summ = res["summary"]
    ds = [s for s in summ if s.startswith("domain_shift/")]
    table = Table(title=f"OOD benchmark ({len(res['seeds'])} seed(s), wall {res['wall_time_s']} s): held-out accuracy")
    table.add_column("method")
    for s in ds:
        table.add_column(f"DS {s.split('/', 1)[1]}", justify="right")
    for k in ("base", "new", "H"):
        table.add_column(f"OC {k}", justify="right")
    table.add_column("Wild total", justify="right")
    for m, label in METHODS.items():
        cells = [summ[s][m]["target"] for s in ds] + [summ["open_class"][m][k] for k in ("base", "new", "H")]
        cells.append(summ["in_the_wild"][m]["total"])
        table.add_row(label, *(f"{c['mean']:.1f}±{c['std']:.1f}" for c in cells))
    console = Console()
    console.print(table)
    cal = res["calibration"]
    console.print("calibration: " + ", ".join(f"{k} {'pass' if v['pass'] else 'FAIL'}" for k, v in cal.items()
                                              if isinstance(v, dict)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    parser.add_argument("--held-out", nargs="+", default=None, choices=DOMAINS, metavar="DOMAIN",
                        help=f"domain-shift held-out domains (default all: {' '.join(DOMAINS)})")
    parser.add_argument("--quick", action="store_true", help="CI size: 1 seed, 1 lr, half the test images, "
                                                            "held-out photo and painting")
    parser.add_argument("--open-class-shots", type=int, default=None, metavar="N",
                        help=f"open-class training shots per class (default {DEFAULT_SHOTS}, the base-to-new "
                             "protocol; 0 = every base image, the benchmark's first protocol)")
    parser.add_argument("--output", default="benchmarks/ood", help="output folder for results.{json,md,png}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Config()
    overrides = {k: v for k, v in (("seeds", args.seeds), ("steps", args.steps), ("held_out", args.held_out))
                 if v is not None}
    if args.open_class_shots is not None:
        overrides["open_class_shots"] = args.open_class_shots or None
    try:
        cfg = Config(**{**asdict(base), **overrides})
    except ValueError as err:
        parser.error(str(err))
    res = run(cfg, progress=not args.no_progress)
    write_outputs(res, Path(args.output))
    print_table(res)
    print(f"wrote {args.output}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
