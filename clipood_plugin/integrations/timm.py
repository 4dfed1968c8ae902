"""CLIPood inside timm's own training loop, through ``timm.task.TrainingTask`` (timm ≥ 1.0.27).

timm's ``train.py`` runs everything model-specific through a *task*: ``task(input, target)``
returns ``{'loss', 'output'}``, ``task.setup_ema(...)`` / ``task.update_ema(step)`` keep the
weight average, ``task.get_eval_model(ema)`` is what validation calls, and
``task.get_checkpoint_state(ema)`` is what ``CheckpointSaver`` writes. :class:`CLIPoodTask`
fills those in for CLIPood: the image tower is the trainable module, a frozen
:class:`~clipood_plugin.TextHead` turns its features into logits, :class:`~clipood_plugin.MMSLoss`
(paper Eq. 3–4) is the loss, and the "EMA" is a :class:`~clipood_plugin.BetaMovingAverage`
(Eq. 5–7) of the tower::

    task = CLIPoodTask(tower, head, total_steps=epochs * updates_per_epoch)
    task.setup_ema()              # train.py: task.setup_ema(decay=..., use_warmup=..., device=...)
    ...
    loss = task(images, labels)['loss']; loss.backward(); optimizer.step(); optimizer.zero_grad()
    task.update_ema(step=num_updates)   # num_updates = 1 after the first optimizer step

Checkpoints keep timm's layout: ``state_dict`` / ``state_dict_ema`` hold the live and averaged
*tower* weights (so ``timm.models.load_checkpoint(tower, path, use_ema=True)`` loads the average
into a bare tower), ``task_state`` holds the text head and ``task_state_ema['bma']`` the BMA
bookkeeping (``n_averaged`` and β, T), which ``timm.task.load_task_ema_checkpoint`` restores.

Older timm (≤ 1.0.26) has no task EMA API and importing :class:`CLIPoodTask` raises an
ImportError that says so. Its ``train.py`` builds ``model_ema = utils.ModelEmaV3(model, ...)``
and calls ``model_ema.update(model, step=num_updates)`` after each optimizer step: replace the
constructor with ``BetaMovingAverage(model, total_steps=T)`` and everything else works as is,
including ``CheckpointSaver(model_ema=model_ema)`` (its ``state_dict_ema`` is the averaged
module's weights). That checkpoint does not carry the BMA count, so to resume such a run save
``model_ema.state_dict()`` yourself.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from clipood_plugin._wrappers import unwrap_model
from clipood_plugin.averaging import DEFAULT_BETA, BetaMovingAverage
from clipood_plugin.mms import DEFAULT_LAMBDA, MMSLoss

__all__ = ["MIN_TIMM_VERSION", "CLIPoodTask", "TowerClassifier"]

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


def _find_training_task() -> tuple[type | None, str]:
    """timm's ``TrainingTask`` if it has the hooks CLIPoodTask overrides, else (None, why)."""
    try:
        import timm
        from timm.task import TrainingTask
    except ImportError as err:
        return None, f"timm.task could not be imported ({err})"
    missing = [name for name in _TASK_API if not hasattr(TrainingTask, name)]
    if missing:
        return None, f"timm {timm.__version__} TrainingTask lacks {missing}"
    return TrainingTask, ""


_TrainingTask, _MISSING_REASON = _find_training_task()


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


def _check_total_steps(total_steps: int | None) -> None:
    if total_steps is None:
        return
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int (optimizer steps of the run), got {total_steps!r}")


def _missing_task_api() -> ImportError:
    return ImportError(
        f"CLIPoodTask needs timm>={MIN_TIMM_VERSION} (timm.task.TrainingTask with setup_ema / "
        f"get_checkpoint_state); {_MISSING_REASON}. Upgrade with `pip install 'timm>={MIN_TIMM_VERSION}'`, "
        "or, with an older train.py, replace `utils.ModelEmaV3(model, ...)` by "
        "`clipood_plugin.BetaMovingAverage(model, total_steps=T)`: its update(model, step=num_updates) "
        "matches timm's EMA call sites."
    )


if _TrainingTask is None:

    def __getattr__(name: str) -> Any:
        if name == "CLIPoodTask":
            raise _missing_task_api()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

