"""ImageNet 16-shot → ImageNet-V2, -Sketch, -A, -R (CoCoOp protocol; docs/official_code.md §4.4.4, §9.9).

The official repo has no script for this table; its numbers match CoCoOp's protocol, and the
dataset code CLIPood imports is CoOp's (``datasets/imagenet*.py``). Rules:

- **Class order** is the ImageNet wnid order of CoOp's ``classnames.txt`` (lines ``<wnid> <name>``),
  which is also the sorted wnid-folder order CoOp labels ImageNet and ImageNet-Sketch by. Here a
  folder's label is its wnid's position in the given wnid list, so the two can never disagree.
- **Train**: 16 shots per class over all 1000 classes, drawn by
  :func:`~clipood_plugin.protocols.base_to_new.few_shot` with ``random.Random(seed)``; test on the
  ImageNet val set (CoOp's ``test``), 1000-way.
- **V2** folders are named ``0`` … ``999`` = the class index; **Sketch** folders are wnids. Both are
  classified 1000-way.
- **A and R** hold 200 classes each. CoOp enumerates only the wnid folders present, sorted,
  relabels them 0 … 199 and names them from ``classnames.txt``: they are classified **200-way**,
  among those names only. :func:`subset_classes` gives the 200 indices into the 1000 classes, so
  a 1000-class text head is subset with ``weight[indices]`` rather than re-encoded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from clipood_plugin.classnames import check_classnames
from clipood_plugin.protocols.base_to_new import DEFAULT_SHOTS, few_shot
from clipood_plugin.protocols.records import ImageRecord, Split

__all__ = [
    "ClassSubset",
    "imagenet_records",
    "imagenet_split",
    "imagenet_v2_records",
    "list_class_dirs",
    "parse_classnames",
    "subset_classes",
    "subset_records",
]


class ClassSubset(NamedTuple):
    """Classes of a subset variant (ImageNet-A/R) in their evaluation order (label = position).

    ``indices[i]`` is the position of ``wnids[i]`` among the full class list, for subsetting a
    1000-class head: ``head.weight[list(subset.indices)]``.
    """

    wnids: list[str]
    names: list[str]
    indices: list[int]


def parse_classnames(text: str) -> tuple[list[str], list[str]]:
    """Parse CoOp's ``classnames.txt`` (``<wnid> <class name with spaces>`` per line) into (wnids, names).

    Pure text parsing; the caller reads the file. Blank lines are skipped; a line without a name,
    or a repeated wnid, is an error naming the line.
    """
    wnids: list[str] = []
    names: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        name = name.strip()
        if not name:
            raise ValueError(f"classnames line {lineno} has no class name: {raw!r}")
        if wnid in wnids:
            raise ValueError(f"classnames line {lineno} repeats wnid {wnid!r}")
        wnids.append(wnid)
        names.append(name)
    return wnids, names


def list_class_dirs(root: str | os.PathLike[str]) -> list[str]:
    """Sorted, non-hidden sub-folder names of ``root`` (files such as ImageNet-R's README.txt are skipped)."""
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"not a directory: {str(base)!r}")
    return sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))


def _files(folder: Path) -> list[str]:
    # CoOp lists every non-hidden file of a class folder (dassl listdir_nohidden), without an
    # extension filter; sorted here so the record order does not depend on the filesystem.
    return sorted(
        str(folder / e.name) for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
    )


def subset_classes(present: Iterable[str], wnids: Sequence[str], names: Sequence[str]) -> ClassSubset:
    """The classes of a subset variant from the wnid folder names it has (ImageNet-A/R).

    ``present`` is sorted (CoOp's order) and each entry looked up in the full ``wnids`` list, whose
    ``names`` give the class names. An unknown or repeated wnid is an error.
    """
    if len(wnids) != len(names):
        raise ValueError(f"{len(wnids)} wnids but {len(names)} class names")
    position = {w: i for i, w in enumerate(wnids)}
    if len(position) != len(wnids):
        raise ValueError("the full wnid list has duplicates")
    chosen = sorted(present)
    if not chosen:
        raise ValueError("a subset needs at least one class folder")
    if len(set(chosen)) != len(chosen):
        raise ValueError(
            f"repeated wnids in the subset: {sorted({w for w in chosen if chosen.count(w) > 1})}"
        )
    unknown = [w for w in chosen if w not in position]
    if unknown:
        raise ValueError(f"folders {unknown[:5]} are not wnids of the {len(wnids)}-class list")
    indices = [position[w] for w in chosen]
    return ClassSubset(chosen, [names[i] for i in indices], indices)


