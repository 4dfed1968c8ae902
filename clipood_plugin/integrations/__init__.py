"""Drop-in integrations with the training frameworks users already run.

Each submodule imports its framework only when it is itself imported, so
``import clipood_plugin`` (and ``import clipood_plugin.integrations``) never needs them:

- :mod:`clipood_plugin.integrations.timm` — routes into timm's own ``train.py``:
  :class:`CLIPoodTask`, a ``timm.task.TrainingTask`` (timm ≥ 1.0.27) holding an image tower, a
  :class:`~clipood_plugin.TextHead` and :class:`~clipood_plugin.MMSLoss`, whose ``setup_ema``
  installs a Beta Moving Average; :class:`BMAClassificationTask` (BMA for any model); and
  ``replace_model_ema`` for older scripts built on ``ModelEmaV3``.
- :mod:`clipood_plugin.integrations.open_clip_train` — open_clip's own trainer with CLIPood:
  ``python -m clipood_plugin.integrations.open_clip_train <its arguments>``; ``load_average``.
- :mod:`clipood_plugin.integrations.lightning` — :class:`BetaWeightAveraging`, a Lightning
  ``WeightAveraging`` callback (lightning ≥ 2.6; ``pip install clipood-plugin[lightning]``).
- :mod:`clipood_plugin.integrations.hf` — :class:`BMACallback`, a Hugging Face ``TrainerCallback``
  (``pip install clipood-plugin[hf]``).

The names are also reachable here, resolved (and their framework imported) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipood_plugin.integrations.hf import BMACallback
    from clipood_plugin.integrations.lightning import BetaWeightAveraging
    from clipood_plugin.integrations.timm import BMAClassificationTask, CLIPoodTask

_PUBLIC = {
    "CLIPoodTask": "clipood_plugin.integrations.timm",
    "BMAClassificationTask": "clipood_plugin.integrations.timm",
    "BetaWeightAveraging": "clipood_plugin.integrations.lightning",
    "BMACallback": "clipood_plugin.integrations.hf",
}

__all__ = ["BMACallback", "BMAClassificationTask", "BetaWeightAveraging", "CLIPoodTask"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clipood_plugin.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
