"""Post-hoc averages from trajectory snapshots against the exact weighted averages of the same run.

The trajectory is a real one (a small MLP trained with AdamW and a cosine schedule); every θ_t is
kept, and the exact averages are the float64 closed form Σ w_t θ_t / Σ w_t of tests/reference.py,
computed independently of the package.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from pathlib import Path

import pytest
import torch
from reference import beta_alphas, closed_form, params64
from torch import nn

from clipood_plugin import ExponentialMovingAverage, interpolate_weights
from clipood_plugin.posthoc import (
    TrajectorySnapshots,
    beta_average,
    ema_average,
    error_bound,
    load_snapshots,
    segment_boundaries,
    weighted_average,
)
from clipood_plugin.training.checkpoint import load_checkpoint, save_checkpoint

BETAS = (0.1, 0.5, 1.0, 2.0)


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 10))


def train(total_steps: int, lr: float = 3e-3) -> list[dict[str, torch.Tensor]]:
    """fp32 state dicts θ_0..θ_T of an AdamW + cosine run on a noisy linear-teacher task."""
    net = make_net()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 32, generator=gen)
    y = (x @ torch.randn(32, 10, generator=gen) + 0.5 * torch.randn(2048, 10, generator=gen)).argmax(1)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))))
    states = [copy.deepcopy(net.state_dict())]
    for _ in range(total_steps):
        idx = torch.randint(0, 2048, (32,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        states.append(copy.deepcopy(net.state_dict()))
    return states


def record(states: list[dict[str, torch.Tensor]], directory: Path, segments: int,
           upto: int | None = None) -> tuple[TrajectorySnapshots, nn.Module]:
    """Replay θ_0..θ_upto through a recorder (θ_0 at construction, then one update per step)."""
    net = make_net()
    net.load_state_dict(states[0])
    rec = TrajectorySnapshots(net, total_steps=len(states) - 1, segments=segments, directory=directory)
    for state in states[1:(upto if upto is not None else len(states) - 1) + 1]:
        net.load_state_dict(state)
        rec.update_parameters(net)
    return rec, net


def float64_states(states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    net = make_net()
    out = []
    for state in states:
        net.load_state_dict(state)
        out.append(params64(net))
    return out


def rel_error(posthoc: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor],
              theta_end: dict[str, torch.Tensor]) -> float:
    num = math.sqrt(sum(float((posthoc[k].double() - exact[k]).square().sum()) for k in exact))
    den = math.sqrt(sum(float((theta_end[k] - theta0[k]).square().sum()) for k in exact))
    return num / den


def max_step(snaps64: list[dict[str, torch.Tensor]]) -> float:
    return max(math.sqrt(sum(float((b[k] - a[k]).square().sum()) for k in a)) for a, b in itertools.pairwise(snaps64))


T = 300


@pytest.fixture(scope="module")
def trajectory() -> list[dict[str, torch.Tensor]]:
    return train(T)


@pytest.fixture(scope="module")
def recorded(trajectory: list[dict[str, torch.Tensor]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("posthoc")
    record(trajectory, directory, segments=32)
    return directory


@pytest.mark.parametrize("beta", BETAS)
def test_full_horizon_within_one_percent_and_within_the_bound(trajectory, recorded: Path, beta: float) -> None:
    snaps64 = float64_states(trajectory)
    snapshots = load_snapshots(recorded)
    assert snapshots.complete and snapshots.recorded_steps == T and len(snapshots.segments) == 31
    exact = closed_form(snaps64, beta_alphas(T, beta))
    posthoc = beta_average(snapshots, beta)
    error = rel_error(posthoc, exact, snaps64[0], snaps64[-1])
    assert error <= 0.01, error
    weights = torch.tensor(beta_alphas(T, beta), dtype=torch.float64)
    bound = error_bound(snapshots, weights, max_step(snaps64))
    absolute = error * math.sqrt(sum(float((snaps64[-1][k] - snaps64[0][k]).square().sum()) for k in exact))
    assert absolute <= bound + 1e-6
    if beta == 1.0:  # a profile constant on every segment is reproduced exactly
        assert error < 1e-5


@pytest.mark.parametrize("beta", BETAS)
def test_early_stop_at_a_boundary_near_half(trajectory, recorded: Path, beta: float) -> None:
    snaps64 = float64_states(trajectory)
    snapshots = load_snapshots(recorded)
    stop = min(snapshots.boundaries, key=lambda b: abs(b - T / 2))
    assert stop in snapshots.horizons and 0.4 * T < stop < 0.6 * T
    exact = closed_form(snaps64[:stop + 1], beta_alphas(stop, beta))
    posthoc = beta_average(snapshots, beta, total_steps=stop)
    error = rel_error(posthoc, exact, snaps64[0], snaps64[stop])
    assert error <= (0.02 if beta < 0.5 else 0.01), error


def test_too_few_segments_fail_the_one_percent(trajectory, tmp_path: Path) -> None:
    """The 1 % check is sensitive: two segments blur β = 0.1's weight on the first and last steps."""
    snaps64 = float64_states(trajectory)
    record(trajectory, tmp_path, segments=2)
    posthoc = beta_average(load_snapshots(tmp_path), 0.1)
    assert rel_error(posthoc, closed_form(snaps64, beta_alphas(T, 0.1)), snaps64[0], snaps64[-1]) > 0.01


