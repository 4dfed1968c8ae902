"""TextHead: CLIP's zero-shot head as a frozen, normalised prompt-embedding classifier.

CLIPood classifies with, and takes its margins from, the text embeddings of one prompt per class,
computed once by the frozen text tower (docs/official_code.md §2.1; official ``main.py:49-51``). The
head holds those embeddings as a persistent ``[C, D]`` buffer (``nn.Linear`` orientation, like
timm heads and WiSE-FT) together with the logit multiplier ``s = exp(logit_scale)``, and maps image
features to scaled cosine logits ``s · cos(f, T_c)``. :class:`~clipood_plugin.MMSLoss` reads its
``weight`` and ``scale``.

:meth:`TextHead.from_open_clip` reproduces open_clip's ``build_zero_shot_classifier`` numerics:
encode every (class, template) prompt with ``normalize=True``, average over templates and
re-normalise, batching over classes the same way. open_clip returns ``[D, C]``;
:meth:`TextHead.as_open_clip` gives that orientation back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipood_plugin._io import atomic_path
from clipood_plugin._precision import autocast_off, compute_dtype
from clipood_plugin._wrappers import unwrap_model
from clipood_plugin.classnames import check_classnames, clean_classname
from clipood_plugin.templates import (
    DEFAULT_TEMPLATE,
    Template,
    get_templates,
    render_template,
    template_text,
)

__all__ = ["FORMAT_VERSION", "TextHead", "encode_prompts"]

#: Version of the safetensors layout written by :meth:`TextHead.save`.
FORMAT_VERSION = 1
_FORMAT_NAME = "clipood_plugin.TextHead"
#: ``progress=None`` shows a bar once there are more prompts than this.
_PROGRESS_MIN_PROMPTS = 500
#: Loaded / cached weights must have rows this close to unit norm.
_UNIT_NORM_TOL = 1e-3


def encode_prompts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Iterable[str],
    templates: str | Template | Sequence[Template],
    *,
    num_classes_per_batch: int | None = 10,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Encode every (class, template) prompt with a CLIP text tower; return ``[C, M, D]`` float32.

    Each prompt embedding is L2-normalised (``encode_text(tokens, normalize=True)``); nothing is
    averaged, so callers choose the reduction: :meth:`TextHead.from_open_clip` averages over
    templates (dim 1), a context bank such as CAR-FT's averages over classes (dim 0).

    Args:
        model: an open_clip-style model with ``encode_text(tokens, normalize=...)``; DDP /
            ``torch.compile`` wrappers are looked through. It is put in eval mode for the call and
            every submodule's previous train/eval flag is restored afterwards.
        tokenizer: maps a list of strings to a LongTensor of token ids (``open_clip.get_tokenizer``).
        classnames: class names; each is cleaned with
            :func:`~clipood_plugin.classnames.clean_classname` (``_`` → space, strip). Repeats are
            encoded as given: the classifiers built from the result (``TextHead.from_open_clip``,
            ``ContextBank.from_open_clip``) apply the duplicate rule.
        templates: anything :func:`~clipood_plugin.templates.get_templates` accepts.
        num_classes_per_batch: classes encoded per forward (each batch holds
            ``classes × templates`` prompts), as open_clip; ``None`` or 0 encodes all at once.
        device: where the tokens go; default the model's (first parameter's) device.
        progress: show a rich progress bar; ``None`` shows one when there are more than 500
            prompts.

    Runs under ``torch.no_grad()``. An enclosing autocast context applies to the encoding; the
    result is upcast to float32 (and re-normalised there when the model ran in lower precision).
    """
    names = [clean_classname(n) for n in check_classnames(classnames, allow_duplicates=True, what="encode_prompts")]
    temps = get_templates(templates)
    if num_classes_per_batch is not None and (
        isinstance(num_classes_per_batch, bool)
        or not isinstance(num_classes_per_batch, int)
        or num_classes_per_batch < 0
    ):
        raise ValueError(
            f"num_classes_per_batch must be a non-negative int or None, got {num_classes_per_batch!r}"
        )
    net = unwrap_model(model)
    if not callable(getattr(net, "encode_text", None)):
        raise TypeError(f"{type(net).__name__} has no encode_text(); expected an open_clip CLIP model")
    if device is None:
        device = _module_device(net)
    step = num_classes_per_batch or len(names)
    chunks = [names[i : i + step] for i in range(0, len(names), step)]
    show = len(names) * len(temps) > _PROGRESS_MIN_PROMPTS if progress is None else bool(progress)

    modes = {module: module.training for module in net.modules()}
    net.eval()
    out: list[Tensor] = []
    try:
        with torch.no_grad(), _progress_bar(show, len(names), "Encoding class prompts") as advance:
            for chunk in chunks:
                texts = [render_template(t, name) for name in chunk for t in temps]
                tokens = tokenizer(texts).to(device)
                emb = net.encode_text(tokens, normalize=True)
                if emb.dtype != torch.float32:
                    emb = F.normalize(emb.float(), dim=-1)
                out.append(emb.reshape(len(chunk), len(temps), -1))
                advance(len(chunk))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return torch.cat(out, dim=0)


