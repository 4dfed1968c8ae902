"""Beta Moving Average as a PyTorch Lightning callback (lightning ≥ 2.6).

``pip install clipood-plugin[lightning]``, then::

    from clipood_plugin.integrations.lightning import BetaWeightAveraging

    trainer = L.Trainer(max_epochs=10, callbacks=[BetaWeightAveraging(beta=0.5)])
    trainer.fit(module, train_loader, val_loader)

:class:`BetaWeightAveraging` builds on Lightning's ``WeightAveraging`` and keeps its behaviour:
validation runs on the averaged weights (swapped in and out in place), checkpoints hold the average
as ``state_dict`` with the live weights as ``current_model_state``, and at the end of ``fit`` the
average is copied into the module. What it changes for BMA (CLIPood Eq. 5–7):

- The averaged copy is a :class:`~clipood_plugin.BetaMovingAverage`, whose Beta weights need T,
  the number of optimizer steps: ``trainer.estimated_stepping_batches`` by default (it accounts
  for ``max_epochs``, ``max_steps``, ``limit_train_batches`` and gradient accumulation), or an
  explicit ``total_steps``. A stream with no length and no ``max_steps`` has no T; that raises.
- θ_0, the weights before the first optimizer step, is folded in with weight α_0. Lightning's own
  hook only updates after optimizer steps, which would leave it out.
- Exactly one update per optimizer step, cross-checked against ``trainer.global_step``; the
  ``should_update`` schedule is not consulted, since skipping steps would change the weights.
- ``use_buffers=False`` by default, as CLIPood and torch (Lightning's base defaults to True):
  buffers are copied from the live model, not averaged.

The average is of the whole LightningModule (that is how Lightning's callback works). For a CLIP
model keep the frozen text tower out of the module (build a :class:`~clipood_plugin.TextHead`
once and hold only it) so it is not copied.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from clipood_plugin.averaging import DEFAULT_BETA, BetaMovingAverage, check_beta, check_total_steps

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import WeightAveraging
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as _err:  # pragma: no cover - exercised only without lightning installed
    raise ImportError(
        "clipood_plugin.integrations.lightning needs lightning>=2.6 (lightning.pytorch.callbacks."
        "WeightAveraging); install it with `pip install 'clipood-plugin[lightning]'`"
    ) from _err

__all__ = ["BetaWeightAveraging"]


class BetaWeightAveraging(WeightAveraging):
    """Lightning ``WeightAveraging`` with CLIPood's Beta Moving Average.

    Args:
        beta: β of the symmetric Beta(β, β) step weights (0.5 default).
        total_steps: T, optimizer steps of the run. Default ``trainer.estimated_stepping_batches``;
            give it explicitly for an unsized (streaming) loader without ``max_steps``.
        device: where to keep the average (default: the module's device; ``"cpu"`` saves
            accelerator memory).
        use_buffers: average buffers too (default False: copy them, as CLIPood).
        include_init: fold in θ_0, the weights at the start of ``fit`` (CLIPood does).
    """

    def __init__(
        self,
        beta: float = DEFAULT_BETA,
        total_steps: int | None = None,
        device: torch.device | str | int | None = None,
        use_buffers: bool = False,
        include_init: bool = True,
    ) -> None:
        super().__init__(device=device, use_buffers=use_buffers)
        self.beta = check_beta(beta)
        self.total_steps = check_total_steps(total_steps, optional=True)
        self.include_init = include_init
        self._restored = False

    @property
    def average(self) -> BetaMovingAverage | None:
        """The :class:`BetaMovingAverage` (``None`` outside ``fit``)."""
        return self._average_model  # type: ignore[return-value]

    def resolve_total_steps(self, trainer: pl.Trainer) -> int:
        """T: the explicit ``total_steps``, else ``trainer.estimated_stepping_batches``."""
        if self.total_steps is not None:
            estimate = _try_estimate(trainer)
            if estimate is not None and estimate != self.total_steps:
                warnings.warn(
                    f"BetaWeightAveraging(total_steps={self.total_steps}) but the trainer expects {estimate} "
                    "optimizer steps; fewer steps leave the average's late weights out, more raise",
                    stacklevel=2,
                )
            return self.total_steps
        estimate = trainer.estimated_stepping_batches
        if not (isinstance(estimate, (int, float)) and math.isfinite(estimate) and estimate >= 1):
            raise ValueError(
                f"BetaWeightAveraging needs T, the number of optimizer steps, but the trainer cannot tell it "
                f"(estimated_stepping_batches = {estimate!r}: an unsized/streaming train loader without "
                "max_steps, or max_epochs=-1). Set Trainer(max_steps=...) or BetaWeightAveraging(total_steps=...)"
            )
        return int(estimate)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """At the start of ``fit``: build the :class:`BetaMovingAverage` (θ_0 = current weights)."""
        if stage != "fit":
            return
        total_steps = self.resolve_total_steps(trainer)
        if is_overridden("configure_model", pl_module):
            warnings.warn(
                "BetaWeightAveraging: the module overrides configure_model; it is called here so the average "
                "holds every layer, but sharded layers are not supported",
                stacklevel=2,
            )
            pl_module.configure_model()
        self._average_model = BetaMovingAverage(
            pl_module,
            total_steps=total_steps,
            beta=self.beta,
            device=self._device or pl_module.device,
            use_buffers=self._use_buffers,
            include_init=self.include_init,
        )
        self._restored = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record θ_0 again now that the module is set up, unless a checkpoint restored the average.

        ``LightningModule.setup`` and the strategy run after the callback's ``setup``, and either
        may still change the weights (loading pretrained weights in ``setup`` is common).
        """
        average = self.average
        if average is not None and not self._restored and average.steps == 0 and trainer.global_step == 0:
            average.set(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After each optimizer step (``global_step`` advanced), fold in θ_t with t = global_step."""
        average = self.average
        if average is not None and trainer.global_step > self._latest_update_step:
            average.update(pl_module, step=trainer.global_step)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """BMA is per optimizer step; nothing happens at epoch ends."""

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resume the average; a checkpoint without BMA state cannot resume it (the count is lost)."""
        if self._average_model is not None and not (
            "current_model_state" in checkpoint and "averaging_state" in checkpoint
        ):
            raise ValueError(
                "resuming with BetaWeightAveraging from a checkpoint that has no averaging state "
                "(current_model_state / averaging_state): it was saved without this callback, so the Beta "
                "average cannot continue. Start a fresh fit from those weights instead of ckpt_path=..."
            )
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:
            self._restored = True


def _try_estimate(trainer: pl.Trainer) -> int | None:
    try:
        estimate = trainer.estimated_stepping_batches
    except Exception:  # Lightning raises MisconfigurationException for unestimable setups
        return None
    if isinstance(estimate, (int, float)) and math.isfinite(estimate) and estimate >= 1:
        return int(estimate)
    return None
