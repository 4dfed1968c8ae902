"""CARFTLoss and ContextBank against float64 computations written out here; one tiny open_clip model."""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
from tiny_open_clip import tiny_open_clip
from torch import Tensor, nn

import clipood_plugin.carft as carft_module
from clipood_plugin.carft import CARFTLoss, ContextBank, HeadCrossEntropy, build_head_and_context_bank
from clipood_plugin.mms import MMSLoss
from clipood_plugin.text_head import TextHead

B, IN, D, C, M = 10, 12, 8, 5, 6
SCALE = 100.0


def tower() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, D))


def perturb(module: nn.Module, size: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * size)


def setup() -> tuple[nn.Module, TextHead, ContextBank, Tensor, Tensor]:
    torch.manual_seed(0)
    net = tower()
    head = TextHead(torch.randn(C, D), scale=SCALE)
    bank = ContextBank(torch.randn(M, D) * 3.0, scale=SCALE)
    x = torch.randn(B, IN)
    y = torch.randint(0, C, (B,))
    return net, head, bank, x, y


def log_softmax64(z: Tensor) -> Tensor:
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def reference(
    ft: nn.Module,
    zs: nn.Module,
    head: TextHead,
    bank_dirs: Tensor,
    x: Tensor,
    y: Tensor,
    weight: float,
    direction: str = "zs_ft",
) -> tuple[Tensor, Tensor, Tensor, nn.Module]:
    """(total, ce, kl) in float64 with autograd through a float64 copy of the fine-tuned tower."""
    ft64, zs64 = copy.deepcopy(ft).double(), copy.deepcopy(zs).double()
    f = unit(ft64(x.double()))
    with torch.no_grad():
        f0 = unit(zs64(x.double()))
    w = unit(bank_dirs.double())
    log_ft = log_softmax64(SCALE * f @ w.t())
    log_zs = log_softmax64(SCALE * f0 @ w.t())
    if direction == "zs_ft":
        kl = (log_zs.exp() * (log_zs - log_ft)).sum(1).mean()
    else:
        kl = (log_ft.exp() * (log_ft - log_zs)).sum(1).mean()
    logits = SCALE * f @ unit(head.weight.double()).t()
    ce = -(log_softmax64(logits).gather(1, y[:, None])).mean()
    return ce + weight * kl, ce, kl, ft64


# -- the KL term ---------------------------------------------------------------------------------


def test_kl_is_zero_for_the_pretrained_tower_and_positive_after_a_perturbation() -> None:
    net, head, bank, x, y = setup()
    loss = CARFTLoss(HeadCrossEntropy(head), bank, pretrained_tower=net)
    out = loss(net(x), y, images=x, output_dict=True)
    assert abs(out["carft_kl"].item()) <= 1e-7
    perturb(net)
    out = loss(net(x), y, images=x, output_dict=True)
    assert out["carft_kl"].item() > 1e-3
    # the frozen copy did not follow the perturbation
    assert not torch.equal(loss.pretrained_tower[0].weight, net[0].weight)


