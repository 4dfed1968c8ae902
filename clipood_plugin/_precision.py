"""One rule for the numerically delicate parts: leave autocast for fp32 (or fp64) arithmetic.

Cosine logits at CLIP's scale (~100) are differences of near-equal numbers, and the MMS margin is
a small shift of them; bf16/fp16 would blur both. Entering ``torch.autocast(enabled=False)`` costs
a few microseconds, so it is only entered when autocast is actually on.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_off", "compute_dtype"]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device_type argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know
        return False


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[None]:
    """A context that disables autocast on ``device_type`` if (and only if) it is enabled."""
    if not _autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)
