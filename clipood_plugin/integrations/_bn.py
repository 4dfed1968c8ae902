"""BatchNorm statistics for an averaged model, recomputed before it is evaluated.

An average of weights with the running statistics the live model gathered along the way is a
model nobody trained (BN models lose tens of points that way); ``torch.optim.swa_utils.update_bn``
is the fix, and training scripts (timm's ``train.py``, open_clip's trainer) never call it. The
integrations attach :class:`BatchNormRefresh` to their average: a forward pre-hook that runs
:func:`recompute_bn_stats` before the first eval-mode forward after new steps, i.e. right
before the script validates the average, so the checkpoint written after validation holds the
recomputed statistics too.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clipood_plugin.averaging import BetaMovingAverage

__all__ = ["BatchNormRefresh", "attach_bn_refresh", "has_batchnorm", "recompute_bn_stats"]

_logger = logging.getLogger(__name__)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` has BatchNorm layers that track running statistics."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in module.modules())


def recompute_bn_stats(module: nn.Module, loader: Iterable[Any], max_batches: int | None = None) -> int:
    """Recompute the BatchNorm running statistics of ``module`` over ``loader``; returns batches used.

    What ``torch.optim.swa_utils.update_bn`` does (cumulative average, momentum ``None``), for a
    loader yielding ``(input, target, ...)`` tuples or bare inputs; inputs are moved to the
    module's device and floating dtype. The module's train/eval mode and BN momenta are restored.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    momenta = [m.momentum for m in norms]
    was_training = module.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    used = 0
    try:
        with torch.no_grad():
            for batch in loader:
                if max_batches is not None and used >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                module(x.to(device=device, dtype=dtype))
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.train(was_training)
    if used == 0:
        raise ValueError("recompute_bn_stats: the loader yielded no batches")
    return used


class BatchNormRefresh:
    """Forward pre-hook on ``average.module``: recompute its BN statistics before its first
    eval-mode forward after new averaging steps (training-mode forwards are left alone)."""

    def __init__(self, average: BetaMovingAverage, loader: Iterable[Any], max_batches: int | None = None) -> None:
        self.average = average
        self.loader = loader
        self.max_batches = max_batches
        self.refreshed_at = average.steps
        self.handle = average.module.register_forward_pre_hook(self)

    def refresh(self) -> None:
        """Recompute now if steps were folded in since the last refresh."""
        if self.average.steps == self.refreshed_at:
            return
        used = recompute_bn_stats(self.average.module, self.loader, self.max_batches)
        self.refreshed_at = self.average.steps
        _logger.info("BMA: recomputed the average's BatchNorm statistics over %d training batches", used)

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        if not module.training:
            self.refresh()


def attach_bn_refresh(
    average: BetaMovingAverage, loader: Iterable[Any] | None, max_batches: int | None, owner: str
) -> BatchNormRefresh | None:
    """A :class:`BatchNormRefresh` if the average has BatchNorm; without a loader, a loud warning."""
    if not has_batchnorm(average.module):
        return None
    if loader is None:
        warnings.warn(
            f"{owner}: the averaged model has BatchNorm layers and no training loader was given, so its "
            "running statistics are the live model's, which do not match averaged weights; evaluate it "
            "after torch.optim.swa_utils.update_bn(loader, average)",
            stacklevel=3,
        )
        return None
    _logger.info("%s: the average has BatchNorm; its statistics are recomputed before each evaluation", owner)
    return BatchNormRefresh(average, loader, max_batches)