def test_one_step_segments_are_exact_for_any_profile(trajectory, tmp_path: Path) -> None:
    short = trajectory[:13]  # T = 12 < K: every segment is one step
    snaps64 = float64_states(short)
    record(short, tmp_path, segments=64)
    snapshots = load_snapshots(tmp_path)
    assert all(s.length == 1 for s in snapshots.segments) and snapshots.horizons == tuple(range(1, 13))
    for horizon in (12, 7):
        for beta in (0.1, 3.0):
            exact = closed_form(snaps64[:horizon + 1], beta_alphas(horizon, beta))
            posthoc = beta_average(snapshots, beta, total_steps=horizon)
            assert rel_error(posthoc, exact, snaps64[0], snaps64[horizon]) < 1e-5
        ramp = torch.arange(1.0, horizon + 2, dtype=torch.float64)  # any weights, e.g. linear
        exact = closed_form(snaps64[:horizon + 1], ramp.tolist())
        assert rel_error(weighted_average(snapshots, ramp), exact, snaps64[0], snaps64[horizon]) < 1e-5


def test_ema_profile_matches_a_live_exponential_moving_average(trajectory, tmp_path: Path) -> None:
    short = trajectory[:21]
    net = make_net()
    net.load_state_dict(short[0])
    ema = ExponentialMovingAverage(net, decay=0.8)
    rec = TrajectorySnapshots(net, total_steps=20, segments=64, directory=tmp_path)
    for state in short[1:]:
        net.load_state_dict(state)
        ema.update_parameters(net)
        rec.update_parameters(net)
    posthoc = ema_average(load_snapshots(tmp_path), 0.8)
    for name, value in ema.module.named_parameters():
        torch.testing.assert_close(posthoc[name], value, rtol=1e-5, atol=1e-6)


def test_wise_mix_with_theta0(trajectory, recorded: Path) -> None:
    snaps64 = float64_states(trajectory)
    snapshots = load_snapshots(recorded)
    mixed = interpolate_weights(snapshots.state(0), beta_average(snapshots, 1.0), 0.3)
    alphas = beta_alphas(T, 1.0)
    exact = {k: 0.7 * snaps64[0][k] + 0.3 * v for k, v in closed_form(snaps64, alphas).items()}
    assert rel_error(mixed, exact, snaps64[0], snaps64[-1]) < 1e-5


def test_buffers_and_full_state_dict_come_back(recorded: Path) -> None:
    average = beta_average(load_snapshots(recorded), 0.5)
    net = make_net()
    net.load_state_dict(average)  # strict: every key present
    assert all(v.dtype == torch.float32 for v in average.values())


def test_kill_mid_segment_and_resume_through_a_checkpoint_is_bitwise(trajectory, tmp_path: Path) -> None:
    short = trajectory[:41]
    reference = tmp_path / "reference"
    record(short, reference, segments=8)
    bounds = segment_boundaries(40, 8)
    kill_at = bounds[3] + 2  # two steps into a segment
    assert kill_at < bounds[4] - 1
    killed = tmp_path / "killed"
    rec, _ = record(short, killed, segments=8, upto=kill_at)
    save_checkpoint(tmp_path / "ckpt.pt", {"posthoc": rec.state_dict()})
    del rec  # the process dies: the open segment exists only in the checkpoint
    state = load_checkpoint(tmp_path / "ckpt.pt")  # weights_only=True
    net = make_net()
    net.load_state_dict(short[0])
    resumed = TrajectorySnapshots(net, total_steps=40, segments=8, directory=killed)  # built from θ_0
    resumed.load_state_dict(state["posthoc"])
    assert resumed.steps == kill_at
    for step in range(kill_at + 1, 41):
        net.load_state_dict(short[step])
        resumed.update_parameters(net)
    ref, mine = load_snapshots(reference), load_snapshots(killed)
    assert mine.complete and len(mine.segments) == len(ref.segments)
    files = [*(p for p in ref.points.values()), *(s.path for s in ref.segments)]
    from safetensors.torch import load_file

    for path in files:
        a, b = load_file(path), load_file(killed / path.name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), path.name