def normalize_rows(rows: Tensor, name: str, row_meaning: str, shape: str = "[N, D]") -> Tensor:
    """Validate a ``[N, D]`` float tensor and return its rows L2-normalised, stored in float32.

    Normalised in float64 (float32 on MPS, which has none) so the stored rows are the correctly
    rounded unit vectors. Shared by :class:`TextHead` and the CAR-FT context bank.
    """
    if not isinstance(rows, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(rows).__name__}")
    if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D {shape} tensor, got shape {tuple(rows.shape)}")
    if not rows.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {rows.dtype}")
    r = rows.detach()
    finite = torch.isfinite(r).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{name} has non-finite (NaN/Inf) values in rows {torch.nonzero(~finite).flatten().tolist()}")
    r = r.to(torch.float32 if r.device.type == "mps" else torch.float64)
    norms = r.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        bad = torch.nonzero(norms.flatten() == 0).flatten().tolist()
        raise ValueError(f"{name} has zero-norm rows {bad}; {row_meaning} cannot be normalised")
    return (r / norms).to(torch.float32)


def scaled_cosine(features: Tensor, rows: Tensor, scale: Tensor | float, owner: str) -> Tensor:
    """``s · cos(f, rows)``: ``[..., N]`` logits for features ``[..., D]`` (need not be normalised).

    Computed in float32 (float64 for float64 input) with autocast off: logits at scale ~100 are
    differences of near-equal cosines, which bf16/fp16 would blur.
    """
    if features.dim() == 0 or features.shape[-1] != rows.shape[1]:
        got = features.shape[-1] if features.dim() else "none (0-dim input)"
        raise ValueError(
            f"image feature dimension {got} does not match {owner} embedding dimension "
            f"{rows.shape[1]} (input shape {tuple(features.shape)})"
        )
    dtype = compute_dtype(features.dtype)
    with autocast_off(features.device.type):
        logits = F.normalize(features.to(dtype), dim=-1) @ rows.to(dtype).t()
        return logits * (scale.to(dtype) if isinstance(scale, Tensor) else scale)


