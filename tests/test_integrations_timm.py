"""CLIPoodTask through timm's task API, timm's CheckpointSaver and timm's checkpoint loaders.

The average is checked against Σ α_t θ_t / Σ α_t computed here in float64 from recorded weights,
with α_t from the Beta pdf written out in this file (not from clipood_plugin).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

timm = pytest.importorskip("timm")
timm_task = pytest.importorskip("timm.task")
if not hasattr(timm_task.TrainingTask, "setup_ema"):
    pytest.skip("timm < 1.0.27 has no task EMA API", allow_module_level=True)

from reference import beta_alphas, closed_form  # noqa: E402
from reference import params64 as snapshot  # noqa: E402
from timm.models import load_checkpoint  # noqa: E402
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint  # noqa: E402
from timm.utils import CheckpointSaver  # noqa: E402

from clipood_plugin import BetaMovingAverage, MMSLoss, TextHead  # noqa: E402
from clipood_plugin.integrations.timm import CLIPoodTask, TowerClassifier  # noqa: E402

DIM, CLASSES, BATCH, STEPS = 16, 5, 8, 6


def make_tower(seed: int = 0) -> nn.Module:
    """The timm CLIP ViT family at toy size; num_classes = embedding dim (the projection)."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_base_patch16_clip_224", pretrained=False, num_classes=DIM,
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
    )


def make_head(seed: int = 1) -> TextHead:
    gen = torch.Generator().manual_seed(seed)
    return TextHead(F.normalize(torch.randn(CLASSES, DIM, generator=gen), dim=-1), scale=100.0)


def batch(seed: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)





def train(task: CLIPoodTask, steps: int, lr: float = 1e-3) -> tuple[list[float], list[dict[str, Tensor]], torch.optim.Optimizer]:
    """timm train.py's order: forward, backward, step, zero_grad, update_ema(step=num_updates)."""
    x, y = batch()
    opt = torch.optim.AdamW(task.get_trainable_module().parameters(), lr=lr)
    losses, snaps = [], [snapshot(task.get_trainable_module())]
    for num_updates in range(1, steps + 1):
        result = task(x, y)
        assert result["output"].shape == (BATCH, CLASSES)
        assert not result["output"].requires_grad
        result["loss"].backward()
        opt.step()
        opt.zero_grad()
        task.update_ema(step=num_updates)
        losses.append(result["loss"].item())
        snaps.append(snapshot(task.get_trainable_module()))
    return losses, snaps, opt


Trained = tuple[CLIPoodTask, list[float], list[dict[str, Tensor]], torch.optim.Optimizer]


@pytest.fixture
def trained() -> Trained:
    task = CLIPoodTask(make_tower(), make_head(), total_steps=STEPS, bma_beta=0.5, verbose=False)
    task.setup_ema(decay=0.9998, use_warmup=False, device=None)  # exactly train.py's call
    losses, snaps, opt = train(task, STEPS - 2)
    return task, losses, snaps, opt


def test_loss_decreases_and_bma_is_closed_form(trained: Trained) -> None:
    task, losses, snaps, _ = trained
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    bma = task.get_trainable_module(ema=True)
    assert isinstance(bma, BetaMovingAverage) and bma.steps == STEPS - 2
    alphas = beta_alphas(STEPS, 0.5)[: len(snaps)]
    ref = closed_form(snaps, alphas)
    moved = False
    for name, p in bma.module.named_parameters():
        assert torch.allclose(p.double(), ref[name], rtol=1e-5, atol=1e-6), name
        moved |= not torch.allclose(ref[name], snaps[-1][name], rtol=1e-4, atol=1e-5)
    assert moved, "the average equals the last weights, so the check above could not fail"


def test_eval_models_are_tower_plus_head(trained: Trained) -> None:
    task, *_ = trained
    x, _ = batch(3)
    bma = task.get_trainable_module(ema=True)
    for ema, tower in ((False, task.get_trainable_module()), (True, bma.module)):
        model = task.get_eval_model(ema=ema)
        assert isinstance(model, TowerClassifier)
        model.eval()
        with torch.no_grad():
            logits = model(x)
            feats = F.normalize(tower(x).double(), dim=-1)
        expected = 100.0 * feats @ task.head.weight.double().t()
        torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(task.get_eval_model(ema=True)(x), task.get_eval_model()(x))


