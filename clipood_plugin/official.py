"""The official CLIPood training numerics: fp16 weights, no fp32 master copy, round back each step.

The official code (``thuml/CLIPood``, ``engine.py`` ``train``) fine-tunes OpenAI CLIP in the
precision ``clip.load`` gives it on a GPU, and each step does:

1. forward with fp16 weights and no autocast (CLIP's LayerNorm computes in fp32 and casts back);
   the MMS logits are fp16 and the cross-entropy takes them as they are;
2. backward with no loss scaling (small fp16 gradients underflow to 0);
3. ``convert_models_to_fp32``: every parameter and gradient cast to fp32;
4. ``optimizer.step()``: AdamW in fp32 (its moments are created in fp32 at the first step);
5. ``clip.model.convert_weights``: the weights rounded back to fp16.

So there are no master weights: an fp16 weight only moves when its AdamW update is larger than
half its ulp. At the paper's lr 5e-6 an update is about 5e-6 (Adam's normalised step is ≈ ±lr),
so every fp16 weight with ``|w| > 2^-6`` never changes at all, weight decay (``lr·wd·w``) is
rounded away, and only the small weights and the fp32 LayerNorms and embeddings train. A run with
fp32 master weights (our ``clean`` numerics, the default elsewhere) trains far more at the same
lr, which is better fine-tuning but not the paper's experiment. docs/numerics.md has the measured
fraction of weights that move.

This module gives the two pieces, usable outside our recipe:

- :func:`to_official_precision` casts a tower (or a whole CLIP model) the way OpenAI CLIP's
  ``convert_weights`` does, and makes its LayerNorms compute in fp32 and its input fp16;
- :class:`OfficialPrecisionStep` wraps the optimizer step in the cast / step / round-back.

With them, ``MMSLoss(..., precision="input")`` (fp16 logits) and
``BetaMovingAverage(..., storage="param")`` (the fp16 average with the official update), a step
is bitwise the official one when the tower is the official class (``benchmarks/official_parity.py``
checks it against the official ``engine.train``, imported live).

The trap: the precision lives in the tensors, so anything that re-creates the parameters (a
``.float()`` call, ``load_state_dict`` into an fp32 copy, an optimizer built on another copy)
silently leaves the official numerics. :class:`OfficialPrecisionStep` checks the dtypes it was
built with at every step and raises if they changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "OfficialPrecisionStep",
    "is_official_precision",
    "official_text_features",
    "official_transforms",
    "to_official_precision",
]

#: The attributes OpenAI CLIP's ``convert_weights`` casts on ``nn.MultiheadAttention``.
_MHA_TENSORS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")
#: Bare ``nn.Parameter`` projections it casts on any module that has them.
_PROJECTIONS = ("text_projection", "proj")
_MARK = "_clipood_official_precision"


def _low_precision_tensors(module: nn.Module) -> Iterator[Tensor]:
    """The tensors of ``module`` itself (not its children) that ``convert_weights`` makes fp16."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):  # MHA's out_proj is an nn.Linear
        yield module.weight
        if module.bias is not None:
            yield module.bias
    if isinstance(module, nn.MultiheadAttention):
        for name in _MHA_TENSORS:
            tensor = getattr(module, name, None)
            if tensor is not None:
                yield tensor
    for name in _PROJECTIONS:
        tensor = module._parameters.get(name)  # only bare Parameters: `proj` may be a submodule elsewhere
        if tensor is not None:
            yield tensor


def _module_half_tensors(model: nn.Module) -> Iterator[Tensor]:
    for module in model.modules():
        yield from _low_precision_tensors(module)


