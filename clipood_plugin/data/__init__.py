"""Data layer: write WebDataset shards, stream them for training, and decide which URLs to open.

- :mod:`clipood_plugin.data.shard_writer` — :func:`write_shards`: samples into deterministic tar
  shards with timm's and open_clip's metadata beside them.
- :mod:`clipood_plugin.data.shard_sources` — ImageFolder, CSV and DomainBed trees as samples for it.
- :mod:`clipood_plugin.data.make_shards` — the ``clipood-make-shards`` CLI (it re-exports both).
- :mod:`clipood_plugin.data.stream` — :func:`make_train_loader` / :func:`make_eval_loader`, the
  open_clip-order pipeline built from webdataset's stages.
- :mod:`clipood_plugin.data.in_memory` — :func:`make_in_memory_loader`, uniform batches from a small
  set read once into memory (few-shot training, as the official DataLoader draws them).
- :mod:`clipood_plugin.data.urls` — brace expansion, the ``pipe:`` policy, which opener reads
  which scheme, and :class:`ShardStoreError` for a store that cannot be reached.

Names are imported on first use: the shard writer needs neither torch nor webdataset, so the CLI
(and its worker processes) start quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipood_plugin.data.in_memory import InMemoryLoader, make_in_memory_loader
    from clipood_plugin.data.shard_writer import ShardSetInfo, write_shards
    from clipood_plugin.data.stream import EvalLoader, TrainLoader, make_eval_loader, make_train_loader
    from clipood_plugin.data.urls import ShardStoreError, check_url, expand_urls, register_fsspec_handlers

_PUBLIC = {
    "InMemoryLoader": "clipood_plugin.data.in_memory",
    "make_in_memory_loader": "clipood_plugin.data.in_memory",
    "ShardSetInfo": "clipood_plugin.data.shard_writer",
    "write_shards": "clipood_plugin.data.shard_writer",
    "EvalLoader": "clipood_plugin.data.stream",
    "TrainLoader": "clipood_plugin.data.stream",
    "make_eval_loader": "clipood_plugin.data.stream",
    "make_train_loader": "clipood_plugin.data.stream",
    "ShardStoreError": "clipood_plugin.data.urls",
    "check_url": "clipood_plugin.data.urls",
    "expand_urls": "clipood_plugin.data.urls",
    "register_fsspec_handlers": "clipood_plugin.data.urls",
}

__all__ = [
    "EvalLoader",
    "InMemoryLoader",
    "ShardSetInfo",
    "ShardStoreError",
    "TrainLoader",
    "check_url",
    "expand_urls",
    "make_eval_loader",
    "make_in_memory_loader",
    "make_train_loader",
    "register_fsspec_handlers",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clipood_plugin.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