def test_default_criterion_is_mms_on_features() -> None:
    head = make_head()
    task = CLIPoodTask(make_tower(), head, lam=0.3, verbose=False)
    x, y = batch()
    ref = MMSLoss(head, lam=0.3)(task.get_trainable_module()(x), y)
    torch.testing.assert_close(task(x, y)["loss"], ref)
    soft = F.one_hot(y, CLASSES).float()
    torch.testing.assert_close(task(x, soft)["loss"], ref, rtol=1e-5, atol=1e-5)


def test_checkpoint_saver_and_timm_loaders(trained: Trained, tmp_path: Path) -> None:
    task, _, _, opt = trained
    saver = CheckpointSaver(
        model=task.get_trainable_module(), optimizer=opt, task=task,
        checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), max_history=1,
    )
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = str(tmp_path / "last.pth.tar")
    bma = task.get_trainable_module(ema=True)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict_ema"]) == set(task.get_trainable_module().state_dict())
    assert int(ckpt["task_state_ema"]["bma"]["n_averaged"]) == bma.steps + 1

    # timm's plain model loader: the average lands in a bare tower, keys and all.
    for use_ema, source in ((True, bma.module), (False, task.get_trainable_module())):
        fresh = make_tower(seed=7)
        load_checkpoint(fresh, path, use_ema=use_ema)
        for (name, got), want in zip(fresh.state_dict().items(), source.state_dict().values()):
            assert torch.equal(got, want), (use_ema, name)

    # timm's task resume path (train.py --resume): live weights, then setup_ema, then the BMA.
    task2 = CLIPoodTask(make_tower(seed=7), make_head(), total_steps=STEPS, verbose=False)
    resume_task_checkpoint(task2, path, log_info=False)
    task2.setup_ema()
    load_task_ema_checkpoint(task2, path)
    bma2 = task2.get_trainable_module(ema=True)
    assert bma2.steps == bma.steps
    for a, b in zip(bma2.module.parameters(), bma.module.parameters()):
        assert torch.equal(a, b)
    # Resumed exactly: the next update gives the same average in both.
    with torch.no_grad():
        for p in task.get_trainable_module().parameters():
            p.add_(0.01)
    task2.get_trainable_module().load_state_dict(task.get_trainable_module().state_dict())
    task.update_ema(step=bma.steps + 1)
    task2.update_ema(step=bma2.steps + 1)
    for a, b in zip(bma2.module.parameters(), bma.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_other_beta_other_head_and_plain_ema(trained: Trained, tmp_path: Path) -> None:
    task, _, _, opt = trained
    saver = CheckpointSaver(model=task.get_trainable_module(), optimizer=opt, task=task,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = str(tmp_path / "last.pth.tar")

    other_beta = CLIPoodTask(make_tower(), make_head(), total_steps=STEPS, bma_beta=0.3, verbose=False)
    other_beta.setup_ema()
    with pytest.raises(ValueError, match="beta"):
        load_task_ema_checkpoint(other_beta, path)

    other_head = CLIPoodTask(make_tower(), make_head(seed=5), total_steps=STEPS, verbose=False)
    with pytest.raises(ValueError, match="text head"):
        resume_task_checkpoint(other_head, path, log_info=False)

    # A checkpoint whose EMA came from timm's ModelEmaV3 has no BMA bookkeeping.
    plain = timm_task.ClassificationTask(make_tower(), criterion=nn.CrossEntropyLoss(), verbose=False)
    plain.setup_ema(decay=0.99)
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    CheckpointSaver(model=plain.get_trainable_module(), optimizer=opt, task=plain,
                    checkpoint_dir=str(plain_dir), recovery_dir=str(plain_dir)).save_checkpoint(epoch=0, metric=1.0)
    fresh = CLIPoodTask(make_tower(), make_head(), total_steps=STEPS, verbose=False)
    fresh.setup_ema()
    with pytest.raises(ValueError, match="bookkeeping"):
        load_task_ema_checkpoint(fresh, str(plain_dir / "last.pth.tar"))


def test_setup_ema_errors_and_step_check() -> None:
    task = CLIPoodTask(make_tower(), make_head(), verbose=False)
    with pytest.raises(ValueError, match="total_steps"):
        task.setup_ema()
    with pytest.raises(TypeError, match="min_decay"):
        task.setup_ema(total_steps=3, min_decay=0.5)
    with pytest.warns(UserWarning, match="warmup"):
        task.setup_ema(total_steps=3, use_warmup=True)
    with pytest.raises(ValueError, match="next is 1"):
        task.update_ema(step=2)  # a skipped update is an error, not a silent skew
    with pytest.raises(ValueError, match="total_steps"):
        CLIPoodTask(make_tower(), make_head(), total_steps=0, verbose=False)
    with pytest.raises(ValueError, match="8-dim"):
        CLIPoodTask(timm.create_model("test_vit", num_classes=8, img_size=32), make_head(), verbose=False)
    with pytest.raises(TypeError, match="TextHead"):
        CLIPoodTask(make_tower(), nn.Linear(DIM, CLASSES), verbose=False)


def test_open_clip_visual_tower_with_head_from_open_clip() -> None:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=DIM,
        vision_cfg={"layers": 1, "width": 32, "patch_size": 8, "image_size": 32, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    head = TextHead.from_open_clip(clip, open_clip.get_tokenizer("ViT-B-32"), ["cat", "dog", "car", "tree", "cup"])
    task = CLIPoodTask(clip.visual, head, total_steps=3, verbose=False)
    task.setup_ema()
    losses, snaps, _ = train(task, 3, lr=1e-3)
    assert all(math.isfinite(v) for v in losses)
    ref = closed_form(snaps, beta_alphas(3, 0.5))
    for name, p in task.get_trainable_module(ema=True).module.named_parameters():
        assert torch.allclose(p.double(), ref[name], rtol=1e-5, atol=1e-6), name


def test_old_timm_train_loop_with_bma_and_checkpoint_saver(tmp_path: Path) -> None:
    """timm ≤ 1.0.26 train.py: ModelEmaV3(model) → BetaMovingAverage(model, T); update(model, step)."""
    tower, head = make_tower(), make_head()
    model_ema = BetaMovingAverage(tower, total_steps=3)
    opt = torch.optim.SGD(tower.parameters(), lr=0.1)
    loss_fn = MMSLoss(head)
    x, y = batch()
    for num_updates in range(1, 4):
        loss_fn(tower(x), y).backward()
        opt.step()
        opt.zero_grad()
        model_ema.update(tower, step=num_updates)
    CheckpointSaver(model=tower, optimizer=opt, model_ema=model_ema,
                    checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path)).save_checkpoint(epoch=0, metric=0.0)
    fresh = make_tower(seed=9)
    load_checkpoint(fresh, str(tmp_path / "last.pth.tar"), use_ema=True)
    for a, b in zip(fresh.parameters(), model_ema.module.parameters()):
        assert torch.equal(a, b)


def test_missing_task_api_gives_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipood_plugin.integrations as integrations

    name = "clipood_plugin.integrations.timm"
    monkeypatch.setattr(integrations, "timm", sys.modules[name], raising=False)  # restored afterwards
    monkeypatch.setitem(sys.modules, "timm.task", None)  # importing timm.task now fails, as on timm < 1.0.23
    monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module(name)
    with pytest.raises(ImportError, match=r"timm>=1\.0\.27"):
        module.CLIPoodTask  # noqa: B018
    with pytest.raises(ImportError, match="BetaMovingAverage"):
        from clipood_plugin.integrations.timm import CLIPoodTask as _  # noqa: F401
    assert module.TowerClassifier is not None  # the rest of the module still imports


# -- train.py routes: from_timm, BMAClassificationTask, replace_model_ema -------------------


def train_args(**overrides: object) -> argparse.Namespace:
    values = dict(model_ema=True, grad_accum_steps=1, epochs=2, sched="cosine", cooldown_epochs=0, warmup_epochs=0,
                  warmup_prefix=False, lr=1e-3, mixup=0.0, cutmix=0.0, cutmix_minmax=None, num_classes=DIM)
    values.update(overrides)
    return argparse.Namespace(**values)


class Batches(list):
    """A sized stand-in for train.py's loader_train: a list of (images, labels) batches."""


def loader(n: int, seed: int = 4) -> Batches:
    return Batches(batch(seed + i) for i in range(n))


def test_total_steps_counts_accumulation_warmup_prefix_and_cooldown() -> None:
    from clipood_plugin.integrations.timm import timm_total_steps

    args = train_args(grad_accum_steps=2, epochs=2, cooldown_epochs=1, warmup_epochs=1, warmup_prefix=True)
    assert timm_total_steps(args, loader(5)) == (1 + 2 + 1) * 3  # ceil(5 / 2) updates per epoch
    assert timm_total_steps(train_args(warmup_epochs=3), loader(4)) == 2 * 4  # warmup inside the epochs


def test_fold_soft_targets_equals_timm_mixup_over_the_real_classes() -> None:
    from timm.data.mixup import mixup_target

    from clipood_plugin.integrations.timm import fold_soft_targets

    _, y = batch()
    for lam, smoothing in ((0.7, 0.1), (1.0, 0.0), (0.35, 0.2)):
        wide = mixup_target(y, DIM, lam=lam, smoothing=smoothing)  # what train.py builds: --num-classes = D
        real = mixup_target(y, CLASSES, lam=lam, smoothing=smoothing)  # what it should have built
        torch.testing.assert_close(fold_soft_targets(wide, CLASSES), real, rtol=0, atol=1e-6)
    bad = mixup_target(torch.full_like(y, CLASSES + 1), DIM, lam=1.0, smoothing=0.0)
    with pytest.raises(ValueError, match="beyond the head"):
        fold_soft_targets(bad, CLASSES)


def classification_task(criterion: nn.Module, tower: nn.Module | None = None) -> timm_task.ClassificationTask:
    return timm_task.ClassificationTask(model=tower or make_tower(), criterion=criterion, verbose=False)


def test_from_timm_honours_label_smoothing_and_mixup() -> None:
    from timm.data.mixup import mixup_target
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    head = make_head()
    x, y = batch()
    task = CLIPoodTask.from_timm(classification_task(LabelSmoothingCrossEntropy(smoothing=0.1)), train_args(), loader(3), head=head)
    assert task.total_steps == 2 * 3
    # Independent: the paper's MMS logits in float64, then timm's smoothing rule (1 - s)·NLL + s·mean(-log p).
    feats = F.normalize(task.get_trainable_module()(x).double(), dim=-1)
    text = head.weight.double()
    scale = float(head.scale)
    logits = scale * (feats @ text.t() + 0.3 * (1 - text[y] @ text.t()))
    logp = logits.log_softmax(dim=-1)
    expected = (0.9 * -logp.gather(1, y[:, None]).squeeze(1) - 0.1 * logp.mean(dim=-1)).mean()
    torch.testing.assert_close(task(x, y)["loss"].double(), expected, rtol=1e-5, atol=1e-5)

    mixed = CLIPoodTask.from_timm(classification_task(SoftTargetCrossEntropy()), train_args(mixup=0.2), loader(3), head=head)
    wide = mixup_target(y, DIM, lam=0.6, smoothing=0.1)
    real = mixup_target(y, CLASSES, lam=0.6, smoothing=0.1)
    torch.testing.assert_close(mixed(x, wide)["loss"], mixed(x, real)["loss"], rtol=1e-6, atol=1e-6)


def test_from_timm_refuses_at_start_up() -> None:
    from timm.loss import BinaryCrossEntropy

    head = make_head()
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="--model-ema"):
        CLIPoodTask.from_timm(classification_task(ce), train_args(model_ema=False), loader(2), head=head)
    with pytest.raises(ValueError, match="bce-loss"):
        CLIPoodTask.from_timm(classification_task(BinaryCrossEntropy()), train_args(), loader(2), head=head)
    with pytest.raises(ValueError, match="num-classes=3"):
        CLIPoodTask.from_timm(classification_task(ce), train_args(mixup=0.2, num_classes=3), loader(2), head=head)
    with pytest.raises(ValueError, match="TextHead"):
        CLIPoodTask.from_timm(classification_task(ce), train_args(), loader(2), head="")
    named = TextHead(head.weight, scale=100.0, classnames=["a", "b", "c", "d", "e"])

    class Folder(Batches):
        class reader:
            class_to_idx: ClassVar[dict[str, int]] = {"a": 0, "b": 1, "d": 2, "c": 3, "e": 4}

    folder = Folder(loader(2))
    folder.dataset = folder
    with pytest.raises(ValueError, match="label order"):
        CLIPoodTask.from_timm(classification_task(ce), train_args(), folder, head=named)


def test_head_and_criterion_follow_the_task_device_and_decay_warns() -> None:
    task = CLIPoodTask(make_tower(), make_head(), total_steps=3, device=torch.device("meta"), verbose=False)
    assert task.head.weight.device.type == "meta"
    assert task.criterion.text_features.device.type == "meta"
    cpu = CLIPoodTask(make_tower(), make_head(), total_steps=3, verbose=False)
    with pytest.warns(UserWarning, match="no decay"):
        cpu.setup_ema(decay=0.9998, device="cpu")


def make_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES)


