"""CLIPood and BMA inside timm's own ``train.py``, each route a few added lines of that script.

Three routes, one per kind of ``train.py`` (``examples/timm_*.patch`` are the exact diffs, each
tested against the real script):

- **CLIPood, current timm** (task API, timm ≥ 1.0.27): after ``train.py`` builds its
  ``ClassificationTask``, ``task = CLIPoodTask.from_timm(task, args, loader_train, head=...)``.
  The image tower is the trainable module, a frozen :class:`~clipood_plugin.TextHead` turns its
  features into logits, :class:`~clipood_plugin.MMSLoss` (paper Eq. 3–4) is the loss and
  ``--model-ema`` installs a :class:`~clipood_plugin.BetaMovingAverage` (Eq. 5–7) of the tower.
- **BMA on any model, current timm**: ``task = BMAClassificationTask.from_timm(task, args,
  loader_train)``: timm's own loss and model, BMA in place of ``ModelEmaV3``.
- **BMA, timm ≤ 1.0.26** (``ModelEmaV3`` built by ``train.py``, no tasks): just before the epoch
  loop, ``model_ema = replace_model_ema(model_ema, saver, loader_train, num_epochs *
  updates_per_epoch, start_epoch * updates_per_epoch)``.

What each route takes care of, because ``train.py`` would otherwise get it silently wrong:

- **T**, the horizon of the Beta weights, is the run's real number of optimizer steps:
  ``updates_per_epoch × num_epochs`` exactly as ``train.py`` counts them (gradient accumulation
  rounds up per epoch; warmup-prefix and cooldown epochs come from timm's own
  ``create_scheduler_v2``). On the task routes a resume with another β or T is refused when
  the average is loaded.
- **Loss options** (CLIPood route): timm's ``--smoothing`` becomes MMS label smoothing; under
  ``--mixup`` / ``--cutmix`` the smoothing is already in timm's soft targets, which timm builds
  ``--num-classes`` (= the embedding size D) wide, so they are folded back to the C classes of the
  head, exactly (see :func:`fold_soft_targets`). ``--bce-loss`` and ``--jsd-loss`` are refused.
- **Device**: the text head and the loss's text embeddings follow the task's device (they stay
  float32: the logits are computed in float32 whatever the tower's dtype).
- **EMA flags**: ``--model-ema-decay`` has no BMA meaning (a warning says so),
  ``--model-ema-warmup`` warns, ``--model-ema-force-cpu`` keeps the average on the CPU. Without
  ``--model-ema`` the task routes refuse to start (the average would silently not exist); the
  legacy route then leaves the run as it was.
- **Resume** from ``last.pth.tar`` / ``checkpoint-N.pth.tar`` with no side files: the task routes
  keep the BMA count, β and T in ``task_state_ema``; the legacy route rebuilds the count from the
  epoch ``train.py`` resumes at (a ``ModelEmaV3`` checkpoint holds no step count).
- **BatchNorm**: the averaged weights do not match running statistics gathered along the way, and
  ``train.py`` never calls ``update_bn``. With a training loader the routes recompute the BN
  statistics of the average (as ``torch.optim.swa_utils.update_bn`` does) before each evaluation
  of it that follows new steps; without one they warn.

Checkpoints keep timm's layout: ``state_dict`` / ``state_dict_ema`` hold the live and averaged
weights (for CLIPood: of the *tower*), so ``timm.models.load_checkpoint(model, path,
use_ema=True)`` loads the average into a bare model.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from clipood_plugin._wrappers import unwrap_model
from clipood_plugin.averaging import DEFAULT_BETA, BetaMovingAverage
from clipood_plugin.integrations._bn import attach_bn_refresh
from clipood_plugin.mms import DEFAULT_LAMBDA, MMSLoss
from clipood_plugin.templates import clean_classname
from clipood_plugin.text_head import TextHead

__all__ = [
    "MIN_TIMM_VERSION",
    "BMAClassificationTask",
    "CLIPoodTask",
    "TowerClassifier",
    "fold_soft_targets",
    "replace_model_ema",
    "timm_total_steps",
]

_logger = logging.getLogger(__name__)

#: First timm release whose ``TrainingTask`` has the EMA and checkpoint hooks used here.
MIN_TIMM_VERSION = "1.0.27"
_TASK_API = (
    "setup_ema",
    "update_ema",
    "has_ema",
    "get_eval_model",
    "get_checkpoint_state",
    "load_checkpoint_state",
    "get_task_state",
    "load_task_state",
)
_HEAD_ATOL = 1e-5
_TASK_CLASSES = ("CLIPoodTask", "BMAClassificationTask")


def _find_training_task() -> tuple[type | None, type | None, str]:
    """timm's ``TrainingTask`` / ``ClassificationTask`` if they have the hooks used here, else why not."""
    try:
        import timm
        from timm.task import ClassificationTask, TrainingTask
    except ImportError as err:
        return None, None, f"timm.task could not be imported ({err})"
    missing = [name for name in _TASK_API if not hasattr(TrainingTask, name)]
    if missing:
        return None, None, f"timm {timm.__version__} TrainingTask lacks {missing}"
    return TrainingTask, ClassificationTask, ""


