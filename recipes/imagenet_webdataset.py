"""CLIPood fine-tuning on WebDataset shards: one file, top to bottom, timm-style.

    python recipes/imagenet_webdataset.py                       # the embedded default, offline, CPU
    python recipes/imagenet_webdataset.py -c my.yaml --lr 1e-5  # YAML defaults, flags override
    torchrun --nproc_per_node=8 recipes/imagenet_webdataset.py --train-shards 's3://b/in1k-{0000..1023}.tar' ...
    torchrun --nproc_per_node=8 recipes/imagenet_webdataset.py --fsdp --model ViT-bigG-14 ...  # sharded tower

The order of one step (docs/architecture): shards → streaming pipeline → image tower →
MMSLoss against the frozen TextHead → backward, optimizer, scheduler → BetaMovingAverage update →
every epoch, evaluation of the raw and the averaged weights → an atomic checkpoint.

Several ``--bma-beta`` values keep one average each in the same run; ``--posthoc-snapshots K``
records the trajectory so that ``clipood-posthoc`` builds the average of any β after it.

Defaults are the paper's: AdamW (wd 0.1), cosine schedule with no warmup, λ = 0.3, β = 0.5,
T = the run's optimizer steps, only the image tower trains, and the model's own logit scale.

Two numerics (docs/numerics.md): ``--numerics clean`` (default) keeps fp32 master weights, optional
autocast and an fp32 BMA, the better way to fine-tune; ``--numerics official`` is the official
code's run (fp16 weights rounded back after every AdamW step, fp16 MMS logits, the fp16 BMA), the
way to reproduce the paper's numbers. ``--augment official`` uses the official transforms.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))

import torch
import yaml
from torch import nn

from clipood_plugin import BetaMovingAverage, ExponentialMovingAverage, MMSLoss, TextHead
from clipood_plugin.data.balanced import BalancedLoader, make_balanced_loader, parse_domain_urls
from clipood_plugin.data.in_memory import (
    AUTO_MAX_SAMPLES,
    InMemoryLoader,
    make_in_memory_loader,
    use_in_memory,
)
from clipood_plugin.data.stream import TrainLoader, make_eval_loader, make_train_loader
from clipood_plugin.models import create_clip, load_classnames
from clipood_plugin.official import (
    OfficialPrecisionStep,
    official_text_features,
    official_transforms,
    to_official_precision,
)
from clipood_plugin.posthoc import TrajectorySnapshots
from clipood_plugin.templates import clean_classname, get_templates, render_template
from clipood_plugin.training.checkpoint import (
    CheckpointManager,
    ShardedCheckpointManager,
    capture_rng,
    load_checkpoint,
    per_rank_key,
    restore_rng,
)
from clipood_plugin.training.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
)
from clipood_plugin.training.evaluate import evaluate
from clipood_plugin.training.preemption import Preemption
from clipood_plugin.training.progress import TrainProgress
from clipood_plugin.training.tracking import ExperimentTracker

if TYPE_CHECKING:
    from clipood_plugin.world.default import EmbeddedDefault

# ----------------------------------------------------------------------------------------------
# Configuration: -c/--config YAML gives defaults, command-line flags override (timm's two stages)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="CLIPood (MMS + BMA) fine-tuning of a CLIP image tower on WebDataset shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-c", "--config", default=None, help="YAML file of defaults (keys are flag names with _)")

    g = p.add_argument_group("data")
    g.add_argument("--train-shards", default=None,
                   help="training shards: brace pattern, '::'-list, directory, file://, s3://, gs://, az://, http(s)://; "
                        "omit all data flags to run the embedded default world")
    g.add_argument("--train-shards-per-domain", action="append", default=[], metavar="DOMAIN=URLS",
                   help="instead of --train-shards: one source domain's shards (repeatable); every step "
                        "concatenates --batch-size samples of each domain (DomainBed's balanced batches)")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch (else read from sizes.json / _info.json beside the shards)")
    g.add_argument("--classnames", default=None,
                   help="class names of the training shards: a JSON list or a text file, one per line "
                        "(default: classnames.json beside the shards)")
    g.add_argument("--allow-duplicate-classnames", action="store_true",
                   help="accept repeated class names (ImageNet's list repeats 'missile' and 'sunglasses'); "
                        "their identical prompts give tied logits, as in the official code")
    g.add_argument("--template", default="clip",
                   help="prompt template preset (clip, openai_imagenet, simple_imagenet, a dataset name) or a "
                        "template string with {}")
    g.add_argument("--eval-shards", action="append", default=[], metavar="NAME=URLS[|CLASSNAMES]",
                   help="an evaluation set (repeatable); its own class-name file after '|' (default: the training "
                        "class names)")
    g.add_argument("--eval-class-subset", action="append", default=[], metavar="NAME=IDX,IDX|@FILE",
                   help="restrict an eval set's argmax to these class indices (or names in a file), e.g. ImageNet-A/R")
    g.add_argument("--base-classes", default=None,
                   help="comma-separated base class indices: eval reports base, new and harmonic mean")
    g.add_argument("--resampled", action="store_true", help="sample shards with replacement (infinite stream)")
    g.add_argument("--shuffle-buffer", type=int, default=2000, help="sample shuffle buffer per worker")
    g.add_argument("--in-memory", choices=["auto", "on", "off"], default="auto",
                   help="hold --train-shards in memory and draw every batch uniformly from the whole set, as the "
                        f"official few-shot loader does (auto: sets of at most {AUTO_MAX_SAMPLES} samples per sizes.json)")
    g.add_argument("--workers", type=int, default=2, help="data-loading worker processes per rank")
    g.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="open_clip model name, e.g. ViT-B-16 (default: the embedded tiny CLIP)")
    g.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (e.g. openai) or a local checkpoint (.safetensors, or a torch file "
                        "loaded with weights_only=True)")
    g.add_argument("--timm-tower", default=None,
                   help="use this timm CLIP image tower (e.g. vit_base_patch16_clip_quickgelu_224.openai) with the "
                        "open_clip text tower of --model")
    g.add_argument("--freeze", choices=["text", "text+embeddings"], default="text",
                   help="what stays frozen: the text tower (paper), or also the patch/positional embeddings")
    g.add_argument("--torchcompile", action="store_true", help="torch.compile the image tower")
    g.add_argument("--numerics", choices=["clean", "official"], default="clean",
                   help="clean: fp32 master weights, optional --amp, fp32 BMA; official: the official code's "
                        "fp16 weights rounded back after each AdamW step, fp16 MMS and BMA, no autocast "
                        "(to reproduce the paper; docs/numerics.md)")
    g.add_argument("--augment", choices=["open_clip", "official"], default="open_clip",
                   help="open_clip: the model's own preprocess (bicubic, scale 0.9-1, no flip); official: "
                        "RandomResizedCrop(scale 0.7-1, bilinear) + flip for training, Resize + CenterCrop for eval")

    g = p.add_argument_group("method")
    g.add_argument("--loss", choices=["mms", "ce", "carft"], default="mms",
                   help="mms: Margin Metric Softmax (paper Eq. 3-4); ce: cross-entropy on the frozen text head; "
                        "carft: --carft-base plus CAR-FT's context KL to the pretrained tower")
    g.add_argument("--carft-weight", type=float, default=1.0, help="CAR-FT: weight of the context KL (λ_ctx)")
    g.add_argument("--carft-templates", default="openai_imagenet", help="CAR-FT: the context templates (a preset)")
    g.add_argument("--carft-base", choices=["ce", "mms"], default="ce",
                   help="CAR-FT: the classification loss it regularises")
    g.add_argument("--wise-alpha", type=float, default=None,
                   help="also evaluate WiSE-FT: (1-α)·zero-shot + α·fine-tuned weights (eval_wise_*)")
    g.add_argument("--mms-lambda", type=float, default=0.3, help="MMS margin strength λ")
    g.add_argument("--mms-scale", type=float, default=None, help="logit scale s (default: the model's exp(logit_scale))")
    g.add_argument("--bma-beta", type=float, nargs="+", default=[0.5],
                   help="β of the Beta moving average (paper Eq. 6); several values keep one average each, "
                        "updated every step and evaluated as eval_bma<β>_* (one value: eval_bma_*)")
    g.add_argument("--no-bma", action="store_true", help="do not keep a Beta moving average")
    g.add_argument("--ema-decay", type=float, default=None, help="also keep an EMA with this decay, for comparison")
    g.add_argument("--posthoc-snapshots", type=int, default=0, metavar="K",
                   help="record θ_0, θ_T and K segment means under OUTPUT/posthoc for post-hoc averages of any β "
                        "(clipood-posthoc); disk: K + 2 fp32 copies of the tower; 0: off")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1,
                   help="epochs: passes over --train-num-samples, or --iters-per-epoch batches each")
    g.add_argument("--total-steps", type=int, default=None,
                   help="optimizer steps (T of BMA); default: epochs × steps per epoch / grad accum")
    g.add_argument("--batch-size", type=int, default=36,
                   help="per-rank batch size (per domain with --train-shards-per-domain)")
    g.add_argument("--iters-per-epoch", type=int, default=None,
                   help="batches per epoch (the official code's 'epoch' is 500 iterations); default: one data pass")
    g.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate (paper: 5e-6)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay, on every parameter (paper)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup before the cosine (paper: none)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast dtype; weights and the BMA stay fp32")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")

    g = p.add_argument_group("run")
    g.add_argument("--output", default="output/train", help="run directory (args.yaml, summary.csv, checkpoints)")
    g.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --output) or a checkpoint path")
    g.add_argument("--checkpoint-interval", type=int, default=0,
                   help="also checkpoint every N optimizer steps (0: at epoch ends only)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="step checkpoints to keep besides last and best")
    g.add_argument("--eval-metric", default="eval_bma_top1",
                   help="metric that picks best.pt; a '*' pattern takes the best match, e.g. 'eval_bma*_val_top1' "
                        "picks the β with the best source-validation top-1 (its average becomes state_dict_ema)")
    g.add_argument("--no-eval-zero-shot", action="store_true",
                   help="skip evaluating the pretrained (zero-shot) weights before training")
    g.add_argument("--log-interval", type=int, default=10,
                   help="every N steps append the rank-averaged training loss to train_log.jsonl")
    g.add_argument("--log-wandb", action="store_true",
                   help="also log to Weights & Biases (extra 'wandb'; WANDB_MODE=offline works without a network)")
    g.add_argument("--wandb-project", default="clipood", help="the wandb project for --log-wandb")
    g.add_argument("--tensorboard", default=None, metavar="DIR", help="also write TensorBoard scalars to DIR")
    g.add_argument("--seed", type=int, default=0, help="seeds model init, data order and augmentation")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the image tower over the ranks with FSDP2 (fully_shard, per block) instead of DDP; "
                        "the averages hold shards, checkpoints are DCP step directories, and the final tower and "
                        "averages are exported as tower/bma_tower/ema_tower.safetensors")
    g.add_argument("--cache-dir", default=None, help="cache for text heads and the embedded world")
    g.add_argument("--quick", action="store_true", help="embedded default only: a small world and few steps")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        defaults = yaml.safe_load(Path(first.config).read_text()) or {}
        known = set(vars(parser.parse_args([])))  # every flag's dest
        unknown = sorted(set(defaults) - known)
        if unknown:
            parser.error(f"{first.config}: unknown keys {unknown}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if len(set(bma_betas(args))) < len(bma_betas(args)):
        parser.error(f"--bma-beta repeats a value: {args.bma_beta}")
    if args.posthoc_snapshots < 0:
        parser.error(f"--posthoc-snapshots must be >= 0, got {args.posthoc_snapshots}")
    return args


def apply_embedded_default(args: argparse.Namespace, default: EmbeddedDefault) -> None:
    """Point ``args`` at the embedded world (in place): its shards and class names always; its eval
    sets, model, template, fine-tuning settings and output name only where ``args`` still holds the
    flag's own default (not a -c YAML's), so ``--lr`` and friends still apply to the embedded default."""
    flags = build_parser()
    args.train_shards = default.train_shards
    args.classnames = default.classnames
    if not args.eval_shards:
        args.eval_shards = list(default.eval_shards)
    if args.model is None:
        args.model, args.pretrained = default.model, default.pretrained
    if args.template == flags.get_default("template"):
        args.template = list(default.template)  # a list: args are saved as YAML
    for dest, value in default.hparams.items():
        if getattr(args, dest) == flags.get_default(dest):
            setattr(args, dest, value)
    if args.output == flags.get_default("output"):
        args.output = str(Path(args.output).parent / default.output_name)


def bma_betas(args: argparse.Namespace) -> list[float]:
    """The --bma-beta values as a list (a YAML config may give one β as a scalar)."""
    return [float(b) for b in (args.bma_beta if isinstance(args.bma_beta, list) else [args.bma_beta])]


def bma_prefix(beta: float, betas: list[float]) -> str:
    """Metric prefix of the average with this β: eval_bma for a single β, else eval_bma<β> (eval_bma0.1)."""
    return "eval_bma" if len(betas) == 1 else f"eval_bma{beta:g}"


def select_metric(metrics: dict[str, Any], pattern: str) -> tuple[float | None, str | None]:
    """(value, key) of --eval-metric: the metric itself, or the best of those a '*' pattern matches."""
    import fnmatch

    keys = [k for k in metrics if fnmatch.fnmatchcase(k, pattern)] if "*" in pattern else [pattern]
    keys = [k for k in keys if isinstance(metrics.get(k), (int, float)) and metrics[k] == metrics[k]]
    best = max(keys, key=lambda k: metrics[k], default=None)
    return (None, None) if best is None else (float(metrics[best]), best)


# ----------------------------------------------------------------------------------------------
# Building blocks (each small; the main loop below reads top to bottom)


def train_data(args: argparse.Namespace, transform: Any, num_classes: int,
               dist_info: DistInfo) -> TrainLoader | BalancedLoader | InMemoryLoader:
    """The training stream: one shuffled stream (--train-shards) or balanced per-domain batches
    (--train-shards-per-domain). --iters-per-epoch fixes the batches per epoch of either; one stream
    with a fixed count is the one-domain case of the balanced loader. A small --train-shards set
    (--in-memory) is read once and every batch drawn uniformly from all of it."""
    common = dict(transform=transform, num_classes=num_classes, workers=args.workers, world_size=dist_info.world_size,
                  rank=dist_info.rank, seed=args.seed, resampled=args.resampled, shuffle_buffer=args.shuffle_buffer,
                  allow_pipe=args.allow_pipe)
    per_domain = parse_domain_urls(args.train_shards_per_domain)
    if per_domain and args.train_shards:
        raise ValueError("give --train-shards or --train-shards-per-domain, not both")
    if per_domain and args.in_memory == "on":
        raise ValueError("--in-memory on applies to --train-shards; per-domain batches keep their streams")
    if per_domain and args.train_num_samples is not None:
        raise ValueError("--train-num-samples does not apply to --train-shards-per-domain (use --iters-per-epoch)")
    if not per_domain and use_in_memory(args.in_memory, args.train_shards, resampled=args.resampled,
                                        num_samples=args.train_num_samples):
        train = make_in_memory_loader(args.train_shards, batch_size=args.batch_size, steps_per_epoch=args.iters_per_epoch,
                                      **{k: v for k, v in common.items() if k not in ("resampled", "shuffle_buffer")})
        if dist_info.is_primary:
            print(f"training set in memory: {train.num_samples} samples ({train.num_bytes / 2**20:.1f} MB), every batch "
                  "a uniform draw from all of them", file=sys.stderr)
        return train
    if per_domain or args.iters_per_epoch is not None:
        return make_balanced_loader(per_domain or {"train": args.train_shards}, batch_per_domain=args.batch_size,
                                    steps_per_epoch=args.iters_per_epoch, **common)
    return make_train_loader(args.train_shards, batch_size=args.batch_size, num_samples=args.train_num_samples,
                             **common)


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, nn.Module, Any, Any, Any]:
    """(clip_model, image_tower, train_transform, eval_transform, tokenizer); QuickGELU and local
    weights as clipood_plugin.models.create_clip does them."""
    model, train_tf, eval_tf, tokenizer = create_clip(args.model, args.pretrained, device)
    tower: nn.Module = model.visual
    if args.timm_tower:
        import timm

        name = args.timm_tower
        if ".openai" in name and "quickgelu" not in name:
            print(f"warning: {name} is natively QuickGELU; use the *_clip_quickgelu_* variant "
                  "(timm#2031) or features will not match the text tower", file=sys.stderr)
        tower = timm.create_model(name, pretrained=True, num_classes=model.text_projection.shape[1]).to(device)
        data_cfg = timm.data.resolve_data_config({}, model=tower)
        train_tf = timm.data.create_transform(**data_cfg, is_training=True)
        eval_tf = timm.data.create_transform(**data_cfg)
    return model, tower, train_tf, eval_tf, tokenizer


def freeze_all_but_tower(model: nn.Module, tower: nn.Module, freeze: str) -> list[nn.Parameter]:
    model.requires_grad_(False)
    tower.requires_grad_(True)
    if freeze == "text+embeddings":
        for name, p in tower.named_parameters():
            if any(k in name for k in ("conv1", "positional_embedding", "class_embedding", "patch_embed", "pos_embed")):
                p.requires_grad_(False)
    return [p for p in tower.parameters() if p.requires_grad]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup, then cosine to 0 at ``total_steps`` (paper: no warmup)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parse_eval_sets(args: argparse.Namespace, train_classnames: list[str]) -> list[tuple[str, str, list[str]]]:
    sets = []
    for spec in args.eval_shards:
        name, _, rest = spec.partition("=")
        if not rest:
            raise ValueError(f"--eval-shards {spec!r}: expected NAME=URLS[|CLASSNAMES]")
        urls, _, names_file = rest.partition("|")
        names = load_classnames(names_file, urls) if names_file else train_classnames
        sets.append((name, urls, names))
    return sets


def parse_subsets(args: argparse.Namespace, classnames_by_set: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    subsets = {}
    for spec in args.eval_class_subset:
        name, _, rest = spec.partition("=")
        if name not in classnames_by_set:
            raise ValueError(f"--eval-class-subset names unknown eval set {name!r}")
        if rest.startswith("@"):
            wanted = [line.strip() for line in Path(rest[1:]).read_text().splitlines() if line.strip()]
            index = {n: i for i, n in enumerate(classnames_by_set[name])}
            missing = [w for w in wanted if w not in index]
            if missing:
                raise ValueError(f"--eval-class-subset {name}: names not among its classes: {missing[:5]}")
            subsets[name] = torch.tensor([index[w] for w in wanted])
        else:
            subsets[name] = torch.tensor([int(i) for i in rest.split(",")])
    return subsets


def build_loss(args: argparse.Namespace, model: nn.Module, tower: nn.Module, tokenizer: Any, classnames: list[str],
               head: TextHead, device: torch.device, primary: bool,
               official_text: torch.Tensor | None = None) -> Any:
    """``loss_fn(tower, images, labels)`` for --loss mms | ce | carft (built before any step).

    ``official_text``: with --numerics official, the fp16 text features :func:`official_head` returns.
    """
    if args.numerics == "official":  # the official engine.py loss: fp16 logits from the fp16 text features
        if official_text is None:
            raise ValueError("--numerics official: build_loss needs the fp16 text features official_head returns")
        official_mms = MMSLoss(official_text, lam=args.mms_lambda,
                               scale=args.mms_scale or float(head.scale), precision="input", check_inputs=False)
        return lambda net, images, labels: official_mms(net(images), labels)
    if args.loss == "mms" or (args.loss == "carft" and args.carft_base == "mms"):
        # no per-step input checks (each a host sync on GPU): the stream validated the labels, and a
        # non-finite loss is diagnosed by the loop from the one loss read it makes per step
        classify: nn.Module = MMSLoss(head, lam=args.mms_lambda, scale=args.mms_scale, check_inputs=False)
    else:
        from clipood_plugin.carft import HeadCrossEntropy

        classify = HeadCrossEntropy(head)
    if args.loss != "carft":
        return lambda net, images, labels: classify(net(images), labels)
    from clipood_plugin.carft import CARFTLoss, ContextBank

    bank = ContextBank.from_open_clip(model, tokenizer, classnames, templates=args.carft_templates,
                                      device=device, progress=primary,
                                      allow_duplicates=args.allow_duplicate_classnames).to(device)
    # the frozen copy of the *pretrained* tower: taken here, before any step or resume
    carft = CARFTLoss(classify, bank, weight=args.carft_weight, pretrained_tower=tower)
    return lambda net, images, labels: carft(net(images), labels, images=images)


@torch.no_grad()
def describe_non_finite(tower: nn.Module, images: torch.Tensor, step: int, sharded: bool) -> str:
    """Why the loss of optimizer step ``step`` is NaN/Inf, from the last micro-batch (checked only then)."""
    where = f"the training loss is not finite at optimizer step {step}"
    if sharded:  # a forward on one rank alone would wait forever for the others' all-gathers
        return f"{where}; lower --lr, or check the data"
    was = tower.training
    feats = tower.eval()(images)
    tower.train(was)
    bad_rows = (~torch.isfinite(feats).all(dim=1)).nonzero().flatten().tolist()
    if bad_rows:
        return f"{where}: the image tower's features are NaN/Inf (batch rows {bad_rows[:8]}); lower --lr"
    return f"{where} although the image features are finite: lower --lr or --mms-scale"


def check_official_flags(args: argparse.Namespace) -> None:
    """--numerics official is the official run: refuse what it does not have, rather than mix."""
    clashes = {"--amp": args.amp != "none", "--warmup-steps": args.warmup_steps > 0,
               "--clip-grad": args.clip_grad is not None, "--loss ce/carft": args.loss != "mms",
               "--timm-tower": args.timm_tower is not None, "--ema-decay": args.ema_decay is not None,
               "--fsdp": bool(getattr(args, "fsdp", False))}
    bad = [flag for flag, clash in clashes.items() if clash]
    if bad:
        raise ValueError(f"--numerics official reproduces the official CLIPood step (fp16 weights, MMS, no autocast, "
                         f"no warmup or clipping); it does not combine with {', '.join(bad)}")


def official_head(model: nn.Module, tokenizer: Any, names: list[str], templates: tuple[Any, ...],
                  device: torch.device, allow_duplicates: bool) -> tuple[TextHead, torch.Tensor]:
    """The official get_text_features (one template, fp16 text tower): ``(head, fp16 features)``.

    The fp16 features are for the fp16 MMS loss (:func:`build_loss`); the head evaluates in fp32."""
    if len(templates) != 1:
        raise ValueError(f"--numerics official uses one prompt template per class, as the official code; "
                         f"--template gives {len(templates)}")
    prompts = [render_template(templates[0], clean_classname(n)) for n in names]
    raw = official_text_features(model, tokenizer, prompts, device)
    head = TextHead(raw.float(), float(model.logit_scale.detach().exp()), names, templates,
                    allow_duplicates=allow_duplicates).to(device)
    return head, raw


def wise_tower(tower: nn.Module, zero_shot_state: dict[str, torch.Tensor], alpha: float) -> nn.Module:
    """A copy of the tower with WiSE-FT weights (1-α)·θ_zs + α·θ_ft, for evaluation."""
    import copy

    from clipood_plugin import interpolate_weights

    finetuned = {k: v.detach().cpu() for k, v in tower.state_dict().items()}
    mixed = copy.deepcopy(tower)
    mixed.load_state_dict(interpolate_weights(zero_shot_state, finetuned, alpha))
    return mixed


def fsdp_state(tower: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, bma: Any, ema: Any,
               rng_keys: list[str]) -> dict[str, Any]:
    """--fsdp: the DCP state, keyed as the single-file checkpoint. The tower and optimizer come as FQN-keyed
    DTensor shards; the RNG of each rank under its own key (DCP saves a key that all ranks hold only once)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(tower, optimizer)
    state = {"state_dict": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), **{key: capture_rng() for key in rng_keys}}
    for key, average in (("averager", bma), ("ema", ema)):
        if average is not None:
            state[key] = average.state_dict()
    return state


