"""BMACallback in a real transformers Trainer run: the saved average against Σ α_t θ_t / Σ α_t."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from reference import beta_alphas, closed_form, params64
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from clipood_plugin.integrations.hf import STATE_NAME, WEIGHTS_NAME, BMACallback, load_bma_weights

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

BATCHES, EPOCHS = 3, 2
STEPS = BATCHES * EPOCHS





class TinyClassifier(nn.Module):
    """What the Trainer needs from a model: forward(**batch) returning a dict with "loss"."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU())
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.classifier(self.backbone(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Toy(Dataset):
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    """θ_0 at train begin (fresh runs only) and θ_t after each optimizer step."""

    def __init__(self, module_name: str | None = None) -> None:
        self.snaps: list[dict[str, Tensor]] = []
        self.module_name = module_name

    def _params(self, model: nn.Module) -> dict[str, Tensor]:
        return params64(model.get_submodule(self.module_name) if self.module_name else model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 0:
            self.snaps = [self._params(model)]

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.snaps.append(self._params(model))


def run(tmp_path: Path, callbacks: list[TrainerCallback], resume: str | None = None, seed: int = 0) -> TinyClassifier:
    torch.manual_seed(seed)
    model = TinyClassifier()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=EPOCHS,
        learning_rate=0.05, lr_scheduler_type="constant", save_strategy="steps", save_steps=BATCHES,
        logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        seed=seed,
    )
    Trainer(model=model, args=args, train_dataset=Toy(4 * BATCHES), callbacks=callbacks).train(
        resume_from_checkpoint=resume
    )
    return model


def as64(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() for k, v in tensors.items()}


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert set(want) <= set(got)
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-6), name


def test_saved_average_is_closed_form_and_resume_is_exact(tmp_path: Path) -> None:
    rec, bma = Recorder(), BMACallback(beta=0.5, copy_to_model_at_end=True)
    model = run(tmp_path, [bma, rec])
    assert len(rec.snaps) == STEPS + 1 and bma.average.total_steps == STEPS
    alphas = beta_alphas(STEPS, 0.5)
    out = tmp_path / "out"

    for step in (BATCHES, STEPS):
        folder = out / f"checkpoint-{step}"
        meta = json.loads((folder / STATE_NAME).read_text())
        assert meta["steps"] == step and meta["total_steps"] == STEPS and meta["beta"] == 0.5
        assert meta["n_averaged"] == step + 1 and meta["global_step"] == step
        assert_close(as64(load_file(str(folder / WEIGHTS_NAME))), closed_form(rec.snaps[: step + 1], alphas[: step + 1]))
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    final = closed_form(rec.snaps, alphas)
    assert any(not torch.allclose(final[k], rec.snaps[-1][k], atol=1e-4) for k in final)
    assert_close(params64(model), final)  # copy_to_model_at_end

    fresh = TinyClassifier()
    meta = load_bma_weights(fresh, out / f"checkpoint-{STEPS}")
    assert meta["steps"] == STEPS
    assert_close(params64(fresh), final)

    # Resume from the mid-run checkpoint: the average continues from the saved one.
    rec2, bma2 = Recorder(), BMACallback(beta=0.5)
    run(tmp_path, [bma2, rec2], resume=str(out / f"checkpoint-{BATCHES}"))
    assert bma2.average.steps == STEPS and len(rec2.snaps) == STEPS - BATCHES
    spliced = rec.snaps[: BATCHES + 1] + rec2.snaps
    assert_close(params64(bma2.average.module), closed_form(spliced, alphas))


def test_submodule_average(tmp_path: Path) -> None:
    rec, bma = Recorder("backbone"), BMACallback(beta=0.3, module_name="backbone")
    run(tmp_path, [bma, rec])
    saved = as64(load_file(str(tmp_path / "out" / f"checkpoint-{STEPS}" / WEIGHTS_NAME)))
    assert set(saved) == set(TinyClassifier().backbone.state_dict())
    assert_close(saved, closed_form(rec.snaps, beta_alphas(STEPS, 0.3)))
    fresh = TinyClassifier()
    load_bma_weights(fresh, tmp_path / "out" / f"checkpoint-{STEPS}")
    assert_close(params64(fresh.backbone), closed_form(rec.snaps, beta_alphas(STEPS, 0.3)))


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="total_steps"):
        BMACallback(total_steps=0)
    with pytest.raises(ValueError, match="beta"):
        BMACallback(beta=0.0)
    with pytest.raises(ValueError, match="no submodule 'vision'"):
        run(tmp_path, [BMACallback(module_name="vision")])
    with pytest.raises(RuntimeError, match="horizon"):
        run(tmp_path / "short", [BMACallback(total_steps=2)])
    # A checkpoint written without the callback cannot resume the average.
    run(tmp_path / "plain", [])
    with pytest.raises(FileNotFoundError, match=r"bma\.safetensors"):
        run(tmp_path / "plain", [BMACallback()], resume=str(tmp_path / "plain" / "out" / f"checkpoint-{BATCHES}"))
    # Nor can one made with another β.
    run(tmp_path / "b", [BMACallback(beta=0.5)])
    with pytest.raises(ValueError, match="cannot resume"):
        run(tmp_path / "b", [BMACallback(beta=0.7)], resume=str(tmp_path / "b" / "out" / f"checkpoint-{BATCHES}"))
