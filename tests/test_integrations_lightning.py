"""BetaWeightAveraging in a real Lightning fit, checked against Σ α_t θ_t / Σ α_t from recorded weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

L = pytest.importorskip("lightning.pytorch")
if not hasattr(pytest.importorskip("lightning.pytorch.callbacks"), "WeightAveraging"):
    pytest.skip("lightning < 2.6 has no WeightAveraging", allow_module_level=True)

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from reference import beta_alphas, closed_form, params64  # noqa: E402

from clipood_plugin.integrations.lightning import BetaWeightAveraging  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*",
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    "ignore:.*LeafSpec.* is deprecated",
)





class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
        self.seen_in_validation: list[dict[str, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in_validation.append(params64(self))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class Recorder(Callback):
    """Records θ_0 at train start and θ_t after every optimizer step, independently of BMA."""

    def __init__(self) -> None:
        self.snaps: list[dict[str, Tensor]] = []
        self._last = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self.snaps = [params64(pl_module)]
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step > self._last:
            self.snaps.append(params64(pl_module))
            self._last = trainer.global_step


def loader(n_batches: int, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4 * n_batches, 6, generator=gen), torch.randint(0, 3, (4 * n_batches,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def trainer(tmp_path: Path, callbacks: list[Callback], **kw: object) -> L.Trainer:
    opts: dict[str, object] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
    )
    opts.update(kw)
    return L.Trainer(callbacks=callbacks, **opts)


def assert_close_to(module_params: dict[str, Tensor] | nn.Module, ref: dict[str, Tensor]) -> None:
    got = module_params if isinstance(module_params, dict) else params64(module_params)
    for name, want in ref.items():
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-6), name


def test_fit_average_validation_swap_and_final_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, rec, bwa = TinyModule(), Recorder(), BetaWeightAveraging(beta=0.5)
    trainer(tmp_path, [bwa, rec], max_epochs=2).fit(module, loader(3), loader(1, seed=1))
    steps = 6  # 3 batches × 2 epochs
    assert bwa.average is not None and bwa.average.total_steps == steps and bwa.average.steps == steps
    assert len(rec.snaps) == steps + 1
    alphas = beta_alphas(steps, 0.5)
    final = closed_form(rec.snaps, alphas)
    # distinct from the last live weights, so the comparison can fail
    assert any(not torch.allclose(final[k], rec.snaps[-1][k], atol=1e-4) for k in final)
    assert_close_to(bwa.average.module, final)
    assert_close_to(module, final)  # WeightAveraging copies the average in at train end
    # validation after epoch 1 (3 steps) ran on the average of θ_0..θ_3
    assert len(module.seen_in_validation) == 2
    assert_close_to(module.seen_in_validation[0], closed_form(rec.snaps[:4], alphas[:4]))


class PretrainedInSetup(TinyModule):
    """Loads its "pretrained" weights in setup(), which Lightning runs after the callbacks' setup()."""

    def setup(self, stage: str) -> None:
        gen = torch.Generator().manual_seed(42)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_theta0_is_taken_at_fit_start_after_module_setup(tmp_path: Path) -> None:
    module, rec, bwa = PretrainedInSetup(), Recorder(), BetaWeightAveraging(beta=0.5)
    trainer(tmp_path, [bwa, rec], max_epochs=1, limit_val_batches=0).fit(module, loader(3))
    assert_close_to(bwa.average.module, closed_form(rec.snaps, beta_alphas(3, 0.5)))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, rec, bwa = TinyModule(), Recorder(), BetaWeightAveraging(beta=0.3)
    trainer(tmp_path, [bwa, rec], max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0).fit(
        module, loader(4)
    )
    assert bwa.average.total_steps == 4 and len(rec.snaps) == 5
    assert_close_to(bwa.average.module, closed_form(rec.snaps, beta_alphas(4, 0.3)))


def test_checkpoint_holds_average_and_resume_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt_dir = tmp_path / "ckpt"
    module, rec, bwa = TinyModule(), Recorder(), BetaWeightAveraging()
    saver = ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer(tmp_path, [bwa, rec, saver], max_epochs=2, enable_checkpointing=True, limit_val_batches=0).fit(
        module, loader(3)
    )
    full_average = {k: v.detach().clone() for k, v in bwa.average.module.state_dict().items()}

    ckpt = torch.load(ckpt_dir / "epoch=0.ckpt", map_location="cpu", weights_only=True)
    alphas = beta_alphas(6, 0.5)
    assert_close_to({k: v.double() for k, v in ckpt["state_dict"].items()}, closed_form(rec.snaps[:4], alphas[:4]))
    for name, want in rec.snaps[3].items():
        assert torch.equal(ckpt["current_model_state"][name].double(), want), name
    assert int(ckpt["averaging_state"]["n_averaged"]) == 4  # θ_0 + 3 steps
    assert ckpt["averaging_state"]["_extra_state"]["total_steps"] == 6

    torch.manual_seed(123)
    resumed_module, resumed = TinyModule(), BetaWeightAveraging()
    trainer(tmp_path, [resumed], max_epochs=2, limit_val_batches=0).fit(
        resumed_module, loader(3), ckpt_path=str(ckpt_dir / "epoch=0.ckpt")
    )
    assert resumed.average.steps == 6
    for name, value in resumed.average.module.state_dict().items():
        torch.testing.assert_close(value, full_average[name], rtol=1e-6, atol=1e-7)


class Stream(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            yield torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)


def test_unsized_stream_needs_max_steps_or_total_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_steps"):
        trainer(tmp_path, [BetaWeightAveraging()], max_epochs=1).fit(TinyModule(), DataLoader(Stream(), batch_size=None))
    bwa = BetaWeightAveraging()
    trainer(tmp_path, [bwa], max_steps=3).fit(TinyModule(), DataLoader(Stream(), batch_size=None))
    assert bwa.average.total_steps == 3 and bwa.average.steps == 3
    explicit = BetaWeightAveraging(total_steps=5)
    trainer(tmp_path, [explicit], max_epochs=1).fit(TinyModule(), DataLoader(Stream(), batch_size=None))
    assert explicit.average.steps == 5


def test_resume_from_checkpoint_without_bma_state_raises(tmp_path: Path) -> None:
    plain = trainer(tmp_path, [], max_epochs=1)
    plain.fit(TinyModule(), loader(2))
    path = tmp_path / "plain.ckpt"
    plain.save_checkpoint(str(path))
    with pytest.raises(ValueError, match="averaging state"):
        trainer(tmp_path, [BetaWeightAveraging()], max_epochs=2).fit(TinyModule(), loader(2), ckpt_path=str(path))


def test_argument_checks_and_horizon_warning(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="total_steps"):
        BetaWeightAveraging(total_steps=0)
    with pytest.raises(ValueError, match="beta"):
        BetaWeightAveraging(beta=-1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="horizon"):
            trainer(tmp_path, [BetaWeightAveraging(total_steps=2)], max_epochs=1).fit(TinyModule(), loader(3))
    assert any("expects 3" in str(w.message) for w in caught)