def _layer_norm_in(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    module._clipood_input_dtype = x.dtype  # type: ignore[assignment]
    return (x.float(), *args[1:])


def _layer_norm_out(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    return output.to(module._clipood_input_dtype)  # type: ignore[arg-type]


def _tower_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # The official README patches CLIP's VisionTransformer.forward to cast the image batch to the
    # conv weight's dtype (openai/CLIP#386); a pre-hook does the same without touching the class.
    ref = getattr(module, "_clipood_input_ref", None)
    if ref is not None and args and isinstance(args[0], Tensor) and args[0].is_floating_point():
        return (args[0].to(ref.dtype), *args[1:])
    return args


@torch.no_grad()
def to_official_precision(model: nn.Module) -> nn.Module:
    """Cast ``model`` in place as OpenAI CLIP's ``convert_weights`` does and return it.

    fp16: the weight and bias of every Conv1d/Conv2d/Linear (attention ``out_proj`` included),
    ``nn.MultiheadAttention``'s input projections and biases, and bare ``proj`` /
    ``text_projection`` parameters. fp32: everything else (LayerNorms, class and positional
    embeddings, the token embedding, ``logit_scale``). Every ``nn.LayerNorm`` then computes in
    fp32 and casts its output back to its input's dtype, as CLIP's own ``LayerNorm`` does, and the
    model casts a floating-point input to fp16 (the official README's patch to
    ``VisionTransformer.forward``).

    Works on an open_clip image tower (``model.visual``), a timm-free OpenAI ``VisionTransformer``,
    or a whole CLIP model (the text side then encodes in fp16 as the official
    ``get_text_features``). Calling it twice is harmless. Use :class:`OfficialPrecisionStep` for
    the optimizer step, and run the forward without autocast.
    """
    if getattr(model, _MARK, False):
        return model
    first_half: Tensor | None = None
    for module in model.modules():
        for tensor in _low_precision_tensors(module):
            tensor.data = tensor.data.half()
            first_half = tensor if first_half is None else first_half
        if isinstance(module, nn.LayerNorm) and not getattr(module, _MARK, False):
            module.register_forward_pre_hook(_layer_norm_in)
            module.register_forward_hook(_layer_norm_out)
            setattr(module, _MARK, True)
    visual = getattr(model, "visual", None)  # a whole CLIP model: its image tower casts its input too
    for tower in (model, visual) if isinstance(visual, nn.Module) else (model,):
        # the input follows the first fp16 weight (the patch embedding of a ViT), as the README patch
        tower._clipood_input_ref = next((t for t in _module_half_tensors(tower)), first_half)
        tower.register_forward_pre_hook(_tower_input)
        setattr(tower, _MARK, True)
    return model


def is_official_precision(model: nn.Module) -> bool:
    """Whether :func:`to_official_precision` was applied to ``model``."""
    return bool(getattr(model, _MARK, False))


class OfficialPrecisionStep:
    """The official optimizer step for a model in :func:`to_official_precision`: cast up, step, round back.

    ``step()`` does what ``engine.py`` does around ``optimizer.step()``: every parameter of the
    model and its gradient go to fp32 (``convert_models_to_fp32``), the optimizer steps (its state
    is created in, and stays, fp32), and the parameters that were fp16 are rounded back to fp16
    (``convert_weights``); their gradients follow, so parameter and gradient dtypes agree again.
    There are no master weights and no loss scaling, on purpose: see the module docstring.

    Args:
        optimizer: the optimizer over (some of) the model's parameters, e.g. ``AdamW``.
        model: the module passed to :func:`to_official_precision` (the tower).

    Use it in place of ``optimizer.step()``::

        loss.backward()
        stepper.step()          # fp32 cast, AdamW, round back to fp16
        optimizer.zero_grad()
        scheduler.step(); bma.update_parameters(tower)

    ``zero_grad``, ``state_dict`` and ``param_groups`` stay the optimizer's own. Unlike the official
    ``convert_models_to_fp32``, a frozen parameter (``grad is None``) is allowed: it is cast and
    rounded back unchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        if not is_official_precision(model):
            raise ValueError("OfficialPrecisionStep needs a model cast with to_official_precision(model) first")
        self.optimizer = optimizer
        self.model = model
        self._params = list(model.parameters())
        self._dtypes = [p.dtype for p in self._params]
        in_model = {id(p) for p in self._params}
        stray = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in in_model)
        if stray:
            raise ValueError(f"the optimizer holds {stray} parameters that are not the model's")

    @torch.no_grad()
    def step(self) -> None:
        for param, dtype in zip(self._params, self._dtypes):
            if param.dtype != dtype:
                raise RuntimeError(
                    f"a parameter of the official-precision model is {param.dtype}, was {dtype}: something "
                    "re-cast the model after OfficialPrecisionStep was built"
                )
            param.data = param.data.float()
            if param.grad is not None:
                param.grad.data = param.grad.data.float()
        self.optimizer.step()
        for param, dtype in zip(self._params, self._dtypes):
            if dtype != torch.float32:
                param.data = param.data.to(dtype)
                if param.grad is not None:
                    param.grad.data = param.grad.data.to(dtype)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


@torch.no_grad()
def official_text_features(model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device | str) -> Tensor:
    """Class text features ``[C, D]`` as the official ``get_text_features``: fp16, not normalised here.

    ``model`` is a whole open_clip CLIP model already cast with :func:`to_official_precision` (so
    its text side runs in fp16); one prompt per class (the official code uses a single template).
    Hand the result to ``MMSLoss(..., precision="input")``, which normalises it in fp16 as the
    official code does.
    """
    if not is_official_precision(model):
        raise ValueError("official_text_features needs the CLIP model cast with to_official_precision(model)")
    was_training = model.training
    model.eval()
    try:
        tokens = tokenizer(prompts).to(device)
        return model.encode_text(tokens)
    finally:
        model.train(was_training)


#: CLIP's normalisation, which the official transforms use (``converter_domainbed.py`` / ``converter_dassl.py``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def official_transforms(tower: nn.Module | None = None, image_size: int | None = None) -> tuple[Any, Any]:
    """The official training and evaluation transforms, built from torchvision: ``(train, eval)``.

    Training: ``RandomResizedCrop(size, scale=(0.7, 1.0))`` (default ratio, bilinear),
    ``RandomHorizontalFlip()``, ``ToTensor()``, CLIP mean/std. Evaluation: ``Resize(size)`` (shorter
    side, bilinear), ``CenterCrop(size)``, ``ToTensor()``, CLIP mean/std. No colour jitter or
    grayscale (DomainBed's defaults, which the official README replaces), no bicubic (CLIP's own
    preprocess). ``size`` is ``image_size`` or the tower's ``image_size`` (open_clip sets it); the
    mean/std are the tower's ``image_mean`` / ``image_std`` when it has them (CLIP's otherwise), so
    a model trained with another normalisation keeps it.
    """
    from torchvision import transforms as T

    size = image_size
    if size is None and tower is not None:
        size = getattr(tower, "image_size", None)
        size = size[0] if isinstance(size, (tuple, list)) else size
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"official_transforms needs an image size: pass image_size= (the tower has {size!r})")
    mean = tuple(getattr(tower, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(tower, "image_std", None) or CLIP_STD)
    normalize = T.Normalize(mean, std)
    train = T.Compose([T.RandomResizedCrop(size, scale=(0.7, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    evaluation = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), normalize])
    return train, evaluation
