"""A tiny CLIP, contrastively pretrained on the procedural world, cached on disk.

CLIPood starts from a pretrained CLIP. No weights can be downloaded here, so this module builds
the smallest stand-in that behaves like one: an open_clip ``CLIP`` (ViT image tower, transformer
text tower, the real 49408-token BPE ``SimpleTokenizer``) registered as ``clipood-tiny``, trained
with open_clip's :class:`~open_clip.ClipLoss` on (image, caption) pairs of
:mod:`clipood_plugin.world.images` in a couple of CPU minutes, then cached as safetensors.

Every domain has an equal share of the pretraining pool (:data:`DOMAIN_WEIGHTS`), as every
DomainNet style is on the web; what makes fine-tuning matter is the captions' vagueness (loose
class names, see :mod:`clipood_plugin.world.images`) and the domains' unequal difficulty. Measured
with the defaults (seed 0, 2 threads, 480 test images per domain, 24 classes, chance 4.2%, the
prompt ensemble :data:`~clipood_plugin.world.images.CLASS_PROMPTS`): photo 62.7%, sketch 51.7%,
cartoon 64.8%, painting 50.0%, infograph 47.7%. Pretraining is far larger than the fine-tuning
runs built on it (2000 steps × 256 pairs at peak lr 2e-3, against 300 steps × 36 labelled images).

Trap: the token embedding alone is 49408 x width parameters (3.2M at width 64, most of the
model); it is what makes the text tower a real CLIP text tower, so it is kept, but the widths
are small to keep the optimiser step cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipood_plugin._io import atomic_path
from clipood_plugin._logging import no_random_init_warning
from clipood_plugin.world.images import CLASS_PROMPTS, DOMAINS, SPLITS, WorldSpec, make_tensors

__all__ = [
    "CACHE_ENV",
    "CONFIG_PATH",
    "DOMAIN_WEIGHTS",
    "MODEL_NAME",
    "QUICK_PRETRAIN",
    "PretrainConfig",
    "cache_key",
    "class_text_embeddings",
    "default_cache_dir",
    "load_pretrained",
    "pretrain",
    "register_model_config",
    "to_model_input",
    "zero_shot_accuracy",
]

MODEL_NAME = "clipood-tiny"
CONFIG_PATH = Path(__file__).with_name(f"{MODEL_NAME}.json")
#: Environment variable that overrides the cache directory.
CACHE_ENV = "CLIPOOD_CACHE"
#: Bump when the saved format or the training code changes what a given key would produce.
_CACHE_FORMAT = 1

_log = logging.getLogger(__name__)

#: Share of each domain in the pretraining pool, relative to ``samples_per_class_domain``.
DOMAIN_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("photo", 1.0),
    ("cartoon", 1.0),
    ("painting", 1.0),
    ("sketch", 1.0),
    ("infograph", 1.0),
)


def register_model_config() -> None:
    """Make ``clipood-tiny`` known to open_clip (idempotent).

    Afterwards ``open_clip.create_model_and_transforms("clipood-tiny", pretrained=None)`` and
    ``open_clip.get_tokenizer("clipood-tiny")`` work like for any built-in config.
    """
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


register_model_config()


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of the contrastive pretraining; hashed (with the world spec) into the cache key.

    ``samples_per_class_domain`` is the pool size per (class, domain) at weight 1.0; a domain of
    weight ``w`` in ``domain_weights`` contributes ``round(w * samples_per_class_domain)`` per
    class (at least one). Domains of the spec missing from ``domain_weights`` get weight 1.0.

    The defaults (2000 steps of 256 pairs from a 24k-image pool) take about 4 minutes on two
    CPU cores; the ViT learns colour and domain within a few hundred steps and class shape only
    after ~700, so fewer steps leave the zero-shot classifier near chance on the full world.
    """

    seed: int = 0
    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 60
    samples_per_class_domain: int = 200
    domain_weights: tuple[tuple[str, float], ...] = DOMAIN_WEIGHTS
    model_name: str = MODEL_NAME

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain_weights", tuple((str(d), float(w)) for d, w in self.domain_weights))
        for name in ("steps", "batch_size", "samples_per_class_domain"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be an int in [0, steps={self.steps}), got {self.warmup_steps!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr!r}, weight_decay={self.weight_decay!r}")
        for d, w in self.domain_weights:
            if d not in DOMAINS:
                raise ValueError(f"domain_weights names unknown domain {d!r}; known: {list(DOMAINS)}")
            if not 0 < w <= 1:
                raise ValueError(f"domain weight for {d!r} must be in (0, 1], got {w}")

    def pool_counts(self, spec: WorldSpec) -> dict[str, int]:
        """Pretraining images per class for each of the spec's domains."""
        weights = dict(self.domain_weights)
        return {d: max(1, round(weights.get(d, 1.0) * self.samples_per_class_domain)) for d in spec.domains}


#: A pretraining run of under a minute on two CPU cores, for smoke tests and quick demos. On an
#: 8-class world it lands at 2-4x chance zero-shot; the default :class:`PretrainConfig` is what
#: clears 10x chance on every domain of the full 24-class world.
QUICK_PRETRAIN = PretrainConfig(steps=900, batch_size=128, samples_per_class_domain=100)


def _config_with(config: PretrainConfig | None, overrides: dict[str, Any]) -> PretrainConfig:
    config = config or PretrainConfig()
    known = {f.name for f in fields(PretrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown pretraining setting(s) {unknown}; known: {sorted(known)}")
    return replace(config, **overrides) if overrides else config


def to_model_input(images: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Normalise uint8 images [N,3,H,W] with the model's preprocessing mean/std (as ``preprocess`` does)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def class_text_embeddings(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], classnames: Sequence[str],
                          template: str | Sequence[str] = CLASS_PROMPTS) -> torch.Tensor:
    """L2-normalised text embeddings [C, D] of ``template.format(name)`` for each class name.

    A sequence of templates is an ensemble: each prompt is embedded and normalised, the
    embeddings are averaged over templates and normalised again (CLIP's prompt ensembling).
    """
    templates = [template] if isinstance(template, str) else list(template)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template must contain '{{}}' for the class name, got {template!r}")
    was_training = model.training
    model.eval()
    per = torch.stack([model.encode_text(tokenizer([t.format(c) for c in classnames]), normalize=True)
                       for t in templates])
    model.train(was_training)
    return torch.nn.functional.normalize(per.mean(dim=0), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], images: torch.Tensor,
                       labels: torch.Tensor, classnames: Sequence[str],
                       template: str | Sequence[str] = CLASS_PROMPTS, *,
                       batch_size: int = 512) -> float:
    """Top-1 accuracy of the prompt-embedding classifier (CLIP zero-shot) on ``images``.

    ``images`` are uint8 [N,3,H,W] (normalised here) or already-normalised floats; ``labels``
    index ``classnames``.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as images (> 0), got {images.shape[0]} images, {labels.shape[0]} labels")
    text = class_text_embeddings(model, tokenizer, classnames, template)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        x = to_model_input(x, model) if x.dtype == torch.uint8 else x
        pred = (model.encode_image(x, normalize=True) @ text.T).argmax(dim=1)
        correct += int((pred == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / images.shape[0]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As open_clip's training script: no decay on gains, biases and the temperature.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def pretrain(spec: WorldSpec | None = None, config: PretrainConfig | None = None, *, progress: bool = True,
             **overrides: Any) -> torch.nn.Module:
    """Contrastively pretrain ``clipood-tiny`` on captioned images of every class and domain.

    Keyword ``overrides`` replace fields of ``config`` (e.g. ``pretrain(spec, steps=300, seed=1)``).
    Initialisation and batch order derive from ``config.seed`` only, so a run is reproducible
    (bit-for-bit at a fixed ``torch.get_num_threads()``). Optimiser: AdamW with linear warm-up
    and cosine decay; loss: open_clip's ``ClipLoss`` (symmetric InfoNCE), temperature learned and
    clamped at 100 as in open_clip's training loop. Returns the model in eval mode.
    """
    spec = spec or WorldSpec()
    config = _config_with(config, overrides)
    register_model_config()

    pool = [make_tensors(spec, SPLITS["pretrain"], domains=[d], samples_per_class_domain=n)
            for d, n in config.pool_counts(spec).items()]
    images = torch.cat([p.images for p in pool])
    captions = [c for p in pool for c in p.captions]
    tokenizer = open_clip.get_tokenizer(config.model_name)
    unique = sorted(set(captions))
    unique_tokens = tokenizer(unique)
    index = {c: i for i, c in enumerate(unique)}
    tokens = unique_tokens[torch.tensor([index[c] for c in captions])]

    with torch.random.fork_rng(devices=[]), no_random_init_warning():  # seed the init, leave the caller's RNG be
        torch.manual_seed(config.seed)
        model = open_clip.create_model(config.model_name, pretrained=None)
    model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=True)

    def lr_lambda(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    gen = torch.Generator().manual_seed(config.seed)
    n = images.shape[0]
    batch = min(config.batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("pretraining clipood-tiny"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), disable=not progress)
    with bar:
        task = bar.add_task("pretrain", total=config.steps, loss=float("nan"))
        for _ in range(config.steps):
            if pos + batch > n:  # epoch boundary: reshuffle, drop the ragged tail
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + batch]
            pos += batch
            image_features = model.encode_image(to_model_input(images[idx], model), normalize=True)
            text_features = model.encode_text(tokens[idx], normalize=True)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            bar.update(task, advance=1, loss=loss.item())
    return model.eval()


def default_cache_dir() -> Path:
    """``$CLIPOOD_CACHE``, else ``$XDG_CACHE_HOME/clipood-plugin``, else ``~/.cache/clipood-plugin``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "clipood-plugin"


def _settings(spec: WorldSpec, config: PretrainConfig) -> dict[str, Any]:
    model_cfg = open_clip.get_model_config(config.model_name)
    if model_cfg is None:
        raise ValueError(f"open_clip knows no model config named {config.model_name!r}")
    pre = asdict(config)
    pre["domain_weights"] = [list(dw) for dw in config.domain_weights]
    world = spec.to_dict()
    del world["samples_per_class_domain"]  # sizes downstream splits only; the pool size is in ``config``
    return {"format": _CACHE_FORMAT, "world": world, "pretrain": pre, "model_cfg": model_cfg,
            "open_clip_version": open_clip.__version__}


def cache_key(spec: WorldSpec | None = None, config: PretrainConfig | None = None, **overrides: Any) -> str:
    """Hex digest naming the cached weights for (world spec + generator version, training settings, model config).

    ``spec.samples_per_class_domain`` is left out: it sizes the downstream splits, not the
    pretraining pool (that is ``config.samples_per_class_domain``), so a small evaluation world
    reuses the same pretrained model.

    The open_clip version is recorded beside the weights but not hashed: the weights stay valid
    across open_clip releases that keep the architecture.
    """
    settings = _settings(spec or WorldSpec(), _config_with(config, overrides))
    settings.pop("open_clip_version")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_pretrained(spec: WorldSpec | None = None, config: PretrainConfig | None = None, *,
                    cache_dir: str | os.PathLike[str] | None = None, force: bool = False, progress: bool = True,
                    **overrides: Any) -> tuple[torch.nn.Module, Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """Return ``(model, preprocess, tokenizer)`` for the tiny CLIP pretrained on ``spec``.

    The first call pretrains (about 4 minutes on two CPU cores with the defaults) and saves
    ``<cache_dir>/clipood-tiny-<key>.safetensors`` plus a ``.json`` of the settings, both written
    atomically; later calls with the same settings load in well under a second. ``force=True``
    retrains and overwrites; so does a weights file whose stored key does not match. Weights are read with safetensors, never unpickled. ``preprocess``
    is open_clip's eval transform for PIL images; for uint8 tensors use :func:`to_model_input`.
    """
    spec = spec or WorldSpec()
    config = _config_with(config, overrides)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(spec, config)
    weights = root / f"{config.model_name}-{key}.safetensors"
    meta = root / f"{config.model_name}-{key}.json"

    with no_random_init_warning():
        model, _, preprocess = open_clip.create_model_and_transforms(config.model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.model_name)
    if not force and weights.is_file() and meta.is_file():
        with safe_open(str(weights), "pt") as f:
            stored = (f.metadata() or {}).get("key")
        if stored == key:
            model.load_state_dict(load_file(weights), strict=True)
            return model.eval(), preprocess, tokenizer
        _log.warning("%s holds weights for key %r, not %r; retraining", weights, stored, key)

    start = time.perf_counter()
    trained = pretrain(spec, config, progress=progress)
    model.load_state_dict(trained.state_dict(), strict=True)
    settings = _settings(spec, config)
    settings["key"] = key
    settings["train_seconds"] = round(time.perf_counter() - start, 1)
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"key": key})
    with atomic_path(meta) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return model.eval(), preprocess, tokenizer