@pytest.mark.parametrize("direction", ["zs_ft", "ft_zs"])
def test_loss_and_gradient_match_float64(direction: str) -> None:
    net, head, bank, x, y = setup()
    pretrained = copy.deepcopy(net)
    loss = CARFTLoss(HeadCrossEntropy(head), bank, weight=0.7, kl_direction=direction, pretrained_tower=net)
    perturb(net)
    out = loss(net(x), y, images=x, output_dict=True)
    out["loss"].backward()
    ref_total, ref_ce, ref_kl, ft64 = reference(net, pretrained, head, bank.directions, x, y, 0.7, direction)
    ref_total.backward()
    assert out["carft_kl"].item() == pytest.approx(ref_kl.item(), rel=1e-5)
    assert out["classification_loss"].item() == pytest.approx(ref_ce.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(ref_total.item(), rel=1e-5)
    for (name, p), p64 in zip(net.named_parameters(), ft64.parameters()):
        assert p.grad is not None
        err = ((p.grad.double() - p64.grad).norm() / p64.grad.norm()).item()
        assert err <= 1e-4, (name, err)


def test_kl_direction_is_asymmetric_and_selectable() -> None:
    net, head, bank, x, y = setup()
    pretrained = copy.deepcopy(net)
    perturb(net, 0.5)
    f, f0 = net(x).detach(), pretrained(x).detach()
    ce = HeadCrossEntropy(head)
    forward = CARFTLoss(ce, bank, kl_direction="zs_ft").context_kl(f, f0).item()
    reverse = CARFTLoss(ce, bank, kl_direction="ft_zs").context_kl(f, f0).item()
    _, _, ref_fwd, _ = reference(net, pretrained, head, bank.directions, x, y, 1.0, "zs_ft")
    _, _, ref_rev, _ = reference(net, pretrained, head, bank.directions, x, y, 1.0, "ft_zs")
    assert forward == pytest.approx(ref_fwd.item(), rel=1e-5)
    assert reverse == pytest.approx(ref_rev.item(), rel=1e-5)
    assert abs(forward - reverse) > 1e-3 * max(forward, reverse)
    # swapping the roles of the two feature sets swaps the direction
    assert CARFTLoss(ce, bank, kl_direction="ft_zs").context_kl(f0, f).item() == pytest.approx(
        forward, rel=1e-6
    )


def test_frozen_copy_and_precomputed_features_agree() -> None:
    net, head, bank, x, y = setup()
    f0 = copy.deepcopy(net)(x).detach()  # "computed once, elsewhere"
    with_tower = CARFTLoss(HeadCrossEntropy(head), bank, weight=0.5, pretrained_tower=net)
    without = CARFTLoss(HeadCrossEntropy(head), bank, weight=0.5)
    perturb(net)
    grads = []
    values = []
    for loss, kwargs in ((with_tower, {"images": x}), (without, {"pretrained_features": f0})):
        net.zero_grad()
        value = loss(net(x), y, **kwargs)
        value.backward()
        values.append(value.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    assert torch.equal(values[0], values[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_composes_with_mms_loss() -> None:
    net, head, bank, x, y = setup()
    pretrained = copy.deepcopy(net)
    mms = MMSLoss(head, lam=0.3)
    perturb(net)
    f = net(x)
    for cls_loss in (mms, MMSLoss(head, lam=0.3, output_dict=True)):
        loss = CARFTLoss(cls_loss, bank, weight=0.25, pretrained_tower=pretrained)
        out = loss(f, y, images=x, output_dict=True)
        _, _, ref_kl, _ = reference(net, pretrained, head, bank.directions, x, y, 0.25)
        mms_value = mms(f, y)
        assert torch.equal(out["classification_loss"], mms_value)
        assert out["loss"].item() == pytest.approx(mms_value.item() + 0.25 * ref_kl.item(), rel=1e-6)
    # weight 0 leaves exactly the classification loss
    zero = CARFTLoss(mms, bank, weight=0.0, pretrained_tower=pretrained)
    assert torch.equal(zero(f, y, images=x), mms_value)


def test_pretrained_tower_stays_frozen_and_in_eval() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, 16), nn.Dropout(0.5), nn.Linear(16, D))
    head = TextHead(torch.randn(C, D), scale=SCALE)
    bank = ContextBank(torch.randn(M, D), scale=SCALE)
    loss = CARFTLoss(HeadCrossEntropy(head), bank, pretrained_tower=net).train()
    frozen = {k: v.clone() for k, v in loss.pretrained_tower.state_dict().items()}
    assert all(not p.requires_grad for p in loss.pretrained_tower.parameters())
    assert not loss.pretrained_tower.training
    x, y = torch.randn(B, IN), torch.randint(0, C, (B,))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    for _ in range(3):
        opt.zero_grad()
        loss(net(x), y, images=x).backward()
        opt.step()
    for k, v in loss.pretrained_tower.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    # eval mode: dropout off, the reference features are deterministic
    assert torch.equal(loss.encode_pretrained(x), loss.encode_pretrained(x))
    assert not torch.equal(net[0].weight, frozen["0.weight"])  # while the tower did train


def test_autocast_keeps_the_kl_in_float32() -> None:
    net, head, bank, x, y = setup()
    loss = CARFTLoss(HeadCrossEntropy(head), bank, pretrained_tower=net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = net(x)
        assert f.dtype == torch.bfloat16
        out = loss(f, y, images=x, output_dict=True)
    assert out["carft_kl"].dtype == torch.float32
    assert abs(out["carft_kl"].item()) <= 1e-7  # both sides ran the same bf16 path


def test_forward_errors_are_named() -> None:
    net, head, bank, x, y = setup()
    ce = HeadCrossEntropy(head)
    f = net(x)
    with pytest.raises(ValueError, match="exactly one of images="):
        CARFTLoss(ce, bank, pretrained_tower=net)(f, y)
    with pytest.raises(ValueError, match="exactly one of images="):
        CARFTLoss(ce, bank, pretrained_tower=net)(f, y, images=x, pretrained_features=f.detach())
    with pytest.raises(ValueError, match="images= needs the pretrained image tower"):
        CARFTLoss(ce, bank)(f, y, images=x)
    with pytest.raises(ValueError, match=r"pretrained features \(3, 8\) and fine-tuned features \(10, 8\)"):
        CARFTLoss(ce, bank)(f, y, pretrained_features=f[:3].detach())
    with pytest.raises(ValueError, match="kl_direction must be one of"):
        CARFTLoss(ce, bank, kl_direction="sym")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight"):
        CARFTLoss(ce, bank, weight=-1.0)
    with pytest.raises(TypeError, match="context_bank must be a ContextBank"):
        CARFTLoss(ce, torch.randn(M, D))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping with keys"):
        CARFTLoss(lambda f, t: {"a": f.sum(), "b": f.sum()}, bank)(f, y, pretrained_features=f.detach())
    with pytest.raises(
        ValueError, match="dimension 7 does not match the context bank's embedding dimension 8"
    ):
        bank(torch.randn(2, 7))


# -- the context bank ----------------------------------------------------------------------------


def test_context_bank_distribution_and_validation() -> None:
    raw = torch.randn(M, D, dtype=torch.float64) * 4
    bank = ContextBank(raw, scale=37.0)
    feats = torch.randn(3, D)
    expected = torch.softmax(37.0 * unit(feats.double()) @ unit(raw).t(), dim=1)
    torch.testing.assert_close(bank.distribution(feats).double(), expected, rtol=1e-5, atol=1e-7)
    assert bank.directions.dtype == torch.float32 and not bank.directions.requires_grad
    assert set(bank.state_dict()) == {"directions", "scale"}
    with pytest.raises(ValueError, match="at least 2 contexts"):
        ContextBank(torch.randn(1, D))
    with pytest.raises(ValueError, match=r"zero-norm rows \[2\]"):
        ContextBank(torch.cat([torch.randn(2, D), torch.zeros(1, D)]))
    with pytest.raises(ValueError, match="scale must be a positive"):
        ContextBank(torch.randn(M, D), scale=0.0)
    with pytest.raises(ValueError, match="3 templates for 6 context directions"):
        ContextBank(torch.randn(M, D), templates=["a {}", "b {}", "c {}"])


def test_from_prompt_embeddings_averages_over_classes() -> None:
    emb = torch.randn(C, M, D, dtype=torch.float64)
    bank = ContextBank.from_prompt_embeddings(emb, scale=50.0)
    expected = unit(unit(emb).mean(dim=0))
    torch.testing.assert_close(bank.directions.double(), expected, rtol=0, atol=1e-7)
    assert bank.scale.item() == 50.0
    with pytest.raises(ValueError, match=r"\[C, M, D\]"):
        ContextBank.from_prompt_embeddings(torch.randn(M, D))


# -- with a tiny open_clip model ----------------------------------------------------------------

TINY = "clipood-test-tiny-carft"
TINY_CFG = {  # open_clip model_configs/*.json keys, shrunk
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
NAMES = ["golden_retriever", "tabby cat", "fire truck"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, object]:
    return tiny_open_clip(tmp_path_factory.mktemp("open_clip_cfg"), TINY, TINY_CFG, math.log(80.0))


def test_context_bank_from_open_clip_equals_per_template_class_average(tiny, monkeypatch) -> None:
    model, tok = tiny
    calls = []
    real = carft_module.encode_prompts
    monkeypatch.setattr(carft_module, "encode_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    bank = ContextBank.from_open_clip(model, tok, NAMES, num_classes_per_batch=2)
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES  # the default context set: all 80
    assert bank.num_contexts == len(templates) == 80
    assert bank.templates == tuple(t("{}") for t in templates)
    assert bank.scale.item() == pytest.approx(80.0, rel=1e-6)
    cleaned = [n.replace("_", " ") for n in NAMES]
    with torch.no_grad():  # one forward for all prompts, template-major: [M, C, D]
        texts = [template(c) for template in templates for c in cleaned]
        emb = model.encode_text(tok(texts), normalize=True).double().reshape(len(templates), len(NAMES), -1)
    expected = unit(emb.mean(dim=1))  # average over classes, per template
    torch.testing.assert_close(bank.directions.double(), expected, rtol=0, atol=2e-6)

    head, bank2 = build_head_and_context_bank(model, tok, NAMES, num_classes_per_batch=2)
    assert len(calls) == 2  # one encoding pass each
    assert torch.equal(bank2.directions, bank.directions)
    ref_head = TextHead.from_open_clip(model, tok, NAMES, templates, num_classes_per_batch=2)
    torch.testing.assert_close(head.weight, ref_head.weight, rtol=0, atol=1e-6)
    assert head.classnames == tuple(NAMES) and head.scale.item() == pytest.approx(80.0, rel=1e-6)

    with pytest.raises(ValueError, match="at least 2 templates"):
        ContextBank.from_open_clip(model, tok, NAMES, templates="clip")
    with pytest.raises(ValueError, match=r"duplicate class name 'fire_truck' and 'fire truck' \(both 'fire truck'"):
        ContextBank.from_open_clip(model, tok, ["fire_truck", "fire truck"], templates="simple_imagenet")


def test_end_to_end_with_an_open_clip_image_tower(tiny) -> None:
    model, tok = tiny
    head, bank = build_head_and_context_bank(model, tok, NAMES, templates="simple_imagenet")
    visual = copy.deepcopy(model.visual)
    loss = CARFTLoss(HeadCrossEntropy(head), bank, pretrained_tower=visual)
    images = torch.randn(4, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 0])
    out = loss(visual(images), target, images=images, output_dict=True)
    assert abs(out["carft_kl"].item()) <= 1e-7
    opt = torch.optim.SGD(visual.parameters(), lr=1.0)
    out["loss"].backward()
    opt.step()
    out = loss(visual(images), target, images=images, output_dict=True)
    assert out["carft_kl"].item() > 0
