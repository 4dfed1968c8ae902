"""BetaMovingAverage against the closed-form weighted sum Σ α_t θ_t / Σ α_t, computed in float64."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn

from clipood_plugin import BetaMovingAverage, beta_weights, get_beta_multi_avg_fn


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def trajectory(model: nn.Module, steps: int, lr: float = 0.05) -> list[dict[str, Tensor]]:
    """Train with SGD and return θ_0..θ_T as float64 snapshots (θ_0 = before any step)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    snaps = [{k: v.detach().double().clone() for k, v in model.named_parameters()}]
    for _ in range(steps):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        snaps.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    return snaps


def closed_form(snaps: list[dict[str, Tensor]], alphas: Tensor) -> dict[str, Tensor]:
    total = alphas.sum()
    return {k: sum(a * s[k] for a, s in zip(alphas.tolist(), snaps)) / total for k in snaps[0]}


def max_rel_err(avg: nn.Module, ref: dict[str, Tensor]) -> float:
    errs = []
    for name, p in avg.named_parameters():
        errs.append(((p.double() - ref[name]).norm() / ref[name].norm()).item())
    return max(errs)


def run_bma(steps: int, beta: float, **kw: object) -> tuple[BetaMovingAverage, list[dict[str, Tensor]]]:
    model = small_model()
    bma = BetaMovingAverage(model, total_steps=steps, beta=beta, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snaps = [{k: v.detach().double().clone() for k, v in model.named_parameters()}]
    for _ in range(steps):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        bma.update_parameters(model)
        snaps.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    return bma, snaps


def test_weights_equal_scipy_beta_pdf() -> None:
    stats = pytest.importorskip("scipy.stats")
    for beta in (0.1, 0.5, 1.0, 2.5):
        for total in (1, 7, 500):
            x = (torch.arange(total + 1, dtype=torch.float64) + 0.5) / (total + 1)
            expected = torch.from_numpy(stats.beta(beta, beta).pdf(x.numpy()))
            torch.testing.assert_close(beta_weights(total, beta), expected, rtol=1e-12, atol=0)


def test_weights_are_symmetric_and_u_shaped_for_small_beta() -> None:
    w = beta_weights(100, 0.5)
    torch.testing.assert_close(w, w.flip(0))
    assert w[0] > w[50] and w[0] == w.max()
    assert torch.allclose(beta_weights(10, 1.0), torch.ones(11, dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
def test_average_equals_closed_form(beta: float) -> None:
    steps = 60
    bma, snaps = run_bma(steps, beta)
    ref = closed_form(snaps, beta_weights(steps, beta))
    assert max_rel_err(bma.module, ref) <= 1e-6
    assert bma.steps == steps and int(bma.n_averaged) == steps + 1


def test_beta_one_is_uniform_average_including_init() -> None:
    bma, snaps = run_bma(25, 1.0)
    uniform = {k: torch.stack([s[k] for s in snaps]).mean(0) for k in snaps[0]}
    assert max_rel_err(bma.module, uniform) <= 1e-6


def test_without_init_averages_steps_one_to_t() -> None:
    steps = 30
    bma, snaps = run_bma(steps, 0.5, include_init=False)
    alphas = beta_weights(steps, 0.5)
    alphas[0] = 0.0
    assert max_rel_err(bma.module, closed_form(snaps, alphas)) <= 1e-6
    assert bma.steps == steps


def test_plain_averaged_model_with_multi_avg_fn_matches() -> None:
    steps = 20
    torch.manual_seed(3)
    bma, _ = run_bma(steps, 0.5)
    torch.manual_seed(3)
    model = small_model()
    avg = AveragedModel(model, multi_avg_fn=get_beta_multi_avg_fn(0.5, steps))
    avg.update_parameters(model)  # θ_0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        avg.update_parameters(model)
    for a, b in zip(avg.module.parameters(), bma.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="past the horizon"):
        avg.update_parameters(model)


def test_resume_from_state_dict_equals_uninterrupted_run() -> None:
    steps, cut = 40, 17

    def train(model: nn.Module, opt: torch.optim.Optimizer, bma: BetaMovingAverage, start: int, stop: int) -> None:
        for i in range(start, stop):
            g = torch.Generator().manual_seed(i)  # data depends on the step index only
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            bma.update_parameters(model)

    torch.manual_seed(5)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    full = BetaMovingAverage(model, total_steps=steps, beta=0.5)
    train(model, opt, full, 0, steps)

    torch.manual_seed(5)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    bma = BetaMovingAverage(model, total_steps=steps, beta=0.5)
    train(model, opt, bma, 0, cut)
    buf = io.BytesIO()
    torch.save(bma.state_dict(), buf)
    buf.seek(0)
    del bma
    # A fresh average built from other weights, then loaded: the checkpoint must carry everything.
    resumed = BetaMovingAverage(small_model(), total_steps=steps, beta=0.5)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.steps == cut
    train(model, opt, resumed, cut, steps)
    for a, b in zip(resumed.module.parameters(), full.module.parameters()):
        assert torch.equal(a, b)


def test_loading_with_other_beta_or_horizon_is_an_error() -> None:
    bma = BetaMovingAverage(small_model(), total_steps=10, beta=0.5)
    state = bma.state_dict()
    with pytest.raises(ValueError, match=r"beta=0\.5, total_steps=10.*beta=0\.1, total_steps=10"):
        BetaMovingAverage(small_model(), total_steps=10, beta=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="total_steps=20"):
        BetaMovingAverage(small_model(), total_steps=20, beta=0.5).load_state_dict(state)


def test_update_past_horizon_is_an_error() -> None:
    model = small_model()
    bma = BetaMovingAverage(model, total_steps=2)
    bma.update_parameters(model)
    bma.update_parameters(model)
    with pytest.raises(RuntimeError, match="update 3 but its horizon is total_steps=2"):
        bma.update_parameters(model)


def test_timm_style_update_checks_step_and_set_restarts() -> None:
    model = small_model()
    bma = BetaMovingAverage(model, total_steps=5)
    bma.update(model, step=1)
    with pytest.raises(ValueError, match=r"step=3.*next is 2"):
        bma.update(model, step=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    bma.set(model)
    assert bma.steps == 0
    for a, b in zip(bma.module.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_low_precision_model_gets_float32_average_matching_closed_form() -> None:
    steps = 40
    model = small_model().to(torch.bfloat16)
    bma = BetaMovingAverage(model, total_steps=steps, beta=0.5)
    assert all(p.dtype == torch.float32 for p in bma.module.parameters())
    snaps = [{k: v.detach().double().clone() for k, v in model.named_parameters()}]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-2)
        bma.update_parameters(model)
        snaps.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    assert max_rel_err(bma.module, closed_form(snaps, beta_weights(steps, 0.5))) <= 1e-6


def test_structure_mismatch_is_a_clear_error() -> None:
    bma = BetaMovingAverage(small_model(), total_steps=3)
    with pytest.raises(ValueError, match="tensors to average"):
        bma.update_parameters(nn.Linear(6, 3))
    other = nn.Sequential(nn.Linear(6, 17), nn.LayerNorm(17), nn.GELU(), nn.Linear(17, 3))
    with pytest.raises(ValueError, match=r"'0.weight' \(17, 6\) does not match"):
        bma.update_parameters(other)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        BetaMovingAverage(small_model(), total_steps=0)
    with pytest.raises(ValueError, match="total_steps"):
        beta_weights(2.5, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        BetaMovingAverage(small_model(), total_steps=3, beta=0.0)


def test_sees_through_compile_and_ddp_wrappers() -> None:
    model = small_model()
    compiled = torch.compile(model)  # not run: wrapping is enough to test unwrapping
    bma = BetaMovingAverage(compiled, total_steps=3)
    assert not any("_orig_mod" in k for k in bma.state_dict())
    bma.update_parameters(compiled)

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            ddp = nn.parallel.DistributedDataParallel(model)
            bma2 = BetaMovingAverage(ddp, total_steps=3)
            assert not any(k.startswith("module.module.") for k in bma2.state_dict())
            bma2.update_parameters(ddp)
            assert bma2.steps == 1
        finally:
            dist.destroy_process_group()


def test_update_bn_and_buffers_follow_torch_semantics() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    bma = BetaMovingAverage(model, total_steps=4)
    model.train()
    model(torch.randn(32, 4) + 3.0)  # moves the model's running stats
    bma.update_parameters(model)
    # use_buffers=False: buffers are copied from the model, as AveragedModel does
    torch.testing.assert_close(bma.module[1].running_mean, model[1].running_mean)
    loader = [(torch.randn(16, 4) - 5.0,) for _ in range(4)]
    update_bn(loader, bma)
    # update_bn recomputes the statistics of the *averaged* weights: a cumulative mean over batches
    with torch.no_grad():
        expected = torch.stack([bma.module[0](x).mean(0) for (x,) in loader]).mean(0)
    torch.testing.assert_close(bma.module[1].running_mean, expected)
    assert not torch.allclose(bma.module[1].running_mean, model[1].running_mean)


# -- storage="param": the official fp16 average -------------------------------------------------


def _official_like_model() -> nn.Module:
    """fp16 Linear weights (as OpenAI CLIP's convert_weights leaves them) next to an fp32 LayerNorm."""
    torch.manual_seed(3)
    model = small_model()
    for layer in (model[0], model[3]):
        layer.half()
    return model


def _fp16_trajectory(model: nn.Module, steps: int) -> list[list[Tensor]]:
    """θ_0..θ_T in the parameters' own dtypes: random drifts rounded to the dtype, as fp16 training."""
    gen = torch.Generator().manual_seed(11)
    snaps = [[p.detach().clone() for p in model.parameters()]]
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_((1e-3 * torch.randn(p.shape, generator=gen)).to(p.dtype))
        snaps.append([p.detach().clone() for p in model.parameters()])
    return snaps


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_param_storage_is_bitwise_the_official_rule(beta: float) -> None:
    # The official GeneralMovingAverage, restated: scipy pdf weights, a float64 running weight sum,
    # and `(avg + r * p) / (1 + r)` on tensors of the parameter's dtype.
    from scipy.stats import beta as beta_dist

    steps = 60
    model = _official_like_model()
    bma = BetaMovingAverage(model, total_steps=steps, beta=beta, storage="param")
    dist = beta_dist(beta, beta)

    def weight(t: int) -> float:
        return dist.pdf((t + 0.5) / (steps + 1))

    snaps = _fp16_trajectory(model, 0)
    ref = [p.clone() for p in snaps[0]]
    weight_sum = weight(0)
    gen = torch.Generator().manual_seed(11)
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_((1e-3 * torch.randn(p.shape, generator=gen)).to(p.dtype))
        bma.update_parameters(model)
        r = weight(t) / weight_sum
        ref = [(a + r * p.detach()) / (1 + r) for a, p in zip(ref, model.parameters())]
        weight_sum += weight(t)
    for (name, mine), theirs, p in zip(bma.module.named_parameters(), ref, model.parameters()):
        assert mine.dtype == p.dtype, name
        assert torch.equal(mine, theirs), (name, (mine.float() - theirs.float()).abs().max().item())


def test_param_storage_rounds_where_fp32_storage_does_not() -> None:
    # The same fp16 trajectory averaged both ways against the float64 closed form: the fp32
    # average is accurate to fp32 rounding of the fp16 inputs, the param one carries fp16 rounding.
    steps = 60
    model = _official_like_model()
    fp32 = BetaMovingAverage(model, total_steps=steps, beta=0.5)
    param = BetaMovingAverage(model, total_steps=steps, beta=0.5, storage="param")
    snaps = [[p.detach().double().clone() for p in model.parameters()]]
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_((1e-3 * torch.randn(p.shape, generator=gen)).to(p.dtype))
        fp32.update_parameters(model)
        param.update_parameters(model)
        snaps.append([p.detach().double().clone() for p in model.parameters()])
    from tests.reference import beta_alphas

    alphas = beta_alphas(steps, 0.5)
    exact = [sum(a * s[i] for a, s in zip(alphas, snaps)) / sum(alphas) for i in range(len(snaps[0]))]
    half_idx = [i for i, p in enumerate(model.parameters()) if p.dtype == torch.float16]
    for i in half_idx:
        err_fp32 = (list(fp32.module.parameters())[i].double() - exact[i]).abs().max().item()
        err_param = (list(param.module.parameters())[i].double() - exact[i]).abs().max().item()
        assert err_fp32 < 1e-6 < err_param, (i, err_fp32, err_param)


def test_storage_is_saved_and_checked_on_load() -> None:
    model = _official_like_model()
    param = BetaMovingAverage(model, total_steps=4, storage="param")
    assert param.module[0].weight.dtype == torch.float16 and param.module[1].weight.dtype == torch.float32
    assert BetaMovingAverage(model, total_steps=4).module[0].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="storage"):
        BetaMovingAverage(model, total_steps=4, storage="fp16")
    other = BetaMovingAverage(model, total_steps=4)
    state = param.state_dict()
    with pytest.raises(ValueError, match="storage=param"):
        other.load_state_dict(state)
    again = BetaMovingAverage(model, total_steps=4, storage="param")
    again.load_state_dict(state)