def imagenet_records(root: str | os.PathLike[str], wnids: Sequence[str]) -> list[ImageRecord]:
    """Records of ``root/<wnid>/<image>`` labelled by the wnid's position in ``wnids`` (ImageNet, Sketch)."""
    position = {w: i for i, w in enumerate(wnids)}
    records: list[ImageRecord] = []
    for folder in list_class_dirs(root):
        if folder not in position:
            raise ValueError(f"folder {folder!r} under {str(root)!r} is not one of the {len(wnids)} wnids")
        records += [ImageRecord(p, position[folder]) for p in _files(Path(root) / folder)]
    return records


def imagenet_v2_records(root: str | os.PathLike[str], num_classes: int = 1000) -> list[ImageRecord]:
    """Records of ImageNet-V2's ``root/<class index>/<image>`` layout, labelled by the folder number."""
    records: list[ImageRecord] = []
    for folder in list_class_dirs(root):
        if not folder.isdigit() or not 0 <= int(folder) < num_classes:
            raise ValueError(
                f"ImageNet-V2 folder {folder!r} under {str(root)!r} is not a class index < {num_classes}"
            )
        records += [ImageRecord(p, int(folder)) for p in _files(Path(root) / folder)]
    return records


def subset_records(
    root: str | os.PathLike[str], wnids: Sequence[str], names: Sequence[str]
) -> tuple[ClassSubset, list[ImageRecord]]:
    """A subset variant (ImageNet-A/R): its :class:`ClassSubset` and records labelled 0 … n-1."""
    subset = subset_classes(list_class_dirs(root), wnids, names)
    records: list[ImageRecord] = []
    for label, folder in enumerate(subset.wnids):
        records += [ImageRecord(p, label) for p in _files(Path(root) / folder)]
    return subset, records


def imagenet_split(
    train: Sequence[ImageRecord],
    test: Sequence[ImageRecord],
    *,
    classnames: Sequence[str],
    shots: int | None = DEFAULT_SHOTS,
    seed: int = 0,
    variants: Mapping[str, Sequence[ImageRecord]] | None = None,
    subset_variants: Mapping[str, tuple[ClassSubset, Sequence[ImageRecord]]] | None = None,
    allow_duplicates: bool = False,
) -> Split:
    """ImageNet few-shot training and its shifted test sets as one :class:`Split`.

    Args:
        train, test: ImageNet train and val records (label = class index).
        classnames: the full class names (1000 for ImageNet), index = label.
        allow_duplicates: accept names that repeat after cleaning (ImageNet's standard list);
            the rule of :mod:`clipood_plugin.classnames`, as for ``TextHead`` and ``write_shards``.
        shots: shots per class (16); ``None`` trains on everything.
        seed: the few-shot seed (0).
        variants: name → records classified among all classes (``"imagenet_v2"``, ``"imagenet_sketch"``).
        subset_variants: name → ``(ClassSubset, records)`` classified among the subset's names
            only (``"imagenet_a"``, ``"imagenet_r"``); ``info["class_index"][name]`` holds the
            subset's indices into ``classnames``.
    """
    names = check_classnames(classnames, allow_duplicates=allow_duplicates, what="imagenet_split")
    parts: dict[str, list[ImageRecord]] = {"train": few_shot(train, shots, seed), "test": list(test)}
    cls: dict[str, list[str]] = {"train": names, "test": names}
    class_index: dict[str, list[int]] = {}
    for name, recs in (variants or {}).items():
        if name in parts:
            raise ValueError(f"variant name {name!r} is already a part")
        parts[name], cls[name] = list(recs), names
    for name, (subset, recs) in (subset_variants or {}).items():
        if name in parts:
            raise ValueError(f"variant name {name!r} is already a part")
        if any(i >= len(names) for i in subset.indices) or [names[i] for i in subset.indices] != list(
            subset.names
        ):
            raise ValueError(f"subset {name!r} does not match the {len(names)} class names given")
        parts[name], cls[name] = list(recs), list(subset.names)
        class_index[name] = list(subset.indices)
    return Split(
        parts=parts,
        classnames=cls,
        info={"protocol": "imagenet", "shots": shots, "seed": seed, "class_index": class_index},
    )
