"""The embedded default: what the streaming recipe runs when it is given no data arguments.

A domain-shift task in the generated world, one of ``recipes/ood_benchmark.py``'s settings:
fine-tune the tiny pretrained CLIP on four source domains (photo, sketch, cartoon, infograph)
and evaluate on every domain, the held-out painting domain included, so the table the recipe
prints shows zero-shot, fine-tuned and BMA accuracy in and out of distribution. Everything is
generated or trained locally and cached (keyed by the generator and training settings), so the
first run takes a few CPU minutes and later runs start in seconds.

The fine-tuning settings are the benchmark's: 300 steps of batch 36, and the lr its source
validation chose for MMS + BMA when painting is held out (from a 30x grid; test data chose
nothing). The benchmark measures every held-out domain, including those where fine-tuning loses.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipood_plugin.world.images import CLASS_PROMPTS, WorldSpec, write_world_shards
from clipood_plugin.world.tiny_clip import (
    MODEL_NAME,
    PretrainConfig,
    cache_key,
    default_cache_dir,
    load_pretrained,
)

__all__ = ["EmbeddedDefault", "EmbeddedTask", "embedded_default", "prepare_world"]


@dataclass(frozen=True)
class EmbeddedTask:
    """The default task: which domains train, which are held out, and the fine-tuning settings."""

    sources: tuple[str, ...] = ("photo", "sketch", "cartoon", "infograph")
    held_out: tuple[str, ...] = ("painting",)
    spec: WorldSpec = field(default_factory=WorldSpec)
    eval_per_class_domain: int = 20
    #: recipe flag dest → value, applied where the user left the recipe's default
    hparams: tuple[tuple[str, Any], ...] = (
        ("lr", 6e-4),
        ("total_steps", 300),
        ("batch_size", 36),
        ("weight_decay", 0.1),
        ("warmup_steps", 0),
        ("workers", 1),
        ("eval_metric", "eval_bma_val_top1"),  # best.pt by source validation, never by a test domain
    )

    @property
    def domains(self) -> tuple[str, ...]:
        return (*self.sources, *self.held_out)


QUICK = EmbeddedTask(
    spec=WorldSpec(samples_per_class_domain=12),
    eval_per_class_domain=8,
    hparams=(("lr", 6e-4), ("total_steps", 60), ("batch_size", 24), ("weight_decay", 0.1), ("workers", 0),
             ("eval_metric", "eval_bma_val_top1")),
)


def _task_key(task: EmbeddedTask) -> str:
    payload = {"spec": task.spec.to_dict(), "sources": task.sources, "held_out": task.held_out,
               "eval_per_class_domain": task.eval_per_class_domain}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def prepare_world(task: EmbeddedTask, cache_dir: str | os.PathLike[str] | None = None, *,
                  progress: bool = True) -> dict[str, Any]:
    """Pretrain (or load) the tiny CLIP and write (or find) the task's shards; return their paths.

    Returns ``{"weights": safetensors path, "train": brace pattern, "val": pattern,
    "test": {domain: pattern}, "classnames": path}``. Written atomically; safe to call again.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    config = PretrainConfig()
    load_pretrained(task.spec, config, cache_dir=root, progress=progress)
    weights = root / f"{MODEL_NAME}-{cache_key(task.spec, config)}.safetensors"
    data = root / f"world-{_task_key(task)}"
    manifest = data / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    kwargs: dict[str, Any] = {"max_samples_per_shard": 500, "progress": progress}
    train = write_world_shards(task.spec, data / "train", "train", domains=list(task.sources), **kwargs)
    val = write_world_shards(task.spec, data / "val", "val", domains=list(task.sources),
                             samples_per_class_domain=task.eval_per_class_domain, **kwargs)
    test = {d: write_world_shards(task.spec, data / "test" / d, "test", domains=[d],
                                  samples_per_class_domain=task.eval_per_class_domain, **kwargs).pattern
            for d in task.domains}
    paths = {"weights": str(weights), "train": train.pattern, "val": val.pattern, "test": test,
             "classnames": str(data / "train" / "classnames.json")}
    from clipood_plugin._io import atomic_write_bytes

    atomic_write_bytes(manifest, json.dumps(paths, indent=2).encode())
    return paths


@dataclass(frozen=True)
class EmbeddedDefault:
    """What the recipe runs when it is given no data arguments: the world's shards, the tiny CLIP
    and the fine-tuning settings, as plain values (:func:`embedded_default` builds it).

    The recipe always trains on ``train_shards`` / ``classnames``; the other fields replace only
    what the user left at the recipe's defaults, so ``--lr`` and friends still apply.
    """

    #: brace pattern of the source domains' training shards
    train_shards: str
    #: path of the ``classnames.json`` beside them
    classnames: str
    #: ``NAME=URLS`` eval specs, one per domain; held-out domains are named ``<domain>-heldout``
    eval_shards: tuple[str, ...]
    #: open_clip model name of the tiny CLIP
    model: str
    #: path of its pretrained safetensors weights
    pretrained: str
    #: the zero-shot prompt templates (the world's ensemble, one prompt per domain)
    template: tuple[str, ...]
    #: recipe flag dest → value (``lr``, ``total_steps``, ``batch_size``, …)
    hparams: dict[str, Any]
    #: the output directory's name, beside the recipe's default output directory
    output_name: str = "embedded-default"


def embedded_default(quick: bool = False, cache_dir: str | os.PathLike[str] | None = None, *,
                     progress: bool = True) -> EmbeddedDefault:
    """Prepare the embedded default task (:data:`QUICK` when ``quick``) and return what to run it with.

    Pretrains (or loads) the tiny CLIP and writes (or finds) the shards, as :func:`prepare_world`,
    cached under ``cache_dir``; ``progress`` shows progress bars.
    """
    task = QUICK if quick else EmbeddedTask()
    paths = prepare_world(task, cache_dir, progress=progress)
    return EmbeddedDefault(
        train_shards=paths["train"],
        classnames=paths["classnames"],
        eval_shards=(f"val={paths['val']}",
                     *(f"{d if d in task.sources else d + '-heldout'}={p}" for d, p in paths["test"].items())),
        model=MODEL_NAME,
        pretrained=paths["weights"],
        template=CLASS_PROMPTS,
        hparams=dict(task.hparams),
    )
