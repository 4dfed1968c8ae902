"""WiSE-FT interpolation: bitwise endpoints, float64 midpoints, dtypes, prefixes, errors, the sweep."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from clipood_plugin.wise import interpolate_weights, load_interpolated, wise_sweep


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    model.train()
    model(torch.randn(4, 5) * (seed + 1))  # BN running stats and num_batches_tracked differ per model
    model(torch.randn(4, 5))
    with torch.no_grad():  # BN's affine starts at 1 / 0 in every model: make it differ too
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model


def states() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    zs = {k: v.clone() for k, v in make_model(0).state_dict().items()}
    ft = {k: v.clone() for k, v in make_model(1).state_dict().items()}
    ft["1.num_batches_tracked"].fill_(7)
    return zs, ft


def reference(zs: dict[str, Tensor], ft: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """(1 − α)·θ_zs + α·θ_ft in float64, written out (floating tensors only)."""
    return {k: (1 - alpha) * zs[k].double() + alpha * ft[k].double() for k in ft if ft[k].is_floating_point()}


def test_endpoints_are_bitwise() -> None:
    zs, ft = states()
    zs["2.weight"] = zs["2.weight"].to(torch.bfloat16)  # a low-precision entry on both sides
    ft["2.weight"] = ft["2.weight"].to(torch.bfloat16)
    zs["index"], ft["index"] = torch.tensor([0, 2, 1]), torch.tensor([2, 1, 0])  # an int buffer
    zs["mask"], ft["mask"] = torch.tensor([True, False]), torch.tensor([False, True])
    assert zs["1.num_batches_tracked"].item() != ft["1.num_batches_tracked"].item()
    at0 = interpolate_weights(zs, ft, 0.0)
    at1 = interpolate_weights(zs, ft, 1)
    for key in ft:  # every entry, integer and bool buffers included: the whole state at each end
        assert torch.equal(at0[key], zs[key]) and at0[key].dtype == zs[key].dtype, key
        assert torch.equal(at1[key], ft[key]) and at1[key].dtype == ft[key].dtype, key
        # new tensors, not views of the inputs: loading or editing one never changes the other
        assert at1[key].data_ptr() != ft[key].data_ptr()


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9])
def test_midpoints_equal_float64_arithmetic(alpha: float) -> None:
    zs, ft = states()
    got = interpolate_weights(zs, ft, alpha)
    ref = reference(zs, ft, alpha)
    for key, value in ref.items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key].double(), value, rtol=1e-6, atol=1e-7)
        # the mix is strictly between the two models, not one of them
        assert not torch.equal(got[key], ft[key]) and not torch.equal(got[key], zs[key])
    # integer buffers come from the fine-tuned side
    assert got["1.num_batches_tracked"].item() == 7 and got["1.num_batches_tracked"].dtype == torch.long


def test_mixed_dtypes_compute_in_float32_and_cast_to_finetuned_dtype() -> None:
    zs, ft = states()
    ft_half = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in ft.items()}
    got = interpolate_weights(zs, ft_half, 0.4)
    ref = reference(zs, ft_half, 0.4)  # the bf16 values as given, mixed exactly
    for key, value in ref.items():
        assert got[key].dtype == torch.bfloat16
        # one rounding to bf16 (≤ half an ulp, 2^-9 relative) from the exact value
        torch.testing.assert_close(got[key].double(), value, rtol=2**-8, atol=1e-6)
    # computed in float32 and rounded once: (nearly) every entry is the exact mix rounded to bf16,
    # which a computation in bf16 itself would not give
    for key, value in ref.items():
        assert (got[key] == value.to(torch.bfloat16)).float().mean().item() > 0.95, key


def test_extrapolation_needs_the_flag() -> None:
    zs, ft = states()
    with pytest.raises(ValueError, match=r"alpha=1\.5 is outside \[0, 1\].*allow_extrapolation=True"):
        interpolate_weights(zs, ft, 1.5)
    with pytest.raises(ValueError, match=r"alpha=-0\.2 is outside"):
        interpolate_weights(zs, ft, -0.2)
    got = interpolate_weights(zs, ft, 1.5, allow_extrapolation=True)
    for key, value in reference(zs, ft, 1.5).items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="alpha must be finite"):
        interpolate_weights(zs, ft, float("nan"), allow_extrapolation=True)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        interpolate_weights(zs, ft, True)  # type: ignore[arg-type]


def test_wrapper_prefixes_are_stripped() -> None:
    zs, ft = states()
    zs_ddp = {f"module.{k}": v for k, v in zs.items()}
    ft_compiled = {f"_orig_mod.module.{k}": v for k, v in ft.items()}
    got = interpolate_weights(zs_ddp, ft_compiled, 0.5)
    assert list(got) == list(ft)
    for key, value in reference(zs, ft, 0.5).items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-6, atol=1e-7)


def test_key_and_shape_mismatches_are_named() -> None:
    zs, ft = states()
    ft_missing = {k: v for k, v in ft.items() if k != "2.bias"}
    ft_missing["head.weight"] = torch.zeros(3)
    with pytest.raises(
        ValueError,
        match=r"missing from finetuned_state: \['2\.bias'\].*extra in finetuned_state.*'head\.weight'",
    ):
        interpolate_weights(zs, ft_missing, 0.5)
    ft_shape = dict(ft)
    ft_shape["0.weight"] = torch.zeros(7, 6)
    with pytest.raises(
        ValueError, match=r"shape mismatch.*'0\.weight': zero-shot \(7, 5\) vs fine-tuned \(7, 6\)"
    ):
        interpolate_weights(zs, ft_shape, 0.5)
    with pytest.raises(TypeError, match="zero_shot_state must be a state dict"):
        interpolate_weights([1, 2], ft, 0.5)  # type: ignore[arg-type]


def test_sweep_evaluates_each_alpha_with_its_weights() -> None:
    zs, ft = states()
    alphas = [0.0, 0.25, 0.5, 1.0]
    seen: list[dict[str, Tensor]] = []

    def evaluate(state: dict[str, Tensor]) -> dict[str, float]:
        seen.append(state)
        return {"w00": state["0.weight"][0, 0].item(), "n": float(len(seen))}

    rows = wise_sweep(zs, ft, alphas, evaluate, progress=False)
    assert [r["alpha"] for r in rows] == alphas
    assert [r["n"] for r in rows] == [1.0, 2.0, 3.0, 4.0]
    for alpha, state, row in zip(alphas, seen, rows):
        for key, value in reference(zs, ft, alpha).items():
            torch.testing.assert_close(state[key].double(), value, rtol=1e-6, atol=1e-7)
        assert row["w00"] == pytest.approx(
            (1 - alpha) * zs["0.weight"][0, 0].item() + alpha * ft["0.weight"][0, 0].item(), rel=1e-6
        )
    assert torch.equal(seen[0]["0.weight"], zs["0.weight"]) and torch.equal(
        seen[-1]["0.weight"], ft["0.weight"]
    )


def test_sweep_validates_before_evaluating() -> None:
    zs, ft = states()
    calls: list[float] = []

    def evaluate(state: dict[str, Tensor]) -> dict[str, float]:
        calls.append(1.0)
        return {"acc": 1.0}

    with pytest.raises(ValueError, match="alpha=2"):
        wise_sweep(zs, ft, [0.0, 0.5, 2], evaluate, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="alphas is empty"):
        wise_sweep(zs, ft, [], evaluate, progress=False)
    with pytest.raises(TypeError, match="must return a mapping"):
        wise_sweep(zs, ft, [0.5], lambda s: 0.9, progress=False)  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match="metric named 'alpha'"):
        wise_sweep(zs, ft, [0.5], lambda s: {"alpha": 1.0}, progress=False)
    rows = wise_sweep(zs, ft, [0.5], evaluate, progress=True)  # the rich bar path runs too
    assert rows == [{"alpha": 0.5, "acc": 1.0}]


def test_load_interpolated_into_a_wrapped_model() -> None:
    zs_model, ft_model = make_model(0), make_model(1)
    target = make_model(2)
    compiled = torch.compile(target)  # not run: wrapping is enough to test unwrapping
    # modules are accepted in place of state dicts
    out = load_interpolated(compiled, zs_model, ft_model, 0.7)
    assert out is compiled
    ref = reference(zs_model.state_dict(), ft_model.state_dict(), 0.7)
    for key, value in target.state_dict().items():
        if key in ref:
            torch.testing.assert_close(value.double(), ref[key], rtol=1e-6, atol=1e-7)
    assert torch.equal(target[1].num_batches_tracked, ft_model[1].num_batches_tracked)


def test_non_tensor_entries_follow_the_endpoints() -> None:
    zs, ft = states()
    zs["_extra_state"], ft["_extra_state"] = {"who": "zero-shot"}, {"who": "fine-tuned"}
    assert interpolate_weights(zs, ft, 0.0)["_extra_state"] == {"who": "zero-shot"}
    assert interpolate_weights(zs, ft, 0.5)["_extra_state"] == {"who": "fine-tuned"}
    assert interpolate_weights(zs, ft, 1.0)["_extra_state"] == {"who": "fine-tuned"}


def test_loading_alpha_zero_restores_the_zero_shot_model() -> None:
    zs_model, ft_model = make_model(0), make_model(1)
    ft_model[1].num_batches_tracked.fill_(11)
    target = load_interpolated(make_model(2), zs_model, ft_model, 0.0)
    for key, value in zs_model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
