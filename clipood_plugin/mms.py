"""Margin Metric Softmax (MMS), CLIPood paper Eq. 3–4.

MMS is cross-entropy over scaled cosine logits between an image feature and frozen class text
embeddings ``T`` (the zero-shot head), with a class-adaptive margin added to every wrong class:

    L = -log( exp(s·cos(I, T_y)) / Σ_c exp(s·(cos(I, T_c) + λ·D(T_y, T_c))) ),   D = 1 - ⟨T_y, T_c⟩

Classes whose text is far from the label's get a larger margin, so the image tower is pushed to
separate semantically distant classes by more, which keeps the pretrained text geometry in play.

We compute it in the official code's form: normalise the image feature, subtract ``λ·T_y``,
project onto all ``T`` and scale. Expanding, with ``T`` unit-norm::

    s·⟨f̂ - λ·T_y, T_c⟩ = s·cos(f̂, T_c) - s·λ·⟨T_y, T_c⟩
                        = s·(cos(f̂, T_c) + λ·(1 - ⟨T_y, T_c⟩)) - s·λ

The last term is the same for every class of a row, and softmax cross-entropy ignores a per-row
constant, so both forms give the same loss and gradient in exact arithmetic. The code form never
builds the [B, C] margin matrix, and it is the form that reproduces the official training
trajectory bit for bit (docs/official_code.md §2.2); the paper form drifts by rounding under Adam.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipood_plugin._precision import autocast_off, compute_dtype

__all__ = ["DEFAULT_LAMBDA", "DEFAULT_SCALE", "MMSLoss"]

#: λ = 0.3 for every dataset (paper §4, "the same λ = 0.3 for all datasets"; official `--lam`).
#: The official scripts use 0.1 for the in-the-wild setting (docs/official_code.md §5).
DEFAULT_LAMBDA = 0.3
#: s = 1/τ with τ = 0.01, CLIP's pretrained temperature (paper §4), used when the text
#: embeddings come as a bare tensor. With a TextHead, its own scale (exp(logit_scale)) is used.
DEFAULT_SCALE = 100.0

Reduction = Literal["mean", "sum", "none"]
Precision = Literal["fp32", "input"]


@runtime_checkable
class _HeadLike(Protocol):
    """What MMSLoss needs from a head: normalised ``weight`` [C, D] and a ``scale`` multiplier."""

    weight: Tensor
    scale: Tensor


class MMSLoss(nn.Module):
    """Margin Metric Softmax loss (CLIPood Eq. 3–4): a drop-in replacement for cross-entropy.

    Args:
        text_features_or_head: class text embeddings ``[C, D]`` (normalised here, once), or a
            :class:`~clipood_plugin.TextHead` (its ``weight`` and ``scale`` are used).
        lam: margin strength λ (default 0.3, as the paper).
        scale: logit multiplier s. Default: the head's ``scale`` (CLIP's ``exp(logit_scale)``,
            about 100); 100 when a bare tensor is given.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``, as ``F.cross_entropy``.
        label_smoothing: as ``F.cross_entropy`` (hard labels only).
        classes: optional index tensor/sequence: train against this subset of the head's classes
            (the base classes of base-to-new). Targets are then indices into the subset, relabelled
            from 0, as CoOp's protocol does.
        output_dict: return ``{"mms_loss": loss}`` (open_clip style) instead of a tensor.
        check_inputs: check that labels are in range (one min/max reduction) and that the loss is
            finite, naming non-finite features when it is not. On CUDA each check is a host sync;
            turn them off in a loop that already validated its data.
        precision: ``"fp32"`` (default): computed in float32 at least, under autocast too.
            ``"input"``: the official code's arithmetic, for its fp16 numerics
            (:mod:`clipood_plugin.official`): the text embeddings are kept in the dtype given and
            normalised in it as ``t / ‖t‖``, and the loss is computed in the image features'
            dtype (fp16 logits into the cross-entropy), in the official order. Give it the raw
            fp16 text features (:func:`~clipood_plugin.official.official_text_features`) to match
            the official trajectory bit for bit.

    ``forward(image_features [B, D], target)`` takes image features that need not be normalised
    and either class indices ``[B]`` or dense soft targets ``[B, C]`` (mixup/cutmix, as timm's
    ``SoftTargetCrossEntropy``). For soft targets the margin uses the target-weighted text vector
    ``q @ T`` in place of ``T_y``, the linear extension that equals the hard-label loss for
    one-hot ``q``.

    Under bf16/fp16 autocast the loss is computed in float32 (float64 inputs stay float64), unless
    ``precision="input"``.
    The text tower is not involved: ``T`` is a frozen buffer, so only the image tower learns.
    """

    text_features: Tensor

    def __init__(
        self,
        text_features_or_head: Tensor | nn.Module,
        lam: float = DEFAULT_LAMBDA,
        scale: float | None = None,
        *,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        classes: Tensor | Sequence[int] | None = None,
        output_dict: bool = False,
        check_inputs: bool = True,
        precision: Precision = "fp32",
    ) -> None:
        super().__init__()
        if precision not in ("fp32", "input"):
            raise ValueError(f"precision must be 'fp32' or 'input', got {precision!r}")
        self.precision: Precision = precision
        if isinstance(text_features_or_head, Tensor):
            text = text_features_or_head
            default_scale = DEFAULT_SCALE
        elif isinstance(text_features_or_head, _HeadLike):
            text = text_features_or_head.weight
            default_scale = float(text_features_or_head.scale)
        else:
            raise TypeError(
                "MMSLoss expects a [C, D] tensor of class text embeddings or a TextHead, "
                f"got {type(text_features_or_head).__name__}"
            )
        text = text.detach()
        if text.dim() != 2 or text.shape[0] < 1 or text.shape[1] < 1:
            raise ValueError(f"class text embeddings must have shape [C, D], got {tuple(text.shape)}")
        if not torch.isfinite(text).all():
            raise ValueError("class text embeddings contain NaN or Inf")
        norms = text.double().norm(dim=-1)
        if bool((norms == 0).any()):
            bad = torch.nonzero(norms == 0).flatten().tolist()
            raise ValueError(f"class text embeddings have zero norm for classes {bad}")
        if classes is not None:
            idx = torch.as_tensor(classes, dtype=torch.long, device=text.device).flatten()
            if idx.numel() == 0:
                raise ValueError("classes= is empty")
            if bool(((idx < 0) | (idx >= text.shape[0])).any()):
                raise ValueError(f"classes= holds indices outside [0, {text.shape[0]})")
            if idx.unique().numel() != idx.numel():
                raise ValueError("classes= holds duplicate indices")
            text = text.index_select(0, idx)
        if precision == "input":  # official get_text_features: t /= t.norm() in the text's own dtype
            normalized = text / text.norm(dim=-1, keepdim=True)
        else:  # once, in the highest precision we were given (fp32 at least)
            normalized = F.normalize(text.to(torch.promote_types(text.dtype, torch.float32)), dim=-1)
        self.register_buffer("text_features", normalized, persistent=False)

        scale = default_scale if scale is None else float(scale)
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.lam = lam  # validates and precomputes λ·T
        self.scale = scale
        self.reduction: Reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.output_dict = output_dict
        self.check_inputs = check_inputs

    @property
    def num_classes(self) -> int:
        return self.text_features.shape[0]

    def extra_repr(self) -> str:
        c, d = self.text_features.shape
        return f"classes={c}, dim={d}, lam={self.lam}, scale={self.scale:.4g}, reduction={self.reduction}"

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        value = float(value)
        if not (value >= 0 and value < float("inf")):
            raise ValueError(f"lam must be a non-negative finite number, got {value}")
        self._lam = value
        # λ·T precomputed: gathering rows of it gives bitwise the official λ·T[y]
        self.register_buffer("_lam_text", value * self.text_features, persistent=False)

    def forward(
        self, image_features: Tensor, target: Tensor, output_dict: bool | None = None
    ) -> Tensor | dict[str, Tensor]:
        soft = self._check_shapes(image_features, target)
        if not soft:
            target = target.long()
            if self.check_inputs:
                self._check_labels(target)
        with autocast_off(image_features.device.type):  # the margin is a small shift of ~100-scale logits
            loss = self._loss(image_features, target, soft)
        if self.check_inputs and not _all_finite(loss):
            self._diagnose_non_finite(image_features, target)
        if self.output_dict if output_dict is None else output_dict:
            return {"mms_loss": loss}
        return loss

    def _loss(self, image_features: Tensor, target: Tensor, soft: bool) -> Tensor:
        official = self.precision == "input"
        dtype = image_features.dtype if official else compute_dtype(image_features.dtype)
        text = self.text_features.to(dtype)
        lam_text = self._lam_text.to(dtype)
        # Official order (engine.py): f̂ = f/‖f‖; f̂ -= λ·T[y]; z = f̂ @ Tᵀ; z = s·z
        if official:
            feats = image_features / image_features.norm(dim=-1, keepdim=True)
        else:
            feats = F.normalize(image_features.to(dtype), dim=-1)
        if soft:
            q = target.to(dtype)
            feats = feats.sub_(q @ lam_text)  # target-weighted text vector; = λ·T_y for one-hot q
        else:
            feats = feats.sub_(lam_text.index_select(0, target))
        logits = (feats @ text.t()) * self.scale
        if not soft:
            return F.cross_entropy(logits, target, reduction=self.reduction, label_smoothing=self.label_smoothing)
        loss = torch.sum(-q * F.log_softmax(logits, dim=-1), dim=-1)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def _check_shapes(self, image_features: Tensor, target: Tensor) -> bool:
        """Validate shapes and dtypes (free: no kernel runs); return True for soft targets."""
        num_classes, dim = self.text_features.shape
        if image_features.dim() != 2:
            raise ValueError(f"image_features must be [B, D], got shape {tuple(image_features.shape)}")
        if image_features.shape[1] != dim:
            raise ValueError(
                f"image feature dimension {image_features.shape[1]} does not match the class text "
                f"embedding dimension {dim}"
            )
        batch = image_features.shape[0]
        if batch == 0:
            raise ValueError("empty batch: image_features has 0 rows")
        if target.dim() == 2:
            if tuple(target.shape) != (batch, num_classes):
                raise ValueError(
                    f"soft targets must be [B, C] = [{batch}, {num_classes}], got {tuple(target.shape)}"
                )
            if not target.is_floating_point():
                raise TypeError(f"soft targets must be floating point, got {target.dtype}")
            if self.label_smoothing:
                raise ValueError("label_smoothing applies to hard labels; smooth soft targets upstream (mixup does)")
            return True
        if target.dim() != 1:
            raise ValueError(f"target must be [B] class indices or [B, C] soft targets, got {tuple(target.shape)}")
        if target.shape[0] != batch:
            raise ValueError(f"target has {target.shape[0]} labels for a batch of {batch} features")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"hard labels must be an integer tensor, got {target.dtype}")
        return False

    def _check_labels(self, target: Tensor) -> None:
        """One min/max reduction (a host sync on CUDA): out-of-range labels would otherwise be a
        device-side assert on GPU or an opaque index error on CPU."""
        num_classes = self.text_features.shape[0]
        low, high = torch.aminmax(target)
        if int(low) < 0 or int(high) >= num_classes:
            bad = target[(target < 0) | (target >= num_classes)]
            raise ValueError(f"labels out of range [0, {num_classes}): {sorted(set(bad.tolist()))[:8]}")

    def _diagnose_non_finite(self, image_features: Tensor, target: Tensor) -> None:
        """The loss is NaN/Inf: name the cause (checked after the fact, so the happy path is free)."""
        finite_rows = torch.isfinite(image_features).all(dim=1)
        if not bool(finite_rows.all()):
            rows = torch.nonzero(~finite_rows).flatten().tolist()
            raise ValueError(f"image_features contain NaN or Inf (batch rows {rows[:8]})")
        if target.is_floating_point() and not bool(torch.isfinite(target).all()):
            raise ValueError("soft targets contain NaN or Inf")
        if target.is_floating_point() and bool((target < 0).any()):
            raise ValueError("soft targets contain negative entries")
        raise FloatingPointError("MMSLoss is not finite although its inputs are; is the scale too large?")


def _all_finite(loss: Tensor) -> bool:
    if loss.dim() == 0:
        return math.isfinite(loss.item())  # cheaper than an isfinite kernel for a scalar
    return bool(torch.isfinite(loss).all())
