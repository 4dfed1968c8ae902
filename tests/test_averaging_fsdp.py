"""BMA, EMA and uniform averages of an FSDP2-sharded model, on 2 CPU ranks (gloo).

One ``torch.multiprocessing.spawn`` runs every 2-rank check (a start costs seconds); its ranks
save a sharded checkpoint and the gathered averages, which the test process then reads back
unsharded, i.e. resharded from 2 ranks to 1.

The trajectory is written into the weights directly (no optimizer), the same full θ_t into an
unsharded reference model and, shard by shard, into the sharded one, so that the sharded and
unsharded averages see bitwise the same inputs. The averages are then compared bitwise:
averaging is elementwise, and on this CPU the lerp of an element does not depend on where the
shard boundary falls. They are also compared to the float64 closed form Σ α_t θ_t / Σ α_t of
tests/reference.py, within 2e-6 (fp32 rounding of the running lerp over 6 steps).
"""

from __future__ import annotations

import copy
import io
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from clipood_plugin import BetaMovingAverage, ExponentialMovingAverage, UniformAverage
from clipood_plugin.training.checkpoint import load_sharded_checkpoint
from tests.reference import beta_alphas, closed_form

STEPS = 6


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)  # the same on every rank
    # 9 and 5 rows split unevenly over 2 ranks (5 + 4, 3 + 2): FSDP's Shard(0) pads, the average must not care
    return nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 5)).to(dtype)


def trajectory_step(reference: nn.Module, sharded: nn.Module, step: int) -> None:
    """θ_t: the same full weights into the reference and, as local shards, into the sharded model."""
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for ref, shard in zip(reference.parameters(), sharded.parameters()):
            ref.add_(0.1 * torch.randn(ref.shape, generator=gen).to(ref.dtype))
            full = distribute_tensor(ref.detach().clone(), shard.device_mesh, shard.placements)
            shard.to_local().copy_(full.to_local())
        for ref, buf in zip(reference.buffers(), sharded.buffers()):  # FSDP2 leaves buffers replicated
            if ref.is_floating_point():
                ref.add_(torch.rand(ref.shape, generator=gen))  # positive: running_var stays a variance
            else:
                ref.add_(1)
            buf.copy_(ref)


def shard(model: nn.Module, mesh: Any, **kwargs: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0], mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def averages(model: nn.Module) -> dict[str, Any]:
    return {
        "bma": BetaMovingAverage(model, total_steps=STEPS, beta=0.5),
        "bma_no_init": BetaMovingAverage(model, total_steps=STEPS, beta=0.3, include_init=False),
        "bma_buffers": BetaMovingAverage(model, total_steps=STEPS, use_buffers=True),
        "bma_param": BetaMovingAverage(model, total_steps=STEPS, storage="param"),
        "ema": ExponentialMovingAverage(model, decay=0.8, warmup=True, warmup_gamma=1.0, warmup_power=0.75),
        "uniform": UniformAverage(model, total_steps=STEPS),
    }


