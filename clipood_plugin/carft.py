"""CAR-FT: context-aware robust fine-tuning (Mao et al., IJCV 2024, arXiv 2211.16175).

CLIP classifies with prompts of the form "a [CONTEXT] of a [CLASS]"; fine-tuning on one
distribution erodes what the image tower knows about contexts (style, background, viewpoint).
CAR-FT keeps that knowledge by regularising the *context distribution* of each image towards
the one the original CLIP gives::

    L = L_cls(f_θ(x), y) + λ_ctx · KL( P_ctx(x; θ_0) ‖ P_ctx(x; θ) )
    P_ctx(x; θ) = softmax_m( s · cos(f_θ(x), w_m) )

with ``w_m`` one text direction per context template and θ_0 the frozen pretrained tower.

What is confirmed and what is our reading (the official code was not found; docs/official_code.md §8):

- **Confirmed** (paper abstract): the regulariser is a KL divergence between the context
  distributions that the original and the fine-tuned CLIP give an image, and the context
  distribution is obtained from zero-shot prompt weights.
- **Our reading** (docs/official_code.md §8.2, to be checked against the paper's PDF):

  * the contexts are the prompt templates, by default the 80 OpenAI ImageNet templates, and
    ``w_m`` is template m's text embedding averaged over all classes and re-normalised (an
    independent later codebase, FD-Align, builds the same per-template class average);
  * the softmax runs at CLIP's logit scale ``s = exp(logit_scale)`` ≈ 100;
  * the KL direction is KL(p_zs ‖ p_ft), the pretrained distribution as the target;
  * the KL is averaged over the batch;
  * λ_ctx defaults to 1.0 (:data:`DEFAULT_CARFT_WEIGHT`); the paper's value is not confirmed.

  Every one of these is an argument, so a reading that turns out wrong is a setting, not a
  rewrite.

Reported result for context: DomainBed average 78.5 with ViT-B/16 (abstract; PACS 96.8, VLCS 85.5,
OfficeHome 85.7, TerraIncognita 61.9, DomainNet 62.5), against CLIPood's 78.6 (docs/official_code.md §7).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipood_plugin._wrappers import unwrap_model
from clipood_plugin.classnames import check_classnames, clean_classname
from clipood_plugin.templates import Template, get_templates, template_text
from clipood_plugin.text_head import TextHead, _check_scale, encode_prompts, normalize_rows, scaled_cosine

__all__ = [
    "DEFAULT_CARFT_WEIGHT",
    "DEFAULT_CONTEXT_TEMPLATES",
    "CARFTLoss",
    "ContextBank",
    "HeadCrossEntropy",
    "build_head_and_context_bank",
]

#: The context templates of our reading: open_clip's 80 OpenAI ImageNet templates (the list
#: WiSE-FT uses), resolved by :func:`~clipood_plugin.templates.get_templates`.
DEFAULT_CONTEXT_TEMPLATES = "openai_imagenet"
#: λ_ctx. NOT confirmed from the paper. 1.0 adds the KL unscaled: it and the cross-entropy are
#: both per-sample expectations of log-ratios in nats, so 1.0 weighs them alike and is the neutral
#: start for a sweep on source-domain validation data.
DEFAULT_CARFT_WEIGHT = 1.0

KLDirection = Literal["zs_ft", "ft_zs"]
_KL_DIRECTIONS = ("zs_ft", "ft_zs")


class ContextBank(nn.Module):
    """One unit text direction per context, ``[M, D]``, as a frozen buffer; maps features to context logits.

    ``forward(f)`` gives ``s · cos(f, w_m)`` for every context m (``[..., M]``); the context
    distribution of an image is its softmax (:meth:`distribution`, :meth:`log_distribution`).

    Args:
        directions: ``[M, D]`` context text directions, M ≥ 2 (a distribution over one context
            is constant). Rows are L2-normalised (in float64, stored in float32) into the
            persistent buffer ``directions``.
        scale: the logit multiplier s > 0 (CLIP's ``exp(logit_scale)``, ≈ 100), stored as the
            persistent 0-dim buffer ``scale``.
        templates: optional template texts, one per row (metadata).

    Build it with :meth:`from_open_clip` (encodes the prompts), :meth:`from_prompt_embeddings`
    (reuses an :func:`~clipood_plugin.text_head.encode_prompts` result), or
    :func:`build_head_and_context_bank` (class head and context bank from one encoding pass).
    """

    directions: Tensor
    scale: Tensor

    def __init__(
        self,
        directions: Tensor,
        scale: float | Tensor = 100.0,
        templates: Sequence[Template] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(directions, Tensor) and directions.dim() == 2 and directions.shape[0] == 1:
            raise ValueError(
                f"a context bank needs at least 2 contexts (got {directions.shape[0]}): the distribution "
                "over a single context is always 1 and its KL always 0"
            )
        self.register_buffer("directions", normalize_rows(directions, "directions", "a context direction", "[M, D]"))
        d = self.directions
        self.register_buffer("scale", torch.tensor(_check_scale(scale), dtype=torch.float32, device=d.device))
        self.templates: tuple[str, ...] | None = None
        if templates is not None:
            texts = tuple(template_text(t) for t in get_templates(list(templates)))
            if len(texts) != directions.shape[0]:
                raise ValueError(f"got {len(texts)} templates for {directions.shape[0]} context directions")
            self.templates = texts

    @property
    def num_contexts(self) -> int:
        return self.directions.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.directions.shape[1]

    def extra_repr(self) -> str:
        return f"num_contexts={self.num_contexts}, embed_dim={self.embed_dim}, scale={float(self.scale):.4g}"

    def forward(self, image_features: Tensor, scale: float | None = None) -> Tensor:
        """Context logits ``s · cos(f, w_m)``, ``[..., M]``, for features ``[..., D]`` (need not be normalised).

        Computed in float32 (float64 for float64 input) with autocast off: at s ≈ 100 the logits
        are differences of near-equal cosines. ``scale`` overrides the bank's s.
        """
        return scaled_cosine(image_features, self.directions, self.scale if scale is None else scale,
                             "the context bank's")

    def log_distribution(self, image_features: Tensor, scale: float | None = None) -> Tensor:
        """``log P_ctx``: log-softmax of the context logits over the M contexts."""
        return torch.log_softmax(self(image_features, scale), dim=-1)

    def distribution(self, image_features: Tensor, scale: float | None = None) -> Tensor:
        """``P_ctx``: the context distribution of each image, ``[..., M]``."""
        return torch.softmax(self(image_features, scale), dim=-1)

    @classmethod
    def from_prompt_embeddings(
        cls,
        embeddings: Tensor,
        scale: float | Tensor = 100.0,
        templates: Sequence[Template] | None = None,
    ) -> ContextBank:
        """Context directions from ``[C, M, D]`` prompt embeddings (class × template, each normalised).

        ``w_m`` = mean over the C classes of template m's normalised embeddings, re-normalised:
        what the templates share across classes, i.e. the context (docs/official_code.md §8.2). The
        rows are normalised here first, so unnormalised input gives the same bank.
        """
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 3:
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise ValueError(
                f"prompt embeddings must be a [C, M, D] tensor (class, template, dim), got {shape}"
            )
        work = torch.float32 if embeddings.device.type == "mps" else torch.float64
        emb = F.normalize(embeddings.detach().to(work), dim=-1)
        return cls(emb.mean(dim=0), scale=scale, templates=templates)

    @classmethod
    def from_open_clip(
        cls,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        classnames: Iterable[str],
        templates: str | Template | Sequence[Template] = DEFAULT_CONTEXT_TEMPLATES,
        *,
        num_classes_per_batch: int | None = 10,
        device: str | torch.device | None = None,
        progress: bool | None = None,
        allow_duplicates: bool = False,
    ) -> ContextBank:
        """The context bank of an open_clip model: one direction per template, averaged over ``classnames``.

        ``scale = exp(model.logit_scale)``. Encodes ``C × M`` prompts with
        :func:`~clipood_plugin.text_head.encode_prompts` (same arguments); to get the class head from
        the same pass use :func:`build_head_and_context_bank`. ``classnames`` follow the class-name
        rule of :mod:`clipood_plugin.classnames`, as in ``TextHead.from_open_clip``: a repeat is an
        error unless ``allow_duplicates`` (a repeated class then counts twice in each average).
        """
        emb, _, temps, scale = _encode_for_bank(
            model,
            tokenizer,
            classnames,
            templates,
            num_classes_per_batch=num_classes_per_batch,
            device=device,
            progress=progress,
            allow_duplicates=allow_duplicates,
        )
        return cls.from_prompt_embeddings(emb, scale=scale, templates=temps)


def build_head_and_context_bank(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Iterable[str],
    templates: str | Template | Sequence[Template] = DEFAULT_CONTEXT_TEMPLATES,
    *,
    num_classes_per_batch: int | None = 10,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    allow_duplicates: bool = False,
) -> tuple[TextHead, ContextBank]:
    """Encode the ``C × M`` prompts once; return the zero-shot class head and the context bank.

    Both are reductions of the same ``[C, M, D]`` normalised prompt embeddings
    (:func:`~clipood_plugin.text_head.encode_prompts`): the class head averages over templates
    (one row per class, as ``TextHead.from_open_clip`` and open_clip's
    ``build_zero_shot_classifier``), the context bank over classes (one row per template). Both get
    ``scale = exp(model.logit_scale)``.

    Class names are cleaned (``_`` → space) for the prompts and must be unique after cleaning
    unless ``allow_duplicates`` (:mod:`clipood_plugin.classnames`); the head keeps them as given.
    """
    emb, names, temps, scale = _encode_for_bank(
        model,
        tokenizer,
        classnames,
        templates,
        num_classes_per_batch=num_classes_per_batch,
        device=device,
        progress=progress,
        allow_duplicates=allow_duplicates,
    )
    head = TextHead(emb.mean(dim=1), scale=scale, classnames=names, templates=temps,
                    allow_duplicates=allow_duplicates)
    return head, ContextBank.from_prompt_embeddings(emb, scale=scale, templates=temps)


def _encode_for_bank(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Iterable[str],
    templates: str | Template | Sequence[Template],
    *,
    num_classes_per_batch: int | None,
    device: str | torch.device | None,
    progress: bool | None,
    allow_duplicates: bool,
) -> tuple[Tensor, list[str], tuple[Template, ...], float]:
    """Validate, then encode: ``([C, M, D] embeddings, class names as given, templates, exp(logit_scale))``."""
    names = check_classnames(classnames, allow_duplicates=allow_duplicates, what="ContextBank")
    cleaned = [clean_classname(n) for n in names]
    temps = get_templates(templates)
    if len(temps) < 2:
        raise ValueError(
            f"a context bank needs at least 2 templates, got {len(temps)}: the contexts are the templates "
            f"(default {DEFAULT_CONTEXT_TEMPLATES!r})"
        )
    net = unwrap_model(model)
    logit_scale = getattr(net, "logit_scale", None)
    if not isinstance(logit_scale, Tensor):
        raise ValueError(
            f"{type(net).__name__} has no logit_scale tensor; build the bank with encode_prompts() and "
            "ContextBank.from_prompt_embeddings(embeddings, scale=...) instead"
        )
    scale = logit_scale.detach().exp().item()  # as TextHead.from_open_clip, so head and bank agree
    emb = encode_prompts(
        net,
        tokenizer,
        cleaned,
        temps,
        num_classes_per_batch=num_classes_per_batch,
        device=device,
        progress=progress,
    )
    return emb, names, temps, scale


class HeadCrossEntropy(nn.Module):
    """Cross-entropy on a head's logits, ``loss(f, y) = CE(head(f), y)``: the plain classification term.

    ``head`` is any module mapping image features to logits: a frozen
    :class:`~clipood_plugin.TextHead`, or a trainable ``nn.Linear`` initialised from the zero-shot
    weights as in WiSE-FT-style end-to-end fine-tuning. ``target`` is class indices ``[B]`` or
    soft targets ``[B, C]``, as ``F.cross_entropy``.
    """

    def __init__(self, head: nn.Module, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not isinstance(head, nn.Module):
            raise TypeError(
                f"head must be an nn.Module mapping features to logits, got {type(head).__name__}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.head = head
        self.label_smoothing = float(label_smoothing)

    def forward(self, image_features: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.head(image_features), target, label_smoothing=self.label_smoothing)


class CARFTLoss(nn.Module):
    """Classification loss + λ_ctx · KL between pretrained and fine-tuned context distributions (CAR-FT).

    ``total = classification_loss(f, y) + weight · mean_batch KL(P_ctx(f_0) ‖ P_ctx(f))`` with
    ``P_ctx(f) = softmax_m(s · cos(f, w_m))`` over the context bank, ``f`` the fine-tuned tower's
    features and ``f_0`` the pretrained tower's for the same images (no gradient). See the module
    docstring for which parts are the paper's and which are our reading.

    Args:
        classification_loss: any callable ``loss(image_features, target)`` returning a scalar
            tensor (a one-entry mapping such as ``MMSLoss(..., output_dict=True)``'s is accepted):
            :class:`HeadCrossEntropy` for CAR-FT's plain cross-entropy, or an
            :class:`~clipood_plugin.MMSLoss` to combine CAR-FT with CLIPood's margin.
        context_bank: the :class:`ContextBank`.
        weight: λ_ctx ≥ 0 (default :data:`DEFAULT_CARFT_WEIGHT` = 1.0, not confirmed from the paper).
        kl_direction: ``"zs_ft"`` (default) = KL(p_zs ‖ p_ft), the pretrained distribution as the
            target, as in distillation; ``"ft_zs"`` = KL(p_ft ‖ p_zs).
        pretrained_tower: the image tower *before fine-tuning*, to compute ``f_0`` from images.
            A frozen deep copy is kept (eval mode, no grad, kept in eval by ``.train()``; wrappers
            seen through); construct the loss before the first optimizer step. ``None`` when
            ``f_0`` is always passed in.
        scale: the context softmax's logit multiplier; default the bank's (CLIP's ``exp(logit_scale)``).
        copy_pretrained: False keeps ``pretrained_tower`` itself instead of a copy (for a tower
            that is already a separate frozen module, or one deepcopy cannot copy); it is still
            frozen and put in eval mode.
        output_dict: default for ``forward``'s ``output_dict``.

    ``forward(image_features, target, *, images=None, pretrained_features=None, output_dict=None)``:

    - ``image_features`` ``[B, D]``: the fine-tuned tower's output for the batch (need not be
      normalised); ``target``: whatever ``classification_loss`` takes.
    - Exactly one of
        * ``images``: the same batch's images; ``f_0`` is computed by the frozen pretrained tower
          under ``no_grad`` (needs ``pretrained_tower``), or
        * ``pretrained_features`` ``[B, D]``: ``f_0`` computed elsewhere (cached once per sample
          for a fixed-view dataset, or by a pretrained tower on another device). It is detached.
          With random augmentation it must come from the same augmented view as ``image_features``.
      Both paths give the same loss for the same ``f_0``.
    - Returns the total loss, or with ``output_dict=True``
      ``{"classification_loss", "carft_kl", "loss"}`` (``loss`` is the total).

    The KL is computed in float32 (float64 for float64 features) with autocast off.
    """

    def __init__(
        self,
        classification_loss: Callable[[Tensor, Tensor], Tensor | Mapping[str, Tensor]],
        context_bank: ContextBank,
        weight: float = DEFAULT_CARFT_WEIGHT,
        kl_direction: KLDirection = "zs_ft",
        pretrained_tower: nn.Module | None = None,
        scale: float | None = None,
        *,
        copy_pretrained: bool = True,
        output_dict: bool = False,
    ) -> None:
        super().__init__()
        if not callable(classification_loss):
            raise TypeError(
                f"classification_loss must be callable as loss(image_features, target), got "
                f"{type(classification_loss).__name__}"
            )
        if not isinstance(context_bank, ContextBank):
            raise TypeError(f"context_bank must be a ContextBank, got {type(context_bank).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 <= weight < math.inf):
            raise ValueError(f"weight (λ_ctx) must be a non-negative finite number, got {weight!r}")
        if kl_direction not in _KL_DIRECTIONS:
            raise ValueError(f"kl_direction must be one of {_KL_DIRECTIONS}, got {kl_direction!r}")
        self.classification_loss = classification_loss
        self.context_bank = context_bank
        self.weight = float(weight)
        self.kl_direction: KLDirection = kl_direction
        self.scale = None if scale is None else _check_scale(scale)
        self.output_dict = output_dict
        self.pretrained_tower: nn.Module | None = None
        if pretrained_tower is not None:
            if not isinstance(pretrained_tower, nn.Module):
                raise TypeError(
                    f"pretrained_tower must be an nn.Module, got {type(pretrained_tower).__name__}"
                )
            tower = unwrap_model(pretrained_tower)
            tower = copy.deepcopy(tower) if copy_pretrained else tower
            tower.requires_grad_(False)
            self.pretrained_tower = tower.eval()

    def extra_repr(self) -> str:
        scale = "bank" if self.scale is None else f"{self.scale:.4g}"
        return f"weight={self.weight}, kl_direction={self.kl_direction!r}, scale={scale}"

    def train(self, mode: bool = True) -> CARFTLoss:
        super().train(mode)
        if self.pretrained_tower is not None:
            self.pretrained_tower.eval()  # the reference distribution never sees dropout
        return self

    @torch.no_grad()
    def encode_pretrained(self, images: Tensor) -> Tensor:
        """``f_0``: the frozen pretrained tower's features for ``images`` (no grad)."""
        if self.pretrained_tower is None:
            raise ValueError(
                "images= needs the pretrained image tower: build CARFTLoss(..., pretrained_tower=tower) "
                "before fine-tuning starts, or pass pretrained_features= instead"
            )
        feats = self.pretrained_tower(images)
        if not isinstance(feats, Tensor):
            raise TypeError(
                f"the pretrained tower returned {type(feats).__name__}, expected a [B, D] feature tensor"
            )
        return feats

    def context_kl(self, image_features: Tensor, pretrained_features: Tensor) -> Tensor:
        """The regulariser alone: batch-mean KL between the two context distributions."""
        if image_features.dim() != 2:
            raise ValueError(f"image_features must be [B, D], got shape {tuple(image_features.shape)}")
        if pretrained_features.shape != image_features.shape:
            raise ValueError(
                f"pretrained features {tuple(pretrained_features.shape)} and fine-tuned features "
                f"{tuple(image_features.shape)} must have the same [B, D] shape"
            )
        if image_features.shape[0] == 0:
            raise ValueError("empty batch: image_features has 0 rows")
        log_ft = self.context_bank.log_distribution(image_features, self.scale)
        log_zs = self.context_bank.log_distribution(pretrained_features.detach(), self.scale).to(log_ft.dtype)
        if self.kl_direction == "zs_ft":
            kl = (log_zs.exp() * (log_zs - log_ft)).sum(dim=-1)
        else:
            kl = (log_ft.exp() * (log_ft - log_zs)).sum(dim=-1)
        return kl.mean()

    def forward(
        self,
        image_features: Tensor,
        target: Tensor,
        *,
        images: Tensor | None = None,
        pretrained_features: Tensor | None = None,
        output_dict: bool | None = None,
    ) -> Tensor | dict[str, Tensor]:
        if (images is None) == (pretrained_features is None):
            raise ValueError(
                "pass exactly one of images= (run through the frozen pretrained tower) or "
                "pretrained_features= (the pretrained tower's features, computed elsewhere)"
            )
        reference = self.encode_pretrained(images) if images is not None else pretrained_features
        assert reference is not None
        kl = self.context_kl(image_features, reference)
        cls_loss = self._classification(image_features, target)
        total = cls_loss + self.weight * kl
        if self.output_dict if output_dict is None else output_dict:
            return {"classification_loss": cls_loss, "carft_kl": kl, "loss": total}
        return total

    def _classification(self, image_features: Tensor, target: Tensor) -> Tensor:
        out = self.classification_loss(image_features, target)
        if isinstance(out, Mapping):
            if len(out) != 1:
                raise TypeError(
                    f"classification_loss returned a mapping with keys {sorted(out)}; give one that returns "
                    "a scalar tensor (or a one-entry mapping)"
                )
            out = next(iter(out.values()))
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"classification_loss must return a scalar tensor, got {shape}")
        return out