else:

    class CLIPoodTask(_TrainingTask):  # type: ignore[misc, valid-type]
        """CLIPood fine-tuning as a timm ``TrainingTask``: MMS loss on a tower, BMA as its EMA.

        Args:
            model: the image tower (a timm CLIP ViT with ``num_classes`` = the embedding size, or
                an open_clip ``model.visual``); ``model(images)`` must return ``[B, D]`` features.
                It is the task's trainable module: the optimizer, DDP and the BMA see only it.
            head: the frozen :class:`~clipood_plugin.TextHead` ``[C, D]`` that maps features to
                logits; it is the classifier at evaluation and the class text for MMS.
            criterion: ``criterion(features, target) -> loss``. Default
                ``MMSLoss(head, lam=lam)``. An open_clip-style dict result is summed.
            lam: MMS margin λ for the default criterion (0.3, as the paper).
            total_steps: T, the optimizer steps of the whole run (epochs × updates per epoch),
                needed by :meth:`setup_ema` because the Beta weights depend on it.
            bma_beta: β of the Beta(β, β) step weights (0.5 default).
            bma_include_init: fold in the weights at ``setup_ema`` time as θ_0 (CLIPood does).
            device, dtype, verbose: as ``timm.task.TrainingTask``.

        ``forward(input, target)`` returns ``{'loss': MMS loss, 'output': logits}`` (the logits
        are computed without grad, for metrics). Targets are class indices ``[B]`` or dense
        mixup/cutmix targets ``[B, C]``.
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
                    "create a timm CLIP tower with num_classes equal to the text embedding size"
                )
            _check_total_steps(total_steps)
            self.trainable_module = model
            self.head = head.requires_grad_(False)
            self.criterion = MMSLoss(head, lam=lam) if criterion is None else criterion
            self.total_steps = total_steps
            self.bma_beta = float(bma_beta)
            self.bma_include_init = bool(bma_include_init)
            # Eval wrappers hold references to registered modules, so they live outside the
            # module tree (no duplicate parameters in the task).
            self._classifiers: dict[str, nn.Module] = {"eval_model": TowerClassifier(model, head)}
            if self.verbose:
                _logger.info(
                    "CLIPoodTask: criterion=%s, classes=%d, dim=%d, total_steps=%s, beta=%s",
                    type(self.criterion).__name__, head.weight.shape[0], dim, total_steps, bma_beta,
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

        def setup_ema(
            self,
            decay: float = 0.9999,
            use_warmup: bool = False,
            device: torch.device | str | None = None,
            *,
            total_steps: int | None = None,
            bma_beta: float | None = None,
            include_init: bool | None = None,
            use_buffers: bool = False,
            **kwargs: Any,
        ) -> BetaMovingAverage:
            """Install a :class:`BetaMovingAverage` of the tower as the task's EMA.

            timm's signature is kept so ``train.py``'s ``--model-ema`` flags reach it: ``decay``
            has no meaning for BMA and is ignored, ``use_warmup=True`` warns (the Beta weights
            have no warmup), ``device='cpu'`` keeps the average off the accelerator.
            ``total_steps``, ``bma_beta`` and ``include_init`` default to the constructor's.
            The tower's current weights are θ_0, so call this before the first optimizer step.
            """
            if kwargs:
                raise TypeError(f"CLIPoodTask.setup_ema got ModelEmaV3 options that BMA does not have: {sorted(kwargs)}")
            if use_warmup:
                warnings.warn(
                    "CLIPoodTask.setup_ema: use_warmup is ignored, BMA's Beta(β, β) weights have no warmup",
                    stacklevel=2,
                )
            total_steps = self.total_steps if total_steps is None else total_steps
            if total_steps is None:
                raise ValueError(
                    "CLIPoodTask.setup_ema needs T, the number of optimizer steps of the run: pass "
                    "CLIPoodTask(..., total_steps=epochs * updates_per_epoch) or setup_ema(total_steps=...)"
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
            head = self.head
            bma_device = next((t.device for t in bma.module.parameters()), head.weight.device)
            if bma_device != head.weight.device:
                head = copy.deepcopy(head).to(bma_device)
            self._classifiers["eval_model_ema"] = TowerClassifier(bma.module, head)
            if "eval_model_ema" in self._modules:  # a compiled wrapper of an earlier average
                del self._modules["eval_model_ema"]
            return bma

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
                bma = self.get_trainable_module(ema=True)
                if bma is None:
                    return {}
                return {"bma": {k: v for k, v in bma.state_dict().items() if not k.startswith("module.")}}
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
            state = state or {}
            if ema:
                bma = self.get_trainable_module(ema=True)
                if bma is None:
                    raise RuntimeError("Cannot load BMA state before setup_ema().")
                bookkeeping = state.get("bma")
                if bookkeeping is None:
                    if strict:
                        raise ValueError(
                            "the checkpoint has no BMA bookkeeping (task_state_ema['bma']): it was not written "
                            "by CLIPoodTask with BMA, so the average cannot resume from it; start the average "
                            "afresh (no --resume for the EMA) or load with strict=False to keep only its weights"
                        )
                    warnings.warn("no BMA bookkeeping in the checkpoint; the BMA step count is left as is", stacklevel=2)
                    return
                full = bma.state_dict()
                full.update(bookkeeping)
                bma.load_state_dict(full, strict=strict)
                return
            saved = state.get("text_head")
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
            loss = self.criterion(features, target)
            if isinstance(loss, Mapping):
                loss = sum(loss.values())
            with torch.no_grad():
                output = self.head(features.detach())
            return {"loss": loss, "output": output}
