"""Balanced per-domain batches: every step holds ``b`` samples of *each* source domain, concatenated.

This is how DomainBed (and so the official CLIPood code) feeds a domain-generalisation run
(docs/official_code.md §4.3, §9.7): one infinite loader per source environment, batch ``b`` each, and
one batch of every loader concatenated per step, 12 × 3 = 36 images for PACS, 12 × 5 = 60 for
DomainNet. A small domain is therefore seen as often as a large one, which one shuffled stream
over the union of the domains would not do. The official "epoch" is a fixed count of such steps
(500), not a pass over the data.

Here each domain is its own streaming pipeline (:func:`~clipood_plugin.data.stream.make_train_loader`
on that domain's shards), sized so that it yields at least ``steps_per_epoch`` batches per epoch.
Its passes repeat inside the worker, so a domain smaller than ``steps_per_epoch × b`` cycles
instead of running out. :class:`BalancedLoader` takes exactly ``steps_per_epoch`` batches from every
domain and concatenates them in the domains' given order.

The draws differ from the official sampler in one way worth knowing: DomainBed samples *with*
replacement (``RandomSampler(replacement=True)``); a stream samples without replacement within a
pass (shard order and a shuffle buffer), so every image of a domain is seen once before any is
seen twice. The per-domain share of each batch, the thing the protocol fixes, is identical.

Determinism: each domain's stream is seeded by ``(seed, domain name)`` and the epoch, so a run is
a function of its seed, and replaying an epoch from its start reproduces its batches (what the
recipe's mid-epoch resume relies on). Each sample's augmentation is seeded by the stream from
``(domain seed, epoch, rank, worker, position)`` (:func:`~clipood_plugin.data.stream.seeded_rngs`),
so a resumed run's fresh workers augment epoch e exactly as the uninterrupted run's did.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from clipood_plugin.data.stream import TrainLoader, dataset_size, make_train_loader
from clipood_plugin.data.urls import expand_urls

__all__ = ["BalancedLoader", "domain_seed", "make_balanced_loader", "parse_domain_urls"]


def domain_seed(seed: int, domain: str) -> int:
    """The stream seed of one domain: a stable 31-bit hash of ``(seed, domain)``.

    Distinct domains get unrelated shuffles (one shared seed would shuffle every domain's stream
    with the same random sequence), and the value does not depend on ``PYTHONHASHSEED``.
    """
    digest = hashlib.sha256(f"clipood-balanced/{seed}/{domain}".encode()).hexdigest()
    return int(digest, 16) % (2**31)


def parse_domain_urls(specs: Sequence[str]) -> dict[str, str]:
    """``["art=/shards/art", "photo=s3://b/photo-{0..7}.tar", ...]`` → ``{domain: urls}``, in order.

    The domain name is everything before the first ``=``; it may hold spaces (OfficeHome's
    "Real World"). An entry without ``=``, an empty name or URL, or a repeated domain is an error.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, urls = str(spec).partition("=")
        name, urls = name.strip(), urls.strip()
        if not sep or not name or not urls:
            raise ValueError(f"per-domain shards {spec!r}: expected DOMAIN=URLS")
        if name in out:
            raise ValueError(f"per-domain shards: domain {name!r} is given twice")
        out[name] = urls
    return out


def _concat(parts: list[tuple]) -> tuple:
    """One step's batch: images and labels concatenated; domain lists (if present) joined."""
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    if len(parts[0]) == 3:
        return images, labels, [d for p in parts for d in p[2]]
    return images, labels


