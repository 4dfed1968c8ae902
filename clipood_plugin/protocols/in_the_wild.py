"""In the wild: domain shift and open classes at once (OfficeHome, DomainNet; docs/official_code.md §4.4.3).

Rules (official ``converter_domainbed.get_domainbed_datasets(..., open_ratio=0.5)``):

- Classes in sorted-name order; the first ``int((1 - open_ratio) · K)`` = ⌊K/2⌋ are base
  (OfficeHome 65 → 32 base / 33 new, DomainNet 345 → 172 / 173). Note the floor, where
  base-to-new (:mod:`~clipood_plugin.protocols.base_to_new`) takes the ceiling.
- Every environment ``i`` (sorted domains) is cut into its base-class and new-class images
  (record order kept), and each part is split 80/20 by DomainBed's ``split_dataset`` with
  ``seed_hash(0, i, "base")`` and ``seed_hash(0, i, "open")``.
- Train on the sources' base "in"; validate on the sources' base "out" (among base names).
- Test on the *whole* target domain: ``test_base`` = its base images ("in" then "out"),
  ``test_new`` = its new images, ``test_all`` = both (the paper's "Total", presumably accuracy
  over all target images; the official code does not compute it). All three are classified among
  all K names, and labels keep their original indices.

The official entry point passes an unknown ``seed=`` keyword and raises a TypeError at HEAD
(§4.4.3, §9.10); the split is fixed by ``seed_hash(0, …)`` anyway, which is what this follows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from clipood_plugin.classnames import check_classnames
from clipood_plugin.protocols.domainbed import (
    DEFAULT_HOLDOUT_FRACTION,
    _sorted_environments,
    holdout_split,
    resolve_targets,
    seed_hash,
)
from clipood_plugin.protocols.records import ImageRecord, Split

__all__ = ["DEFAULT_OPEN_RATIO", "in_the_wild_split", "num_base_classes"]

#: Share of classes that are new (official ``open_ratio=0.5`` in ``engine.py``).
DEFAULT_OPEN_RATIO = 0.5


def num_base_classes(num_classes: int, open_ratio: float = DEFAULT_OPEN_RATIO) -> int:
    """``int((1 - open_ratio) * K)``: the official formula, ⌊K/2⌋ at the default ratio."""
    if not 0.0 < open_ratio < 1.0:
        raise ValueError(f"open_ratio must be in (0, 1), got {open_ratio}")
    n_base = int((1 - open_ratio) * num_classes)
    if not 0 < n_base < num_classes:
        raise ValueError(f"{num_classes} classes at open_ratio {open_ratio} leave {n_base} base classes")
    return n_base


def in_the_wild_split(
    records_per_domain: Mapping[str, Sequence[ImageRecord]],
    target: int | str | Sequence[int | str],
    *,
    classnames: Sequence[str],
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    open_ratio: float = DEFAULT_OPEN_RATIO,
    trial_seed: int = 0,
    allow_duplicates: bool = False,
) -> Split:
    """The in-the-wild split (docs/official_code.md §4.4.3).

    Args:
        records_per_domain: domain name → records labelled by sorted class index; the
            environment index is the sorted position of the domain name.
        target: held-out domain(s), by sorted index or name.
        classnames: all K class names in sorted order (index = label).
        allow_duplicates: accept names that repeat after cleaning (ImageNet's standard list);
            the rule of :mod:`clipood_plugin.classnames`, as for ``TextHead`` and ``write_shards``.
        holdout_fraction: "out" share of each base/new part (0.2).
        open_ratio: share of new classes (0.5).
        trial_seed: first element of the holdout seed tuples (the official code fixes 0).

    Returns:
        A :class:`Split` with ``train``, ``val`` (base names) and ``test_base``, ``test_new``,
        ``test_all`` (all K names, original labels).
    """
    names = check_classnames(classnames, allow_duplicates=allow_duplicates, what="in_the_wild_split")
    n_base = num_base_classes(len(names), open_ratio)
    domains, envs = _sorted_environments(records_per_domain, len(names), "in_the_wild_split")
    targets = resolve_targets(domains, target)
    parts: dict[str, list[ImageRecord]] = {k: [] for k in ("train", "val", "test_base", "test_new")}
    seeds: dict[str, dict[str, int]] = {}
    for env_i, d in enumerate(domains):
        base_env = [r for r in envs[d] if r.label < n_base]
        open_env = [r for r in envs[d] if r.label >= n_base]
        seeds[d] = {
            "base": seed_hash(trial_seed, env_i, "base"),
            "open": seed_hash(trial_seed, env_i, "open"),
        }
        in_base, out_base = holdout_split(base_env, holdout_fraction, seeds[d]["base"])
        in_open, out_open = holdout_split(open_env, holdout_fraction, seeds[d]["open"])
        if env_i in targets:
            parts["test_base"] += in_base + out_base
            parts["test_new"] += in_open + out_open
        else:
            parts["train"] += in_base
            parts["val"] += out_base
    parts["test_all"] = parts["test_base"] + parts["test_new"]
    base_names = names[:n_base]
    return Split(
        parts=parts,
        classnames={
            "train": base_names,
            "val": base_names,
            "test_base": names,
            "test_new": names,
            "test_all": names,
        },
        info={
            "protocol": "in_the_wild",
            "domains": domains,
            "targets": [domains[t] for t in targets],
            "sources": [d for i, d in enumerate(domains) if i not in targets],
            "num_base": n_base,
            "num_new": len(names) - n_base,
            "holdout_fraction": holdout_fraction,
            "holdout_seeds": seeds,
        },
    )