def test_bma_classification_task_checkpoints_resumes_and_recomputes_bn(tmp_path: Path) -> None:
    from torch.optim.swa_utils import update_bn

    from clipood_plugin.integrations.timm import BMAClassificationTask

    data = loader(3)
    base = classification_task(nn.CrossEntropyLoss(), tower=make_bn_model())
    task = BMAClassificationTask.from_timm(base, train_args(epochs=1), data)
    with pytest.warns(UserWarning, match="no decay"):
        task.setup_ema(decay=0.9998)
    model = task.get_trainable_module()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = [snapshot(model)]
    for step, (x, y) in enumerate(data, start=1):
        task(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()
        task.update_ema(step=step)
        snaps.append(snapshot(model))
    bma = task.get_trainable_module(ema=True)
    ref = closed_form(snaps, beta_alphas(3, 0.5))
    for name, p in bma.module.named_parameters():
        torch.testing.assert_close(p.double(), ref[name], rtol=1e-5, atol=1e-6)

    # validation runs the eval model in eval mode: the BN statistics are recomputed first
    eval_model = task.get_eval_model(ema=True)
    eval_model.eval()
    with torch.no_grad():
        eval_model(data[0][0])
    independent = make_bn_model(seed=3)
    independent.load_state_dict(bma.module.state_dict())
    update_bn([x for x, _ in data], independent)
    for key, value in independent.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(bma.module.state_dict()[key], value, rtol=1e-5, atol=1e-6)

    CheckpointSaver(model=model, optimizer=opt, task=task, checkpoint_dir=str(tmp_path),
                    recovery_dir=str(tmp_path)).save_checkpoint(epoch=0, metric=1.0)
    path = str(tmp_path / "last.pth.tar")
    fresh = make_bn_model(seed=9)
    load_checkpoint(fresh, path, use_ema=True)
    for a, b in zip(fresh.state_dict().values(), bma.module.state_dict().values()):
        assert torch.equal(a, b.to(a.dtype))
    again = BMAClassificationTask(make_bn_model(seed=9), nn.CrossEntropyLoss(), total_steps=3, verbose=False)
    resume_task_checkpoint(again, path, log_info=False)
    again.setup_ema()
    load_task_ema_checkpoint(again, path)
    assert again.get_trainable_module(ema=True).steps == 3
    other_t = BMAClassificationTask(make_bn_model(), nn.CrossEntropyLoss(), total_steps=4, verbose=False)
    other_t.setup_ema()
    with pytest.raises(ValueError, match="total_steps"):
        load_task_ema_checkpoint(other_t, path)
    with pytest.raises(TypeError, match="plain ClassificationTask"):
        BMAClassificationTask.from_timm(task, train_args(), data)


def test_replace_model_ema_swaps_the_saver_and_resumes_from_the_start_step(tmp_path: Path) -> None:
    from timm.utils import ModelEmaV3

    from clipood_plugin.integrations.timm import replace_model_ema

    model = make_bn_model()
    ema = ModelEmaV3(model, decay=0.99)
    saver = CheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    assert replace_model_ema(None, saver, None, 4) is None
    with pytest.warns(UserWarning, match="decay 0.99"):
        bma = replace_model_ema(ema, saver, loader(2), 4, 2)
    assert saver.model_ema is bma and bma.steps == 2
    for a, b in zip(bma.module.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)  # the loaded average is where the BMA continues from
    bma.update(model, step=3)
    with pytest.raises(ValueError, match="next is 4"):
        bma.update(model, step=5)
    with pytest.raises(ValueError, match="start_steps"):
        replace_model_ema(ema, saver, None, 4, 5)