def test_killed_run_without_resume_gives_the_recorded_horizons(trajectory, tmp_path: Path) -> None:
    record(trajectory[:41], tmp_path, segments=8, upto=25)
    snapshots = load_snapshots(tmp_path)
    assert not snapshots.complete and snapshots.recorded_steps <= 25
    with pytest.raises(ValueError, match="pass total_steps"):
        beta_average(snapshots, 0.5)
    average = beta_average(snapshots, 0.5, total_steps=snapshots.horizons[-1])
    assert set(average) == set(trajectory[0])
    with pytest.raises(ValueError, match="segment boundary"):
        beta_average(snapshots, 0.5, total_steps=snapshots.horizons[-1] + 1)


def test_bad_input_is_a_clear_error(trajectory, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="posthoc-snapshots"):
        load_snapshots(tmp_path)
    rec, net = record(trajectory[:6], tmp_path / "a", segments=4)
    with pytest.raises(RuntimeError, match="total_steps=5"):
        rec.update_parameters(net)
    with pytest.raises(ValueError, match="segments must be a positive int"):
        TrajectorySnapshots(net, total_steps=5, segments=0, directory=tmp_path / "b")
    state = rec.state_dict()
    with pytest.raises(ValueError, match="total_steps=5, segments=4"):
        TrajectorySnapshots(net, total_steps=6, segments=4, directory=tmp_path / "c").load_state_dict(state)
    other = make_net()  # θ_0 differs from the recording's
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="another θ_0"):
        TrajectorySnapshots(other, total_steps=5, segments=4, directory=tmp_path / "d").load_state_dict(state)
    with pytest.raises(ValueError, match="lacks recorded parameters"):
        rec2 = TrajectorySnapshots(net, total_steps=5, segments=4, directory=tmp_path / "e")
        rec2.update_parameters(nn.Linear(3, 3))


def test_a_stale_file_from_another_recording_is_skipped(trajectory, tmp_path: Path) -> None:
    record(trajectory[:21], tmp_path / "old", segments=4)
    record(trajectory[:21], tmp_path / "new", segments=4, upto=3)
    stale = sorted((tmp_path / "old").glob("mean-*"))[-1]
    (tmp_path / "new" / stale.name).write_bytes(stale.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snapshots = load_snapshots(tmp_path / "new")
    assert snapshots.recorded_steps <= 3 and any("do not belong" in str(w.message) for w in caught)


def test_segments_partition_the_steps_and_are_single_steps_for_short_runs() -> None:
    from clipood_plugin.posthoc.layout import segment_spans

    for segments in (1, 2, 8, 32, 64):
        for total in (1, 2, 3, 7, 20, 21, 41, 300, 5000):
            spans = segment_spans(segment_boundaries(total, segments))
            covered = [t for start, end in spans for t in range(start, end + 1)]
            assert covered == list(range(1, total)), (segments, total)  # 1..T−1, each once, in order
            assert len(spans) <= segments
            if total <= 2 * segments / math.pi:
                assert all(start == end for start, end in spans), (segments, total)
    first = segment_spans(segment_boundaries(5000, 32))
    lengths = [end - start + 1 for start, end in first]
    assert lengths[0] < lengths[len(lengths) // 2] > lengths[-1]  # finer near both ends


def test_a_bf16_model_gets_fp32_means_of_its_bf16_weights(tmp_path: Path) -> None:
    net = make_net().to(torch.bfloat16)
    rec = TrajectorySnapshots(net, total_steps=6, segments=1, directory=tmp_path)  # one mean: steps 1..5
    seen = []
    for _ in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        seen.append({k: v.double() for k, v in net.named_parameters()})
        rec.update_parameters(net)
    snapshots = load_snapshots(tmp_path)
    (segment,) = snapshots.segments
    from safetensors.torch import load_file

    mean = load_file(segment.path)
    for name, value in mean.items():
        assert value.dtype == torch.float32
        expected = sum(s[name] for s in seen[:5]) / 5  # float64 mean of the bf16 weights
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    assert snapshots.state(6)["0.weight"].dtype == torch.bfloat16  # exact points keep the model's dtype