_TrainingTask, _ClassificationTask, _MISSING_REASON = _find_training_task()


# ------------------------------------------------------------------------------------------
# Pieces every route shares
# ------------------------------------------------------------------------------------------


def timm_total_steps(args: Any, loader_train: Any) -> int:
    """T as timm's ``train.py`` will run it: ``num_epochs × updates_per_epoch``.

    ``updates_per_epoch = ceil(len(loader_train) / grad_accum_steps)`` (the last, partial
    accumulation of an epoch is a step too, as in ``train_one_epoch``) and ``num_epochs`` is what
    timm's ``create_scheduler_v2`` returns for ``args``: ``--epochs`` plus ``--cooldown-epochs``,
    plus ``--warmup-epochs`` with ``--warmup-prefix``. Computed with timm's own function on a
    throwaway optimizer, so it cannot drift from the loop's count.
    """
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    try:
        batches = len(loader_train)
    except TypeError as err:
        raise ValueError(
            "the training loader has no len(), so T (the optimizer steps of the run) cannot be derived; "
            "pass total_steps= explicitly"
        ) from err
    accum = max(1, int(getattr(args, "grad_accum_steps", 1) or 1))
    updates_per_epoch = (batches + accum - 1) // accum
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=float(getattr(args, "lr", None) or 1.0))
    _, num_epochs = create_scheduler_v2(probe, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    total = int(num_epochs) * updates_per_epoch
    if total < 1:
        raise ValueError(f"the run has no optimizer steps ({num_epochs} epochs × {updates_per_epoch} updates)")
    return total


def _warn_ema_flags(owner: str, decay: float | None, use_warmup: bool) -> None:
    if decay is not None:
        warnings.warn(
            f"{owner}: BMA has no decay; the EMA decay {decay} (--model-ema-decay) is ignored. The Beta(β, β) "
            "step weights are fixed by β and T",
            stacklevel=4,
        )
    if use_warmup:
        warnings.warn(f"{owner}: use_warmup (--model-ema-warmup) is ignored, BMA's weights have no warmup", stacklevel=4)


def _check_total_steps(total_steps: int | None) -> None:
    if total_steps is None:
        return
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int (optimizer steps of the run), got {total_steps!r}")


def _bma_bookkeeping(bma: BetaMovingAverage) -> dict[str, Any]:
    """``n_averaged`` and the extra state (β, T, include_init): what a resume needs besides the weights."""
    return {k: v for k, v in bma.state_dict().items() if not k.startswith("module.")}


def _restore_bookkeeping(bma: BetaMovingAverage, state: Mapping[str, Any] | None, strict: bool, writer: str) -> None:
    bookkeeping = (state or {}).get("bma")
    if bookkeeping is None:
        if strict:
            raise ValueError(
                f"the checkpoint has no BMA bookkeeping (task_state_ema['bma']): it was not written by {writer} "
                "with BMA, so the average cannot resume from it; start the average afresh (no --resume for the "
                "EMA) or load with strict=False to keep only its weights"
            )
        warnings.warn("no BMA bookkeeping in the checkpoint; the BMA step count is left as is", stacklevel=3)
        return
    full = bma.state_dict()
    full.update(bookkeeping)
    bma.load_state_dict(full, strict=strict)


def fold_soft_targets(target: Tensor, num_classes: int) -> Tensor:
    """Soft targets built over N ≥ C columns (timm's mixup with ``--num-classes`` = D) → over C.

    timm's ``mixup_target`` gives ``off + (1 - s)·mix`` in every column, ``off = s / N``, and
    the labels only reach the first C columns. So ``m = t[:, :C] - off`` is ``(1 - s)·mix`` and
    ``m + (1 - Σm) / C`` is exactly the target timm would have built with ``num_classes=C``
    (smoothing ``s`` spread over the C real classes). Raises if a column ≥ C carries label mass.
    """
    if target.dim() != 2 or target.shape[1] == num_classes:
        return target
    width = target.shape[1]
    if width < num_classes:
        raise ValueError(
            f"soft targets are {width} wide but the text head has {num_classes} classes: timm's mixup one-hots "
            f"labels to --num-classes ({width}, the embedding size), fewer than the classes; run without "
            "--mixup/--cutmix"
        )
    rest = target[:, num_classes:]
    off = rest[:, :1]
    if bool(((rest - off).abs() > 1e-6).any()):
        raise ValueError(
            f"soft targets [B, {width}] put label mass beyond the head's {num_classes} classes: the labels do not "
            "fit the text head"
        )
    mix = target[:, :num_classes] - off
    return mix + (1.0 - mix.sum(dim=1, keepdim=True)) / num_classes


def _mms_criterion(criterion: Any, head: TextHead, lam: float) -> MMSLoss:
    """MMS with the options of the criterion ``train.py`` built (its class says which flags were on)."""
    name = type(criterion).__name__
    if name in ("BinaryCrossEntropy", "JsdCrossEntropy", "BinaryCrossEntropyLoss"):
        raise ValueError(
            f"train.py built {name} (--bce-loss / --jsd-loss): MMS is a softmax loss with no counterpart; "
            "drop that flag to train with CLIPood"
        )
    if name == "SoftTargetCrossEntropy":  # mixup/cutmix: smoothing is inside timm's soft targets
        return MMSLoss(head, lam=lam)
    if name == "LabelSmoothingCrossEntropy":
        return MMSLoss(head, lam=lam, label_smoothing=float(criterion.smoothing))
    if isinstance(criterion, nn.CrossEntropyLoss):
        return MMSLoss(head, lam=lam, label_smoothing=float(criterion.label_smoothing))
    raise TypeError(f"CLIPoodTask.from_timm does not know how to carry {name}'s options over to MMS")


def _dataset_classnames(loader: Any) -> list[str] | None:
    """Class names in label order from a timm ImageFolder-style loader, when it exposes them."""
    dataset = getattr(loader, "dataset", None)
    for _ in range(3):  # AugMixDataset and friends wrap the real dataset
        reader = getattr(dataset, "reader", None)
        class_to_idx = getattr(reader, "class_to_idx", None) or getattr(dataset, "class_to_idx", None)
        if isinstance(class_to_idx, Mapping) and class_to_idx:
            return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        dataset = getattr(dataset, "dataset", None)
    return None


def _check_head_matches_data(head: TextHead, loader: Any) -> None:
    data_names = _dataset_classnames(loader)
    if data_names is None or head.classnames is None:
        return
    ours = [clean_classname(n) for n in head.classnames]
    theirs = [clean_classname(n) for n in data_names]
    if ours != theirs:
        diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ValueError(
            f"the text head's classes do not match the training data's label order ({len(ours)} head classes, "
            f"{len(theirs)} in the data; first difference at label {diff}: head "
            f"{ours[diff] if diff < len(ours) else None!r}, data {theirs[diff] if diff < len(theirs) else None!r}). "
            "Build the head from the dataset's class list, in its order"
        )


def _load_head(head: TextHead | str | Any) -> TextHead:
    if isinstance(head, TextHead):
        return head
    if isinstance(head, str) and head:
        return TextHead.load(head)
    raise ValueError(
        f"head must be a TextHead or the path of a TextHead.save() file, got {head!r}; write one with "
        "TextHead.from_open_clip(clip, tokenizer, classnames).save(path)"
    )


# ------------------------------------------------------------------------------------------
# Legacy route: timm <= 1.0.26 train.py with ModelEmaV3
# ------------------------------------------------------------------------------------------


def replace_model_ema(
    model_ema: nn.Module | None,
    saver: Any,
    loader_train: Iterable[Any] | None,
    total_steps: int,
    start_steps: int = 0,
    *,
    beta: float = DEFAULT_BETA,
    bn_batches: int | None = None,
) -> BetaMovingAverage | None:
    """Swap the ``ModelEmaV3`` of an older ``train.py`` for a BMA, just before its epoch loop.

    Called where ``train.py`` knows T (``num_epochs * updates_per_epoch``) and the steps already
    done (``start_epoch * updates_per_epoch``). The EMA's module is, at that point, exactly what
    the average needs: the pretrained weights θ_0 on a fresh run, or the average ``train.py`` just
    loaded with ``load_checkpoint(model_ema.module, args.resume, use_ema=True)`` on a resume, so
    the count is ``start_steps``. ``saver.model_ema`` (the object ``CheckpointSaver`` writes as
    ``state_dict_ema``) is pointed at the BMA, so checkpoints hold the average.

    The trap: a ``ModelEmaV3`` checkpoint stores no step count, so a resume trusts
    ``start_steps``; resume from ``last.pth.tar`` / ``checkpoint-N.pth.tar`` (written at epoch
    ends), not from a mid-epoch ``recovery-*`` file, and not from a run that used a plain EMA.

    The EMA's decay (``--model-ema-decay``) has no BMA meaning and warns; its device
    (``--model-ema-force-cpu``) is kept. Returns None when ``model_ema`` is None (no
    ``--model-ema``), leaving the run as it was.
    """
    if model_ema is None:
        return None
    _check_total_steps(total_steps)
    if isinstance(start_steps, bool) or not isinstance(start_steps, int) or not 0 <= start_steps <= total_steps:
        raise ValueError(f"start_steps must be an int in [0, total_steps={total_steps}], got {start_steps!r}")
    ema = unwrap_model(model_ema)  # a torch.compile'd ModelEmaV3 is seen through
    source = getattr(ema, "module", None)
    if not isinstance(source, nn.Module):
        raise TypeError(f"model_ema must be timm's ModelEmaV3 (with .module), got {type(model_ema).__name__}")
    _warn_ema_flags("replace_model_ema", getattr(ema, "decay", None), bool(getattr(ema, "use_warmup", False)))
    device = getattr(ema, "device", None)  # --model-ema-force-cpu built the EMA with device='cpu'
    bma = BetaMovingAverage(source, total_steps=total_steps, beta=beta, device=device)
    if start_steps:
        bma.n_averaged.fill_(start_steps + 1)
        bma.load_state_dict(bma.state_dict())  # re-syncs the host count with n_averaged
        _logger.info("BMA: resumed at step %d of %d from the checkpoint's average", start_steps, total_steps)
    if saver is not None:
        saver.model_ema = bma
    attach_bn_refresh(bma, loader_train, bn_batches, "replace_model_ema")
    _logger.info("BMA: replaced the EMA, beta=%s, T=%d", beta, total_steps)
    return bma


# ------------------------------------------------------------------------------------------
# Task routes: timm >= 1.0.27
# ------------------------------------------------------------------------------------------


class TowerClassifier(nn.Module):
    """An image tower followed by a frozen text head: images → scaled cosine (zero-shot) logits.

    This is what timm's ``validate`` receives as the eval model. It holds references, not
    copies: the tower keeps training, and the BMA copy keeps averaging, underneath it.
    """

    def __init__(self, tower: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.tower(images))


def _check_head(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Module) or not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(
            "head must be a TextHead (an nn.Module with a [C, D] `weight` and a `scale`), "
            f"got {type(head).__name__}"
        )
    if not isinstance(getattr(head, "scale", None), (Tensor, float)):
        raise TypeError(f"head must be a TextHead; {type(head).__name__} has no `scale` logit multiplier")
    return int(weight.shape[1])


def _tower_output_dim(tower: nn.Module) -> int | None:
    """The feature size a tower declares: timm's ``num_classes`` or open_clip's ``output_dim``."""
    for attr in ("output_dim", "num_classes"):
        value = getattr(tower, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _missing_task_api() -> ImportError:
    return ImportError(
        f"CLIPoodTask and BMAClassificationTask need timm>={MIN_TIMM_VERSION} (timm.task.TrainingTask with "
        f"setup_ema / get_checkpoint_state); {_MISSING_REASON}. Upgrade with `pip install 'timm>={MIN_TIMM_VERSION}'`, "
        "or, with an older train.py, swap its ModelEmaV3 for a BMA with "
        "clipood_plugin.integrations.timm.replace_model_ema (or use clipood_plugin.BetaMovingAverage directly)."
    )


def _from_timm_common(task: Any, args: Any, loader_train: Any, total_steps: int | None, owner: str) -> int:
    if _ClassificationTask is None or not isinstance(task, _ClassificationTask):
        raise TypeError(f"{owner}.from_timm wraps the ClassificationTask train.py builds, got {type(task).__name__}")
    if not getattr(args, "model_ema", False):
        raise ValueError(
            f"{owner}: add --model-ema to train.py's command line; the BMA is installed through timm's EMA "
            "hooks (setup_ema), and without it the run would silently train with no average"
        )
    if total_steps is None:
        total_steps = timm_total_steps(args, loader_train)
    _check_total_steps(total_steps)
    return total_steps


if _TrainingTask is None or _ClassificationTask is None:

    def __getattr__(name: str) -> Any:
        if name in _TASK_CLASSES:
            raise _missing_task_api()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

else:

    class _BMAHooks:
        """timm's EMA hooks filled in with a BMA: what both task classes share."""

        total_steps: int | None
        bma_beta: float
        bma_include_init: bool
        _bn_loader: Iterable[Any] | None
        _bn_batches: int | None
        get_trainable_module: Callable[..., Any]

        def _init_bma(
            self,
            total_steps: int | None,
            bma_beta: float,
            bma_include_init: bool,
            bn_loader: Iterable[Any] | None,
            bn_batches: int | None,
        ) -> None:
            _check_total_steps(total_steps)
            self.total_steps = total_steps
            self.bma_beta = float(bma_beta)
            self.bma_include_init = bool(bma_include_init)
            self._bn_loader = bn_loader
            self._bn_batches = bn_batches

        def _build_bma(
            self,
            decay: float | None,
            use_warmup: bool,
            device: torch.device | str | None,
            total_steps: int | None,
            bma_beta: float | None,
            include_init: bool | None,
            use_buffers: bool,
            kwargs: Mapping[str, Any],
        ) -> BetaMovingAverage:
            owner = type(self).__name__
            if kwargs:
                raise TypeError(f"{owner}.setup_ema got ModelEmaV3 options that BMA does not have: {sorted(kwargs)}")
            _warn_ema_flags(owner, decay, use_warmup)
            total_steps = self.total_steps if total_steps is None else total_steps
            if total_steps is None:
                raise ValueError(
                    f"{owner}.setup_ema needs T, the number of optimizer steps of the run: build the task with "
                    f"{owner}.from_timm(task, args, loader_train) or pass total_steps="
                )
            _check_total_steps(total_steps)
            bma = BetaMovingAverage(
                self.get_trainable_module(),
                total_steps=total_steps,
                beta=self.bma_beta if bma_beta is None else bma_beta,
                device=device,
                use_buffers=use_buffers,
                include_init=self.bma_include_init if include_init is None else include_init,
            )
            self.trainable_module_ema = bma
            attach_bn_refresh(bma, self._bn_loader, self._bn_batches, owner)
            return bma

        def setup_ema(
            self,
            decay: float | None = None,
            use_warmup: bool = False,
            device: torch.device | str | None = None,
            *,
            total_steps: int | None = None,
            bma_beta: float | None = None,
            include_init: bool | None = None,
            use_buffers: bool = False,
            **kwargs: Any,
        ) -> BetaMovingAverage:
            """Install a :class:`BetaMovingAverage` of the trainable module as the task's EMA.

            timm's signature is kept so ``train.py``'s ``--model-ema`` flags reach it: ``decay``
            has no meaning for BMA (a warning says it is ignored), ``use_warmup=True`` warns (the
            Beta weights have no warmup), ``device='cpu'`` keeps the average off the accelerator.
            ``total_steps``, ``bma_beta`` and ``include_init`` default to the constructor's.
            The module's current weights are θ_0, so call this before the first optimizer step.
            """
            bma = self._build_bma(decay, use_warmup, device, total_steps, bma_beta, include_init, use_buffers, kwargs)
            self._after_setup_ema(bma)
            return bma

        def _after_setup_ema(self, bma: BetaMovingAverage) -> None:
            """What a task adds once its average exists (CLIPoodTask: the eval model of it)."""

        def _ema_task_state(self) -> dict[str, Any]:
            bma = self.get_trainable_module(ema=True)
            return {} if bma is None else {"bma": _bma_bookkeeping(bma)}

        def _load_ema_task_state(self, state: Mapping[str, Any] | None, strict: bool) -> None:
            bma = self.get_trainable_module(ema=True)
            if bma is None:
                raise RuntimeError("Cannot load BMA state before setup_ema().")
            _restore_bookkeeping(bma, state, strict, type(self).__name__)

    class CLIPoodTask(_BMAHooks, _TrainingTask):  # type: ignore[misc, valid-type]
        """CLIPood fine-tuning as a timm ``TrainingTask``: MMS loss on a tower, BMA as its EMA.

        In ``train.py``, build it from the task timm made: :meth:`from_timm`.

        Args:
            model: the image tower (a timm CLIP ViT with ``num_classes`` = the embedding size, or
                an open_clip ``model.visual``); ``model(images)`` must return ``[B, D]`` features.
                It is the task's trainable module: the optimizer, DDP and the BMA see only it.
            head: the frozen :class:`~clipood_plugin.TextHead` ``[C, D]`` that maps features to
                logits; it is the classifier at evaluation and the class text for MMS.
            criterion: ``criterion(features, target) -> loss``. Default
                ``MMSLoss(head, lam=lam)``. An open_clip-style dict result is summed.
            lam: MMS margin λ for the default criterion (0.3, as the paper).
            total_steps: T, the optimizer steps of the whole run, needed by :meth:`setup_ema`
                because the Beta weights depend on it (:meth:`from_timm` derives it).
            bma_beta: β of the Beta(β, β) step weights (0.5 default).
            bma_include_init: fold in the weights at ``setup_ema`` time as θ_0 (CLIPood does).
            bn_loader: training batches to recompute the average's BatchNorm statistics before
                it is evaluated (only used if the tower has BatchNorm); ``bn_batches`` caps them.
            device, dtype, verbose: as ``timm.task.TrainingTask``. The head and the criterion are
                moved to ``device``.

        ``forward(input, target)`` returns ``{'loss': MMS loss, 'output': logits}`` (the logits
        are computed without grad, for metrics). Targets are class indices ``[B]`` or dense
        mixup/cutmix targets ``[B, C]``, or ``[B, N]`` with N > C as timm's mixup builds them
        with ``--num-classes`` = D (folded back to C, :func:`fold_soft_targets`).
        """

        def __init__(
            self,
            model: nn.Module,
            head: nn.Module,
            criterion: nn.Module | Callable[[Tensor, Tensor], Any] | None = None,
            *,
            lam: float = DEFAULT_LAMBDA,
            total_steps: int | None = None,
            bma_beta: float = DEFAULT_BETA,
            bma_include_init: bool = True,
            bn_loader: Iterable[Any] | None = None,
            bn_batches: int | None = None,
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
            verbose: bool = True,
        ) -> None:
            super().__init__(device=device, dtype=dtype, verbose=verbose)
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be the image tower nn.Module, got {type(model).__name__}")
            dim = _check_head(head)
            tower_dim = _tower_output_dim(unwrap_model(model))
            if tower_dim is not None and tower_dim != dim:
                raise ValueError(
                    f"the image tower outputs {tower_dim}-dim features but the text head is {dim}-dim; "
                    "create a timm CLIP tower with num_classes equal to the text embedding size "
                    "(train.py: --num-classes D)"
                )
            self._init_bma(total_steps, bma_beta, bma_include_init, bn_loader, bn_batches)
            self.trainable_module = model
            head = head.requires_grad_(False)
            criterion = MMSLoss(head, lam=lam) if criterion is None else criterion
            self.head = head.to(self.device)
            if isinstance(criterion, nn.Module):
                criterion = criterion.to(self.device)
            self.criterion = criterion
            # Eval wrappers hold references to registered modules, so they live outside the
            # module tree (no duplicate parameters in the task).
            self._classifiers: dict[str, nn.Module] = {"eval_model": TowerClassifier(model, self.head)}
            if self.verbose:
                _logger.info(
                    "CLIPoodTask: criterion=%s, classes=%d, dim=%d, total_steps=%s, beta=%s",
                    type(self.criterion).__name__, self.head.weight.shape[0], dim, total_steps, bma_beta,
                )

        @classmethod
        def from_timm(
            cls,
            task: Any,
            args: Any,
            loader_train: Any,
            head: TextHead | str,
            *,
            lam: float = DEFAULT_LAMBDA,
            bma_beta: float = DEFAULT_BETA,
            total_steps: int | None = None,
            bn_batches: int | None = None,
        ) -> CLIPoodTask:
            """CLIPood in place of the ``ClassificationTask`` timm's ``train.py`` just built.

            Takes the model (the tower), device, dtype and verbosity from ``task``; label
            smoothing from its criterion (see the module docstring); T from ``args`` and
            ``loader_train`` (:func:`timm_total_steps`). ``head`` is a TextHead or a file written
            by :meth:`TextHead.save`. Refuses to start, naming the flag, when ``--model-ema`` is
            missing, when the head's class names differ from the ImageFolder's label order, or
            when mixup is on and ``--num-classes`` is below the class count.
            """
            total_steps = _from_timm_common(task, args, loader_train, total_steps, cls.__name__)
            text_head = _load_head(head)
            criterion = _mms_criterion(task.criterion, text_head, lam)
            _check_head_matches_data(text_head, loader_train)
            mixup = getattr(args, "mixup", 0) > 0 or getattr(args, "cutmix", 0) > 0 or getattr(args, "cutmix_minmax", None)
            num_classes = getattr(args, "num_classes", None)
            if mixup and isinstance(num_classes, int) and num_classes < text_head.num_classes:
                raise ValueError(
                    f"--mixup/--cutmix one-hot the labels to --num-classes={num_classes} (the embedding size) but "
                    f"the head has {text_head.num_classes} classes; run without --mixup/--cutmix"
                )
            return cls(
                task.get_trainable_module(),
                text_head,
                criterion,
                total_steps=total_steps,
                bma_beta=bma_beta,
                bn_loader=loader_train,
                bn_batches=bn_batches,
                device=task.device,
                dtype=task.dtype,
                verbose=task.verbose,
            )

        # -- wrapping --------------------------------------------------------------------------

        def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> CLIPoodTask:
            """Wrap the tower in DDP (the head is a frozen buffer and needs no wrapper)."""
            from torch.nn.parallel import DistributedDataParallel

            self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
            return self

        def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs: Any) -> nn.Module:
            """Compile the tower (before DDP); the eval model becomes compiled tower + head."""
            self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
            self._classifiers["eval_model"] = TowerClassifier(self.trainable_module, self.head)
            return self._classifiers["eval_model"]

        # -- averaging -------------------------------------------------------------------------

        def _after_setup_ema(self, bma: BetaMovingAverage) -> None:
            """The eval model of the average: BMA tower + the head (copied to the average's device)."""
            head = self.head
            bma_device = next((t.device for t in bma.module.parameters()), head.weight.device)
            if bma_device != head.weight.device:
                head = copy.deepcopy(head).to(bma_device)
            self._classifiers["eval_model_ema"] = TowerClassifier(bma.module, head)
            if "eval_model_ema" in self._modules:  # a compiled wrapper of an earlier average
                del self._modules["eval_model_ema"]

        def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
            """Tower + head for validation (``ema=True``: the BMA tower + head; None before setup_ema).

            A ``module`` passed in is taken as a tower and paired with the head.
            """
            if module is not None:
                return TowerClassifier(module, self.head)
            name = "eval_model_ema" if ema else "eval_model"
            compiled = self._modules.get(name)  # set by TrainingTask.compile_ema
            if compiled is not None:
                return compiled
            return self._classifiers.get(name)

        # -- checkpoint state ------------------------------------------------------------------

        def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
            """``ema=True``: the BMA bookkeeping (``n_averaged``, β, T, include_init) under
            ``'bma'``; else the text head under ``'text_head'``."""
            if ema:
                return self._ema_task_state()
            return {"text_head": dict(self.head.state_dict())}

        def load_task_state(
            self,
            state: Mapping[str, Any] | None,
            strict: bool = True,
            module: nn.Module | None = None,
            ema: bool = False,
        ) -> None:
            """Restore what :meth:`get_task_state` saved.

            ``ema=True`` restores the BMA count and checks β and T against this average (a
            mismatch raises: the weights would change). For the text head, ``strict`` checks the
            saved head equals this task's (a changed class list or order would silently
            relabel); ``strict=False`` loads the saved head instead.
            """
            if ema:
                self._load_ema_task_state(state, strict)
                return
            saved = (state or {}).get("text_head")
            if saved is None:
                return
            if strict:
                self._check_same_head(saved)
            else:
                self.head.load_state_dict(saved, strict=False)

        def _check_same_head(self, saved: Mapping[str, Tensor]) -> None:
            mine = self.head.state_dict()
            if set(saved) != set(mine):
                raise ValueError(f"checkpoint text head has entries {sorted(saved)}, this task's head has {sorted(mine)}")
            for key, value in mine.items():
                other = saved[key].to(device=value.device, dtype=value.dtype)
                if other.shape != value.shape:
                    raise ValueError(
                        f"checkpoint text head {key!r} has shape {tuple(other.shape)}, this task's "
                        f"{tuple(value.shape)}: the class list changed since the checkpoint was written"
                    )
                diff = float((other - value).abs().max()) if value.numel() else 0.0
                tol = _HEAD_ATOL * max(1.0, float(value.abs().max()))
                if diff > tol:
                    raise ValueError(
                        f"checkpoint text head {key!r} differs from this task's (max |Δ| = {diff:.3g}): class "
                        "names, their order, the templates or the text tower changed; pass strict=False to "
                        "use the checkpoint's head"
                    )

        def get_checkpoint_state(
            self, ema: bool = False, unwrap_fn: Callable[[nn.Module], nn.Module] = unwrap_model
        ) -> dict[str, Any]:
            """timm checkpoint entries: bare tower weights under ``state_dict`` / ``state_dict_ema``."""
            if ema:
                bma = self.get_trainable_module(ema=True)
                if bma is None:
                    return {}
                return {"state_dict_ema": bma.module.state_dict(), "task_state_ema": self.get_task_state(ema=True)}
            tower = unwrap_fn(self.get_trainable_module())
            return {"state_dict": tower.state_dict(), "task_state": self.get_task_state()}

        def load_checkpoint_state(
            self,
            state_dict: Mapping[str, Any],
            task_state: Mapping[str, Any] | None = None,
            ema: bool = False,
            strict: bool = True,
        ) -> None:
            """Load tower weights (``ema=True``: the averaged tower and its BMA bookkeeping)."""
            if ema:
                bma = self.get_trainable_module(ema=True)
                if bma is None:
                    raise RuntimeError("Cannot load EMA checkpoint state before setup_ema().")
                if strict and not (task_state or {}).get("bma"):
                    self.load_task_state(task_state, strict=True, ema=True)  # raises, naming the cause
                bma.module.load_state_dict(state_dict, strict=strict)
                self.load_task_state(task_state, strict=strict, ema=True)
                return
            unwrap_model(self.get_trainable_module()).load_state_dict(state_dict, strict=strict)
            self.load_task_state(task_state, strict=strict)

        # -- step ------------------------------------------------------------------------------

        def forward(self, input: Tensor, target: Tensor) -> dict[str, Tensor]:
            """MMS loss on the tower's features; ``output`` = the head's logits (no grad)."""
            features = self.trainable_module(input)
            if not isinstance(features, Tensor):
                raise TypeError(
                    f"the image tower returned {type(features).__name__}, expected a [B, D] feature tensor"
                )
            loss = self.criterion(features, fold_soft_targets(target, self.head.weight.shape[0]))
            if isinstance(loss, Mapping):
                loss = sum(loss.values())
            with torch.no_grad():
                output = self.head(features.detach())
            return {"loss": loss, "output": output}

    class BMAClassificationTask(_BMAHooks, _ClassificationTask):  # type: ignore[misc, valid-type]
        """timm's ``ClassificationTask`` with a Beta Moving Average as its EMA: BMA for any model.

        Everything but the EMA is timm's (model, loss, DDP, compile). ``setup_ema`` installs a
        :class:`~clipood_plugin.BetaMovingAverage` of the model with horizon ``total_steps``;
        checkpoints hold the averaged weights under ``state_dict_ema`` (timm's layout) and the
        BMA count, β and T under ``task_state_ema['bma']``, so ``--resume`` continues the same
        average. With ``bn_loader``, a BatchNorm model's average gets its statistics recomputed
        before each evaluation. In ``train.py``, build it with :meth:`from_timm`.
        """

        def __init__(
            self,
            model: nn.Module,
            criterion: nn.Module | Callable[..., Any] | None = None,
            *,
            total_steps: int | None = None,
            bma_beta: float = DEFAULT_BETA,
            bma_include_init: bool = True,
            bn_loader: Iterable[Any] | None = None,
            bn_batches: int | None = None,
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
            verbose: bool = True,
        ) -> None:
            super().__init__(model=model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
            self._init_bma(total_steps, bma_beta, bma_include_init, bn_loader, bn_batches)

        @classmethod
        def from_timm(
            cls,
            task: Any,
            args: Any,
            loader_train: Any,
            *,
            bma_beta: float = DEFAULT_BETA,
            total_steps: int | None = None,
            bn_batches: int | None = None,
        ) -> BMAClassificationTask:
            """The same classification task with BMA as its EMA; T from ``args`` and ``loader_train``."""
            if type(task) is not _ClassificationTask:
                raise TypeError(
                    f"BMAClassificationTask.from_timm wraps timm's plain ClassificationTask, got {type(task).__name__}"
                )
            total_steps = _from_timm_common(task, args, loader_train, total_steps, cls.__name__)
            return cls(
                task.get_trainable_module(),
                task.criterion,
                total_steps=total_steps,
                bma_beta=bma_beta,
                bn_loader=loader_train,
                bn_batches=bn_batches,
                device=task.device,
                dtype=task.dtype,
                verbose=task.verbose,
            )

        def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
            """``ema=True``: the BMA bookkeeping under ``'bma'``; nothing else is task-owned."""
            return self._ema_task_state() if ema else {}

        def load_task_state(
            self,
            state: Mapping[str, Any] | None,
            strict: bool = True,
            module: nn.Module | None = None,
            ema: bool = False,
        ) -> None:
            """``ema=True``: restore the BMA count, checking β and T (a mismatch raises)."""
            if ema:
                self._load_ema_task_state(state, strict)

        def load_checkpoint_state(
            self,
            state_dict: Mapping[str, Any],
            task_state: Mapping[str, Any] | None = None,
            ema: bool = False,
            strict: bool = True,
        ) -> None:
            """timm's loader, but a BMA resume without the bookkeeping fails before touching weights."""
            if ema and strict and not (task_state or {}).get("bma"):
                self._load_ema_task_state(task_state, strict=True)  # raises, naming the cause
            super().load_checkpoint_state(state_dict, task_state, ema=ema, strict=strict)