def write_summary(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def print_results_table(results: dict[str, Any], eval_names: list[str], out_dir: Path) -> None:
    """Top-1 per eval set for the zero-shot, fine-tuned and averaged weights."""
    from rich.console import Console
    from rich.table import Table

    bma_columns = sorted({m.group(1) for k in results if (m := re.match(r"^(eval_bma[0-9.e+-]+)_", k))},
                         key=lambda p: float(p[len("eval_bma"):]))
    columns = [("eval_zs", "zero-shot"), ("eval", "fine-tuned"), ("eval_bma", "BMA (CLIPood)"),
               *[(p, f"BMA β={p[len('eval_bma'):]}") for p in bma_columns], ("eval_ema", "EMA"), ("eval_wise", "WiSE-FT")]
    columns = [(p, title) for p, title in columns if any(f"{p}_{n}_top1" in results for n in eval_names)]
    table = Table(title=f"top-1 accuracy (%), {out_dir}")
    table.add_column("eval set")
    for _, title in columns:
        table.add_column(title, justify="right")
    for name in eval_names:
        table.add_row(name, *[f"{results[f'{p}_{name}_top1']:.1f}" if f"{p}_{name}_top1" in results else "–"
                              for p, _ in columns])
    Console().print(table)


# ----------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    primary = dist_info.is_primary
    torch.manual_seed(args.seed)  # identical model init on every rank

    if args.train_shards is None and not args.train_shards_per_domain:  # the embedded default world and tiny CLIP
        from clipood_plugin.world.default import embedded_default

        if not primary:
            barrier(dist_info)  # rank 0 generates and caches the world first
        apply_embedded_default(args, embedded_default(args.quick, args.cache_dir, progress=primary))
        if primary:
            barrier(dist_info)
    out_dir = Path(args.output)
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))

    # -- model, frozen text head, loss -------------------------------------------------------
    model, tower, train_tf, eval_tf, tokenizer = build_model(args, device)
    if args.augment == "official":
        train_tf, eval_tf = official_transforms(tower)
    official = args.numerics == "official"
    if official:
        check_official_flags(args)
        to_official_precision(model)  # the whole CLIP, as clip.load on a GPU: its text side encodes in fp16
    params = freeze_all_but_tower(model, tower, args.freeze)
    classnames = load_classnames(args.classnames, args.train_shards or "::".join(
        parse_domain_urls(args.train_shards_per_domain).values()))
    templates = get_templates(args.template)
    def make_head(names: list[str]) -> tuple[TextHead, torch.Tensor | None]:
        """The frozen head for ``names``, and (official numerics only) its fp16 text features."""
        if official:
            return official_head(model, tokenizer, names, templates, device, args.allow_duplicate_classnames)
        clean = TextHead.from_open_clip(model, tokenizer, names, templates, device=device, cache_dir=args.cache_dir,
                                        progress=primary, allow_duplicates=args.allow_duplicate_classnames)
        return clean.to(device), None

    head, official_text = make_head(classnames)
    loss_fn = build_loss(args, model, tower, tokenizer, classnames, head, device, primary, official_text)
    zero_shot_state = {k: v.detach().to("cpu", copy=True) for k, v in tower.state_dict().items()} \
        if args.wise_alpha is not None else None
    if args.fsdp:  # after the CAR-FT copy, before the optimizer and the averages: both must see the shards
        from clipood_plugin.training.sharded import shard_tower

        if args.wise_alpha is not None or args.amp == "fp16":
            raise ValueError("--fsdp does not support --wise-alpha (it interpolates full copies of the tower) "
                             "or --amp fp16 (GradScaler does not see shards; use --amp bf16)")
        if len(bma_betas(args)) > 1 or args.posthoc_snapshots:
            raise ValueError("--fsdp keeps one Beta moving average: give one --bma-beta and no --posthoc-snapshots "
                             "(the recorder is not sharded)")
        shard_tower(tower, device)
        params = [p for p in tower.parameters() if p.requires_grad]  # fully_shard replaced them by DTensors

    # -- data: every rank takes the same number of steps ------------------------------------
    train = train_data(args, train_tf, len(classnames), dist_info)
    steps_per_epoch = train.steps_per_epoch // args.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {train.steps_per_epoch} batches, fewer than --grad-accum {args.grad_accum}")
    total_steps = args.total_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    eval_sets = parse_eval_sets(args, classnames)
    eval_heads = {name: head if names == classnames else make_head(names)[0] for name, _, names in eval_sets}
    subsets = parse_subsets(args, {name: names for name, _, names in eval_sets})
    base_classes = torch.tensor([int(i) for i in args.base_classes.split(",")]) if args.base_classes else None

    # -- optimisation: AdamW over the tower, cosine per step; fp32 master weights (clean) or the
    #    official fp32-cast / step / fp16-round-back (official), where the scheduler is torch's
    #    CosineAnnealingLR as in the official main.py
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if official:
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    else:
        scheduler = cosine_with_warmup(optimizer, total_steps, args.warmup_steps)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    stepper = OfficialPrecisionStep(optimizer, tower) if official else None
    betas = bma_betas(args)
    storage = "param" if official else "fp32"
    bmas = {} if args.no_bma else {bma_prefix(b, betas): BetaMovingAverage(tower, total_steps=total_steps, beta=b,
                                                                            storage=storage)
                                   for b in betas}  # one average per β, all updated every step
    ema_prefix = next(iter(bmas), None)  # the average saved as state_dict_ema (--eval-metric '*' may switch it)
    bma = next(iter(bmas.values()), None)  # --fsdp keeps one β (checked above): its DCP state and export
    recorder = (TrajectorySnapshots(tower, total_steps, segments=args.posthoc_snapshots, directory=out_dir / "posthoc")
                if args.posthoc_snapshots and primary else None)  # θ_0 recorded here, before any step or resume
    # our EMA (θ_0 included, fp32, resumable with its decay checked), sharded or not
    ema = None if args.ema_decay is None else ExponentialMovingAverage(tower, decay=args.ema_decay)
    train_tower: nn.Module = tower
    if dist_info.distributed and not args.fsdp:
        train_tower = nn.parallel.DistributedDataParallel(
            tower, device_ids=[device.index] if device.type == "cuda" else None)
    if args.torchcompile:
        train_tower = torch.compile(train_tower)

    # -- resume: model, averages, optimizer, schedule, RNG and the data position -----------
    ckpt = (ShardedCheckpointManager if args.fsdp else CheckpointManager)(out_dir / "checkpoints",
                                                                         keep_last=args.keep_checkpoints)
    step, start_epoch, skip_batches = 0, 0, 0
    resume_path = ckpt.latest() if args.resume == "auto" else (Path(args.resume) if args.resume else None)
    if resume_path is not None and args.fsdp:  # every rank reads its shards, and its own RNG
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = fsdp_state(tower, optimizer, scheduler, scaler, bma, ema,
                           [per_rank_key("rng", r) for r in range(dist_info.world_size)])
        meta = ckpt.load(resume_path, state)
        if meta["world_size"] != dist_info.world_size:
            raise ValueError(f"{resume_path} was saved by {meta['world_size']} ranks; resume it with as many "
                             "(each rank's RNG and data position are part of the exact resume)")
        set_state_dict(tower, optimizer, model_state_dict=state.pop("state_dict"),
                       optim_state_dict=state.pop("optimizer"))
        state |= {**meta, "rng": state[per_rank_key("rng", dist_info.rank)]}
    elif resume_path is not None:
        state = load_checkpoint(resume_path)
        tower.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
    if resume_path is not None:
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        saved = state.get("averagers") or ({f"{betas[0]:g}": state["averager"]} if "averager" in state else {})
        for avg in bmas.values():
            if f"{avg.beta:g}" not in saved:
                raise ValueError(f"{resume_path} holds no BMA for β={avg.beta:g} (it has β {sorted(saved)})")
            avg.load_state_dict(saved[f"{avg.beta:g}"])
        ema_prefix = state.get("state_dict_ema_prefix") if state.get("state_dict_ema_prefix") in bmas else ema_prefix
        if recorder is not None:
            if "posthoc" not in state:
                raise ValueError(f"{resume_path} was saved without --posthoc-snapshots: a recording cannot start mid-run")
            recorder.load_state_dict(state["posthoc"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])
        step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        ckpt.best_metric = state.get("best_metric")
        if primary:
            print(f"resumed from {resume_path} at step {step}", file=sys.stderr)

    def checkpoint(epoch: int, batches_in_epoch: int, metric: float | None = None) -> None:
        if args.fsdp:  # a collective: every rank writes its own shards
            ckpt.save(step, fsdp_state(tower, optimizer, scheduler, scaler, bma, ema,
                                       [per_rank_key("rng", dist_info.rank)]),
                      {"epoch": epoch, "batches_in_epoch": batches_in_epoch, "world_size": dist_info.world_size,
                       "metric": metric, "args": vars(args)})
            return
        if not primary:
            return
        state = {
            "arch": args.model, "args": vars(args), "step": step, "epoch": epoch,
            "batches_in_epoch": batches_in_epoch, "state_dict": tower.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": capture_rng(), "best_metric": ckpt.best_metric,
        }
        if bmas:
            state["state_dict_ema"] = bmas[ema_prefix].module.state_dict()  # what timm's readers load
            state["state_dict_ema_prefix"] = ema_prefix
            state["averager"] = next(iter(bmas.values())).state_dict()  # the first β, as with a single one
            state["averagers"] = {f"{avg.beta:g}": avg.state_dict() for avg in bmas.values()}
        if recorder is not None:
            state["posthoc"] = recorder.state_dict()  # the open segment: a kill mid-segment loses nothing
        if ema is not None:
            state["ema"] = ema.state_dict()
        ckpt.save(step, state, metric)

    def run_eval(models: dict[str, nn.Module | None]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if not primary and not args.fsdp:  # sharded: every rank joins each forward's all-gathers
            return metrics
        for name, urls, names in eval_sets:
            loader = make_eval_loader(urls, batch_size=args.batch_size, transform=eval_tf, num_classes=len(names),
                                      workers=min(args.workers, 1), allow_pipe=args.allow_pipe)
            for prefix, net in models.items():
                if net is None:
                    continue
                # --fsdp: an average is evaluated with its shards swapped into the sharded tower
                with net.swapped_into(tower) if args.fsdp and net is not tower else contextlib.nullcontext(net) as net:
                    result = evaluate(net, eval_heads[name], loader, device, amp_dtype=amp_dtype,
                                      class_subset=subsets.get(name), base_classes=base_classes)
                metrics.update({f"{prefix}_{name}_{k}": v for k, v in result.items() if k != "n"})
                if len(eval_sets) == 1:
                    metrics.update({f"{prefix}_{k}": v for k, v in result.items() if k != "n"})
        return metrics

    # -- the loop ------------------------------------------------------------------------------
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    results: dict[str, Any] = {}
    if not args.no_eval_zero_shot and step == 0 and eval_sets:  # the pretrained weights, as the official code
        results.update(run_eval({"eval_zs": tower}))
    trained = {"eval": tower, **{p: avg.module for p, avg in bmas.items()}, "eval_ema": ema.module if ema else None}
    if args.fsdp:  # the sharded averages themselves: run_eval swaps their shards into the tower
        trained |= {**bmas, "eval_ema": ema}
    tracker = ExperimentTracker(wandb_project=args.wandb_project if args.log_wandb else None,
                                tensorboard_dir=args.tensorboard, config=vars(args), run_name=out_dir.name,
                                enabled=primary)
    if tracker.active and results:  # the zero-shot evaluation, at step 0
        tracker.log(results, step)
    # preemption (SIGTERM, SLURM's SIGUSR1): finish the step, checkpoint it on every rank, exit 128+signal
    with Preemption() as preemption, TrainProgress(total_steps, start_step=step, enabled=primary) as bar:
        for epoch in range(start_epoch, epochs):
            train.set_epoch(epoch)
            torch.manual_seed(args.seed * 100_003 + epoch * 1_009 + dist_info.rank)  # data order = f(seed, epoch)
            micro = 0
            loss_acc = torch.zeros((), dtype=acc_dtype, device=device)  # summed on device: no sync per micro-batch
            for batch_index, (images, labels, *_) in enumerate(train):
                if batch_index < skip_batches:  # resuming mid-epoch: replay the stream to its position
                    continue
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                micro += 1
                boundary = micro % args.grad_accum == 0
                if args.fsdp:  # FSDP2's no_sync: no reduce-scatter on accumulation micro-batches
                    tower.set_requires_gradient_sync(boundary)
                sync = (contextlib.nullcontext() if boundary or not dist_info.distributed or args.fsdp
                        else train_tower.no_sync())
                with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = loss_fn(train_tower, images, labels) / args.grad_accum
                    scaler.scale(loss).backward()
                loss_acc += loss.detach().to(acc_dtype)
                if not boundary:
                    continue
                if args.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
                if stepper is not None:
                    stepper.step()  # fp32 cast, AdamW, round back to fp16
                else:
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                loss_sum = loss_acc.item()  # the one host read per optimizer step
                loss_acc.zero_()
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(describe_non_finite(tower, images, step, args.fsdp))
                for avg in bmas.values():
                    avg.update_parameters(tower)
                if recorder is not None:
                    recorder.update_parameters(tower)
                if ema is not None:
                    ema.update_parameters(tower)
                bar.advance(images=len(images) * args.grad_accum * dist_info.world_size, loss=loss_sum,
                            lr=scheduler.get_last_lr()[0], skipped=train.num_skipped)
                results["train_loss"] = loss_sum
                if args.log_interval and (step % args.log_interval == 0 or step == total_steps):
                    global_loss = all_reduce_mean(loss_sum, dist_info)  # a collective: every rank joins
                    if primary:
                        with (out_dir / "train_log.jsonl").open("a") as fh:
                            fh.write(json.dumps({"step": step, "loss": global_loss,
                                                 "lr": scheduler.get_last_lr()[0]}) + "\n")
                        tracker.log({"train/loss": global_loss, "train/lr": scheduler.get_last_lr()[0],
                                     "train/skipped": train.num_skipped}, step)
                if preemption.requested(device):  # all ranks agree (a MAX all-reduce when distributed)
                    checkpoint(epoch, batch_index + 1)
                    barrier(dist_info)  # every rank leaves once the checkpoint is on disk
                    if primary:
                        bar.log(f"preempted: checkpoint at step {step} written; resume with --resume auto")
                    tracker.close()
                    cleanup(dist_info)
                    sys.exit(preemption.exit_code())
                if args.checkpoint_interval and step % args.checkpoint_interval == 0 and step < total_steps:
                    checkpoint(epoch, batch_index + 1)
                if step >= total_steps:
                    break
            skip_batches = 0
            metrics = run_eval(trained)
            if zero_shot_state is not None and primary:
                metrics.update(run_eval({"eval_wise": wise_tower(tower, zero_shot_state, args.wise_alpha)}))
            results.update(metrics)
            if primary:
                row = {"epoch": epoch, "step": step, "train_loss": results.get("train_loss", float("nan")),
                       "lr": scheduler.get_last_lr()[0], "skipped": train.num_skipped, **metrics}
                write_summary(out_dir / "summary.csv", row)
                tracker.log({"epoch": epoch, **metrics}, step)  # raw, BMA (per β), EMA and WiSE metrics
                with (out_dir / "metrics.jsonl").open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                for name, _, _ in eval_sets:
                    bar.log(f"epoch {epoch} {name}: " + ", ".join(
                        f"{p} {metrics[f'{p}_{name}_top1']:.1f}" for p in [*trained, "eval_wise"]
                        if f"{p}_{name}_top1" in metrics))
            value, chosen = select_metric(metrics, args.eval_metric)
            if value is None and metrics and epoch == start_epoch:  # e.g. eval_bma_top1 with several β
                print(f"warning: --eval-metric {args.eval_metric!r} matches no metric, so best.pt is not written; "
                      f"metrics: {', '.join(sorted(k for k in metrics if k.endswith('top1')))}", file=sys.stderr)
            if chosen is not None and "*" in args.eval_metric:
                results["eval_metric_selected"] = chosen
                ema_prefix = next((p for p in bmas if chosen.startswith(p + "_")), ema_prefix)
            checkpoint(epoch + 1, 0, value)
            if step >= total_steps:
                break
    results.update(step=step, total_steps=total_steps, skipped=train.num_skipped)
    if args.fsdp:  # gathered to rank 0 one tensor at a time; each file loads into a bare tower
        from clipood_plugin.training.sharded import export_full

        export_full(out_dir, {"tower": tower, "bma_tower": bma, "ema_tower": ema})
    elif bmas and dist_info.distributed:  # every rank averages the same DDP weights: check it
        fingerprint = sum(p.double().sum().item() for p in next(iter(bmas.values())).module.parameters())
        results["bma_fingerprint_per_rank"] = all_gather_objects(fingerprint, dist_info)
        if primary and len(set(results["bma_fingerprint_per_rank"])) > 1:
            print(f"warning: BMA weights differ across ranks: {results['bma_fingerprint_per_rank']}", file=sys.stderr)
    if primary:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        print_results_table(results, [name for name, _, _ in eval_sets], out_dir)
    tracker.close()
    cleanup(dist_info)
    return results


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
