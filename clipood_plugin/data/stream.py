"""Stream WebDataset shards into (image, label[, domain]) batches for training and evaluation.

The training pipeline is open_clip's (``open_clip_train/data.py``, ``get_wds_dataset``), rebuilt
from webdataset's ``DataPipeline`` stages rather than its ``WebDataset`` class, which shuffles
shards *after* splitting them and whose default node splitter refuses multi-node runs
(webdataset#440, Lightning#20149). Per DataLoader worker, one pass is:

1. shard list, permuted by ``(seed, epoch)`` — the same permutation on every rank, *before* the
   node split, so the ranks partition the shards (with ``resampled=True``: shards drawn with
   replacement, seeded by ``(seed, epoch, rank, worker)``, and no split);
2. split by node (``rank`` / ``world_size`` passed in, never read from the environment);
3. split by DataLoader worker;
4. tar → samples, with a handler that logs and *counts* a bad shard or sample and goes on
   (webdataset's ``warn_and_continue`` sleeps 0.5 s per error); a store that cannot be reached
   is not bad data and ends the run with :class:`~clipood_plugin.data.urls.ShardStoreError`,
   naming the shard and the store;
5. sample shuffle buffer, seeded by ``(seed, epoch, rank, worker, pass)``;
6. decode the image to RGB PIL and parse ``cls`` (and ``domain``); undecodable → counted skip.
   Only these fields are decoded, so nothing in a shard is ever unpickled;
7. label check: a label outside ``[0, num_classes)`` raises ValueError naming shard and key,
   because it means the class list does not match the shards — skipping would hide that;
8. ``transform`` (open_clip's preprocess, timm's ``create_transform`` output, any callable),
   with torch's and Python's RNG seeded for the call from ``(seed, epoch, rank, worker, pass,
   position in the pass)`` and restored after (:func:`seeded_rngs`), so a sample's augmentation
   is a function of the run's seed and epoch, not of how long the worker has lived: a resumed
   run's fresh workers crop and flip exactly as the uninterrupted run's persistent ones
   (numpy's global RNG is not seeded: a transform drawing from it still varies);
9. tuple ``(image, label[, domain])``.

Passes repeat, and the worker's stream is batched (``partial=False``) and cut at
``per_worker_batches``. This is open_clip's per-worker ``with_epoch`` count (global batch =
batch × world_size, ceil, rounded up to a multiple of the workers), so every rank takes exactly
:attr:`TrainLoader.steps_per_epoch` steps. Unlike ``DataPipeline.with_epoch``, batches run on
across pass boundaries: a worker whose shards hold fewer samples than one batch still fills its
batches instead of ending the epoch early, which under DDP would leave the other ranks waiting
in a collective forever. A pass that yields no usable sample at all raises instead of spinning.

The epoch lives in a :class:`SharedEpoch` (a ``multiprocessing.Value``) so persistent workers see
``set_epoch``; skipped samples are counted in a shared :class:`SkipCounter`, so the training
progress bar can show :attr:`TrainLoader.num_skipped` from the main process. The count is of
skip *events*: a bad sample is counted each time a pass meets it, an unreadable shard each time
it is opened, and a truncated tar once or twice (the cut member, then the broken header).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import PurePosixPath
from typing import Any

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipood_plugin._signals import shield_worker_from_preemption
from clipood_plugin.data.urls import (
    ShardStoreError,
    check_url,
    expand_urls,
    is_local,
    is_network_failure,
    local_path,
    metadata_readable,
    read_json,
    register_fsspec_handlers,
    sibling_url,
)

__all__ = [
    "DEFAULT_IMAGE_KEYS",
    "EvalLoader",
    "SharedEpoch",
    "SkipCounter",
    "TrainLoader",
    "dataset_size",
    "epoch_steps",
    "make_eval_loader",
    "make_train_loader",
    "seeded_rngs",
    "shard_order",
]

_LOG = logging.getLogger(__name__)

#: Image entries tried in order (open_clip's ``jpg;png;jpeg;webp``); the label is ``cls`` (timm).
DEFAULT_IMAGE_KEYS: tuple[str, ...] = ("jpg", "png", "jpeg", "webp")


# --------------------------------------------------------------------------------------------
# State shared with DataLoader workers
# --------------------------------------------------------------------------------------------


class SharedEpoch:
    """The current epoch in shared memory, so persistent DataLoader workers see ``set_value``."""

    def __init__(self, epoch: int = 0, context: Any = None) -> None:
        self._value = (context or multiprocessing.get_context()).Value("q", epoch)

    def set_value(self, epoch: int) -> None:
        self._value.value = int(epoch)

    def get_value(self) -> int:
        return int(self._value.value)


class SkipCounter:
    """A webdataset exception handler that logs, counts (across worker processes) and continues.

    Returning True tells webdataset to skip the failed item. The count sits in shared memory,
    so :attr:`value` read in the main process includes every worker's skips. With ``strict``
    the error is re-raised instead (a recipe's ``--strict-data``).

    A store that cannot be reached (connection refused or reset, a timeout:
    :func:`~clipood_plugin.data.urls.is_network_failure`) is not bad data, and skipping it would
    only walk through every other shard of the epoch to the same failure, logging each as bad
    data: it raises :class:`~clipood_plugin.data.urls.ShardStoreError`, naming the shard and the
    store, and is not counted. There are no retries here beyond the store client's own (s3fs and
    botocore retry a connection a few times; ``AWS_MAX_ATTEMPTS`` sets botocore's count).
    """

    def __init__(self, context: Any = None, strict: bool = False) -> None:
        self._value = (context or multiprocessing.get_context()).Value("q", 0)
        self.strict = strict

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, ShardStoreError):  # raised by this handler at an inner stage: pass it on as it was
            exn.args = exn.args[:1]
            raise exn
        if is_network_failure(exn):
            # webdataset appends the shard URL (and the stream) to the args of what it hands over
            url = next((a for a in reversed(exn.args) if isinstance(a, str) and "://" in a), "<unknown shard>")
            raise ShardStoreError.from_failure(url, exn) from exn
        if self.strict:
            raise exn
        with self._value.get_lock():
            self._value.value += 1
            count = self._value.value
        message = " ".join(str(a) for a in exn.args if isinstance(a, str)) or repr(exn)
        _LOG.warning("skipped bad data (%d so far): %s: %s", count, type(exn).__name__, message[:500])
        return True

    @property
    def value(self) -> int:
        return int(self._value.value)


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator and Python's ``random`` seeded by ``seed``; restore both after.

    The one rule for augmentation randomness, shared by the stream and the in-memory loader: each
    sample's transform runs under its own seed, so what it draws depends on the sample's place in
    the run, never on the worker process's history (persistent workers seeded once at start-up
    would otherwise crop a resumed run's samples differently). The state is restored, so nothing
    else in the process (a ``workers=0`` training loop) sees its RNG move.
    """
    # The CPU generator directly: torch.manual_seed would also queue a CUDA seeding, with a stack
    # trace, on every call (a third of the time per sample in the in-memory loader).
    generator = torch.default_generator
    torch_state, py_state = generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(py_state)


def augment_seed_base(*parts: object) -> int:
    """A 62-bit seed base from ``parts`` (hashed as a string with SHA-512, so stable across processes)."""
    return random.Random("clipood-augment/" + "/".join(str(p) for p in parts)).getrandbits(62)


class _AugmentSeeds:
    """Per-sample augmentation seeds of one worker's pass: base(seed, epoch, rank, worker, pass) + position.

    :class:`_Repeat` calls :meth:`start_pass` before each pass; :class:`_ToTuple` takes one seed
    per sample it transforms, in stream order (after the shuffle buffer), which is itself a pure
    function of (seed, epoch, rank, worker).
    """

    def __init__(self, seed: int, epoch: SharedEpoch, rank: int) -> None:
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.base, self.position = 0, 0

    def start_pass(self, pass_index: int) -> None:
        worker, _ = _worker()
        self.base = augment_seed_base(self.seed, self.epoch.get_value(), self.rank, worker, pass_index)
        self.position = 0

    def next(self) -> int:
        self.position += 1
        return self.base + self.position - 1


# --------------------------------------------------------------------------------------------
# Pipeline stages (picklable callables, so they survive the DataLoader's worker start-up)
# --------------------------------------------------------------------------------------------


def shard_order(urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The shard permutation for ``(seed, epoch)``: a pure function, identical on every rank.

    Seeded through a string, which Python's ``random`` hashes with SHA-512, so the order does
    not depend on ``PYTHONHASHSEED`` or the process.
    """
    order = list(urls)
    random.Random(f"clipood-shards/{seed}/{epoch}").shuffle(order)
    return order


class _ShardList(IterableDataset):
    """Stage 1: all shard URLs, permuted by (seed, epoch) when ``shuffle``; read anew each pass."""

    def __init__(self, urls: Sequence[str], *, seed: int, epoch: SharedEpoch, shuffle: bool) -> None:
        super().__init__()
        self.urls, self.seed, self.epoch, self.shuffle = list(urls), seed, epoch, shuffle

    def __iter__(self) -> Iterator[dict]:
        urls = shard_order(self.urls, self.seed, self.epoch.get_value()) if self.shuffle else self.urls
        for url in urls:
            yield {"url": url}


class _ResampledShardList(IterableDataset):
    """Stage 1 (resampled): shards drawn with replacement forever, seeded by (seed, epoch, rank, worker).

    Seeding from the shared epoch (not a per-process call counter, as webdataset's
    ``ResampledShards`` does) makes epoch e draw the same shards after a resume as in an
    uninterrupted run.
    """

    def __init__(self, urls: Sequence[str], *, seed: int, epoch: SharedEpoch, rank: int) -> None:
        super().__init__()
        self.urls, self.seed, self.epoch, self.rank = list(urls), seed, epoch, rank

    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        rng = random.Random(f"clipood-resample/{self.seed}/{self.epoch.get_value()}/{self.rank}/{worker}")
        while True:
            yield {"url": rng.choice(self.urls)}


class _NodeSplit:
    """Stage 2: every ``world_size``-th shard starting at ``rank`` (explicit, not from the environment)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        yield from islice(src, self.rank, None, self.world_size)


def _split_by_worker(src: Iterable[dict]) -> Iterator[dict]:
    """Stage 3: every n-th shard for DataLoader worker k of n (from torch, not the environment)."""
    worker, num_workers = _worker()
    yield from islice(src, worker, None, num_workers)


def _register_openers(src: Iterable[dict]) -> Iterator[dict]:
    """Install the fsspec openers in this process (workers started by ``spawn`` lack them)."""
    register_fsspec_handlers()
    yield from src


class _SampleShuffle:
    """Stage 5: webdataset's shuffle buffer with an RNG seeded by (seed, epoch, rank, worker, pass)."""

    def __init__(self, bufsize: int, *, seed: int, epoch: SharedEpoch, rank: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank
        self.pass_index = 0

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.bufsize <= 1:
            return src
        worker, _ = _worker()
        rng = random.Random(
            f"clipood-samples/{self.seed}/{self.epoch.get_value()}/{self.rank}/{worker}/{self.pass_index}"
        )
        # Fill a fifth of the buffer before the first sample goes out (open_clip: 1000 of 5000).
        return wds.shuffle(self.bufsize, max(1, self.bufsize // 5), rng=rng)(iter(src))


class BadSampleError(ValueError):
    """A sample that cannot be used (no image, undecodable image, unparsable label); it is skipped."""


class _DecodeSample:
    """Stage 6: image bytes → RGB PIL image, ``cls`` → int, ``domain`` → str. Nothing else is decoded."""

    def __init__(self, image_keys: Sequence[str]) -> None:
        self.image_keys = tuple(image_keys)

    def __call__(self, sample: dict) -> dict:
        from PIL import Image

        key, url = sample.get("__key__"), sample.get("__url__")
        try:
            ext = next((k for k in self.image_keys if k in sample), None)
            if ext is None:
                raise BadSampleError(f"no image entry (looked for {list(self.image_keys)})")
            if "cls" not in sample:
                raise BadSampleError("no 'cls' entry")
            label = int(bytes(sample["cls"]).decode("ascii").strip())
            with Image.open(io.BytesIO(sample[ext])) as img:
                img.load()
                image = img.convert("RGB")
            out = {"__key__": key, "__url__": url, "image": image, "label": label}
            if "domain" in sample:
                out["domain"] = bytes(sample["domain"]).decode("utf-8")
            return out
        except Exception as exc:
            raise BadSampleError(f"shard {url!r}, sample {key!r}: {type(exc).__name__}: {exc}") from exc


class _CheckLabel:
    """Stage 7: a label outside [0, num_classes) is a configuration error, not a bad sample."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, sample: dict) -> dict:
        label = sample["label"]
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"shard {sample['__url__']!r}, sample {sample['__key__']!r}: label {label} is outside "
                f"[0, {self.num_classes}); the class list does not match these shards"
            )
        return sample


class _ToTuple:
    """Stages 8–9: apply ``transform`` to the image (under a per-sample seed with ``seeds``); return the tuple."""

    def __init__(self, transform: Callable[[Any], Any], with_domain: bool, seeds: _AugmentSeeds | None = None) -> None:
        self.transform, self.with_domain, self.seeds = transform, with_domain, seeds

    def __call__(self, sample: dict) -> tuple:
        if self.seeds is None:
            image = self.transform(sample["image"])
        else:
            with seeded_rngs(self.seeds.next()):
                image = self.transform(sample["image"])
        if not self.with_domain:
            return image, sample["label"]
        if "domain" not in sample:
            raise ValueError(
                f"shard {sample['__url__']!r}, sample {sample['__key__']!r}: with_domain=True but the "
                "sample has no 'domain' entry"
            )
        return image, sample["label"], sample["domain"]


def _collate(samples: list[tuple]) -> tuple:
    """Stack images into [B, ...], labels into an int64 [B] tensor, keep domains as a list of str."""
    images = [s[0] for s in samples]
    if not isinstance(images[0], Tensor):
        raise TypeError(f"transform must return a torch.Tensor, got {type(images[0]).__name__}")
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    if len(samples[0]) == 3:
        return torch.stack(images), labels, [s[2] for s in samples]
    return torch.stack(images), labels


class _Repeat(IterableDataset):
    """Run the one-pass pipeline again and again; raise if a whole pass gives no usable sample."""

    def __init__(self, one_pass: wds.DataPipeline, shuffle: _SampleShuffle, seeds: _AugmentSeeds) -> None:
        super().__init__()
        self.one_pass, self.shuffle, self.seeds = one_pass, shuffle, seeds

    def __iter__(self) -> Iterator[tuple]:
        pass_index = 0
        while True:
            self.shuffle.pass_index = pass_index
            self.seeds.start_pass(pass_index)
            produced = 0
            for sample in self.one_pass:
                produced += 1
                yield sample
            if produced == 0:
                worker, num_workers = _worker()
                raise RuntimeError(
                    f"DataLoader worker {worker}/{num_workers}: a full pass over its shards gave no usable "
                    "sample (all shards unreadable or empty?); see the skipped-data warnings"
                )
            pass_index += 1


# --------------------------------------------------------------------------------------------
# Sizes and steps
# --------------------------------------------------------------------------------------------


def epoch_steps(num_samples: int, batch_size: int, world_size: int, workers: int) -> tuple[int, int]:
    """(steps per epoch per rank, batches per DataLoader worker), as open_clip computes them.

    global batch = batch_size × world_size; steps = ceil(num_samples / global batch), rounded up
    to a multiple of the worker count (``workers=0`` counts as one reader) so every worker
    contributes the same number of batches.
    """
    readers = max(1, workers)
    num_batches = math.ceil(num_samples / (batch_size * world_size))
    per_worker = math.ceil(num_batches / readers)
    return per_worker * readers, per_worker


def _basename(url: str) -> str:
    return local_path(url).name if is_local(url) else PurePosixPath(url.split("://", 1)[-1]).name


def _lengths_from_metadata(first_url: str) -> tuple[dict[str, int], str] | None:
    """Shard basename → sample count from sizes.json, else _info.json, beside ``first_url``."""
    sizes_url = sibling_url(first_url, "sizes.json")
    sizes = read_json(sizes_url, missing_ok=True)
    if sizes is not None:
        return {str(k): int(v) for k, v in sizes.items()}, sizes_url
    info_url = sibling_url(first_url, "_info.json")
    info = read_json(info_url, missing_ok=True)
    if info is not None:
        lengths: dict[str, int] = {}
        for split in info.get("splits", {}).values():
            lengths.update(zip(split.get("filenames", ()), (int(n) for n in split.get("shard_lengths", ()))))
        return lengths, info_url
    return None


def dataset_size(urls: Sequence[str]) -> int | None:
    """Total samples in ``urls`` from the ``sizes.json`` / ``_info.json`` beside them, or None.

    Shards from several directories (``a/x-{0..3}.tar::b/y-{0..1}.tar``) are looked up in their
    own directory. A shard missing from a metadata file that exists is an error, not a guess.
    """
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        if not metadata_readable(url):
            return None  # pipe:, or https:// without fsspec's HTTP backend: no directory to look in
        by_dir.setdefault(sibling_url(url, ""), []).append(url)
    total = 0
    for group in by_dir.values():
        found = _lengths_from_metadata(group[0])
        if found is None:
            return None
        lengths, source = found
        for url in group:
            name = _basename(url)
            if name not in lengths:
                raise ValueError(f"shard {url!r} is not listed in {source}; rewrite the metadata or pass num_samples")
            total += lengths[name]
    return total


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


@dataclass
class TrainLoader:
    """The training DataLoader and its epoch bookkeeping.

    Iterate it like the DataLoader (``for images, labels in train: ...``); ``len()`` is
    :attr:`steps_per_epoch`. Call :meth:`set_epoch` before each epoch.
    """

    loader: DataLoader
    urls: list[str]
    #: Optimizer steps (batches) per epoch on this rank; the same on every rank.
    steps_per_epoch: int
    #: Samples in the dataset (from num_samples or the metadata).
    num_samples: int
    #: Samples drawn per epoch over all ranks: steps_per_epoch × batch_size × world_size.
    samples_per_epoch: int
    shared_epoch: SharedEpoch
    skip_counter: SkipCounter

    def set_epoch(self, epoch: int) -> None:
        """Select the shard permutation (and shuffle seeds) of ``epoch`` for the next iteration."""
        self.shared_epoch.set_value(epoch)

    @property
    def epoch(self) -> int:
        return self.shared_epoch.get_value()

    @property
    def num_skipped(self) -> int:
        """Bad shards and samples skipped so far, over all workers of this rank."""
        return self.skip_counter.value

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.loader)

    def __len__(self) -> int:
        return self.steps_per_epoch


@dataclass
class EvalLoader:
    """The evaluation DataLoader: every sample once, in shard order per worker, last batch partial."""

    loader: DataLoader
    urls: list[str]
    #: Samples in the dataset per the metadata, or None when there is none (progress bars only).
    num_samples: int | None
    skip_counter: SkipCounter

    @property
    def num_skipped(self) -> int:
        return self.skip_counter.value

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.loader)


def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _prepare_urls(urls: str | Sequence[str], allow_pipe: bool) -> list[str]:
    """Expand, apply the URL policy, and fail early on missing local shards."""
    expanded = expand_urls(urls)
    for url in expanded:
        check_url(url, allow_pipe=allow_pipe)
    missing = [u for u in expanded if is_local(u) and not local_path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} shard file(s) not found: {missing[:3]}{more}")
    register_fsspec_handlers()
    return expanded


def _check_common(batch_size: int, transform: Any, num_classes: int, workers: int) -> None:
    _check_positive("batch_size", batch_size)
    _check_positive("num_classes", num_classes)
    _check_positive("workers", workers, minimum=0)
    if not callable(transform):
        raise TypeError(f"transform must be callable, got {type(transform).__name__}")


def _decode_stages(
    handler: SkipCounter, image_keys: Sequence[str], num_classes: int, transform: Callable, with_domain: bool,
    seeds: _AugmentSeeds | None = None,
) -> list:
    return [
        wds.map(_DecodeSample(image_keys), handler=handler),
        wds.map(_CheckLabel(num_classes)),
        wds.map(_ToTuple(transform, with_domain, seeds)),
    ]


def make_train_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    transform: Callable[[Any], Tensor],
    num_classes: int,
    num_samples: int | None = None,
    workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    resampled: bool = False,
    shuffle_buffer: int = 1000,
    allow_pipe: bool = False,
    with_domain: bool = False,
    image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    strict_data: bool = False,
) -> TrainLoader:
    """Build the training stream for one rank (see the module docstring for the stage order).

    Args:
        urls: shard spec for :func:`~clipood_plugin.data.urls.expand_urls` (brace pattern, ``::``
            list, directory, fsspec URL) or a list of URLs.
        batch_size: per-rank batch size.
        transform: PIL RGB image → tensor (open_clip preprocess, timm transform, …).
        num_classes: labels must lie in ``[0, num_classes)``.
        num_samples: samples per epoch (``--train-num-samples``); default: from ``sizes.json`` or
            ``_info.json`` beside the shards.
        workers: DataLoader worker processes (0: load in the main process). Workers persist
            across epochs and see :meth:`TrainLoader.set_epoch` through shared memory.
        world_size, rank: the distributed layout, passed explicitly.
        seed: seeds the shard permutation, the sample shuffle and each sample's augmentation,
            together with the epoch (the transform's torch and Python RNG draws are a function
            of (seed, epoch, rank, worker, sample position), whatever the worker's history).
        resampled: draw shards with replacement (no node split; required when there are fewer
            shards than ``max(1, workers) × world_size``).
        shuffle_buffer: sample shuffle buffer size per worker (1: no sample shuffle).
        allow_pipe: permit ``pipe:`` URLs, which run shell commands.
        with_domain: yield ``(image, label, domain)`` (DomainBed shards) instead of ``(image, label)``.
        image_keys: tar entries tried for the image, in order.
        pin_memory: passed to the DataLoader.
        multiprocessing_context: start method of the workers (``"fork"``, ``"spawn"``,
            ``"forkserver"``; default: Python's). The shared epoch and skip counter are created in
            the same context, which multiprocessing requires.
        strict_data: raise on the first bad shard or sample instead of skipping and counting it.

    Raises:
        ValueError: too few shards for the readers (without ``resampled``), no way to know the
            sample count, a ``pipe:`` URL without ``allow_pipe``, an unknown scheme, bad arguments.
        FileNotFoundError: a local shard is missing.
        ImportError: the fsspec backend for the URLs' scheme is not installed.
        ShardStoreError: (here or while iterating) the shards' store cannot be reached.
    """
    _check_common(batch_size, transform, num_classes, workers)
    _check_positive("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    _check_positive("shuffle_buffer", shuffle_buffer)
    shard_urls = _prepare_urls(urls, allow_pipe)
    readers = max(1, workers) * world_size
    if not resampled and len(shard_urls) < readers:
        raise ValueError(
            f"{len(shard_urls)} shard(s) cannot feed {max(1, workers)} worker(s) × {world_size} rank(s) = "
            f"{readers} readers: some would get no data (and DDP would hang). Write more, smaller shards "
            "(clipood-make-shards --max-samples), use fewer workers, or pass resampled=True"
        )
    if num_samples is None:
        num_samples = dataset_size(shard_urls)
        if num_samples is None:
            raise ValueError(
                f"cannot tell how many samples {shard_urls[0]!r}… hold: no sizes.json or _info.json beside "
                "the shards. Pass num_samples (--train-num-samples)"
            )
    _check_positive("num_samples", num_samples)
    steps, per_worker = epoch_steps(num_samples, batch_size, world_size, workers)

    context = multiprocessing.get_context(multiprocessing_context)
    epoch = SharedEpoch(0, context)
    skips = SkipCounter(context, strict=strict_data)
    shuffle = _SampleShuffle(shuffle_buffer, seed=seed, epoch=epoch, rank=rank)
    seeds = _AugmentSeeds(seed, epoch, rank)
    if resampled:
        source: list = [_ResampledShardList(shard_urls, seed=seed, epoch=epoch, rank=rank)]
    else:
        source = [
            _ShardList(shard_urls, seed=seed, epoch=epoch, shuffle=True),
            _NodeSplit(rank, world_size),
            _split_by_worker,
        ]
    one_pass = wds.DataPipeline(
        *source,
        _register_openers,
        wds.tarfile_to_samples(handler=skips),
        shuffle,
        *_decode_stages(skips, image_keys, num_classes, transform, with_domain, seeds),
    )
    pipeline = wds.DataPipeline(
        _Repeat(one_pass, shuffle, seeds),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
        wds.slice(per_worker),
    )
    loader = DataLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        multiprocessing_context=context if workers > 0 else None,
        worker_init_fn=shield_worker_from_preemption,  # preemption is the main process's to handle
    )
    return TrainLoader(
        loader=loader,
        urls=shard_urls,
        steps_per_epoch=steps,
        num_samples=num_samples,
        samples_per_epoch=steps * batch_size * world_size,
        shared_epoch=epoch,
        skip_counter=skips,
    )


def make_eval_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    transform: Callable[[Any], Tensor],
    num_classes: int,
    workers: int = 0,
    allow_pipe: bool = False,
    with_domain: bool = False,
    image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    strict_data: bool = False,
) -> EvalLoader:
    """Build an evaluation stream: every sample exactly once, no shuffle, no node split.

    Run it on one rank (open_clip evaluates on the primary rank): uneven per-rank evaluation
    batches deadlock collectives. Workers split the shards; a worker left without shards simply
    yields nothing, and each worker's last batch may be partial. The keyword arguments mean
    what they mean for :func:`make_train_loader`.
    """
    _check_common(batch_size, transform, num_classes, workers)
    shard_urls = _prepare_urls(urls, allow_pipe)
    try:
        num_samples = dataset_size(shard_urls)
    except ValueError:
        num_samples = None
    context = multiprocessing.get_context(multiprocessing_context)
    epoch = SharedEpoch(0, context)
    skips = SkipCounter(context, strict=strict_data)
    pipeline = wds.DataPipeline(
        _ShardList(shard_urls, seed=0, epoch=epoch, shuffle=False),
        _split_by_worker,
        _register_openers,
        wds.tarfile_to_samples(handler=skips),
        *_decode_stages(skips, image_keys, num_classes, transform, with_domain),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    loader = DataLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=pin_memory,
        multiprocessing_context=context if workers > 0 else None,
        worker_init_fn=shield_worker_from_preemption,  # preemption is the main process's to handle
    )
    return EvalLoader(loader=loader, urls=shard_urls, num_samples=num_samples, skip_counter=skips)
