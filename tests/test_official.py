"""The official numerics (clipood_plugin.official, MMSLoss precision="input"), against independent
restatements of the official arithmetic, and live against the official code when it is checked out."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipood_plugin import MMSLoss
from clipood_plugin.official import OfficialPrecisionStep, is_official_precision, to_official_precision

ROOT = Path(__file__).resolve().parents[1]


def tiny_open_clip_tower() -> nn.Module:
    import open_clip

    torch.manual_seed(0)
    cfg = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
    return open_clip.model._build_vision_tower(16, cfg, quick_gelu=True)


def test_casts_follow_openai_convert_weights() -> None:
    tower = to_official_precision(tiny_open_clip_tower())
    dtypes = {name: p.dtype for name, p in tower.named_parameters()}
    half = {n for n, d in dtypes.items() if d == torch.float16}
    # OpenAI's convert_weights: Conv/Linear weight+bias, MHA in-proj weight and bias, out_proj, proj
    expected_half = {n for n in dtypes if n.startswith(("conv1.", "proj")) or n.endswith(
        ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight", "c_fc.bias",
         "c_proj.weight", "c_proj.bias"))}
    assert half == expected_half
    for name in ("class_embedding", "positional_embedding", "ln_pre.weight", "ln_post.bias"):
        assert dtypes[name] == torch.float32
    assert is_official_precision(tower)
    out = tower(torch.randn(2, 3, 16, 16))  # fp32 images are cast to fp16 at the door
    assert out.dtype == torch.float16


def test_layer_norm_computes_in_fp32_and_returns_the_input_dtype() -> None:
    ln = to_official_precision(nn.Sequential(nn.LayerNorm(64)))[0]
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.1, 0.1)
    x = (torch.randn(16, 64) * 3).half()
    x64 = x.double()
    ref = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + ln.eps)
    ref = (ref * ln.weight.double() + ln.bias.double()).half()
    out = ln(x)
    assert out.dtype == torch.float16
    # fp32 arithmetic rounded to fp16 equals the float64 result rounded to fp16 except at ties (≤ 1 ulp)
    ulp = torch.finfo(torch.float16).eps * ref.float().abs().clamp_min(2**-14)
    assert ((out.float() - ref.float()).abs() <= ulp).all()


def test_step_rounds_back_and_large_weights_never_move_at_paper_lr() -> None:
    # Adam's first step is lr·sign(g) (m̂/√v̂ = ±1), so at lr 5e-6 an fp16 weight moves iff half its
    # ulp is below 5e-6: |w| < 2^-6 moves, |w| ≥ 2^-6 (ulp 2^-16 ≈ 1.5e-5) stays (computed, not measured).
    layer = nn.Linear(512, 1, bias=False)
    mags = torch.logspace(-3.5, -0.5, 512)
    with torch.no_grad():
        layer.weight.copy_((mags * torch.where(torch.arange(512) % 2 == 0, 1.0, -1.0)).unsqueeze(0))
    model = to_official_precision(nn.Sequential(layer))
    before = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.0)
    stepper = OfficialPrecisionStep(optimizer, model)
    model(torch.randn(4, 512)).float().sum().backward()
    stepper.step()
    assert layer.weight.dtype == torch.float16 and layer.weight.grad.dtype == torch.float16
    assert optimizer.state[layer.weight]["exp_avg"].dtype == torch.float32
    w = before.float().abs()
    half_ulp = torch.where(w >= 2**-14, 2.0 ** (torch.floor(torch.log2(w)) - 11), torch.tensor(2.0**-25))
    grad_nonzero = layer.weight.grad != 0
    should_move = (half_ulp < 5e-6) & grad_nonzero
    moved = layer.weight.detach() != before
    # at |w| exactly a power of two the step down lands in the finer binade: allow those either way
    exact_pow2 = torch.log2(w) == torch.floor(torch.log2(w))
    assert torch.equal(moved[~exact_pow2], should_move[~exact_pow2])
    assert moved.any() and (~moved).any()


def test_step_refuses_a_recast_model_and_foreign_parameters() -> None:
    model = to_official_precision(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="to_official_precision"):
        OfficialPrecisionStep(torch.optim.AdamW(nn.Linear(4, 4).parameters()), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not the model's"):
        OfficialPrecisionStep(torch.optim.AdamW(nn.Linear(4, 4).parameters()), model)
    stepper = OfficialPrecisionStep(torch.optim.AdamW(model.parameters()), model)
    model.float()
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="re-cast"):
        stepper.step()


def test_mms_input_precision_is_the_official_fp16_arithmetic() -> None:
    torch.manual_seed(0)
    text = torch.randn(7, 32).half()
    feats = torch.randn(12, 32).half()
    labels = torch.randint(0, 7, (12,))
    lam, scale = 0.3, 100.0
    # engine.py, restated: t /= ‖t‖; f = f/‖f‖; f -= λ·t[y]; y = s·(f @ tᵀ); CE on the fp16 logits
    t = text / text.norm(dim=-1, keepdim=True)
    f = feats / feats.norm(dim=-1, keepdim=True)
    f = f - lam * t[labels]
    ref = F.cross_entropy(scale * (f @ t.T), labels)
    loss = MMSLoss(text, lam=lam, scale=scale, precision="input")(feats, labels)
    assert loss.dtype == torch.float16
    assert torch.equal(loss, ref)
    fp32 = MMSLoss(text.float(), lam=lam, scale=scale)(feats.float(), labels)
    assert abs(loss.item() - fp32.item()) < 0.05 * fp32.item() + 0.02  # fp16 rounding, not another loss
    with pytest.raises(ValueError, match="precision"):
        MMSLoss(text, precision="fp16")  # type: ignore[arg-type]


def _official_dirs() -> tuple[Path, Path] | None:
    official, clip = os.environ.get("CLIPOOD_OFFICIAL_DIR"), os.environ.get("OPENAI_CLIP_DIR")
    if official and clip and (Path(official) / "engine.py").is_file() and (Path(clip) / "clip" / "model.py").is_file():
        return Path(official), Path(clip)
    return None


def test_live_parity_with_the_official_training_loop() -> None:
    dirs = _official_dirs()
    if dirs is None:
        reason = ("official code not checked out: set CLIPOOD_OFFICIAL_DIR (thuml/CLIPood) and OPENAI_CLIP_DIR "
                  "(openai/CLIP) to run the live parity check")
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    pytest.importorskip("scipy")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import official_parity

    results = official_parity.run(*dirs, steps=50, lr=1e-4)
    failed = [row for row in results["comparisons"] if not row["ok"]]
    assert not failed, failed
    same_class_official = [r for r in results["comparisons"] if r["tower"] == "same class" and r["numerics"] == "official"]
    assert all(r["bitwise"] for r in same_class_official)
