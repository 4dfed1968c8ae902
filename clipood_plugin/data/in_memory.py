"""Uniform random batches from a small training set held in memory (few-shot sets, Tables 2–3).

The official code trains its few-shot runs from an ordinary shuffled DataLoader (batch 36,
``drop_last=True``, cycled forever): every batch is a uniform draw without replacement from the
whole training set, and a batch never spans two passes. A stream (:mod:`.stream`) cannot give
that for a small set. Its workers read disjoint shards and its shuffle buffer mixes only within
a worker, so when the shards are written class after class (as a protocol's record list comes),
a batch covers a fraction of the classes; and its batches run on across pass boundaries, so a
batch can hold the same image twice. Measured on a 50-class, 16-shot set in 16 class-grouped
shards with 2 workers: about 20 distinct classes per batch of 36 where a uniform draw gives 26.

Here the set is read once and kept as its encoded bytes (tens of MB for a base-to-new set, about
2 GB for 16-shot ImageNet), and each batch is drawn by index, whatever the shard layout and
worker count. The pipeline:

Once, in the main process, when the loader is built:

1. every shard, in the given order (every rank reads all of them: no node or worker split);
2. tar → samples with :class:`~.stream.SkipCounter` as handler (a bad shard is logged, counted
   and skipped, as in the stream);
3. the stream's decode stage on every sample: an undecodable image or label is a counted skip
   and the sample is dropped, so a later batch never meets it; the stream's label check: a
   label outside ``[0, num_classes)`` raises ValueError naming shard and key;
4. the encoded image bytes kept in one uint8 tensor, shared with the workers rather than copied
   to each (forked workers inherit it, spawned ones receive it through torch's shared memory),
   with offsets, labels and domains.

Per batch, in the main process (the batch sampler): global batch ``g = epoch × steps_per_epoch
+ i``; pass ``p = g // P`` with ``P = ⌊N / (batch_size × world_size)⌋`` full global batches per
pass; pass ``p`` is a permutation of the N samples seeded by ``(seed, p)``, cut into P global
batches (``drop_last``: the last ``N mod (batch_size × world_size)`` samples of each permutation
sit the pass out); rank ``r`` takes rows ``[r × batch_size, (r + 1) × batch_size)`` of each global
batch, so the ranks stay in step and together partition it.

Per sample, in the DataLoader workers (a map-style dataset):

5. the stream's decode (bytes → RGB PIL image; these bytes decoded once already, so a failure
   here is an error, not a skip) and ``transform``, with torch's and Python's RNG
   seeded from ``(seed, pass, position in the pass)`` for the call and restored after (the
   stream's :func:`~.stream.seeded_rngs`, one rule for both loaders), so the
   augmentation is a function of the run's seed, not of the worker count or of a resume
   (numpy's global RNG is not seeded: a transform drawing from it varies with the worker);
6. collate into ``(images [B, ...], labels int64 [B][, domains list[str]])``.

With ``steps_per_epoch=None`` an epoch is one pass (``P`` steps); with a fixed count (the
official 500-iteration "epoch") the passes simply continue across epochs, as they do in the
official loader, which is cycled forever. Either way the batches of epoch e are a pure function of
``(seed, e)``, so replaying an epoch from its start (the recipe's mid-epoch resume) reproduces
them exactly.

The trap: everything is read before the first step, so this is for sets that fit in memory on
every rank (:data:`AUTO_MAX_SAMPLES` is where ``in_memory="auto"`` stops choosing it). DomainBed's
per-domain batches (:mod:`.balanced`) sample with replacement in the official code and keep
their own loader.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clipood_plugin._signals import shield_worker_from_preemption
from clipood_plugin.data.stream import (
    DEFAULT_IMAGE_KEYS,
    SharedEpoch,
    SkipCounter,
    _check_common,
    _check_positive,
    _CheckLabel,
    _collate,
    _DecodeSample,
    _prepare_urls,
    _ShardList,
    _ToTuple,
    dataset_size,
    seeded_rngs,
)

__all__ = ["AUTO_MAX_SAMPLES", "InMemoryLoader", "make_in_memory_loader", "use_in_memory"]

_LOG = logging.getLogger(__name__)

#: ``in_memory="auto"`` holds a training set in memory up to this many samples (16-shot ImageNet
#: is 16,000; the largest base-to-new set, SUN397, 3,184).
AUTO_MAX_SAMPLES = 20_000


def use_in_memory(mode: str, urls: str | Sequence[str], *, resampled: bool = False,
                  num_samples: int | None = None, max_samples: int = AUTO_MAX_SAMPLES) -> bool:
    """Whether to train from :func:`make_in_memory_loader` (``mode``: ``"on"``, ``"off"``, ``"auto"``).

    ``auto`` is on when the ``sizes.json`` / ``_info.json`` beside the shards count at most
    ``max_samples`` samples, and off without such metadata or when the stream is asked for
    explicitly (``resampled``, or ``num_samples`` setting the epoch's length). ``on`` with those
    stream settings is an error rather than a silent choice between them.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"in_memory must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return False
    stream_only = [name for name, given in (("resampled", resampled), ("num_samples", num_samples is not None))
                   if given]
    if mode == "on":
        if stream_only:
            raise ValueError(f"in_memory='on' draws whole passes over the set; {' and '.join(stream_only)} "
                             "apply to the stream only (use in_memory='off')")
        return True
    if stream_only:
        return False
    from clipood_plugin.data.urls import expand_urls

    size = dataset_size(expand_urls(urls))
    return size is not None and size <= max_samples


class _KeepEncoded:
    """Stage 3: decode once to prove the sample usable (stream's stage 6), keep its encoded bytes."""

    def __init__(self, image_keys: Sequence[str]) -> None:
        self.decode = _DecodeSample(image_keys)

    def __call__(self, sample: dict) -> dict:
        decoded = self.decode(sample)  # BadSampleError → the handler counts and skips it
        ext = next(k for k in self.decode.image_keys if k in sample)
        decoded["ext"], decoded["data"] = ext, bytes(sample[ext])
        decoded.pop("image").close()
        return decoded


class _EncodedImages(Dataset):
    """Stages 5–6: item ``(index, aug_seed)`` → ``(transform(image), label[, domain])``."""

    def __init__(self, data: Tensor, offsets: Tensor, labels: list[int], domains: list[str] | None,
                 names: list[tuple[str, str]], exts: list[str], transform: Callable[[Any], Any], with_domain: bool,
                 image_keys: Sequence[str]) -> None:
        self.data, self.offsets, self.labels, self.domains = data, offsets, labels, domains
        self.names, self.exts = names, exts
        self.decode = _DecodeSample(image_keys)
        self.to_tuple = _ToTuple(transform, with_domain)

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, index: int) -> dict:
        """The decoded sample ``index`` (RGB PIL image, label, domain), before the transform."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        url, key = self.names[index]
        raw = {"__key__": key, "__url__": url, self.exts[index]: self.data[start:end].numpy().tobytes(),
               "cls": str(self.labels[index]).encode()}
        if self.domains is not None:
            raw["domain"] = self.domains[index].encode()
        return self.decode(raw)

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        index, aug_seed = item
        sample = self.sample(index)
        with seeded_rngs(aug_seed):  # the stream's per-sample rule
            return self.to_tuple(sample)


class _PassBatches:
    """Batch sampler: this rank's share of every global batch, cut from permutations per pass."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int,
                 steps_per_epoch: int) -> None:
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.steps_per_epoch = seed, steps_per_epoch
        self.global_batch = batch_size * world_size
        self.batches_per_pass = num_samples // self.global_batch
        self.epoch = 0
        self._cached: tuple[int, list[int], int] | None = None

    def permutation(self, pass_index: int) -> tuple[list[int], int]:
        """(sample order, augmentation seed base) of one pass: a pure function of (seed, pass).

        Seeded through a string, which Python's ``random`` hashes with SHA-512, so the order does
        not depend on ``PYTHONHASHSEED``, the process, the worker count or the rank.
        """
        if self._cached is None or self._cached[0] != pass_index:
            rng = random.Random(f"clipood-in-memory/{self.seed}/{pass_index}")
            order = list(range(self.num_samples))
            rng.shuffle(order)
            self._cached = (pass_index, order, rng.getrandbits(62))
        return self._cached[1], self._cached[2]

    def batch(self, global_index: int) -> list[tuple[int, int]]:
        """This rank's ``(sample index, augmentation seed)`` rows of global batch ``global_index``."""
        pass_index, within = divmod(global_index, self.batches_per_pass)
        order, aug_base = self.permutation(pass_index)
        start = within * self.global_batch + self.rank * self.batch_size
        return [(order[k], aug_base + k) for k in range(start, start + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        first = self.epoch * self.steps_per_epoch
        for i in range(self.steps_per_epoch):
            yield self.batch(first + i)

    def __len__(self) -> int:
        return self.steps_per_epoch


@dataclass
class InMemoryLoader:
    """The training DataLoader over an in-memory set, with :class:`~.stream.TrainLoader`'s interface.

    Iterate it (``for images, labels in train: ...``); ``len()`` is :attr:`steps_per_epoch`. Call
    :meth:`set_epoch` before each epoch.
    """

    loader: DataLoader
    urls: list[str]
    #: Optimizer steps (batches) per epoch on this rank; the same on every rank.
    steps_per_epoch: int
    #: Usable samples held (bad ones were skipped while reading).
    num_samples: int
    #: Samples drawn per epoch over all ranks: steps_per_epoch × batch_size × world_size.
    samples_per_epoch: int
    #: Encoded image bytes held in memory.
    num_bytes: int
    sampler: _PassBatches
    skip_counter: SkipCounter

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s batches on the next iteration."""
        self.sampler.epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def num_skipped(self) -> int:
        """Bad shards and samples skipped while reading the set (nothing is skipped afterwards)."""
        return self.skip_counter.value

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.loader)

    def __len__(self) -> int:
        return self.steps_per_epoch


def make_in_memory_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    transform: Callable[[Any], Tensor],
    num_classes: int,
    steps_per_epoch: int | None = None,
    workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    allow_pipe: bool = False,
    with_domain: bool = False,
    image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    strict_data: bool = False,
) -> InMemoryLoader:
    """Read every sample of ``urls`` once and draw uniform batches from them (module docstring).

    Args:
        urls, transform, num_classes, workers, world_size, rank, allow_pipe, with_domain,
            image_keys, pin_memory, multiprocessing_context, strict_data: as for
            :func:`~clipood_plugin.data.stream.make_train_loader`.
        batch_size: per-rank batch size; a global batch is ``batch_size × world_size``.
        steps_per_epoch: batches per epoch (the official 500); ``None``: one pass,
            ``⌊N / (batch_size × world_size)⌋`` batches.
        seed: seeds the per-pass permutations and the per-sample augmentation RNG.

    Raises:
        ValueError: fewer usable samples than one global batch, a label outside the class list,
            bad arguments; plus what the stream raises for missing shards and URL policy.
    """
    _check_common(batch_size, transform, num_classes, workers)
    _check_positive("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if steps_per_epoch is not None:
        _check_positive("steps_per_epoch", steps_per_epoch)
    shard_urls = _prepare_urls(urls, allow_pipe)
    context = multiprocessing.get_context(multiprocessing_context)
    skips = SkipCounter(context, strict=strict_data)

    started = time.perf_counter()
    reader = wds.DataPipeline(
        _ShardList(shard_urls, seed=0, epoch=SharedEpoch(0, context), shuffle=False),
        wds.tarfile_to_samples(handler=skips),
        wds.map(_KeepEncoded(image_keys), handler=skips),
        wds.map(_CheckLabel(num_classes)),
    )
    chunks: list[bytes] = []
    labels: list[int] = []
    domains: list[str] = []
    names: list[tuple[str, str]] = []  # (shard, key) of each sample, for error messages
    exts: list[str] = []
    for sample in reader:
        if with_domain and "domain" not in sample:
            raise ValueError(f"shard {sample['__url__']!r}, sample {sample['__key__']!r}: with_domain=True but the "
                             "sample has no 'domain' entry")
        chunks.append(sample["data"])
        labels.append(sample["label"])
        names.append((sample["__url__"], sample["__key__"]))
        exts.append(sample["ext"])
        if "domain" in sample:
            domains.append(sample["domain"])
    num_samples = len(labels)
    global_batch = batch_size * world_size
    if num_samples < global_batch:
        raise ValueError(f"{shard_urls[0]!r}…: {num_samples} usable sample(s), fewer than one global batch of "
                         f"{batch_size} × {world_size} rank(s) = {global_batch}; every batch is drawn without "
                         "replacement from one pass, so use a smaller --batch-size")
    sizes = torch.tensor([0] + [len(c) for c in chunks], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0)
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    del chunks
    _LOG.info("in memory: %d samples, %.1f MB of encoded images, read in %.1f s (%d skipped)",
              num_samples, data.numel() / 2**20, time.perf_counter() - started, skips.value)

    steps = steps_per_epoch if steps_per_epoch is not None else num_samples // global_batch
    sampler = _PassBatches(num_samples, batch_size, world_size, rank, seed, steps)
    dataset = _EncodedImages(data, offsets, labels, domains if len(domains) == num_samples else None, names, exts,
                             transform, with_domain, image_keys)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        multiprocessing_context=context if workers > 0 else None,
        worker_init_fn=shield_worker_from_preemption,  # preemption is the main process's to handle
    )
    return InMemoryLoader(loader=loader, urls=shard_urls, steps_per_epoch=steps, num_samples=num_samples,
                          samples_per_epoch=steps * global_batch, num_bytes=int(data.numel()), sampler=sampler,
                          skip_counter=skips)
