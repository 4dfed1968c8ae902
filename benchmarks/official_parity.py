"""Live parity with the official CLIPood training loop, step by step.

    CLIPOOD_OFFICIAL_DIR=/path/to/thuml/CLIPood OPENAI_CLIP_DIR=/path/to/openai/CLIP \\
        python benchmarks/official_parity.py [--steps 60] [--lr 1e-4] [--device cpu] [--json out.json]

Both directories are checkouts of the public repositories (``thuml/CLIPood``, ``openai/CLIP``);
nothing of them is copied here. The official ``engine.py`` is imported as it is, with stubs for
what it imports but this check does not use (its dataset converters, and tensorboard behind its
``utils``), and its ``train()`` is called one iteration at a time, so the weights can be compared
after every step.

The model is a tiny OpenAI-architecture CLIP (``clip.model.CLIP``, random init: ViT 32 px, patch 8,
width 64, 2 layers). Both sides start from the same weights, see the same batches, use the same
text features (the official ``get_text_features`` arithmetic), AdamW (wd 0.1) and torch's
``CosineAnnealingLR``, and a BMA over T = ``--steps``. Two numerics:

- ``official``: the official loop unpatched (fp16 weights, fp32 cast, AdamW, round back; fp16 BMA)
  against ours with ``to_official_precision``, ``OfficialPrecisionStep``, ``MMSLoss(precision=
  "input")`` and ``BetaMovingAverage(storage="param")``;
- ``fp32``: the official loop with its two casts patched out on an fp32 model, against our
  ``clean`` numerics without autocast (``MMSLoss`` in fp32, the fp32 lerp BMA).

and two towers on our side:

- ``same class``: our numerics applied to OpenAI's own ``VisionTransformer`` (a deep copy of the
  official side's initial tower), which isolates the training step: expected bitwise, except the
  fp32 BMA (our lerp and the official ``(avg + r·θ)/(1 + r)`` round differently in fp32; bound
  ‖ours − official‖ ≤ 1e-6 ‖official‖, a few fp32 ulps);
- ``open_clip``: the same weights loaded into open_clip (``build_model_from_openai_state_dict``),
  the tower our recipe trains. Its attention runs batch-first through another kernel, so the
  forward differs in the last bits of the dtype, and training amplifies that (Adam turns a
  rounding-sized gradient change on a near-zero gradient into an lr-sized step). The bound is
  measured, not guessed: the official run is repeated with every input pixel moved by one ulp of
  its training dtype, and the open_clip run must stay within 3× that self-divergence (and at
  least 1e-3) of ‖θ_t − θ_0‖, for the weights and the BMA.

Exit status 0 when every comparison is within its bound; the largest differences are printed
(and written as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipood_plugin import BetaMovingAverage, MMSLoss
from clipood_plugin.official import OfficialPrecisionStep, to_official_precision

#: Tolerances stated in the module docstring.
BMA_FP32_REL = 1e-6
SELF_DIVERGENCE_FACTOR = 3.0
OPEN_CLIP_FLOOR = 1e-3
CLASSES = ["circle", "square", "triangle", "star", "cross"]


def load_official(official_dir: Path, clip_dir: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Import OpenAI's ``clip`` and the official ``engine`` from their checkouts, with stubs."""
    for path, marker in ((official_dir, "engine.py"), (clip_dir, "clip/model.py")):
        if not (path / marker).is_file():
            raise FileNotFoundError(f"{path} has no {marker}: give a checkout of the official repository")
    sys.path.insert(0, str(clip_dir))
    sys.path.insert(0, str(official_dir))
    # engine.py imports both dataset converters (DomainBed / dassl code) and utils, whose
    # TensorboardWriter needs tensorboard: none of it runs in train(), so empty stand-ins do.
    for name in ("converter_dassl", "converter_domainbed"):
        sys.modules.setdefault(name, types.ModuleType(name))
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = object  # type: ignore[attr-defined]
    sys.modules.setdefault("torch.utils.tensorboard", tensorboard)
    clip = importlib.import_module("clip")
    engine = importlib.import_module("engine")
    return engine, clip


