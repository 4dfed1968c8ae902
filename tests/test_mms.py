"""MMSLoss against an independent float64 computation of the paper's margin form (Eq. 3–4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipood_plugin import MMSLoss


def paper_form_loss(feats: Tensor, text: Tensor, q: Tensor, lam: float, scale: float, smoothing: float = 0.0) -> Tensor:
    """Per-row loss in the paper's form, in float64: explicit margin matrix, explicit log-softmax.

    ``q`` is a [B, C] target distribution (one-hot for hard labels). The margin added to class c
    is the q-weighted class-adaptive margin Σ_k q_k·λ·(1 - ⟨T_k, T_c⟩).
    """
    f = feats.double()
    f = f / f.norm(dim=1, keepdim=True)
    t = text.double()
    t = t / t.norm(dim=1, keepdim=True)
    cos = f @ t.T
    distance = 1.0 - t @ t.T  # D(T_k, T_c)
    margin = lam * (q.double() @ distance)
    logits = scale * (cos + margin)
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    nll = -(q.double() * logp).sum(dim=1)
    if smoothing:
        nll = (1 - smoothing) * nll + smoothing * (-logp.mean(dim=1))
    return nll


def make_inputs(batch: int = 16, classes: int = 10, dim: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    feats = torch.randn(batch, dim) * 3.0
    text = torch.randn(classes, dim)
    labels = torch.randint(0, classes, (batch,))
    return feats, text, labels


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.3, 1.0])
def test_loss_and_gradient_match_float64_paper_form(lam: float) -> None:
    feats, text, labels = make_inputs()
    q = F.one_hot(labels, text.shape[0])
    scale = 100.0

    f32 = feats.clone().requires_grad_(True)
    loss = MMSLoss(text, lam=lam, scale=scale)(f32, labels)
    loss.backward()

    f64 = feats.double().clone().requires_grad_(True)
    ref = paper_form_loss(f64, text, q, lam, scale).mean()
    ref.backward()

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f32.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)


def test_float64_inputs_stay_float64_and_match_tightly() -> None:
    feats, text, labels = make_inputs()
    loss = MMSLoss(text.double(), lam=0.3, scale=37.0)(feats.double(), labels)
    ref = paper_form_loss(feats, text, F.one_hot(labels, 10), 0.3, 37.0).mean()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_lambda_zero_is_cross_entropy_on_scaled_cosine_logits() -> None:
    feats, text, labels = make_inputs()
    logits = 50.0 * F.normalize(feats, dim=1) @ F.normalize(text, dim=1).T
    expected = F.cross_entropy(logits, labels)
    torch.testing.assert_close(MMSLoss(text, lam=0.0, scale=50.0)(feats, labels), expected)


def test_margin_raises_the_loss_and_is_zero_on_the_target() -> None:
    feats, text, labels = make_inputs()
    assert MMSLoss(text, lam=0.3)(feats, labels) > MMSLoss(text, lam=0.0)(feats, labels)
    # Paper form: the margin of the true class is λ·(1 - ⟨T_y, T_y⟩) = 0, so with a single class
    # the loss is 0 for any λ.
    one = MMSLoss(text[:1], lam=0.7)(feats, torch.zeros(len(feats), dtype=torch.long))
    assert one.abs().item() < 1e-6


def test_gradcheck_float64() -> None:
    feats, text, labels = make_inputs(batch=4, classes=5, dim=6)
    loss_fn = MMSLoss(text.double(), lam=0.3, scale=10.0)
    x = feats.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, labels), (x,), eps=1e-6, atol=1e-6)
    soft = torch.softmax(torch.randn(4, 5, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, soft), (x,), eps=1e-6, atol=1e-6)


def test_soft_targets_match_expected_margin_form_and_one_hot_matches_hard() -> None:
    feats, text, labels = make_inputs()
    loss_fn = MMSLoss(text, lam=0.3, scale=100.0)
    one_hot = F.one_hot(labels, 10).float()
    torch.testing.assert_close(loss_fn(feats, one_hot), loss_fn(feats, labels))

    # mixup of two samples' labels
    perm = torch.randperm(len(labels))
    q = 0.7 * one_hot + 0.3 * one_hot[perm]
    ref = paper_form_loss(feats, text, q, 0.3, 100.0).mean()
    torch.testing.assert_close(loss_fn(feats, q).double(), ref, rtol=1e-5, atol=1e-5)


def test_label_smoothing_and_reductions() -> None:
    feats, text, labels = make_inputs()
    q = F.one_hot(labels, 10)
    ref_rows = paper_form_loss(feats, text, q, 0.3, 100.0, smoothing=0.1)
    smoothed = MMSLoss(text, label_smoothing=0.1, reduction="none")(feats, labels)
    torch.testing.assert_close(smoothed.double(), ref_rows, rtol=1e-5, atol=1e-5)

    rows = paper_form_loss(feats, text, q, 0.3, 100.0)
    torch.testing.assert_close(MMSLoss(text, reduction="sum")(feats, labels).double(), rows.sum(), rtol=1e-5, atol=1e-4)
    assert MMSLoss(text, reduction="none")(feats, labels).shape == (16,)


def test_class_subset_relabels_from_zero() -> None:
    feats, text, _ = make_inputs()
    base = torch.tensor([1, 4, 7])
    labels = torch.randint(0, 3, (16,))
    subset = MMSLoss(text, classes=base)(feats, labels)
    torch.testing.assert_close(subset, MMSLoss(text[base])(feats, labels))
    ref = paper_form_loss(feats, text[base], F.one_hot(labels, 3), 0.3, 100.0).mean()
    torch.testing.assert_close(subset.double(), ref, rtol=1e-5, atol=1e-5)


def test_head_supplies_weight_and_scale() -> None:
    class Head(nn.Module):  # anything with a normalised `weight` and a `scale`, like TextHead
        def __init__(self, weight: Tensor, scale: float) -> None:
            super().__init__()
            self.register_buffer("weight", F.normalize(weight, dim=1))
            self.register_buffer("scale", torch.tensor(scale))

    feats, text, labels = make_inputs()
    head = Head(text, 42.0)
    loss_fn = MMSLoss(head)
    assert loss_fn.scale == pytest.approx(42.0)
    torch.testing.assert_close(loss_fn(feats, labels), MMSLoss(text, scale=42.0)(feats, labels))


def test_autocast_computes_in_float32() -> None:
    feats, text, labels = make_inputs()
    loss_fn = MMSLoss(text)
    expected = loss_fn(feats, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(feats.bfloat16(), labels)
    assert got.dtype == torch.float32
    # bf16 features carry ~3 significant digits; the loss itself must not add bf16 error on top
    torch.testing.assert_close(got, loss_fn(feats.bfloat16().float(), labels))
    assert abs(got.item() - expected.item()) < 0.05 * max(1.0, expected.item())


def test_output_dict() -> None:
    feats, text, labels = make_inputs()
    out = MMSLoss(text, output_dict=True)(feats, labels)
    assert set(out) == {"mms_loss"}
    assert MMSLoss(text)(feats, labels, output_dict=True)["mms_loss"].shape == ()


@pytest.mark.parametrize(
    ("feats", "labels", "error", "match"),
    [
        (torch.randn(4, 31), torch.zeros(4, dtype=torch.long), ValueError, "dimension 31 does not match.*32"),
        (torch.randn(4, 32), torch.tensor([0, 1, 10, 2]), ValueError, r"labels out of range \[0, 10\): \[10\]"),
        (torch.randn(4, 32), torch.tensor([0, -1, 1, 2]), ValueError, r"out of range.*-1"),
        (torch.full((4, 32), float("nan")), torch.zeros(4, dtype=torch.long), ValueError, "NaN or Inf"),
        (torch.randn(4, 32), torch.zeros(3, dtype=torch.long), ValueError, "3 labels for a batch of 4"),
        (torch.randn(4, 32), torch.zeros(4), TypeError, "integer"),
        (torch.randn(4, 32), torch.zeros(4, 9), ValueError, r"soft targets must be \[B, C\]"),
        (torch.randn(4, 32, 1), torch.zeros(4, dtype=torch.long), ValueError, r"\[B, D\]"),
    ],
)
def test_bad_input_is_a_clear_error(feats: Tensor, labels: Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MMSLoss(torch.randn(10, 32))(feats, labels)


def test_bad_construction_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="zero norm for classes \\[2\\]"):
        MMSLoss(torch.cat([torch.randn(2, 8), torch.zeros(1, 8)]))
    with pytest.raises(ValueError, match=r"\[C, D\]"):
        MMSLoss(torch.randn(8))
    with pytest.raises(ValueError, match="lam"):
        MMSLoss(torch.randn(3, 8), lam=-0.1)
    with pytest.raises(ValueError, match="scale"):
        MMSLoss(torch.randn(3, 8), scale=0.0)
    with pytest.raises(ValueError, match="outside"):
        MMSLoss(torch.randn(3, 8), classes=[0, 3])
    with pytest.raises(ValueError, match="duplicate"):
        MMSLoss(torch.randn(3, 8), classes=[0, 0])
    with pytest.raises(TypeError, match="TextHead"):
        MMSLoss([[1.0, 0.0]])  # type: ignore[arg-type]


def test_text_features_are_frozen_and_follow_the_module() -> None:
    text = torch.randn(5, 8, requires_grad=True)
    loss_fn = MMSLoss(text)
    assert not loss_fn.text_features.requires_grad
    assert "text_features" not in loss_fn.state_dict()  # frozen input, not learned state
    torch.testing.assert_close(loss_fn.text_features.norm(dim=1), torch.ones(5))
    assert loss_fn.double().text_features.dtype == torch.float64
