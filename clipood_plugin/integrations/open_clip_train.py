"""CLIPood in open_clip's own trainer, with no line of it changed.

::

    python -m clipood_plugin.integrations.open_clip_train <open_clip_train's own arguments> \\
        [--clipood-classnames FILE] [--clipood-lam 0.3] [--clipood-beta 0.5] [--clipood-templates NAME]

runs ``open_clip_train.main.main`` on the remaining arguments, with five names of that module
swapped for the run (and restored after):

- ``create_model_and_transforms``: open_clip's, then the zero-shot :class:`~clipood_plugin.TextHead`
  is built from the *pretrained* text tower, everything outside ``visual.`` is frozen (so the
  trainer's optimizer only sees the image tower), and the model's forward returns
  ``{"image_features", "labels", "logit_scale"}`` instead of running the text tower.
- ``create_loss``: :class:`~clipood_plugin.MMSLoss` against the frozen head (paper Eq. 3–4),
  taking the trainer's ``**model_out``.
- ``get_data``: our WebDataset stream (:mod:`clipood_plugin.data.stream`), which yields class
  labels where open_clip's yields captions. It also sidesteps open_clip 3.3's own loader, which
  needs pandas and breaks on webdataset 1.0.2 (``KeyError: 'fname'``).
- ``evaluate``: top-1 of the live tower and of the Beta Moving Average with the head on
  ``--val-data``, logged and appended to ``results.jsonl`` as open_clip does.
- ``torch`` (only the name inside ``open_clip_train.main``): ``save`` adds the average to every
  checkpoint the trainer writes (``state_dict_bma`` in open_clip's layout, ``clipood`` with the
  BMA count, β, T and the head), so ``--resume`` continues it with no side files.

The Beta Moving Average (paper Eq. 5–7) of the image tower gets one update per optimizer step:
the trainer steps inside its loop body, so the step is complete when the loop asks for the next
batch (or ends). Counting there rather than in an optimizer hook keeps T exact under fp16
``GradScaler``, which skips ``optimizer.step()`` on overflow. T is the trainer's own
``(num_batches // accum_freq) × epochs``.

Shards are ``clipood-make-shards`` output (``<key>.jpg``/``.png`` + ``<key>.cls``); the class
names default to the ``classnames.json`` beside the training shards. Load the average of a
checkpoint into an open_clip model with :func:`load_average`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipood_plugin._wrappers import unwrap_model
from clipood_plugin.averaging import DEFAULT_BETA, BetaMovingAverage
from clipood_plugin.data.stream import EvalLoader, TrainLoader, make_eval_loader, make_train_loader
from clipood_plugin.data.urls import expand_urls, read_json, sibling_url
from clipood_plugin.integrations._bn import BatchNormRefresh, attach_bn_refresh
from clipood_plugin.mms import DEFAULT_LAMBDA, MMSLoss
from clipood_plugin.templates import DEFAULT_TEMPLATE
from clipood_plugin.text_head import TextHead

__all__ = ["load_average", "main"]

_logger = logging.getLogger(__name__)

#: Checkpoint keys this route adds next to open_clip's ``epoch``/``state_dict``/``optimizer``.
AVERAGE_KEY = "state_dict_bma"
STATE_KEY = "clipood"
_REFUSED = {
    "imagenet_val": "--imagenet-val (zero-shot ImageNet needs open_clip's own data loader)",
    "imagenet_v2": "--imagenet-v2 (zero-shot ImageNet needs open_clip's own data loader)",
    "distill_model": "--distill-model (distillation losses are contrastive)",
    "lock_image": "--lock-image (CLIPood trains the image tower)",
    "torchscript": "--torchscript",
    "trace": "--trace",
}


@dataclass
class _Options:
    classnames: str | None
    lam: float
    beta: float
    templates: str


def _parse_options(argv: Sequence[str]) -> tuple[_Options, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m clipood_plugin.integrations.open_clip_train",
        description="open_clip_train with CLIPood (MMS on a frozen text head + BMA); other arguments go to open_clip_train",
        add_help=False,
    )
    parser.add_argument("--clipood-classnames", default=None,
                        help="class names, a JSON list or one per line (default: classnames.json beside --train-data)")
    parser.add_argument("--clipood-lam", type=float, default=DEFAULT_LAMBDA, help="MMS margin λ (default 0.3)")
    parser.add_argument("--clipood-beta", type=float, default=DEFAULT_BETA, help="BMA β (default 0.5)")
    parser.add_argument("--clipood-templates", default=DEFAULT_TEMPLATE,
                        help="prompt template or preset for the text head (default: CLIPood's one template)")
    ns, rest = parser.parse_known_args(list(argv))
    if any(a in ("-h", "--help") for a in rest):
        parser.print_help()
    return _Options(ns.clipood_classnames, ns.clipood_lam, ns.clipood_beta, ns.clipood_templates), rest


def _read_classnames(path: str | None, train_data: str | None) -> list[str]:
    if path is None:
        if not train_data:
            raise ValueError("--clipood-classnames is needed when there is no --train-data to find classnames.json beside")
        first = expand_urls(train_data)[0]
        found = read_json(sibling_url(first, "classnames.json"), missing_ok=True)
        if found is None:
            raise ValueError(f"no classnames.json beside {first!r}: pass --clipood-classnames FILE")
        names = found
    else:
        text = Path(path).read_text(encoding="utf-8")
        names = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class names must be a non-empty list of strings, got {names!r:.200}")
    return names


# ------------------------------------------------------------------------------------------
# The model, loss, data and evaluation the trainer runs
# ------------------------------------------------------------------------------------------


def _features_forward(self: nn.Module, image: Tensor | None = None, text: Tensor | None = None) -> dict[str, Tensor]:
    """Bound as the CLIP model's ``forward``: image features and the labels, no text tower."""
    out: dict[str, Tensor] = {"logit_scale": self.logit_scale.exp()}
    if image is not None:
        out["image_features"] = self.encode_image(image)
    if text is not None:
        out["labels"] = text
    return out


