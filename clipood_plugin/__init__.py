"""clipood-plugin: CLIPood (ICML 2023) as composable PyTorch pieces.

Public names:

- :class:`MMSLoss` — Margin Metric Softmax (paper Eq. 3–4), a drop-in for cross-entropy.
- :class:`BetaMovingAverage`, :func:`beta_weights`, :func:`get_beta_multi_avg_fn` — Beta Moving
  Average (paper Eq. 5–7) in the style of ``torch.optim.swa_utils.AveragedModel``.
- :class:`TextHead` — a frozen, normalised prompt-embedding classifier.
- Baselines users compare against: :class:`ExponentialMovingAverage`, :class:`UniformAverage`
  (same API as BMA), :class:`CARFTLoss` / :class:`ContextBank` (CAR-FT) and
  :func:`interpolate_weights` (WiSE-FT).

Names are imported on first use, so ``import clipood_plugin`` stays cheap and a submodule
(``clipood_plugin.averaging`` for a ResNet user) never drags in the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipood_plugin.averaging import (
        BetaMovingAverage,
        ExponentialMovingAverage,
        UniformAverage,
        beta_weights,
        get_beta_multi_avg_fn,
    )
    from clipood_plugin.carft import CARFTLoss, ContextBank
    from clipood_plugin.mms import MMSLoss
    from clipood_plugin.text_head import TextHead
    from clipood_plugin.wise import interpolate_weights

_PUBLIC = {
    "BetaMovingAverage": "clipood_plugin.averaging",
    "beta_weights": "clipood_plugin.averaging",
    "get_beta_multi_avg_fn": "clipood_plugin.averaging",
    "ExponentialMovingAverage": "clipood_plugin.averaging",
    "UniformAverage": "clipood_plugin.averaging",
    "CARFTLoss": "clipood_plugin.carft",
    "ContextBank": "clipood_plugin.carft",
    "MMSLoss": "clipood_plugin.mms",
    "TextHead": "clipood_plugin.text_head",
    "interpolate_weights": "clipood_plugin.wise",
}

__all__ = [
    "BetaMovingAverage",
    "CARFTLoss",
    "ContextBank",
    "ExponentialMovingAverage",
    "MMSLoss",
    "TextHead",
    "UniformAverage",
    "beta_weights",
    "get_beta_multi_avg_fn",
    "interpolate_weights",
]
#: The one place the version is written: pyproject.toml reads it (``dynamic = ["version"]``).
__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clipood_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
