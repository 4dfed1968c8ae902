"""ExponentialMovingAverage and UniformAverage against float64 recursions / means, and BMA(β=1) = uniform."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor, nn

from clipood_plugin.averaging import BetaMovingAverage, ExponentialMovingAverage, UniformAverage

Snapshot = dict[str, Tensor]


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def snapshot(model: nn.Module) -> Snapshot:
    return {k: v.detach().double().clone() for k, v in model.named_parameters()}


def train(
    model: nn.Module,
    averages: list[nn.Module],
    steps: int,
    start: int = 0,
    opt: torch.optim.Optimizer | None = None,
) -> list[Snapshot]:
    """SGD steps with data fixed by the step index; every average is updated after each step.

    Returns θ_{start+1}..θ_{steps} as float64 snapshots.
    """
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snaps = []
    for i in range(start, steps):
        g = torch.Generator().manual_seed(1000 + i)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for avg in averages:
            avg.update_parameters(model)
        snaps.append(snapshot(model))
    return snaps


def max_rel_err(avg: nn.Module, ref: Snapshot) -> float:
    return max(((p.double() - ref[k]).norm() / ref[k].norm()).item() for k, p in avg.named_parameters())


def ema_reference(
    snaps: list[Snapshot],
    decay: float,
    *,
    warmup: bool = False,
    gamma: float = 1.0,
    power: float = 2 / 3,
    min_decay: float = 0.0,
    include_init: bool = True,
) -> Snapshot:
    """The float64 recursion, written out: avg = d·avg + (1 − d)·θ, d from the count of models in."""
    models = snaps if include_init else snaps[1:]
    avg = {k: v.clone() for k, v in models[0].items()}
    for n, theta in enumerate(models[1:], start=1):  # n models are already in the average
        d = decay
        if warmup:
            d = min(decay, max(min_decay, 1.0 - (1.0 + n / gamma) ** (-power)))
        avg = {k: d * avg[k] + (1.0 - d) * theta[k] for k in avg}
    return avg


def mean_of(snaps: list[Snapshot]) -> Snapshot:
    return {k: torch.stack([s[k] for s in snaps]).mean(0) for k in snaps[0]}


# -- uniform -------------------------------------------------------------------------------------


def test_bma_beta_one_equals_uniform_with_init_and_the_float64_mean() -> None:
    steps = 40
    model = small_model()
    theta0 = snapshot(model)
    bma = BetaMovingAverage(model, total_steps=steps, beta=1.0)
    uni = UniformAverage(model)
    snaps = [theta0, *train(model, [bma, uni], steps)]
    ref = mean_of(snaps)
    assert max_rel_err(uni.module, ref) <= 1e-6
    assert max_rel_err(bma.module, ref) <= 1e-6
    for a, b in zip(bma.module.parameters(), uni.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=0)
    # the average is really a mean of many models, not the last or the first one
    assert max_rel_err(uni.module, snaps[-1]) > 1e-3 and max_rel_err(uni.module, theta0) > 1e-3
    assert uni.steps == steps and int(uni.n_averaged) == steps + 1


def test_uniform_without_init_is_the_mean_of_steps_one_to_t() -> None:
    steps = 25
    model = small_model()
    uni = UniformAverage(model, include_init=False)
    snaps = train(model, [uni], steps)
    assert max_rel_err(uni.module, mean_of(snaps)) <= 1e-6
    assert uni.steps == steps and int(uni.n_averaged) == steps


def test_uniform_optional_horizon() -> None:
    model = small_model()
    free = UniformAverage(model)
    guarded = UniformAverage(model, total_steps=2)
    train(model, [free, guarded], 2)
    with pytest.raises(RuntimeError, match="UniformAverage got update 3 but its horizon is total_steps=2"):
        guarded.update_parameters(model)
    free.update_parameters(model)  # no horizon: keeps going
    assert free.steps == 3


# -- exponential ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"decay": 0.9},
        {"decay": 0.95, "warmup": True},
        {"decay": 0.9, "warmup": True, "warmup_gamma": 3.0, "warmup_power": 0.75, "min_decay": 0.3},
        {"decay": 0.9, "include_init": False},
        {"decay": 0.95, "warmup": True, "include_init": False},
    ],
    ids=["plain", "warmup", "warmup-gamma-power-min", "plain-no-init", "warmup-no-init"],
)
def test_ema_equals_float64_recursion(kw: dict) -> None:
    steps = 40
    model = small_model()
    theta0 = snapshot(model)
    ema = ExponentialMovingAverage(model, **kw)
    snaps = [theta0, *train(model, [ema], steps)]
    ref = ema_reference(
        snaps,
        kw["decay"],
        warmup=kw.get("warmup", False),
        gamma=kw.get("warmup_gamma", 1.0),
        power=kw.get("warmup_power", 2 / 3),
        min_decay=kw.get("min_decay", 0.0),
        include_init=kw.get("include_init", True),
    )
    assert max_rel_err(ema.module, ref) <= 1e-6
    # the reference is sensitive to the schedule: the neighbouring rule is far away
    other = ema_reference(
        snaps, kw["decay"], warmup=not kw.get("warmup", False), include_init=kw.get("include_init", True)
    )
    assert max(((ref[k] - other[k]).norm() / ref[k].norm()).item() for k in ref) > 1e-5
    assert ema.steps == steps


def test_ema_decay_schedule_values() -> None:
    ema = ExponentialMovingAverage(small_model(), decay=0.999, warmup=True)
    for t in (1, 2, 10, 1000):
        assert ema.get_decay(t) == pytest.approx(1 - (1 + t) ** (-2 / 3), rel=1e-12)
    # with power 2/3 the schedule reaches 0.999 at about 31.6k models (timm's note)
    assert ema.get_decay(31_000) < 0.999 and ema.get_decay(32_000) == 0.999
    floor = ExponentialMovingAverage(small_model(), decay=0.99, warmup=True, min_decay=0.5)
    assert floor.get_decay(1) == 0.5  # 1 − 2^(−2/3) ≈ 0.37 is clamped up
    assert ExponentialMovingAverage(small_model(), decay=0.9).get_decay(7) == 0.9
    no_init = ExponentialMovingAverage(small_model(), decay=0.9, include_init=False)
    assert no_init.get_decay(1) == 0.0 and no_init.get_decay(2) == 0.9
    with pytest.raises(ValueError, match="step must be a positive int"):
        ema.get_decay(0)


def test_ema_without_init_matches_timm_model_ema_v3() -> None:
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    steps = 30
    model = small_model()
    ours = ExponentialMovingAverage(model, decay=0.95, warmup=True, include_init=False)
    theirs = timm_ema.ModelEmaV3(model, decay=0.95, use_warmup=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, steps + 1):
        train(model, [], step, start=step - 1, opt=opt)
        ours.update(model, step=step)
        theirs.update(model, step=step)
    for a, b in zip(ours.module.parameters(), theirs.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_ema_horizon_only_when_given() -> None:
    model = small_model()
    free = ExponentialMovingAverage(model, decay=0.9)
    guarded = ExponentialMovingAverage(model, decay=0.9, total_steps=1)
    train(model, [free, guarded], 1)
    with pytest.raises(RuntimeError, match="update 2 but its horizon is total_steps=1"):
        guarded.update_parameters(model)
    train(model, [free], 3, start=1)
    assert free.steps == 3


# -- shared conveniences -------------------------------------------------------------------------


def _make(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ema":
        return ExponentialMovingAverage(model, decay=0.9, warmup=True, warmup_gamma=2.0)
    return UniformAverage(model)


@pytest.mark.parametrize("kind", ["ema", "uniform"])
def test_resume_from_state_dict_equals_uninterrupted_run(kind: str) -> None:
    steps, cut = 30, 13
    torch.manual_seed(5)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    full = _make(kind, model)
    train(model, [full], steps, opt=opt)

    torch.manual_seed(5)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    avg = _make(kind, model)
    train(model, [avg], cut, opt=opt)
    buf = io.BytesIO()
    torch.save(avg.state_dict(), buf)
    buf.seek(0)
    del avg
    resumed = _make(kind, small_model())  # other weights: the checkpoint must carry everything
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.steps == cut
    train(model, [resumed], steps, start=cut, opt=opt)
    for a, b in zip(resumed.module.parameters(), full.module.parameters()):
        assert torch.equal(a, b)


def test_loading_with_other_hyperparameters_is_an_error() -> None:
    state = ExponentialMovingAverage(small_model(), decay=0.9).state_dict()
    assert state["_extra_state"]["kind"] == "ema" and state["_extra_state"]["decay"] == 0.9
    with pytest.raises(
        ValueError, match=r"EMA checkpoint was made with decay=0\.9, .*this average has decay=0\.99"
    ):
        ExponentialMovingAverage(small_model(), decay=0.99).load_state_dict(state)
    with pytest.raises(ValueError, match=r"warmup=False.*warmup=True"):
        ExponentialMovingAverage(small_model(), decay=0.9, warmup=True).load_state_dict(state)
    uni = UniformAverage(small_model()).state_dict()
    with pytest.raises(ValueError, match=r"include_init=True.*include_init=False"):
        UniformAverage(small_model(), include_init=False).load_state_dict(uni)
    # a checkpoint of another kind of average is named as such
    with pytest.raises(ValueError, match="not a ExponentialMovingAverage state"):
        ExponentialMovingAverage(small_model()).load_state_dict(uni)
    bma = BetaMovingAverage(small_model(), total_steps=5).state_dict()
    with pytest.raises(ValueError, match="not a UniformAverage state"):
        UniformAverage(small_model()).load_state_dict(bma)
    broken = dict(state)
    broken["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != "warmup_power"}
    with pytest.raises(ValueError, match=r"lacks \['warmup_power'\]"):
        ExponentialMovingAverage(small_model(), decay=0.9).load_state_dict(broken)


@pytest.mark.parametrize("kind", ["ema", "uniform"])
def test_half_precision_model_gets_float32_average(kind: str) -> None:
    steps = 20
    model = small_model().to(torch.bfloat16)
    theta0 = snapshot(model)
    avg = ExponentialMovingAverage(model, decay=0.8) if kind == "ema" else UniformAverage(model)
    assert all(p.dtype == torch.float32 for p in avg.module.parameters())
    snaps = [theta0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-2)
        avg.update_parameters(model)
        snaps.append(snapshot(model))
    ref = ema_reference(snaps, 0.8) if kind == "ema" else mean_of(snaps)
    assert max_rel_err(avg.module, ref) <= 1e-6


@pytest.mark.parametrize("kind", ["ema", "uniform"])
def test_update_step_check_set_and_wrappers(kind: str) -> None:
    model = small_model()
    compiled = torch.compile(model)  # not run: wrapping is enough to test unwrapping
    avg = _make(kind, compiled)
    assert not any("_orig_mod" in k for k in avg.state_dict())
    avg.update(compiled, step=1)
    name = type(avg).__name__
    with pytest.raises(ValueError, match=rf"{name}\.update\(step=3\).*next is 2"):
        avg.update(model, step=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.set(model)
    assert avg.steps == 0
    for a, b in zip(avg.module.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tensors to average"):
        avg.update_parameters(nn.Linear(6, 3))


def test_bad_arguments_are_clear_errors() -> None:
    m = small_model()
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\], got 1\.5"):
        ExponentialMovingAverage(m, decay=1.5)
    with pytest.raises(ValueError, match=r"min_decay=0\.5 is larger than decay=0\.4"):
        ExponentialMovingAverage(m, decay=0.4, min_decay=0.5)
    with pytest.raises(ValueError, match="warmup_gamma must be a positive"):
        ExponentialMovingAverage(m, warmup=True, warmup_gamma=0.0)
    with pytest.raises(ValueError, match="warmup_power must be a positive"):
        ExponentialMovingAverage(m, warmup=True, warmup_power=-1.0)
    with pytest.raises(ValueError, match="total_steps must be None"):
        UniformAverage(m, total_steps=0)
    with pytest.raises(ValueError, match="decay must be a number"):
        ExponentialMovingAverage(m, decay=math.nan)


def test_buffers_are_averaged_with_use_buffers() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    uni = UniformAverage(model, use_buffers=True)
    means = [model[1].running_mean.double().clone()]
    model.train()
    for i in range(5):
        model(torch.randn(16, 4) + i)
        uni.update_parameters(model)
        means.append(model[1].running_mean.double().clone())
    torch.testing.assert_close(
        uni.module[1].running_mean.double(), torch.stack(means).mean(0), rtol=1e-6, atol=1e-7
    )
    assert int(uni.module[1].num_batches_tracked) == 5  # integers are copied, not averaged