class OpenClipMMS(nn.Module):
    """MMS with open_clip's loss signature: ``loss(image_features=, labels=, ..., output_dict=)``."""

    def __init__(self, mms: MMSLoss) -> None:
        super().__init__()
        self.mms = mms

    def forward(
        self, image_features: Tensor, labels: Tensor, output_dict: bool = False, **_: Any
    ) -> Tensor | dict[str, Tensor]:
        loss = self.mms(image_features, labels)
        return {"mms_loss": loss} if output_dict else loss


class _StepCountingLoader:
    """The trainer's training loader: our stream, plus one BMA update per completed optimizer step.

    open_clip's loop steps the optimizer in its body for batch ``i`` when ``(i + 1) %
    accum_freq == 0``, so that step is complete when batch ``i + 1`` is requested (or the epoch
    ends). ``num_batches`` / ``num_samples`` are what the trainer reads for its schedule and logs.
    """

    def __init__(self, train: TrainLoader, accum_freq: int, on_step: Any) -> None:
        self.train = train
        self.accum_freq = accum_freq
        self.on_step = on_step
        self.num_batches = train.steps_per_epoch
        self.num_samples = train.samples_per_epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple]:
        i = 0
        for i, batch in enumerate(self.train, start=1):
            if i > 1 and (i - 1) % self.accum_freq == 0:
                self.on_step()
            yield batch
        if i and i % self.accum_freq == 0:
            self.on_step()


class _EvalData:
    def __init__(self, loader: EvalLoader) -> None:
        self.dataloader = loader

    def set_epoch(self, epoch: int) -> None:
        return None


class _TrainData:
    def __init__(self, loader: _StepCountingLoader) -> None:
        self.dataloader = loader

    def set_epoch(self, epoch: int) -> None:
        self.dataloader.train.set_epoch(epoch)