@dataclass
class BalancedLoader:
    """Concatenated per-domain batches, exactly :attr:`steps_per_epoch` of them per epoch.

    Iterate it like :class:`~clipood_plugin.data.stream.TrainLoader`: ``for images, labels in
    loader`` (``(images, labels, domains)`` with ``with_domain=True``); call :meth:`set_epoch`
    before each epoch. The first ``batch_per_domain`` rows of a batch come from ``domains[0]``,
    the next from ``domains[1]``, and so on.
    """

    domains: list[str]
    loaders: list[TrainLoader]
    #: Steps (concatenated batches) per epoch; the same on every rank.
    steps_per_epoch: int
    batch_per_domain: int

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s shard order and shuffle seeds in every domain's stream."""
        for loader in self.loaders:
            loader.set_epoch(epoch)

    @property
    def num_skipped(self) -> int:
        """Bad shards and samples skipped so far, summed over the domains."""
        return sum(loader.num_skipped for loader in self.loaders)

    @property
    def batch_size(self) -> int:
        """Samples per step: ``batch_per_domain × len(domains)``."""
        return self.batch_per_domain * len(self.domains)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple]:
        streams = [iter(loader.loader) for loader in self.loaders]
        for step in range(self.steps_per_epoch):
            parts = []
            for domain, stream in zip(self.domains, streams):
                batch = next(stream, None)
                if batch is None:  # cannot happen with the sizes make_balanced_loader sets; say so if it does
                    raise RuntimeError(
                        f"domain {domain!r} ran out after {step} of {self.steps_per_epoch} batches this epoch"
                    )
                parts.append(batch)
            yield _concat(parts)


def make_balanced_loader(
    urls_by_domain: Mapping[str, str | Sequence[str]],
    *,
    batch_per_domain: int,
    transform: Callable[[Any], Tensor],
    num_classes: int,
    steps_per_epoch: int | None = None,
    workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    **stream_kwargs: Any,
) -> BalancedLoader:
    """One stream per domain, ``batch_per_domain`` each, concatenated per step.

    Args:
        urls_by_domain: domain name → its shards (anything ``make_train_loader`` takes). The
            mapping's order is the order of the domains inside each batch.
        batch_per_domain: samples of each domain per step per rank (the official 12).
        transform, num_classes: as for :func:`~clipood_plugin.data.stream.make_train_loader`.
        steps_per_epoch: steps per epoch (the official 500). ``None``: one data pass, i.e.
            ``ceil(total samples / (batch_per_domain × domains × world_size))``, read from the
            ``sizes.json`` / ``_info.json`` beside the shards.
        workers: DataLoader workers *per domain* (DomainBed also gives each environment its own).
        world_size, rank: the distributed layout; each domain's shards are split over the ranks.
        seed: the run seed; domain ``d``'s stream gets :func:`domain_seed` ``(seed, d)``.
        stream_kwargs: passed on to ``make_train_loader`` (``resampled``, ``shuffle_buffer``,
            ``allow_pipe``, ``with_domain``, ``multiprocessing_context``, ...).

    Raises:
        ValueError: no domains, a bad batch or step count, or (for a data pass) shards whose
            sample count cannot be read; plus whatever ``make_train_loader`` raises for a domain.
    """
    if not urls_by_domain:
        raise ValueError("make_balanced_loader: no domains given")
    for name, value in (("batch_per_domain", batch_per_domain), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    domains = [str(d) for d in urls_by_domain]
    if steps_per_epoch is None:
        sizes = {}
        for domain, urls in urls_by_domain.items():
            n = dataset_size(expand_urls(urls))
            if n is None:
                raise ValueError(
                    f"domain {domain!r}: no sizes.json or _info.json beside its shards, so a data pass has no "
                    "length; give steps_per_epoch (--iters-per-epoch)"
                )
            sizes[domain] = n
        steps_per_epoch = max(1, math.ceil(sum(sizes.values()) / (batch_per_domain * len(domains) * world_size)))
    elif isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1 or None, got {steps_per_epoch!r}")
    loaders = [
        make_train_loader(
            urls,
            batch_size=batch_per_domain,
            transform=transform,
            num_classes=num_classes,
            # sized so every domain yields >= steps_per_epoch batches per epoch (more when the
            # worker count does not divide it; the surplus is never drawn)
            num_samples=steps_per_epoch * batch_per_domain * world_size,
            workers=workers,
            world_size=world_size,
            rank=rank,
            seed=domain_seed(seed, domain),
            **stream_kwargs,
        )
        for domain, urls in urls_by_domain.items()
    ]
    return BalancedLoader(domains, loaders, steps_per_epoch, batch_per_domain)