class TextHead(nn.Module):
    """A frozen zero-shot classifier: scaled cosine similarity to fixed class text embeddings.

    ``logits = s · normalize(f) @ Tᵀ``, with ``T`` the ``[C, D]`` class embeddings (rows
    L2-normalised) and ``s`` the logit multiplier, CLIP's ``exp(logit_scale)`` ≈ 100 (a multiplier,
    not the log and not a temperature divisor).

    Args:
        weight: ``[C, D]`` class text embeddings. Rows are L2-normalised (computed in float64,
            stored in float32) into the persistent buffer ``weight``.
        scale: the logit multiplier ``s > 0``, stored as the persistent 0-dim float32 buffer
            ``scale``.
        classnames: optional class names, one per row, checked by
            :func:`~clipood_plugin.classnames.check_classnames`: non-empty, and no two equal after
            cleaning unless ``allow_duplicates``.
        templates: optional prompt templates the embeddings came from (metadata only; callables
            are stored in their canonical text form, see
            :func:`~clipood_plugin.templates.template_text`).

    Both buffers are in ``state_dict`` and never require grad, so the head travels with a
    checkpoint and an optimiser over ``model.parameters()`` never touches it.
    """

    weight: Tensor
    scale: Tensor

    def __init__(
        self,
        weight: Tensor,
        scale: float | Tensor = 100.0,
        classnames: Sequence[str] | None = None,
        templates: Sequence[Template] | None = None,
        *,
        allow_duplicates: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", normalize_rows(weight, "weight", "a class embedding", "[C, D]"))
        w = self.weight
        self.register_buffer("scale", torch.tensor(_check_scale(scale), dtype=torch.float32, device=w.device))
        self.classnames: tuple[str, ...] | None = None
        if classnames is not None:
            self.classnames = _check_head_classnames(classnames, weight.shape[0], allow_duplicates)
        self.templates: tuple[str, ...] | None = None
        if templates is not None:
            self.templates = _canonical_templates(templates)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[1]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, scale={float(self.scale):.4g}"

    def forward(self, image_features: Tensor) -> Tensor:
        """Scaled cosine logits ``[..., C]`` for image features ``[..., D]`` (need not be normalised).

        Computed in float32 (float64 for float64 input) with autocast off: logits at scale ~100 are
        differences of near-equal cosines, which bf16/fp16 would blur.
        """
        return scaled_cosine(image_features, self.weight, self.scale, "the TextHead")

    def subset(self, indices: Sequence[int] | Tensor) -> TextHead:
        """A new head with only the rows (and class names) at ``indices``, in that order.

        Used to train on the base classes of a base-to-new split; targets then index the subset.
        The selected rows are copied bitwise.
        """
        idx = torch.as_tensor(indices)
        if idx.numel() == 0:
            raise ValueError("subset indices are empty")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"subset indices must be integers, got dtype {idx.dtype}")
        if idx.dim() > 1:
            raise ValueError(f"subset indices must be 1-D, got shape {tuple(idx.shape)}")
        idx = idx.reshape(-1).long().cpu()
        bad = idx[(idx < 0) | (idx >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"subset indices {bad.tolist()} are out of range [0, {self.num_classes})")
        values, counts = idx.unique(return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"subset indices contain duplicates: {values[counts > 1].tolist()}")
        weight = self.weight.index_select(0, idx.to(self.weight.device))
        names = None if self.classnames is None else tuple(self.classnames[i] for i in idx.tolist())
        return type(self)._from_normalized(weight, self.scale, names, self.templates, allow_duplicates=True)

    def as_open_clip(self) -> Tensor:
        """The class embeddings as ``[D, C]`` (a copy), the orientation open_clip's zero-shot code uses."""
        return self.weight.detach().t().clone(memory_format=torch.contiguous_format)

    @classmethod
    def from_open_clip(
        cls,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        classnames: Sequence[str],
        templates: str | Template | Sequence[Template] = (DEFAULT_TEMPLATE,),
        *,
        num_classes_per_batch: int | None = 10,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        allow_duplicates: bool = False,
    ) -> TextHead:
        """Build the zero-shot head of an open_clip model, as ``build_zero_shot_classifier`` does.

        Class embedding = mean over templates of the normalised prompt embeddings
        (:func:`encode_prompts`), re-normalised; ``scale = exp(model.logit_scale)``. CLIPood's
        default is one template, ``"a photo of a {}."`` (docs/official_code.md §2.1).

        ``classnames`` are cleaned (``_`` → space, strip) for the prompts and must be non-empty and
        unique after cleaning (``allow_duplicates=True`` accepts repeats: ImageNet's standard list
        names "missile" and "sunglasses" twice; identical prompts then give tied logits, as in the
        official code); the head keeps them as given. ``templates`` is anything
        :func:`~clipood_plugin.templates.get_templates` accepts (a preset name, a template, a
        sequence of strings or callables).

        With ``cache_dir``, the result is stored as ``<cache_dir>/text_head-<key16>.safetensors``,
        keyed by a SHA-256 over the text tower's weights (every ``state_dict`` entry outside
        ``visual.``), the model and tokenizer types, the cleaned class names, the template texts and
        the rendered prompts; a later call with the same inputs loads it instead of encoding.
        Batch size and device are not part of the key.

        The head is returned on the device the prompts were encoded on.
        """
        names = tuple(check_classnames(classnames, allow_duplicates=allow_duplicates, what="TextHead.from_open_clip"))
        cleaned = [clean_classname(n) for n in names]
        temps = get_templates(templates)
        texts = tuple(template_text(t) for t in temps)
        net = unwrap_model(model)
        logit_scale = getattr(net, "logit_scale", None)
        if not isinstance(logit_scale, Tensor):
            raise ValueError(
                f"{type(net).__name__} has no logit_scale tensor; build the head with "
                "encode_prompts() and TextHead(weight, scale=...) instead"
            )
        scale = logit_scale.detach().exp().item()
        if device is None:
            device = _module_device(net)

        cache_file: Path | None = None
        key = ""
        if cache_dir is not None:
            key = _cache_key(net, tokenizer, cleaned, temps, texts)
            cache_file = Path(cache_dir) / f"text_head-{key[:16]}.safetensors"
            cached = _read_cached_weight(cache_file, key, len(cleaned))
            if cached is not None:
                return cls._from_normalized(cached.to(device), scale, names, texts, allow_duplicates)

        emb = encode_prompts(
            net,
            tokenizer,
            cleaned,
            temps,
            num_classes_per_batch=num_classes_per_batch,
            device=device,
            progress=progress,
        )
        weight = emb.mean(dim=1)
        weight = weight / weight.norm(dim=1, keepdim=True)
        head = cls._from_normalized(weight, scale, names, texts, allow_duplicates)
        if cache_file is not None:
            head._write(cache_file, {"cache_key": key})
        return head

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the head to a safetensors file, atomically.

        Tensors ``weight`` [C, D] and ``scale`` []; class names and templates go as JSON strings in
        the file's metadata with ``format`` and ``format_version``.
        """
        self._write(Path(path), {})

    @classmethod
    def load(cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> TextHead:
        """Read a head written by :meth:`save` (no unpickling); weights are restored bitwise."""
        weight, scale, names, templates, _ = _read_file(Path(path))
        return cls._from_normalized(weight, scale, names, templates, allow_duplicates=True).to(map_location)

    # -- internals -----------------------------------------------------------------------------

    @classmethod
    def _from_normalized(
        cls,
        weight: Tensor,
        scale: float | Tensor,
        classnames: Sequence[str] | None,
        templates: Sequence[Template] | None,
        allow_duplicates: bool = False,
    ) -> TextHead:
        """Build a head that keeps ``weight`` exactly, for rows that are already unit-norm.

        Re-normalising is not idempotent in floating point, so loading, subsetting and the
        open_clip-parity path copy the given rows in instead of normalising them again.
        """
        head = cls(weight, scale, classnames, templates, allow_duplicates=allow_duplicates)
        norms = weight.detach().double().norm(dim=1)
        worst = float((norms - 1).abs().max())
        if worst > _UNIT_NORM_TOL:
            raise ValueError(f"class embeddings are not unit-norm (largest |norm - 1| = {worst:.3g})")
        with torch.no_grad():
            head.weight.copy_(weight.detach().to(torch.float32))
        return head

    def _write(self, path: Path, extra_metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        metadata = {
            "format": _FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "classnames": json.dumps(None if self.classnames is None else list(self.classnames)),
            "templates": json.dumps(None if self.templates is None else list(self.templates)),
            **extra_metadata,
        }
        tensors = {
            "weight": self.weight.detach().cpu().contiguous(),
            "scale": self.scale.detach().cpu().contiguous(),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)


# -- helpers ---------------------------------------------------------------------------------------


def _check_scale(scale: float | Tensor) -> float:
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a single number, got a tensor of shape {tuple(scale.shape)}")
        value = float(scale.detach().item())
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        value = float(scale)
    else:
        raise TypeError(f"scale must be a float or a one-element tensor, got {type(scale).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"scale must be a positive finite logit multiplier (CLIP's exp(logit_scale) ≈ 100), got {value}"
        )
    return value


def _canonical_templates(templates: Sequence[Template]) -> tuple[str, ...]:
    """Templates as metadata: canonical texts, with no ``{}`` requirement (a callable may lack one)."""
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise TypeError(
            f"templates must be a sequence of strings or callables, got {type(templates).__name__}"
        )
    if len(templates) == 0:
        raise ValueError("templates is empty; pass None when the templates are unknown")
    for i, template in enumerate(templates):
        if not (isinstance(template, str) or callable(template)):
            raise TypeError(f"template {i} must be a string or a callable, got {type(template).__name__}")
    return tuple(template_text(t) for t in templates)


def _check_head_classnames(classnames: Iterable[str], num_classes: int, allow_duplicates: bool) -> tuple[str, ...]:
    names = check_classnames(classnames, allow_duplicates=allow_duplicates, what="TextHead")
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} weight rows; they must match")
    return tuple(names)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callback, backed by a rich progress bar when ``enabled``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _cache_key(
    net: nn.Module,
    tokenizer: Any,
    cleaned: Sequence[str],
    templates: Sequence[Template],
    texts: Sequence[str],
) -> str:
    """SHA-256 over everything that determines the class embeddings, hashed field by field.

    Every field is length-prefixed so that no two different inputs share a byte stream. The text
    tower's fingerprint is the raw bytes of each non-``visual.`` state_dict entry, in key order.
    """
    digest = hashlib.sha256()

    def add(label: str, payload: bytes | memoryview) -> None:
        digest.update(label.encode())
        digest.update(len(payload).to_bytes(8, "little"))
        digest.update(payload)

    add("format", f"{_FORMAT_NAME}/{FORMAT_VERSION}".encode())
    add("model", f"{type(net).__module__}.{type(net).__qualname__}".encode())
    tok = type(tokenizer)
    add(
        "tokenizer",
        f"{tok.__module__}.{tok.__qualname__}:{getattr(tokenizer, 'context_length', None)}".encode(),
    )
    for name, value in net.state_dict().items():
        if name.startswith("visual."):
            continue
        add("key", name.encode())
        if isinstance(value, Tensor):
            add("meta", f"{value.dtype}:{tuple(value.shape)}".encode())
            add("data", _tensor_bytes(value))
        else:
            add("extra", repr(value).encode())
    add("classnames", json.dumps(list(cleaned)).encode())
    add("templates", json.dumps(list(texts)).encode())
    # Callables are hashed by their canonical text, which two different callables may share;
    # the rendered prompts settle it.
    prompts = [render_template(t, name) for name in cleaned for t in templates]
    add("prompts", json.dumps(prompts).encode())
    return digest.hexdigest()


def _read_cached_weight(path: Path, key: str, num_classes: int) -> Tensor | None:
    """The cached weight for ``key``, or None (with a warning when a file is there but unusable)."""
    if not path.is_file():
        return None
    try:
        weight, _, _, _, metadata = _read_file(path)
        if metadata.get("cache_key") != key:
            raise ValueError("its cache key does not match (hash prefix collision or foreign file)")
        if weight.dim() != 2 or weight.shape[0] != num_classes:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not fit {num_classes} classes")
        if weight.dtype != torch.float32 or not bool(torch.isfinite(weight).all()):
            raise ValueError(f"weight must be finite float32, got dtype {weight.dtype}")
        worst = float((weight.double().norm(dim=1) - 1).abs().max())
        if worst > _UNIT_NORM_TOL:
            raise ValueError(f"weight rows are not unit-norm (largest |norm - 1| = {worst:.3g})")
    except (OSError, ValueError, TypeError) as err:
        warnings.warn(f"ignoring TextHead cache file {path}: {err}; re-encoding", stacklevel=3)
        return None
    return weight


def _read_file(path: Path) -> tuple[Tensor, Tensor, list[str] | None, list[str] | None, dict[str, str]]:
    """Parse and validate a TextHead safetensors file (safetensors never unpickles)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no TextHead file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            keys = set(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in ("weight", "scale") if name in keys}
    except Exception as err:  # safetensors raises its own error types for a bad header or body
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != _FORMAT_NAME:
        raise ValueError(
            f"{path} is not a TextHead file: metadata 'format' is {metadata.get('format')!r}, "
            f"expected {_FORMAT_NAME!r}"
        )
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has unsupported TextHead format_version {version!r}; this clipood_plugin reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [name for name in ("weight", "scale") if name not in tensors]
    if missing:
        raise ValueError(f"{path} lacks tensor(s) {missing}")
    lists = []
    for field in ("classnames", "templates"):
        if field not in metadata:
            raise ValueError(f"{path} lacks the {field!r} metadata entry")
        try:
            value = json.loads(metadata[field])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} has malformed {field!r} metadata: {err}") from err
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(
                f"{path} metadata {field!r} must be a JSON list of strings or null, got {value!r}"
            )
        lists.append(value)
    return tensors["weight"], tensors["scale"], lists[0], lists[1], metadata
