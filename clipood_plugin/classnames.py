"""Class lists: the one rule for what a list of class names may hold, used by every caller.

A class list maps a label (its index) to a name. The names become prompts
(``"a photo of a {}."``), and two names that give the same prompt give the same class
embedding and tied logits, so those two classes cannot be told apart. Whether that is a mistake
depends on the list: ImageNet's standard CLIP list (open_clip's ``IMAGENET_CLASSNAMES``, which
CoOp's ``classnames.txt`` copies) really names two classes "missile" and two "sunglasses", and
the official code keeps them. So a repeat is an error unless the caller says it is meant.

The rule, applied by the protocols (``clipood_plugin.protocols``), the shard writer
(``write_shards`` and ``clipood-make-shards``), :class:`~clipood_plugin.TextHead` and CAR-FT's
:class:`~clipood_plugin.ContextBank`, each taking the same keyword ``allow_duplicates``
(default False):

- a class list is a sequence of strings (a single string is an error, not a list of letters);
- it holds at least one name, and every name is non-empty after :func:`clean_classname`;
- two names that are equal after :func:`clean_classname` (``"Alarm_Clock"`` and
  ``"Alarm Clock"`` too) are a duplicate: ``ValueError`` naming both indices, unless
  ``allow_duplicates=True``.

Names are kept as given; cleaning is only how they are compared and how prompts are written.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["check_classnames", "clean_classname", "duplicate_classnames"]

_DUPLICATE_HINT = (
    "; pass allow_duplicates=True (recipes: --allow-duplicate-classnames) if the list really names two "
    "classes alike (ImageNet's standard list has 'missile' and 'sunglasses' twice): their prompts are then "
    "identical and their logits tie"
)


def clean_classname(name: str) -> str:
    """CLIPood's class-name cleanup: underscores become spaces, outer whitespace goes, case stays."""
    if not isinstance(name, str):
        raise TypeError(f"class names must be strings, got {type(name).__name__}: {name!r}")
    return name.replace("_", " ").strip()


def _as_names(classnames: Iterable[str], what: str) -> list[str]:
    if isinstance(classnames, (str, bytes)) or not isinstance(classnames, Iterable):
        raise TypeError(f"{what}: classnames must be a sequence of strings, got {type(classnames).__name__}: "
                        f"{classnames!r}")
    names = list(classnames)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{what}: class name {i} must be a string, got {type(name).__name__}: {name!r}")
    return names


def duplicate_classnames(classnames: Iterable[str]) -> dict[str, list[int]]:
    """Cleaned name → the indices that share it, for the names that repeat (empty when none do)."""
    where: dict[str, list[int]] = {}
    for i, name in enumerate(_as_names(classnames, "duplicate_classnames")):
        where.setdefault(clean_classname(name), []).append(i)
    return {name: idx for name, idx in where.items() if len(idx) > 1}


def check_classnames(
    classnames: Iterable[str], *, allow_duplicates: bool = False, what: str = "classnames"
) -> list[str]:
    """Check a class list against the rule above; return its names as given, as a list.

    ``what`` names the caller in the messages (``"imagenet_split"``, ``"write_shards"``, …).

    Raises:
        TypeError: not a sequence of strings.
        ValueError: an empty list, a name empty after cleaning, or (without ``allow_duplicates``)
            two names equal after cleaning; the message names the indices.
    """
    names = _as_names(classnames, what)
    if not names:
        raise ValueError(f"{what}: classnames is empty: give at least one class name")
    first: dict[str, int] = {}
    for i, raw in enumerate(names):
        name = clean_classname(raw)
        if not name:
            raise ValueError(f"{what}: class name {i} ({raw!r}) is empty after cleaning")
        if name in first and not allow_duplicates:
            j = first[name]
            same = f"{raw!r}" if raw == names[j] else f"{names[j]!r} and {raw!r} (both {name!r} after cleaning)"
            raise ValueError(f"{what}: duplicate class name {same} at indices {j} and {i}{_DUPLICATE_HINT}")
        first.setdefault(name, i)
    return names
