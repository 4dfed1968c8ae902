"""clipood-plugin: CLIPood (ICML 2023) as composable PyTorch pieces.

Public names:

- :class:`MMSLoss` — Margin Metric Softmax (paper Eq. 3–4), a drop-in for cross-entropy.
- :class:`BetaMovingAverage`, :func:`beta_weights`, :func:`get_beta_multi_avg_fn` — Beta Moving
  Average (paper Eq. 5–7) in the style of ``torch.optim.swa_utils.AveragedModel``.
- :class:`TextHead` — a frozen, normalised prompt-embedding classifier.
"""

from clipood_plugin.averaging import BetaMovingAverage, beta_weights, get_beta_multi_avg_fn
from clipood_plugin.mms import MMSLoss
from clipood_plugin.text_head import TextHead

__all__ = [
    "BetaMovingAverage",
    "MMSLoss",
    "TextHead",
    "beta_weights",
    "get_beta_multi_avg_fn",
]

__version__ = "0.1.0.dev0"
