"""clipood-plugin: CLIPood (ICML 2023) as composable PyTorch pieces.

Public names:

- :class:`MMSLoss` — Margin Metric Softmax (paper Eq. 3–4), a drop-in for cross-entropy.
- :class:`BetaMovingAverage`, :func:`beta_weights`, :func:`get_beta_multi_avg_fn` — Beta Moving
  Average (paper Eq. 5–7) in the style of ``torch.optim.swa_utils.AveragedModel``.
- :class:`TextHead` — a frozen, normalised prompt-embedding classifier.

Names are imported on first use, so ``import clipood_plugin`` stays cheap and a submodule
(``clipood_plugin.averaging`` for a ResNet user) never drags in the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipood_plugin.averaging import BetaMovingAverage, beta_weights, get_beta_multi_avg_fn
    from clipood_plugin.mms import MMSLoss
    from clipood_plugin.text_head import TextHead

_PUBLIC = {
    "BetaMovingAverage": "clipood_plugin.averaging",
    "beta_weights": "clipood_plugin.averaging",
    "get_beta_multi_avg_fn": "clipood_plugin.averaging",
    "MMSLoss": "clipood_plugin.mms",
    "TextHead": "clipood_plugin.text_head",
}

__all__ = ["BetaMovingAverage", "MMSLoss", "TextHead", "beta_weights", "get_beta_multi_avg_fn"]
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
