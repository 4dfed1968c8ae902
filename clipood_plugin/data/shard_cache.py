"""Shard sets written once and named by their content: protocol splits into WebDataset shards.

A protocol (:mod:`clipood_plugin.protocols`) splits a dataset into parts of
:class:`~clipood_plugin.protocols.ImageRecord` s. :class:`ShardCache` writes each part as a
directory of shards under ``<root>/<dataset>/``, named by a hash of exactly what it holds (file
paths, labels, domains, class list), so a second run, or another split that shares a part, reuses
it, and a changed tree gets new shards. A directory appears under its final name only when
complete (written beside it, then renamed), so an interrupted write is redone, never half-read.

Sample keys are the files' paths relative to the dataset folder (:func:`sample_key`), so a
sample names its file. Class-name lists for the recipe's ``--classnames`` and eval ``|NAMES``
are cached the same way (:meth:`ShardCache.names`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from clipood_plugin._io import atomic_path
from clipood_plugin.data.shard_sources import ShardRecord, Source
from clipood_plugin.data.shard_writer import write_shards
from clipood_plugin.protocols import ImageRecord

__all__ = ["ShardCache", "ShardSet", "safe_name", "sample_key"]

_LOG = logging.getLogger(__name__)

#: Bump when a change here would make the same records produce different shards.
_SHARD_FORMAT = 1


@dataclass(frozen=True)
class ShardSet:
    """A directory of shards (the recipe reads a directory as its sorted ``*.tar``) and its sample count."""

    urls: str
    num_samples: int


def sample_key(path: str, base: Path) -> str:
    """A shard key from the file's path relative to ``base`` (or to its parent, for folders beside
    the dataset such as ImageNet's variants): no extension, dots → ``_``, so a sample names its file."""
    pure = PurePath(path)
    for anchor in (base, base.parent):
        if pure.is_relative_to(anchor):
            rel = pure.relative_to(anchor)
            break
    else:
        rel = PurePath(*pure.parts[1:]) if pure.is_absolute() else pure
    parts = [*rel.parts[:-1], rel.stem]
    return "/".join(p.replace(".", "_") for p in parts if p not in ("", ".", ".."))


def safe_name(label: str) -> str:
    """``label`` as a file-name fragment: runs of anything but letters, digits, ``_ . -`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "part"


class ShardCache:
    """Shard sets and class-name files under ``<root>/<dataset>/``, each named by a hash of its content.

    ``base`` is the dataset folder that sample keys are taken relative to; ``workers`` processes
    decode images while shards are written; ``progress`` shows a progress bar per shard set.
    """

    def __init__(self, root: Path, dataset: str, base: Path, *, workers: int = 1, progress: bool = True) -> None:
        self.dir = Path(root) / dataset
        self.base = Path(base)
        self.workers = max(1, workers)
        self.progress = progress

    def names(self, names: Sequence[str]) -> Path:
        """A JSON class-name file (the recipe's ``--classnames`` / eval ``|NAMES``) holding ``names``."""
        text = json.dumps([str(n) for n in names], ensure_ascii=False)
        path = self.dir / f"names-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        if not path.is_file():
            with atomic_path(path) as tmp:
                tmp.write_text(text + "\n", encoding="utf-8")
        return path

    def shards(self, label: str, records: Sequence[ImageRecord], class_keys: Sequence[str]) -> ShardSet:
        """Write ``records`` as shards unless a set with exactly these records exists; return it.

        ``label`` names the set's directory (with the content hash); ``class_keys`` is the class
        list written beside the shards, which :func:`write_shards` requires to be unique.
        Unreadable images are skipped, counted and listed in the set's ``_complete.json``.
        """
        if not records:
            raise ValueError(f"{self.dir.name}: the split part {label!r} holds no images")
        payload = json.dumps([_SHARD_FORMAT, list(class_keys), [[r.path, r.label, r.domain] for r in records]])
        digest = hashlib.sha256(payload.encode()).hexdigest()
        final = self.dir / f"{safe_name(label)}-{digest[:16]}"
        marker = final / "_complete.json"
        if marker.is_file():
            return ShardSet(str(final), int(json.loads(marker.read_text())["num_samples"]))
        partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        keys: set[str] = set()
        recs = []
        for i, r in enumerate(records):
            key = sample_key(r.path, self.base)
            key = key if key not in keys else f"{key}~{i}"  # a.jpg beside a.png
            keys.add(key)
            recs.append(ShardRecord(r.path, r.label, key, r.domain))
        source = Source(list(class_keys), recs)
        info = write_shards(source.samples(self.workers), partial, classnames=list(class_keys), split="data",
                            prefix="shard", max_samples_per_shard=min(1000, max(1, math.ceil(len(recs) / 16))),
                            progress=self.progress, total=len(recs))
        with atomic_path(partial / "_complete.json") as tmp:
            tmp.write_text(json.dumps({"label": label, "num_samples": info.num_samples, "records_sha256": digest,
                                       "num_unreadable": source.num_unreadable,
                                       "unreadable": source.unreadable[:50]}, indent=2))
        if final.exists():  # left by an interrupted older layout: replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        if source.num_unreadable:
            _LOG.warning("%s: skipped %d unreadable images (listed in %s)", label, source.num_unreadable, marker)
        return ShardSet(str(final), info.num_samples)