@dataclass
class _Run:
    """What the swapped-in functions share during one ``main`` call."""

    options: _Options
    model: nn.Module | None = None
    head: TextHead | None = None
    classnames: list[str] = field(default_factory=list)
    bma: BetaMovingAverage | None = None
    train: TrainLoader | None = None
    bn_refresh: BatchNormRefresh | None = None

    # -- create_model_and_transforms ------------------------------------------------------

    def create_model_and_transforms(self, original: Any, model_name: str, *args: Any, **kwargs: Any) -> Any:
        import open_clip

        model, preprocess_train, preprocess_val = original(model_name, *args, **kwargs)
        if self.model is not None:
            raise ValueError("the CLIPood route builds one model; --distill-model is not supported")
        tokenizer = open_clip.get_tokenizer(model_name, context_length=kwargs.get("force_context_length"))
        was_training = model.training
        self.head = TextHead.from_open_clip(model, tokenizer, self.classnames, self.options.templates).requires_grad_(False)
        model.train(was_training)
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("visual."))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{type(model).__name__} has no parameters under 'visual.' to train")
        model.forward = types.MethodType(_features_forward, model)
        self.model = model
        _logger.info("CLIPood: text head %d classes × %d (frozen), image tower trains", *self.head.weight.shape)
        return model, preprocess_train, preprocess_val

    def create_loss(self, args: Any) -> nn.Module:
        assert self.head is not None
        return OpenClipMMS(MMSLoss(self.head, lam=self.options.lam))

    # -- get_data -------------------------------------------------------------------------

    def get_data(self, args: Any, preprocess_fns: tuple[Any, Any], epoch: int = 0, tokenizer: Any = None) -> dict:
        preprocess_train, preprocess_val = preprocess_fns
        data: dict[str, Any] = {}
        if args.dataset_type not in ("auto", "webdataset"):
            raise ValueError(f"the CLIPood route reads WebDataset shards with labels; --dataset-type {args.dataset_type} is not supported")
        if args.train_data:
            self.train = make_train_loader(
                args.train_data, batch_size=args.batch_size, transform=preprocess_train,
                num_classes=len(self.classnames), num_samples=args.train_num_samples, workers=args.workers,
                world_size=args.world_size, rank=args.rank, seed=args.seed, resampled=args.dataset_resampled,
            )
            total_steps = (self.train.steps_per_epoch // args.accum_freq) * args.epochs
            if total_steps < 1:
                raise ValueError(
                    f"the run has no optimizer steps: {self.train.steps_per_epoch} batches per epoch // "
                    f"--accum-freq {args.accum_freq} × {args.epochs} epochs"
                )
            self._start_average(args, total_steps)
            data["train"] = _TrainData(_StepCountingLoader(self.train, args.accum_freq, self._step))
            data["train"].set_epoch(epoch)
        if args.val_data:
            data["val"] = _EvalData(make_eval_loader(
                args.val_data, batch_size=args.batch_size, transform=preprocess_val,
                num_classes=len(self.classnames), workers=args.workers,
            ))
        return data

    def _tower(self) -> nn.Module:
        assert self.model is not None
        return unwrap_model(self.model).visual

    def _start_average(self, args: Any, total_steps: int) -> None:
        """θ_0 is the tower now (get_data runs after the trainer's resume, before any step)."""
        self.bma = BetaMovingAverage(self._tower(), total_steps=total_steps, beta=self.options.beta)
        if args.resume:
            self._resume_average(args.resume)
        self.bn_refresh = attach_bn_refresh(self.bma, self.train, None, "open_clip_train CLIPood")
        _logger.info("CLIPood: BMA beta=%s, T=%d, at step %d", self.options.beta, total_steps, self.bma.steps)

    def _resume_average(self, path: str) -> None:
        from open_clip_train.file_utils import pt_load

        assert self.bma is not None and self.head is not None
        checkpoint = pt_load(path, map_location="cpu")
        state = checkpoint.get(STATE_KEY) if isinstance(checkpoint, dict) else None
        if state is None or AVERAGE_KEY not in checkpoint:
            raise ValueError(
                f"{path} has no CLIPood average ({AVERAGE_KEY!r} / {STATE_KEY!r}): it was not written by this route, "
                "so the BMA cannot resume from it"
            )
        saved_head = state["text_head"]["weight"].to(self.head.weight)
        if state.get("classnames") != self.classnames or not torch.allclose(saved_head, self.head.weight, atol=1e-5):
            raise ValueError(
                f"{path} was trained against another text head (class names, their order, templates or text tower "
                "differ); resuming would relabel the average"
            )
        tower_sd = {k[len("visual."):]: v for k, v in _strip(checkpoint[AVERAGE_KEY]).items() if k.startswith("visual.")}
        full = {f"module.{k}": v for k, v in tower_sd.items()}
        full.update(state["bma"])
        self.bma.load_state_dict(full)

    def _step(self) -> None:
        assert self.bma is not None
        self.bma.update_parameters(self._tower())

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint_entries(self) -> dict[str, Any]:
        if self.bma is None or self.model is None or self.head is None:
            return {}
        model = unwrap_model(self.model)
        average = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for key, value in self.bma.module.state_dict().items():
            average[f"visual.{key}"] = value.detach().to(dtype=average[f"visual.{key}"].dtype).clone()
        bookkeeping = {k: v for k, v in self.bma.state_dict().items() if not k.startswith("module.")}
        return {
            AVERAGE_KEY: average,
            STATE_KEY: {
                "bma": bookkeeping,
                "classnames": list(self.classnames),
                "lam": self.options.lam,
                "text_head": dict(self.head.state_dict()),
            },
        }

    # -- evaluate -------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, data: dict, epoch: int, args: Any, tb_writer: Any = None, tokenizer: Any = None) -> dict:
        from open_clip import get_input_dtype
        from open_clip_train.distributed import is_master
        from open_clip_train.precision import get_autocast

        metrics: dict[str, Any] = {}
        if not is_master(args) or "val" not in data:
            return metrics
        if not (args.val_frequency and (epoch % args.val_frequency == 0 or epoch == args.epochs)):
            return metrics
        assert self.head is not None
        device = torch.device(args.device)
        autocast = get_autocast(args.precision, device_type=device.type)
        input_dtype = get_input_dtype(args.precision)
        towers = {"top1": self._tower()}
        if self.bma is not None:
            towers["bma_top1"] = self.bma.module
        for name, tower in towers.items():
            was_training = tower.training
            tower.eval()
            correct = seen = 0
            with torch.no_grad():
                for images, labels, *_ in data["val"].dataloader:
                    images = images.to(device=device, dtype=input_dtype if name == "top1" else None)
                    with autocast():
                        logits = self.head(tower(images))
                    correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
                    seen += labels.numel()
            tower.train(was_training)
            metrics[name] = correct / max(1, seen)
        metrics.update({"epoch": epoch, "num_samples": seen})
        logging.info(f"Eval Epoch: {epoch} " + "\t".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        if args.save_logs:
            if tb_writer is not None:
                for key, value in metrics.items():
                    tb_writer.add_scalar(f"val/{key}", value, epoch)
            with open(os.path.join(args.checkpoint_path, "results.jsonl"), "a+") as f:
                f.write(json.dumps(metrics) + "\n")
        return metrics


def _strip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


class _TorchWithAverage(types.ModuleType):
    """``torch`` as ``open_clip_train.main`` sees it for the run: ``save`` adds the average to
    the trainer's checkpoint dicts (recognised by their ``epoch``/``state_dict``/``optimizer``)."""

    def __init__(self, run: _Run) -> None:
        super().__init__("torch")
        self._run = run

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def save(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and {"epoch", "state_dict", "optimizer"} <= obj.keys():
            obj = {**obj, **self._run.checkpoint_entries()}
        torch.save(obj, f, *args, **kwargs)


def _import_trainer() -> types.ModuleType:
    """``open_clip_train.main``; if its data module cannot import (open_clip 3.3 needs pandas,
    which this route never uses), a stand-in holding only ``get_data`` lets it load."""
    try:
        import open_clip_train.main as trainer
    except ImportError as err:
        if not str(getattr(err, "name", "") or "").startswith(("pandas", "webdataset")):
            raise
        stand_in = types.ModuleType("open_clip_train.data")
        stand_in.get_data = None  # type: ignore[attr-defined]  # replaced for the run
        sys.modules["open_clip_train.data"] = stand_in
        try:
            import open_clip_train.main as trainer
        finally:
            del sys.modules["open_clip_train.data"]
        _logger.debug("open_clip_train.data could not import (%s); this route does not need it", err)
    return trainer


@contextlib.contextmanager
def _swapped(trainer: types.ModuleType, run: _Run) -> Iterator[None]:
    original_create = trainer.create_model_and_transforms
    swaps = {
        "create_model_and_transforms": lambda *a, **k: run.create_model_and_transforms(original_create, *a, **k),
        "create_loss": run.create_loss,
        "get_data": run.get_data,
        "evaluate": run.evaluate,
        "torch": _TorchWithAverage(run),
    }
    saved = {name: getattr(trainer, name) for name in swaps}
    for name, value in swaps.items():
        setattr(trainer, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)


def main(argv: Sequence[str]) -> int:
    """Run open_clip's trainer with CLIPood on ``argv`` (its own arguments plus ``--clipood-*``)."""
    options, rest = _parse_options(argv)
    trainer = _import_trainer()
    from open_clip_train.params import parse_args

    probe = parse_args(list(rest))  # open_clip's own parser: its errors and --help as usual
    refused = [why for key, why in _REFUSED.items() if getattr(probe, key, None)]
    if refused:
        raise SystemExit(f"the CLIPood route does not support {', '.join(refused)}")
    run = _Run(options, classnames=_read_classnames(options.classnames, probe.train_data))
    with _swapped(trainer, run):
        result = trainer.main(list(rest))
    return int(result or 0) if isinstance(result, int) else 0


def load_average(model: nn.Module, checkpoint_path: str | os.PathLike[str], strict: bool = True) -> Any:
    """Load the BMA weights of a checkpoint this route wrote into an open_clip ``model``.

    The average is stored in open_clip's own layout (the whole model, with the averaged image
    tower), so this is ``model.load_state_dict(checkpoint["state_dict_bma"])``; the live weights
    stay under ``state_dict``, where open_clip's loaders look. Loads without unpickling code.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or AVERAGE_KEY not in checkpoint:
        raise ValueError(f"{checkpoint_path} holds no {AVERAGE_KEY!r}: it was not written by the CLIPood open_clip_train route")
    return unwrap_model(model).load_state_dict(_strip(checkpoint[AVERAGE_KEY]), strict=strict)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