def tiny_openai_clip(clip: types.ModuleType, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return clip.model.CLIP(
        embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1,
    )


def make_batches(steps: int, batch: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, len(CLASSES), (batch,), generator=gen))
            for _ in range(steps)]


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Parameters by name (open_clip keeps OpenAI's names but registers them in another order)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class _Writer:
    def record_training_values(self, values: dict[str, Any]) -> None:
        pass


def run_official(engine: types.ModuleType, clip: types.ModuleType, visual: nn.Module, text_features: Tensor,
                 batches: list[tuple[Tensor, Tensor]], lr: float, beta: float, scale: float, lam: float,
                 patched: bool, device: torch.device) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """The official ``train()``, one iteration per call; weights and BMA after every step."""
    from scipy import stats

    total = len(batches)
    # The official README's step 1 patches CLIP's VisionTransformer.forward to cast the image batch
    # to conv1's dtype (openai/CLIP#386); a pre-hook makes the same one-line change.
    visual.register_forward_pre_hook(lambda module, args: (args[0].to(module.conv1.weight.dtype),))
    dist = stats.beta(beta, beta)
    bma = engine.GeneralMovingAverage(visual, lambda it: dist.pdf((it + 0.5) / (total + 1)))
    optimizer = torch.optim.AdamW(visual.parameters(), lr=lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    args = argparse.Namespace(task="open_class", iters_per_epoch=1, lam=lam, temperature=scale, print_freq=10**9)
    stream = iter([(x.to(device), y.to(device)) for x, y in batches])
    weights, averages = [], []
    saved = engine.convert_models_to_fp32, clip.model.convert_weights
    if patched:  # the fp32 comparison: the official loop with its two casts taken out
        engine.convert_models_to_fp32 = lambda model: None
        clip.model.convert_weights = lambda model: None
    try:
        for epoch in range(total):
            with contextlib.redirect_stdout(io.StringIO()):
                engine.train(stream, visual, bma, text_features, optimizer, scheduler, epoch, args, _Writer(), device)
            weights.append(snapshot(visual))
            averages.append(snapshot(bma.moving_avg))
    finally:
        engine.convert_models_to_fp32, clip.model.convert_weights = saved
    return weights, averages


def run_ours(tower: nn.Module, raw_text: Tensor, batches: list[tuple[Tensor, Tensor]], lr: float, beta: float,
             scale: float, lam: float, numerics: str, device: torch.device) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Our step in ``official`` or ``clean`` numerics (no autocast), as the recipe composes it."""
    official = numerics == "official"
    if official:
        to_official_precision(tower)
    tower.eval()  # the official loop's model.eval() (a no-op for a ViT)
    total = len(batches)
    loss_fn = MMSLoss(raw_text, lam=lam, scale=scale, precision="input" if official else "fp32")
    bma = BetaMovingAverage(tower, total_steps=total, beta=beta, storage="param" if official else "fp32")
    optimizer = torch.optim.AdamW(tower.parameters(), lr=lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)  # wraps optimizer.step: take it after
    stepper: Callable[[], None] = OfficialPrecisionStep(optimizer, tower).step if official else optimizer.step
    weights, averages = [], []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss = loss_fn(tower(x if official else x.to(next(tower.parameters()).dtype)), y)
        optimizer.zero_grad()
        loss.backward()
        stepper()
        scheduler.step()
        bma.update_parameters(tower)
        weights.append(snapshot(tower))
        averages.append(snapshot(bma.module))
    return weights, averages


def compare(ours: list[dict[str, Tensor]], theirs: list[dict[str, Tensor]], start: dict[str, Tensor]) -> dict[str, Any]:
    """Over all steps: the largest elementwise difference, ‖ours − theirs‖ / ‖theirs − θ_0‖ (relative to
    how far the weights moved) and ‖ours − theirs‖ / ‖theirs‖ (relative to the weights)."""
    max_abs, max_rel, max_rel_norm, bitwise = 0.0, 0.0, 0.0, True
    for step_ours, step_theirs in zip(ours, theirs):
        if set(step_ours) != set(step_theirs):
            raise ValueError(f"parameter names differ: {sorted(set(step_ours) ^ set(step_theirs))[:4]}")
        diff_sq, move_sq, norm_sq = 0.0, 0.0, 0.0
        for name, b in step_theirs.items():
            a, s = step_ours[name], start[name]
            a64, b64 = a.double().cpu(), b.double().cpu()
            bitwise &= a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
            max_abs = max(max_abs, (a64 - b64).abs().max().item())
            diff_sq += (a64 - b64).pow(2).sum().item()
            move_sq += (b64 - s.double().cpu()).pow(2).sum().item()
            norm_sq += b64.pow(2).sum().item()
        max_rel = max(max_rel, (diff_sq / move_sq) ** 0.5 if move_sq > 0 else (0.0 if diff_sq == 0 else float("inf")))
        max_rel_norm = max(max_rel_norm, (diff_sq / norm_sq) ** 0.5)
    return {"bitwise": bitwise, "max_abs_diff": max_abs, "max_rel_diff": max_rel, "max_rel_norm": max_rel_norm}


def run(official_dir: Path, clip_dir: Path, steps: int = 60, lr: float = 1e-4, beta: float = 0.5, lam: float = 0.3,
        batch: int = 8, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    import open_clip

    dev = torch.device(device)
    engine, clip = load_official(official_dir, clip_dir)
    engine.clip = clip  # the same module object the checks patch
    batches = make_batches(steps, batch, seed + 1)
    results: dict[str, Any] = {"steps": steps, "lr": lr, "beta": beta, "lam": lam, "batch": batch, "device": device,
                               "torch": torch.__version__, "comparisons": []}
    for numerics in ("official", "fp32"):
        base = tiny_openai_clip(clip, seed).to(dev)
        if numerics == "official":
            clip.model.convert_weights(base)  # what clip.load does on a GPU
        state = copy.deepcopy(base.state_dict())
        scale = base.logit_scale.exp().item()
        tokens = torch.cat([clip.tokenize(f"a photo of a {c}.") for c in CLASSES]).to(dev)
        with torch.no_grad():
            raw_text = base.encode_text(tokens)
        text = raw_text / raw_text.norm(dim=-1, keepdim=True)  # engine.get_text_features, in its dtype
        official_visual = base.visual
        same_class = copy.deepcopy(official_visual)
        oc_model = open_clip.model.build_model_from_openai_state_dict(
            {k: v.cpu() for k, v in state.items()}, quick_gelu=True,
            cast_dtype=torch.float16 if numerics == "official" else None).to(dev)
        if numerics == "fp32":  # open_clip's loader stores the weights in fp16: load them again in fp32
            oc_model.float().load_state_dict(state)
        oc_tower = oc_model.visual
        start = snapshot(official_visual)
        # The official run's own sensitivity: the same run with every image moved by one ulp of the
        # dtype it trains in. Another tower class changes the forward by about that much.
        jittered = copy.deepcopy(official_visual)
        ref_w, ref_b = run_official(engine, clip, official_visual, text, batches, lr, beta, scale, lam,
                                    patched=numerics == "fp32", device=dev)
        jit_w, jit_b = run_official(engine, clip, jittered, text, _one_ulp(batches, base.dtype), lr, beta, scale,
                                    lam, patched=numerics == "fp32", device=dev)
        self_rel = max(compare(jit_w, ref_w, start)["max_rel_diff"], compare(jit_b, ref_b, start)["max_rel_diff"])
        results[f"{numerics}_self_divergence"] = self_rel
        ours_numerics = "official" if numerics == "official" else "clean"
        for tower_name, tower in (("same class", same_class), ("open_clip", oc_tower)):
            tower_start = snapshot(tower)
            ours_w, ours_b = run_ours(tower, raw_text, batches, lr, beta, scale, lam, ours_numerics, dev)
            for what, ours, theirs in (("weights", ours_w, ref_w), ("bma", ours_b, ref_b)):
                row = {"numerics": numerics, "tower": tower_name, "what": what,
                       **compare(ours, theirs, start if tower_name == "same class" else tower_start)}
                row["bound"], row["ok"] = _judge(row, self_rel)
                results["comparisons"].append(row)
        moved = sum(int((ref_w[-1][name] != p).sum()) for name, p in start.items())
        results[f"{numerics}_fraction_moved"] = moved / sum(p.numel() for p in start.values())
    results["ok"] = all(row["ok"] for row in results["comparisons"])
    return results


def _one_ulp(batches: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """The batches with every pixel one ulp of ``dtype`` away (up or down at random), back in fp32."""
    gen = torch.Generator().manual_seed(12345)
    moved = []
    for x, y in batches:
        low = x.to(dtype)
        up = torch.rand(x.shape, generator=gen) < 0.5
        target = torch.where(up, torch.full_like(low, float("inf")), torch.full_like(low, float("-inf")))
        moved.append((torch.nextafter(low, target).to(x.dtype), y))
    return moved


def _judge(row: dict[str, Any], self_divergence: float) -> tuple[str, bool]:
    if row["tower"] == "open_clip":
        bound = max(SELF_DIVERGENCE_FACTOR * self_divergence, OPEN_CLIP_FLOOR)
        return f"rel <= {bound:.3g}", row["max_rel_diff"] <= bound
    if row["numerics"] == "fp32" and row["what"] == "bma":
        return f"rel-to-weights <= {BMA_FP32_REL:g}", row["max_rel_norm"] <= BMA_FP32_REL
    return "bitwise", bool(row["bitwise"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-dir", default=os.environ.get("CLIPOOD_OFFICIAL_DIR"), help="thuml/CLIPood checkout")
    p.add_argument("--clip-dir", default=os.environ.get("OPENAI_CLIP_DIR"), help="openai/CLIP checkout")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not args.official_dir or not args.clip_dir:
        p.error("set CLIPOOD_OFFICIAL_DIR and OPENAI_CLIP_DIR (or --official-dir / --clip-dir)")
    results = run(Path(args.official_dir), Path(args.clip_dir), steps=args.steps, lr=args.lr, beta=args.beta,
                  device=args.device)
    print(f"official parity on {args.device}, {args.steps} steps at lr {args.lr:g} (torch {torch.__version__})")
    print(f"{'numerics':9} {'our tower':11} {'compared':8} {'bitwise':>7} {'max |diff|':>11} {'max rel':>9}  bound")
    for row in results["comparisons"]:
        print(f"{row['numerics']:9} {row['tower']:11} {row['what']:8} {row['bitwise']!s:>7} "
              f"{row['max_abs_diff']:11.3g} {row['max_rel_diff']:9.3g}  {row['bound']} {'ok' if row['ok'] else 'FAIL'}")
    print(f"official run against itself with inputs one ulp away (the open_clip bound's scale): official "
          f"{results['official_self_divergence']:.3g}, fp32 {results['fp32_self_divergence']:.3g}")
    print(f"fraction of tower weights the official run moved: official numerics "
          f"{results['official_fraction_moved']:.3f}, fp32 {results['fp32_fraction_moved']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
