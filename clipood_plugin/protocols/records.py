"""The data model every protocol shares: image records and the named splits a protocol returns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ImageRecord", "Split"]


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, its class index and (for multi-domain data) its domain.

    ``label`` is an index into the class-name list of whatever :class:`Split` part holds the
    record; protocols that relabel (base-to-new, ImageNet-A/R) return new records.
    """

    path: str
    label: int
    domain: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise TypeError(f"ImageRecord.path must be a str, got {type(self.path).__name__}: {self.path!r}")
        if isinstance(self.label, bool) or not isinstance(self.label, int):
            raise TypeError(
                f"ImageRecord.label must be an int, got {type(self.label).__name__}: {self.label!r}"
            )
        if self.label < 0:
            raise ValueError(f"ImageRecord.label must be >= 0, got {self.label} for {self.path!r}")
        if self.domain is not None and not isinstance(self.domain, str):
            raise TypeError(f"ImageRecord.domain must be a str or None, got {self.domain!r}")


@dataclass(frozen=True)
class Split:
    """The result of a protocol: named record lists and the class names each is classified among.

    Attributes:
        parts: part name → records, e.g. ``"train"``, ``"val"``, ``"test"``; insertion order is
            the order a report should list them in.
        classnames: part name → the class names that part is evaluated (or, for ``"train"``,
            trained) against; a record's ``label`` indexes this list. Every part has an entry.
        info: protocol facts worth logging or needed downstream (target domain, holdout seeds,
            the 1000-class indices of an ImageNet-A/R subset, ...).

    The lists are copied on construction, and every label is checked against its part's names,
    so a Split that exists is consistent.
    """

    parts: dict[str, list[ImageRecord]]
    classnames: dict[str, list[str]]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = {str(k): list(v) for k, v in self.parts.items()}
        names = {str(k): [str(n) for n in v] for k, v in self.classnames.items()}
        missing = [k for k in parts if k not in names]
        if missing:
            raise ValueError(f"Split: parts {missing} have no classnames entry (have {sorted(names)})")
        extra = [k for k in names if k not in parts]
        if extra:
            raise ValueError(f"Split: classnames given for unknown parts {extra} (parts: {list(parts)})")
        for key, records in parts.items():
            n = len(names[key])
            for rec in records:
                if not isinstance(rec, ImageRecord):
                    raise TypeError(f"Split part {key!r} holds a {type(rec).__name__}, expected ImageRecord")
                if rec.label >= n:
                    raise ValueError(
                        f"Split part {key!r}: label {rec.label} of {rec.path!r} is out of range for {n} class names"
                    )
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "classnames", names)
        object.__setattr__(self, "info", dict(self.info))

    def __getitem__(self, part: str) -> list[ImageRecord]:
        try:
            return self.parts[part]
        except KeyError:
            raise KeyError(f"no split part {part!r}; this split has {list(self.parts)}") from None

    def __contains__(self, part: object) -> bool:
        return part in self.parts

    def sizes(self) -> dict[str, int]:
        """Number of records per part, in part order (for logs and reports)."""
        return {k: len(v) for k, v in self.parts.items()}

    def domain_sizes(self, part: str) -> dict[str, int]:
        """Consecutive per-domain counts of ``part`` (e.g. the sources of ``"train"``).

        Protocols concatenate sources domain after domain, so the result is what
        :func:`~clipood_plugin.protocols.domainbed.per_domain_batches` needs to map a draw in
        domain ``d`` to an index of ``split[part]``. Raises if a domain's records are not
        contiguous (the offsets would then be wrong) or a record has no domain.
        """
        return _contiguous_domain_counts(self[part], part)


def _contiguous_domain_counts(records: Iterable[ImageRecord], what: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    last: str | None = None
    for rec in records:
        if rec.domain is None:
            raise ValueError(f"{what}: record {rec.path!r} has no domain")
        if rec.domain != last:
            if rec.domain in counts:
                raise ValueError(f"{what}: records of domain {rec.domain!r} are not contiguous")
            counts[rec.domain] = 0
            last = rec.domain
        counts[rec.domain] += 1
    return counts