def _worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from clipood_plugin.training.checkpoint import save_sharded_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        out = Path(tmp)
        results: dict[str, Any] = {}
        for dtype in (torch.float32, torch.bfloat16):
            reference = make_model(dtype)
            model = shard(copy.deepcopy(reference), mesh)
            sharded, unsharded = averages(model), averages(reference)
            snaps = [{k: v.detach().double().clone() for k, v in reference.named_parameters()}]
            for step in range(1, STEPS + 1):
                trajectory_step(reference, model, step)
                snaps.append({k: v.detach().double().clone() for k, v in reference.named_parameters()})
                for name in sharded:
                    sharded[name].update_parameters(model)
                    unsharded[name].update_parameters(reference)
            for name, avg in sharded.items():
                assert avg.sharded and not unsharded[name].sharded
                assert all(isinstance(p, DTensor) for p in avg.module.parameters())
                gathered = avg.full_state_dict(rank0_only=False)
                expected = unsharded[name].module.state_dict()
                assert list(gathered) == list(expected), name
                for key, value in expected.items():
                    assert gathered[key].dtype == value.dtype, (name, key)
                    assert torch.equal(gathered[key], value), (dtype, name, key)
                # the shards are this rank's part only: the two ranks' bytes add up to the full average
                local = sum(p.to_local().numel() for p in avg.module.parameters())
                full = sum(p.numel() for p in avg.module.parameters())
                counts = [None, None]
                dist.all_gather_object(counts, local)
                assert sum(counts) == full and max(counts) < full, counts  # type: ignore[arg-type]
            if dtype is torch.float32:  # independent check of one, against the float64 closed form
                want = closed_form(snaps, beta_alphas(STEPS, 0.5))
                got = sharded["bma"].full_state_dict(rank0_only=False)
                for key, value in want.items():
                    assert torch.allclose(got[key].double(), value, atol=2e-6, rtol=0), key
                fp32 = (reference, model, sharded, unsharded)
        reference, model, sharded, unsharded = fp32

        # past the horizon: an error on the sharded average as on the unsharded one
        try:
            sharded["bma"].update_parameters(model)
        except RuntimeError as exc:
            assert "horizon" in str(exc)
        else:
            raise AssertionError("an update past T did not raise")

        # evaluation: the sharded model with the average swapped in computes the unsharded average's output
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
        before = [p.to_local().clone() for p in model.parameters()]
        model.eval()
        unsharded["bma"].module.eval()
        with torch.no_grad():
            with sharded["bma"].swapped_into(model):
                inside = model(x)
            results["swap_equal"] = torch.equal(inside, unsharded["bma"].module(x))
        assert results["swap_equal"]
        assert all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))  # restored exactly
        try:
            sharded["bma"](x)
        except RuntimeError as exc:
            assert "swapped_into" in str(exc)
        else:
            raise AssertionError("forward of a sharded average did not raise")

        # a sharded checkpoint round trip (DCP), and one for the test process to reshard to 1 rank
        save_sharded_checkpoint(out / "ckpt", {name: avg.state_dict() for name, avg in sharded.items()},
                                {"world_size": 2})
        reloaded = averages(model)
        from clipood_plugin.training.checkpoint import load_sharded_checkpoint as load

        state = {name: avg.state_dict() for name, avg in reloaded.items()}
        load(out / "ckpt", state)
        for name, avg in reloaded.items():
            avg.load_state_dict(state[name])
            assert avg.steps == STEPS and avg.sharded
            for a, b in zip(avg.module.state_dict().values(), sharded[name].module.state_dict().values()):
                assert torch.equal(a.to_local() if isinstance(a, DTensor) else a,
                                   b.to_local() if isinstance(b, DTensor) else b), name
        other = BetaMovingAverage(model, total_steps=STEPS, beta=0.7)
        state = {"bma": other.state_dict()}
        load(out / "ckpt", state)
        try:
            other.load_state_dict(state["bma"])
        except ValueError as exc:
            assert "beta=0.5" in str(exc)
        else:
            raise AssertionError("a checkpoint with another beta loaded")
        gathered = {name: avg.full_state_dict() for name, avg in sharded.items()}  # a collective: every rank
        if rank == 0:
            torch.save(gathered, out / "gathered.pt")

        # a full (unsharded) state loads into a sharded average: each rank keeps its slice
        from_full = averages(model)
        for name, avg in from_full.items():
            avg.load_state_dict(unsharded[name].state_dict())
            assert avg.sharded and avg.steps == STEPS
            for key, value in avg.full_state_dict(rank0_only=False).items():
                assert torch.equal(value, unsharded[name].module.state_dict()[key]), (name, key)

        # set(): restart from the sharded model's current weights, which are the reference's θ_T
        sharded["uniform"].set(model)
        assert sharded["uniform"].steps == 0
        restarted = sharded["uniform"].full_state_dict(rank0_only=False)
        for key, value in reference.state_dict().items():
            assert torch.equal(restarted[key], value), key

        # an average built before fully_shard, then updated with the sharded model: a clear error
        early_model = make_model()
        early = BetaMovingAverage(early_model, total_steps=STEPS)
        shard(early_model, mesh)
        try:
            early.update_parameters(early_model)
        except ValueError as exc:
            assert "after fully_shard" in str(exc), exc
        else:
            raise AssertionError("an average built before fully_shard accepted the sharded model")

        # a model sharded differently (dim 1 of the weights): a clear error, not a silent mix of elements
        # (Shard(1) needs an even split on CPU: only the first weight, 9 × 6, gets it)
        differently = shard(make_model(), mesh,
                            shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % 2 == 0 else Shard(0))
        try:
            sharded["bma_no_init"].set(differently)
        except ValueError as exc:
            assert "sharded differently" in str(exc), exc
        else:
            raise AssertionError("an average accepted a model sharded another way")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(_worker, args=(str(tmp),), nprocs=2, join=False)
    deadline = time.monotonic() + 300  # a collective one rank skipped would otherwise hang CI
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank FSDP worker did not finish in 300 s (a hung collective?)")
    return tmp


def test_sharded_averages_equal_unsharded_ones_bitwise(two_rank_run: Path) -> None:
    """Every 2-rank check above passed (the spawn raises with the rank's traceback otherwise)."""
    assert (two_rank_run / "ckpt" / ".metadata").is_file() and (two_rank_run / "gathered.pt").is_file()
    assert not any(p.name.endswith(".partial") for p in two_rank_run.iterdir())


def test_sharded_checkpoint_reshards_into_an_unsharded_average(two_rank_run: Path) -> None:
    gathered = torch.load(two_rank_run / "gathered.pt", weights_only=True)
    fresh = averages(make_model())
    state = {name: avg.state_dict() for name, avg in fresh.items()}
    load_sharded_checkpoint(two_rank_run / "ckpt", state)  # no process group: DCP reads every shard here
    for name, avg in fresh.items():
        avg.load_state_dict(state[name])
        assert avg.steps == STEPS
        for key, value in avg.module.state_dict().items():
            assert torch.equal(value, gathered[name][key]), (name, key)
    bare = make_model()
    bare.load_state_dict(gathered["bma"])  # the export loads into a bare, unsharded model


def test_sharded_checkpoint_errors_name_the_directory(two_rank_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a complete sharded checkpoint"):
        load_sharded_checkpoint(tmp_path, {})
    with pytest.raises(ValueError, match="does not load into this run's state"):
        load_sharded_checkpoint(two_rank_run / "ckpt", {"not_saved": torch.zeros(3)})


class _Payload:
    """An object whose unpickling would import and call code."""


def test_sharded_checkpoint_holding_code_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from clipood_plugin.training.checkpoint import save_sharded_checkpoint

    save_sharded_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2), "obj": _Payload()})
    with pytest.raises(ValueError, match="not plain data"):
        load_sharded_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2), "obj": io.BytesIO()})
    state = {"w": torch.zeros(2)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    assert torch.equal(state["w"], torch.ones(2))


def test_deepspeed_engines_and_zero3_parameters_are_refused() -> None:
    class DeepSpeedEngine(nn.Module):  # the name is what the check sees (DeepSpeed is not installed here)
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"engine\.module"):
        BetaMovingAverage(DeepSpeedEngine(), total_steps=3)
    zero3 = nn.Linear(2, 2)
    zero3.weight.ds_id = 0  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="ZeRO-3"):
        UniformAverage(zero3)
