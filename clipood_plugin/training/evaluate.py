"""Zero-shot-style evaluation: argmax of a TextHead's scaled cosine logits over an eval loader.

CLIPood evaluates with the plain cosine argmax (no margin, no temperature effect on the argmax),
so evaluation needs only the image tower and the head. Metrics: top-1, mean per-class accuracy,
and, when base classes are given, base / new accuracy and their harmonic mean (the open-class
protocol). A class subset restricts the argmax to some of the head's classes (ImageNet-A and -R
are 200-class subsets of ImageNet's 1000).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from clipood_plugin.protocols.base_to_new import harmonic_mean

__all__ = ["accuracy_metrics", "evaluate", "predict"]


@torch.no_grad()
def predict(
    tower: nn.Module,
    head: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    class_subset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Predicted and true labels (CPU int64) for every sample of ``batches`` ((images, labels, …))."""
    was_training = tower.training
    tower.eval()
    preds, labels = [], []
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    subset = None if class_subset is None else class_subset.to(device)
    try:
        for batch in batches:
            images, target = batch[0].to(device, non_blocking=True), batch[1]
            with autocast:
                logits = head(tower(images))
            if subset is not None:
                pred = subset[logits.index_select(1, subset).argmax(dim=1)]
            else:
                pred = logits.argmax(dim=1)
            preds.append(pred.cpu())
            labels.append(torch.as_tensor(target).cpu())
    finally:
        tower.train(was_training)
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(preds).long(), torch.cat(labels).long()


def accuracy_metrics(
    preds: Tensor, labels: Tensor, *, base_classes: Tensor | None = None
) -> dict[str, float]:
    """top1, mean per-class accuracy, n; plus base / new / harmonic_mean when base classes are given."""
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.shape[0]} predictions for {labels.shape[0]} labels")
    n = labels.numel()
    if n == 0:
        return {"top1": float("nan"), "mean_per_class": float("nan"), "n": 0}
    correct = (preds == labels).double()
    present = labels.unique()
    per_class = torch.stack([correct[labels == c].mean() for c in present])
    metrics = {"top1": 100 * correct.mean().item(), "mean_per_class": 100 * per_class.mean().item(), "n": n}
    if base_classes is not None:
        is_base = torch.isin(labels, base_classes.cpu())
        base = 100 * correct[is_base].mean().item() if is_base.any() else float("nan")
        new = 100 * correct[~is_base].mean().item() if (~is_base).any() else float("nan")
        both = not (math.isnan(base) or math.isnan(new))  # a split with no samples has no H
        metrics.update(base=base, new=new, harmonic_mean=harmonic_mean(base, new) if both else float("nan"))
    return metrics


def evaluate(
    tower: nn.Module,
    head: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    class_subset: Tensor | None = None,
    base_classes: Tensor | None = None,
) -> dict[str, float]:
    """Run :func:`predict` and return :func:`accuracy_metrics` (percentages)."""
    preds, labels = predict(tower, head, batches, device, amp_dtype=amp_dtype, class_subset=class_subset)
    return accuracy_metrics(preds, labels, base_classes=base_classes)
