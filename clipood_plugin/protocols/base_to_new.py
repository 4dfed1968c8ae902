"""Open class, base-to-new: the CoOp/CoCoOp protocol CLIPood runs (docs/official_code.md §4.4.2).

Rules (CoOp ``datasets/*.py`` with dassl's ``DatasetBase``, as called by the official
``converter_dassl.py`` with ``NUM_SHOTS=16``, ``SEED=0``):

1. **Few-shot first, over all classes.** Train records are grouped by label in order of first
   appearance; a class with at least ``shots`` records gets ``rng.sample(items, shots)``, a smaller
   one keeps all of its records (dassl ``generate_fewshot_dataset`` with ``repeat=False``). The
   val set is then drawn *from the same random stream* with ``min(shots, 4)`` shots.
   ``rng`` is ``random.Random(seed)``, the same generator and calls as CoOp's ``random.seed(seed)``
   followed by ``random.sample``.
2. **Then split classes.** The labels present in the few-shot train set are sorted; the first
   ⌈K/2⌉ are base, the rest new (65 → 33 base / 32 new), and each half is relabelled from 0
   (CoOp ``subsample_classes``).
3. **Evaluate each half on its own.** The base test set is classified among the base names only,
   the new test set among the new names only, and H = 2·B·N / (B + N) (not computed by the
   official code; CoCoOp's definition).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

from clipood_plugin.classnames import check_classnames
from clipood_plugin.protocols.records import ImageRecord, Split

__all__ = [
    "DEFAULT_SHOTS",
    "DEFAULT_VAL_SHOTS_CAP",
    "base_new_labels",
    "base_to_new_split",
    "few_shot",
    "harmonic_mean",
    "subsample_classes",
]

#: Shots per class (official ``--n_shot`` default for open class, CoOp ``NUM_SHOTS=16``).
DEFAULT_SHOTS = 16
#: CoOp draws its few-shot val set with ``min(shots, 4)`` shots per class.
DEFAULT_VAL_SHOTS_CAP = 4


def few_shot(
    records: Sequence[ImageRecord], shots: int | None = DEFAULT_SHOTS, seed: int | random.Random = 0
) -> list[ImageRecord]:
    """Sample ``min(shots, n_c)`` records of every class ``c``, as dassl's ``generate_fewshot_dataset``.

    Classes are visited in order of first appearance in ``records``; each draw is
    ``rng.sample(class_records, shots)``. ``seed`` is an int (a fresh ``random.Random(seed)``) or a
    ``random.Random`` to continue a stream, as CoOp draws train then val from one global state.
    ``shots=None`` keeps everything (CoOp's ``NUM_SHOTS < 1``).
    """
    if shots is None:
        return list(records)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int or None, got {shots!r}")
    rng = seed if isinstance(seed, random.Random) else random.Random(_check_seed(seed))
    by_label: dict[int, list[ImageRecord]] = {}
    for rec in records:
        by_label.setdefault(rec.label, []).append(rec)
    out: list[ImageRecord] = []
    for items in by_label.values():
        out += rng.sample(items, shots) if len(items) >= shots else items
    return out


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a random.Random, got {seed!r}")
    return seed


def base_new_labels(labels: Iterable[int]) -> tuple[list[int], list[int]]:
    """Sorted distinct labels split into the first ⌈K/2⌉ (base) and the rest (new)."""
    uniq = sorted(set(labels))
    if len(uniq) < 2:
        raise ValueError(f"base-to-new needs at least 2 classes, got {len(uniq)}")
    m = math.ceil(len(uniq) / 2)
    return uniq[:m], uniq[m:]


def subsample_classes(records: Iterable[ImageRecord], selected: Sequence[int]) -> list[ImageRecord]:
    """Keep the records whose label is in ``selected``, relabelled to its position there."""
    relabel = {y: i for i, y in enumerate(selected)}
    return [ImageRecord(r.path, relabel[r.label], r.domain) for r in records if r.label in relabel]


def base_to_new_split(
    train: Sequence[ImageRecord],
    test: Sequence[ImageRecord],
    *,
    classnames: Sequence[str],
    val: Sequence[ImageRecord] | None = None,
    shots: int | None = DEFAULT_SHOTS,
    seed: int = 0,
    val_shots: int | None = None,
    allow_duplicates: bool = False,
) -> Split:
    """The base-to-new split of one dataset (CoOp protocol; docs/official_code.md §4.4.2).

    Args:
        train, test: the dataset's own train and test records, labelled by ``classnames`` index.
        classnames: all K class names (index = original label).
        allow_duplicates: accept names that repeat after cleaning (ImageNet's standard list);
            the rule of :mod:`clipood_plugin.classnames`, as for ``TextHead`` and ``write_shards``.
        val: CoOp's val records, or ``None`` (CoOp's ImageNet has none; it validates on test).
        shots: shots per class for train (16); ``None`` keeps the full train set.
        seed: the few-shot seed (official ``cfg.SEED = 0``).
        val_shots: shots per class for val; default ``min(shots, 4)`` as CoOp.

    Returns:
        A :class:`Split` with ``train`` (few-shot, base classes), ``val`` (if given),
        ``test_base`` (classified among base names) and ``test_new`` (among new names), each half
        relabelled from 0. ``info`` holds the original labels of each half.
    """
    names = check_classnames(classnames, allow_duplicates=allow_duplicates, what="base_to_new_split")
    for part, recs in (("train", train), ("test", test), ("val", val or [])):
        for r in recs:
            if r.label >= len(names):
                raise ValueError(
                    f"base_to_new_split: {part} label {r.label} of {r.path!r} >= {len(names)} classes"
                )
    rng = random.Random(_check_seed(seed))
    train_fs = few_shot(train, shots, rng)
    if val is not None:
        if val_shots is None and shots is not None:
            val_shots = min(shots, DEFAULT_VAL_SHOTS_CAP)
        val_fs = few_shot(val, val_shots, rng)
    # CoOp takes the label set from the (few-shot) train set, dataset[0] of subsample_classes.
    base, new = base_new_labels(r.label for r in train_fs)
    base_names = [names[y] for y in base]
    new_names = [names[y] for y in new]
    parts = {"train": subsample_classes(train_fs, base)}
    cls = {"train": base_names}
    if val is not None:
        parts["val"] = subsample_classes(val_fs, base)
        cls["val"] = base_names
    parts["test_base"] = subsample_classes(test, base)
    parts["test_new"] = subsample_classes(test, new)
    cls["test_base"] = base_names
    cls["test_new"] = new_names
    return Split(
        parts=parts,
        classnames=cls,
        info={
            "protocol": "base_to_new",
            "base_labels": base,
            "new_labels": new,
            "shots": shots,
            "seed": seed,
        },
    )


def harmonic_mean(base: float, new: float) -> float:
    """H = 2·B·N / (B + N), the base-to-new summary (CoCoOp); 0 when both are 0."""
    if base < 0 or new < 0 or math.isnan(base) or math.isnan(new):
        raise ValueError(f"accuracies must be >= 0, got base={base}, new={new}")
    if base + new == 0:
        return 0.0
    return 2.0 * base * new / (base + new)
