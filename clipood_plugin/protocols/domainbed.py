"""DomainBed leave-one-domain-out, as CLIPood's official code runs it (docs/official_code.md §4.3, §4.4.1).

Rules, each mirrored exactly so a split made here equals the official one image for image:

- **Environments** are the sorted sub-folder names of the dataset root, so ``target=i`` follows
  that order (PACS: art_painting, cartoon, photo, sketch). Hidden folders are skipped.
- **Records** follow torchvision's ``ImageFolder``: classes are the sorted sub-folders of a
  domain, files are found by a sorted recursive walk of each class folder (sorted names within a
  folder), kept when their lower-cased extension is an image extension. The holdout indexes this
  order, so it has to be the same.
- **Holdout**: DomainBed's ``split_dataset(env, int(len(env) * 0.2), seed_hash(trial_seed, env_i))``
  — shuffle ``list(range(n))`` with ``numpy.random.RandomState(seed)``; the first ``n_out`` keys
  are "out", the rest "in". CLIPood fixes ``trial_seed = 0``.
- **Splits**: train = "in" of every source, val = "out" of every source, test = the target's
  20 % "out" holdout. That is the official code (``converter_domainbed.py``) and the split §9
  says a reproduction must use; DomainBed's own standard reports the target's "in" split
  instead (``model_selection.py``). ``test_split="in"`` gives DomainBed's, ``"all"`` the whole
  target domain.
- **Batches**: one with-replacement sampler per source domain, ``batch_per_domain`` each,
  concatenated per step (12 × 3 = 36 for PACS, 12 × 5 = 60 for DomainNet; §4.3, §9.7).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from clipood_plugin.classnames import check_classnames
from clipood_plugin.protocols.records import ImageRecord, Split

__all__ = [
    "DEFAULT_HOLDOUT_FRACTION",
    "IMG_EXTENSIONS",
    "DomainBedTree",
    "domain_batch",
    "holdout_split",
    "leave_one_domain_out",
    "list_domainbed",
    "list_image_folder",
    "per_domain_batches",
    "resolve_targets",
    "seed_hash",
    "split_indices",
]

#: The holdout fraction of every environment (official ``holdout=0.2``; DomainBed's default).
DEFAULT_HOLDOUT_FRACTION = 0.2
#: torchvision's ``IMG_EXTENSIONS`` (matched on the lower-cased file name, as ImageFolder does).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

TestSplit = Literal["out", "in", "all"]


class DomainBedTree(NamedTuple):
    """What :func:`list_domainbed` found: unpacks as ``domains, classnames, records``."""

    domains: list[str]
    classnames: list[str]
    records: dict[str, list[ImageRecord]]


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def list_image_folder(
    folder: str | os.PathLike[str], domain: str | None = None
) -> tuple[list[str], list[ImageRecord]]:
    """List ``folder/<class>/**/<image>`` in torchvision ``ImageFolder`` order.

    Returns the sorted class names and one record per image, labelled by sorted class position.
    Raises ``ValueError`` if there is no class folder or a class folder holds no image (as
    ImageFolder does), so a typo in a path never yields a silently empty split.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"not a directory: {str(root)!r}")
    classes = _subdirs(root)
    if not classes:
        raise ValueError(f"no class folders under {str(root)!r}")
    records: list[ImageRecord] = []
    empty: list[str] = []
    for label, cls in enumerate(classes):
        n_before = len(records)
        # sorted(os.walk(...)) sorts the (dirpath, dirnames, filenames) tuples by dirpath, as ImageFolder.
        for dirpath, _, fnames in sorted(os.walk(root / cls, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    records.append(ImageRecord(os.path.join(dirpath, fname), label, domain))
        if len(records) == n_before:
            empty.append(cls)
    if empty:
        raise ValueError(
            f"no image files ({', '.join(IMG_EXTENSIONS)}) for classes {empty} under {str(root)!r}"
        )
    return classes, records


def list_domainbed(root: str | os.PathLike[str]) -> DomainBedTree:
    """List a DomainBed-style tree ``root/<domain>/<class>/<image>``.

    Domains are the sorted sub-folders (DomainBed ``MultipleEnvironmentImageFolder``); each is
    read as an ImageFolder. Every domain must have the same class folders: DomainBed takes the
    names from the first domain and would silently shift labels otherwise.
    """
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"DomainBed root is not a directory: {str(base)!r}")
    domains = _subdirs(base)
    if not domains:
        raise ValueError(f"no domain folders under {str(base)!r}")
    classnames: list[str] | None = None
    records: dict[str, list[ImageRecord]] = {}
    for domain in domains:
        classes, recs = list_image_folder(base / domain, domain)
        if classnames is None:
            classnames = classes
        elif classes != classnames:
            only_here = sorted(set(classes) - set(classnames))
            only_first = sorted(set(classnames) - set(classes))
            raise ValueError(
                f"domain {domain!r} has different classes from {domains[0]!r}: "
                f"extra {only_here[:5]}, missing {only_first[:5]}"
            )
        records[domain] = recs
    assert classnames is not None
    return DomainBedTree(domains, classnames, records)


def seed_hash(*args: object) -> int:
    """DomainBed's ``seed_hash``: ``int(md5(str(args)).hexdigest(), 16) % 2**31``.

    The hash is of ``str`` of the argument *tuple*, so ``seed_hash(0, 1)`` hashes ``"(0, 1)"`` and
    ``seed_hash(0, 1, "base")`` hashes ``"(0, 1, 'base')"``; types matter (``1`` ≠ ``"1"``).
    """
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def split_indices(n: int, n_out: int, seed: int) -> tuple[list[int], list[int]]:
    """DomainBed's ``split_dataset`` on indices: returns ``(out_keys, in_keys)``.

    ``keys = list(range(n))`` is shuffled in place by ``numpy.random.RandomState(seed)``; the
    first ``n_out`` keys are "out", the rest "in" (DomainBed ``misc.split_dataset``).
    """
    if n < 0 or not 0 <= n_out <= n:
        raise ValueError(f"split_indices needs 0 <= n_out <= n, got n={n}, n_out={n_out}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    return keys[:n_out], keys[n_out:]


def holdout_split(
    records: Sequence[ImageRecord], fraction: float = DEFAULT_HOLDOUT_FRACTION, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split one environment into ``(in, out)`` with ``int(len(records) * fraction)`` "out" records.

    Note the order: DomainBed's ``split_dataset`` returns ``(out, in)``; this returns "in" (the
    80 % used for training) first. Records keep the shuffled order, as DomainBed's subset does.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1], got {fraction}")
    n_out = int(len(records) * fraction)
    out_keys, in_keys = split_indices(len(records), n_out, seed)
    return [records[k] for k in in_keys], [records[k] for k in out_keys]


def resolve_targets(domains: Sequence[str], target: int | str | Sequence[int | str]) -> list[int]:
    """Target domain(s) as indices into the sorted ``domains``; accepts indices or names."""
    items = [target] if isinstance(target, int | str) else list(target)
    if not items:
        raise ValueError("at least one target domain is needed")
    out: list[int] = []
    for t in items:
        if isinstance(t, bool) or not isinstance(t, int | str):
            raise TypeError(f"target must be a domain index or name, got {t!r}")
        if isinstance(t, str):
            if t not in domains:
                raise ValueError(f"unknown target domain {t!r}; domains are {list(domains)}")
            idx = domains.index(t)
        else:
            if not 0 <= t < len(domains):
                raise ValueError(f"target index {t} out of range for {len(domains)} domains {list(domains)}")
            idx = t
        if idx not in out:
            out.append(idx)
    if len(out) == len(domains):
        raise ValueError(f"every domain is a target ({list(domains)}); nothing is left to train on")
    return sorted(out)


def _sorted_environments(
    records_per_domain: Mapping[str, Sequence[ImageRecord]], num_classes: int, what: str
) -> tuple[list[str], dict[str, list[ImageRecord]]]:
    """Domains in sorted order (the environment index DomainBed uses), records stamped with their domain."""
    if not records_per_domain:
        raise ValueError(f"{what}: no domains given")
    domains = sorted(records_per_domain)
    envs: dict[str, list[ImageRecord]] = {}
    for d in domains:
        recs: list[ImageRecord] = []
        for rec in records_per_domain[d]:
            if rec.domain is None:
                rec = replace(rec, domain=d)
            elif rec.domain != d:
                raise ValueError(
                    f"{what}: record {rec.path!r} says domain {rec.domain!r} but is listed under {d!r}"
                )
            if rec.label >= num_classes:
                raise ValueError(
                    f"{what}: label {rec.label} of {rec.path!r} is out of range for {num_classes} classes"
                )
            recs.append(rec)
        envs[d] = recs
    return domains, envs


def leave_one_domain_out(
    records_per_domain: Mapping[str, Sequence[ImageRecord]],
    target: int | str | Sequence[int | str],
    *,
    classnames: Sequence[str],
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    trial_seed: int = 0,
    test_split: TestSplit = "out",
    allow_duplicates: bool = False,
) -> Split:
    """Leave-one-domain-out split (docs/official_code.md §4.4.1).

    Args:
        records_per_domain: domain name → records (e.g. ``list_domainbed(root).records``). The
            environment index is the domain's position in *sorted* order, whatever the mapping order.
        target: the held-out domain, by sorted index (the official ``--targets i``) or name; a
            sequence holds out several.
        classnames: the K class names (index = label); every part is classified among all K.
        allow_duplicates: accept names that repeat after cleaning (ImageNet's standard list);
            the rule of :mod:`clipood_plugin.classnames`, as for ``TextHead`` and ``write_shards``.
        holdout_fraction: "out" share of every environment (0.2).
        trial_seed: DomainBed's trial seed; environment ``i`` is split with ``seed_hash(trial_seed, i)``.
            CLIPood fixes it at 0.
        test_split: which part of the target is the test set. ``"out"`` (default): the 20 %
            holdout, as the official code and §9; ``"in"``: the 80 %, DomainBed's standard
            (``model_selection.py``); ``"all"``: the whole domain ("in" then "out").

    Returns:
        A :class:`Split` with parts ``train`` (sources' "in"), ``val`` (sources' "out") and
        ``test``; sources are concatenated in sorted domain order (see :meth:`Split.domain_sizes`).
    """
    if test_split not in ("out", "in", "all"):
        raise ValueError(f"test_split must be 'out', 'in' or 'all', got {test_split!r}")
    names = check_classnames(classnames, allow_duplicates=allow_duplicates, what="leave_one_domain_out")
    domains, envs = _sorted_environments(records_per_domain, len(names), "leave_one_domain_out")
    targets = resolve_targets(domains, target)
    train: list[ImageRecord] = []
    val: list[ImageRecord] = []
    test: list[ImageRecord] = []
    seeds: dict[str, int] = {}
    for env_i, d in enumerate(domains):
        seeds[d] = seed_hash(trial_seed, env_i)
        in_, out = holdout_split(envs[d], holdout_fraction, seeds[d])
        if env_i in targets:
            test += {"out": out, "in": in_, "all": in_ + out}[test_split]
        else:
            train += in_
            val += out
    return Split(
        parts={"train": train, "val": val, "test": test},
        classnames={"train": names, "val": names, "test": names},
        info={
            "protocol": "domainbed",
            "domains": domains,
            "targets": [domains[t] for t in targets],
            "sources": [d for i, d in enumerate(domains) if i not in targets],
            "test_split": test_split,
            "holdout_fraction": holdout_fraction,
            "holdout_seeds": seeds,
        },
    )


def _sizes_list(domain_sizes: Mapping[str, int] | Sequence[int]) -> list[int]:
    sizes = list(domain_sizes.values()) if isinstance(domain_sizes, Mapping) else list(domain_sizes)
    if not sizes:
        raise ValueError("per_domain_batches: no source domains")
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
            raise ValueError(
                f"per_domain_batches: source domain {i} has size {n!r}; every source needs >= 1 record"
            )
    return [int(n) for n in sizes]


def domain_batch(
    domain_sizes: Mapping[str, int] | Sequence[int], batch_per_domain: int, step: int, *, seed: int = 0
) -> list[int]:
    """The indices of one balanced step: ``batch_per_domain`` draws per source, concatenated.

    Indices point into the concatenation of the sources in the given order (``split["train"]``
    when ``domain_sizes = split.domain_sizes("train")``). Each step's draws come from their own
    generator seeded by ``(seed, step)``, so step ``k`` is the same whether reached by iterating
    or by resuming at ``start_step=k``.
    """
    sizes = _sizes_list(domain_sizes)
    if batch_per_domain < 1:
        raise ValueError(f"batch_per_domain must be >= 1, got {batch_per_domain}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    rng = np.random.default_rng([seed, step])
    out: list[int] = []
    offset = 0
    for n in sizes:
        out += (offset + rng.integers(0, n, size=batch_per_domain)).tolist()
        offset += n
    return out


def per_domain_batches(
    domain_sizes: Mapping[str, int] | Sequence[int],
    batch_per_domain: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    steps: int | None = None,
) -> Iterator[list[int]]:
    """Balanced per-domain batches, forever (or for ``steps`` steps): see :func:`domain_batch`.

    This is the official ``InfiniteDataLoader`` behaviour (one ``RandomSampler(replacement=True)``
    with ``BatchSampler(batch, drop_last=True)`` per source, one batch of each concatenated per
    step; docs/official_code.md §4.3, §9.7): uniform draws with replacement, so a small domain is seen
    as often as a large one. The random stream is numpy's, not torch's, so it matches the
    official sampler in distribution, not draw for draw (the official one is not seeded for
    that either). Usable as a DataLoader ``batch_sampler`` over the concatenated sources.
    """
    sizes = _sizes_list(domain_sizes)
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0 or None, got {steps}")
    domain_batch(sizes, batch_per_domain, start_step, seed=seed)  # validate now, not at the first next()
    return _batches(sizes, batch_per_domain, seed, start_step, steps)


def _batches(
    sizes: list[int], batch_per_domain: int, seed: int, start_step: int, steps: int | None
) -> Iterator[list[int]]:
    step = start_step
    while steps is None or step < start_step + steps:
        yield domain_batch(sizes, batch_per_domain, step, seed=seed)
        step += 1
