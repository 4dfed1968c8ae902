"""Beta Moving Average for the Hugging Face ``Trainer``, as a ``TrainerCallback``.

``pip install clipood-plugin[hf]``, then::

    from clipood_plugin.integrations.hf import BMACallback, load_bma_weights

    bma = BMACallback(beta=0.5)                       # T = state.max_steps
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[bma])
    trainer.train()
    load_bma_weights(model, "out/checkpoint-1000")    # or evaluate bma.average directly

The Trainer has no weight averaging of its own, and callbacks only observe, so the callback keeps
a :class:`~clipood_plugin.BetaMovingAverage` (CLIPood Eq. 5–7) beside the model:

- ``on_train_begin``: builds it from the model (or the submodule ``module_name``, e.g. the
  vision tower) with T = ``state.max_steps``; the weights then are θ_0. When the Trainer resumes
  (``global_step > 0``) it reloads the average saved in that checkpoint.
- ``on_step_end``: folds in the weights after every optimizer step (``global_step`` has just
  advanced, and is cross-checked against the average's own count). ``on_optimizer_step`` would
  also fire after steps that AMP skipped; both count them, as the Trainer does.
- ``on_save``: writes ``bma.safetensors`` (the averaged weights, keys as the averaged module's
  ``state_dict``) and ``bma.json`` (β, T, steps, ``n_averaged``, the module name) into the
  checkpoint folder the Trainer just wrote, each atomically. Only the main process writes.

Every process keeps its own average (identical under DDP). Sharded models (FSDP, DeepSpeed
ZeRO-3) are not supported: each process would average only its shard.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipood_plugin._io import atomic_path
from clipood_plugin._wrappers import unwrap_model
from clipood_plugin.averaging import DEFAULT_BETA, BetaMovingAverage, check_beta, check_total_steps

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as _err:  # pragma: no cover - exercised only without transformers installed
    raise ImportError(
        "clipood_plugin.integrations.hf needs transformers (TrainerCallback); install it with "
        "`pip install 'clipood-plugin[hf]'`"
    ) from _err

__all__ = ["STATE_NAME", "WEIGHTS_NAME", "BMACallback", "load_bma_weights"]

#: File names written into each ``checkpoint-<step>`` folder.
WEIGHTS_NAME = "bma.safetensors"
STATE_NAME = "bma.json"
_FORMAT = "clipood_plugin.BMACallback"
_FORMAT_VERSION = 1
_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def _select(model: nn.Module, module_name: str | None) -> nn.Module:
    model = unwrap_model(model)
    if not module_name:
        return model
    try:
        return unwrap_model(model.get_submodule(module_name))
    except AttributeError as err:
        raise ValueError(f"model {type(model).__name__} has no submodule {module_name!r} to average") from err


class BMACallback(TrainerCallback):
    """Keep a Beta Moving Average of the model (or one submodule) during ``Trainer.train()``.

    Args:
        beta: β of the Beta(β, β) step weights (0.5 default).
        total_steps: T; default ``state.max_steps`` (the Trainer's optimizer steps).
        module_name: average only this submodule (``model.get_submodule``), e.g. ``"vision_model"``.
        device: where to keep the average (default: the model's device).
        use_buffers: average buffers too (default False: copy them).
        include_init: fold in θ_0, the weights at ``on_train_begin`` (CLIPood does).
        resume_from: checkpoint folder to reload the average from when the Trainer resumes.
            Default: ``args.resume_from_checkpoint`` if it is a folder, else
            ``<output_dir>/checkpoint-<global_step>``.
        copy_to_model_at_end: at ``on_train_end`` copy the average into the model, so a following
            ``trainer.save_model()`` / ``evaluate()`` uses it.
    """

    def __init__(
        self,
        beta: float = DEFAULT_BETA,
        total_steps: int | None = None,
        module_name: str | None = None,
        device: torch.device | str | None = None,
        use_buffers: bool = False,
        include_init: bool = True,
        resume_from: str | os.PathLike[str] | None = None,
        copy_to_model_at_end: bool = False,
    ) -> None:
        self.beta = check_beta(beta)
        self.total_steps = check_total_steps(total_steps, optional=True)
        self.module_name = module_name
        self.device = device
        self.use_buffers = use_buffers
        self.include_init = include_init
        self.resume_from = resume_from
        self.copy_to_model_at_end = copy_to_model_at_end
        self.average: BetaMovingAverage | None = None

    # -- trainer events ------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"BMACallback needs the model in the callback kwargs, got {type(model).__name__}")
        total_steps = self.total_steps if self.total_steps is not None else state.max_steps
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"BMACallback needs T, the number of optimizer steps, but state.max_steps = {state.max_steps!r}; "
                "set TrainingArguments(max_steps=...) or BMACallback(total_steps=...)"
            )
        self.average = BetaMovingAverage(
            _select(model, self.module_name),
            total_steps=total_steps,
            beta=self.beta,
            device=self.device,
            use_buffers=self.use_buffers,
            include_init=self.include_init,
        )
        if state.global_step > 0:
            self._resume(self._resume_dir(args, state), state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        average = self._require_average()
        average.update(_select(kwargs["model"], self.module_name), step=state.global_step)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or self.average is None:
            return
        folder = Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{state.global_step}"
        if not folder.is_dir():  # e.g. hyper-parameter search runs save under run-<id>/
            warnings.warn(f"BMACallback: no checkpoint folder {folder} to save the average beside; skipped", stacklevel=2)
            return
        self.save(folder, global_step=state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.copy_to_model_at_end and self.average is not None:
            target = _select(kwargs["model"], self.module_name)
            with torch.no_grad():
                for mine, theirs in zip(target.state_dict().values(), self.average.module.state_dict().values()):
                    mine.copy_(theirs)

    # -- files ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str], global_step: int | None = None) -> None:
        """Write ``bma.safetensors`` and ``bma.json`` into ``directory`` (each atomically)."""
        from safetensors.torch import save_file

        average = self._require_average()
        directory = Path(directory)
        # Cloned per key: safetensors refuses tensors that share memory (tied weights).
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in average.module.state_dict().items()}
        meta = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "beta": average.beta,
            "total_steps": average.total_steps,
            "include_init": average.include_init,
            "use_buffers": average.use_buffers,
            "steps": average.steps,
            "n_averaged": int(average.n_averaged),
            "global_step": global_step,
            "module_name": self.module_name,
        }
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _FORMAT, "format_version": str(_FORMAT_VERSION)})
        with atomic_path(directory / STATE_NAME) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")

    def _resume_dir(self, args: TrainingArguments, state: TrainerState) -> Path:
        if self.resume_from is not None:
            return Path(self.resume_from)
        hinted = getattr(args, "resume_from_checkpoint", None)
        if isinstance(hinted, (str, os.PathLike)) and Path(hinted).is_dir():
            return Path(hinted)
        return Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{state.global_step}"

    def _resume(self, directory: Path, global_step: int) -> None:
        average = self._require_average()
        meta, tensors = _read(directory)
        saved = (float(meta["beta"]), int(meta["total_steps"]), bool(meta["include_init"]))
        mine = (average.beta, average.total_steps, average.include_init)
        if saved != mine:
            raise ValueError(
                f"BMA in {directory} was made with (beta, total_steps, include_init) = {saved}, this run has "
                f"{mine}; the Beta weights depend on them, so the average cannot resume"
            )
        if int(meta["steps"]) != global_step:
            raise ValueError(
                f"BMA in {directory} has {meta['steps']} steps but the Trainer resumes at global step {global_step}"
            )
        state = average.state_dict()
        state.update({f"module.{k}": v for k, v in tensors.items()})
        state["n_averaged"] = torch.tensor(int(meta["n_averaged"]), dtype=torch.long)
        average.load_state_dict(state)

    def _require_average(self) -> BetaMovingAverage:
        if self.average is None:
            raise RuntimeError("BMACallback has no average yet: it is built at on_train_begin")
        return self.average


def _read(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, state = directory / WEIGHTS_NAME, directory / STATE_NAME
    missing = [p.name for p in (weights, state) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} has no {' / '.join(missing)}: it was not saved with BMACallback "
            "(pass BMACallback(resume_from=<folder with bma.safetensors>) if the files are elsewhere)"
        )
    meta = json.loads(state.read_text())
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{state} is not a BMACallback state file (format {meta.get('format')!r})")
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{state} has format_version {meta.get('format_version')!r}; this reads {_FORMAT_VERSION}")
    return meta, load_file(str(weights))


def load_bma_weights(model: nn.Module, checkpoint_dir: str | os.PathLike[str], strict: bool = True) -> dict[str, Any]:
    """Load the averaged weights saved by :class:`BMACallback` into ``model``; return the metadata.

    When the callback averaged a submodule, they go into ``model.get_submodule(module_name)``.
    Nothing is unpickled (safetensors + JSON).
    """
    meta, tensors = _read(checkpoint_dir)
    target = _select(model, meta.get("module_name"))
    target.load_state_dict(tensors, strict=strict)
    return meta
