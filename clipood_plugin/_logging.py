"""Quieting one misleading log line, in one place.

open_clip logs "No pretrained weights loaded for model …" whenever a model is built with
``pretrained=None``. Where we build it that way on purpose (random init for the embedded world, or
weights loaded from a local file right after), the line is wrong, so it is filtered out for the
duration of the build; every other record still passes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["no_random_init_warning"]


@contextlib.contextmanager
def no_random_init_warning(enabled: bool = True) -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded" record while the block runs."""
    if not enabled:
        yield
        return

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
