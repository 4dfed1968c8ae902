"""Seeing through the wrappers training scripts put around a model.

DistributedDataParallel and DataParallel hide the real module under ``.module``;
``torch.compile`` hides it under ``._orig_mod``. Their state dicts carry the matching
``module.`` and ``_orig_mod.`` key prefixes. Averaging, interpolation and checkpoint code
all need the bare module or the bare keys, so the rule lives here, once.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module under any stack of DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop leading ``module.`` / ``_orig_mod.`` (in any order and count) from every key."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        bare = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if bare.startswith(prefix):
                    bare = bare[len(prefix) :]
                    stripped = True
        if bare in out:
            raise ValueError(f"state dict keys {key!r} and another key both map to {bare!r} once wrapper prefixes are removed")
        out[bare] = value
    return out
