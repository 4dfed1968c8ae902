"""TextHead: parity with open_clip's zero-shot classifier, forward numerics, persistence, cache, errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_open_clip import tiny_open_clip
from torch import nn

import clipood_plugin.text_head as text_head_module
from clipood_plugin.templates import get_templates
from clipood_plugin.text_head import FORMAT_VERSION, TextHead, encode_prompts

TINY = "clipood-test-tiny-text-head"
# The keys every open_clip model config has (see open_clip/model_configs/ViT-B-32.json), shrunk.
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
LOGIT_SCALE = 4.2  # exp = 66.686…, distinct from both open_clip's init (14.29) and the default 100

NAMES = [f"thing_{i}" for i in range(13)]  # 13 with 5 per batch: two full batches and a short one
CLEANED = [n.replace("_", " ") for n in NAMES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, object]:
    torch.set_num_threads(1)
    return tiny_open_clip(tmp_path_factory.mktemp("open_clip_cfg"), TINY, TINY_CFG, LOGIT_SCALE)


def _rand_head(c: int = 6, d: int = 8, seed: int = 0) -> tuple[TextHead, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(c, d, generator=g, dtype=torch.float64) * 3
    names = [f"class {i}" for i in range(c)]
    return TextHead(raw, scale=37.5, classnames=names, templates=["a photo of a {}."]), raw


# -- parity with open_clip -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("templates", "per_batch"),
    [
        (["a photo of a {}."], 5),
        (["a photo of a {}.", "a drawing of a {}.", "{} texture."], None),
        (list(open_clip.OPENAI_IMAGENET_TEMPLATES[:4]), 5),  # callables
    ],
    ids=["one-template", "strings-unbatched", "openai-callables"],
)
def test_from_open_clip_equals_build_zero_shot_classifier(tiny, templates, per_batch) -> None:
    model, tok = tiny
    head = TextHead.from_open_clip(model, tok, NAMES, templates, num_classes_per_batch=per_batch)
    ref = open_clip.build_zero_shot_classifier(
        model, tok, CLEANED, templates, num_classes_per_batch=per_batch
    )
    assert ref.shape == (TINY_CFG["embed_dim"], len(NAMES))
    got = head.as_open_clip()
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-6
    assert head.scale.item() == pytest.approx(math.exp(LOGIT_SCALE), rel=1e-6)
    assert head.classnames == tuple(NAMES)  # kept as given; cleaned only for the prompts
    assert head.templates == tuple(t if isinstance(t, str) else t("{}") for t in templates)


def test_encode_prompts_is_per_prompt_encode_text_and_restores_modes(tiny) -> None:
    model, tok = tiny
    templates = ["a photo of a {}.", "{} texture."]
    model.train()
    model.visual.eval()  # a mixed state must come back exactly
    seen: list[bool] = []
    hook = model.transformer.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    try:
        emb = encode_prompts(model, tok, NAMES[:4], templates, num_classes_per_batch=3)
    finally:
        hook.remove()
    assert seen and not any(seen)  # ran in eval mode
    assert model.training and not model.visual.training and model.transformer.training
    model.eval()
    assert emb.shape == (4, 2, TINY_CFG["embed_dim"]) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4, 2), atol=1e-6, rtol=0)
    with torch.no_grad():  # independent: one prompt at a time, normalised in float64
        one = model.encode_text(tok(["a photo of a thing 2."])).double()
    torch.testing.assert_close(emb[2, 0].double(), (one / one.norm())[0], atol=1e-5, rtol=0)


def test_progress_bar_shown_when_asked_or_many_prompts(tiny, capsys) -> None:
    model, tok = tiny
    quiet = encode_prompts(model, tok, NAMES[:2], ["a photo of a {}."], progress=False)
    assert "Encoding class prompts" not in capsys.readouterr().out
    loud = encode_prompts(model, tok, NAMES[:2], ["a photo of a {}."], progress=True)
    assert "Encoding class prompts" in capsys.readouterr().out
    assert torch.equal(quiet, loud)
    templates = list(open_clip.OPENAI_IMAGENET_TEMPLATES[:50])
    encode_prompts(model, tok, NAMES[:10], templates, num_classes_per_batch=None)  # 500 prompts
    assert "Encoding class prompts" not in capsys.readouterr().out
    encode_prompts(model, tok, NAMES[:11], templates, num_classes_per_batch=None)  # 550 prompts
    assert "Encoding class prompts" in capsys.readouterr().out


def test_wrapped_model_is_unwrapped(tiny) -> None:
    model, tok = tiny
    plain = TextHead.from_open_clip(model, tok, NAMES[:3])
    wrapped = TextHead.from_open_clip(nn.DataParallel(model), tok, NAMES[:3])
    assert torch.equal(plain.weight, wrapped.weight) and torch.equal(plain.scale, wrapped.scale)


# -- forward and buffers ---------------------------------------------------------------------------


def test_forward_is_scaled_cosine_against_float64_reference() -> None:
    head, raw = _rand_head()
    feats = torch.randn(5, 8, dtype=torch.float64) * 7
    ref = 37.5 * (feats / feats.norm(dim=1, keepdim=True)) @ (raw / raw.norm(dim=1, keepdim=True)).T
    out32 = head(feats.float())
    assert out32.dtype == torch.float32 and out32.shape == (5, 6)
    torch.testing.assert_close(out32.double(), ref, atol=1e-4, rtol=0)
    out64 = head(feats)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref, atol=1e-5, rtol=0)
    # leading dims broadcast like nn.Linear
    torch.testing.assert_close(head(feats.float().reshape(5, 1, 8)).reshape(5, 6), out32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = head(feats.float())
    assert amp.dtype == torch.float32
    assert torch.equal(amp, out32)


def test_buffers_are_unit_norm_persistent_and_frozen() -> None:
    head, _ = _rand_head()
    torch.testing.assert_close(
        head.weight.double().norm(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert head.weight.dtype == torch.float32 and head.scale.dtype == torch.float32 and head.scale.dim() == 0
    state = head.state_dict()
    assert set(state) == {"weight", "scale"}
    assert list(head.parameters()) == []
    assert not head.weight.requires_grad and not head.scale.requires_grad
    assert (head.num_classes, head.embed_dim) == (6, 8)
    other, _ = _rand_head(seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.weight, head.weight) and other.scale.item() == 37.5


def test_subset_picks_rows_and_names() -> None:
    head, _ = _rand_head()
    for indices in ([3, 0, 5], torch.tensor([3, 0, 5])):
        sub = head.subset(indices)
        assert torch.equal(sub.weight, head.weight[[3, 0, 5]])
        assert sub.classnames == ("class 3", "class 0", "class 5")
        assert torch.equal(sub.scale, head.scale) and sub.templates == head.templates
    with pytest.raises(ValueError, match=r"indices \[6, -1\] are out of range \[0, 6\)"):
        head.subset([1, 6, -1])
    with pytest.raises(ValueError, match=r"duplicates: \[2\]"):
        head.subset([2, 4, 2])
    with pytest.raises(ValueError, match="empty"):
        head.subset([])
    with pytest.raises(TypeError, match="must be integers"):
        head.subset(torch.tensor([0.0, 1.0]))


def test_as_open_clip_is_a_transposed_copy() -> None:
    head, _ = _rand_head()
    out = head.as_open_clip()
    assert out.shape == (8, 6) and out.is_contiguous()
    assert torch.equal(out, head.weight.T)
    out.zero_()
    assert head.weight.abs().sum() > 0


# -- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip_is_bitwise(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    head = TextHead.from_open_clip(model, tok, NAMES[:4], list(open_clip.SIMPLE_IMAGENET_TEMPLATES[:2]))
    path = tmp_path / "sub" / "head.safetensors"
    head.save(path)
    back = TextHead.load(path)
    assert torch.equal(back.weight, head.weight) and torch.equal(back.scale, head.scale)
    assert back.classnames == head.classnames and back.templates == head.templates
    with safe_open(str(path), framework="pt") as f:  # readable by plain safetensors, nothing pickled
        meta = f.metadata()
        assert set(f.keys()) == {"weight", "scale"}
    assert json.loads(meta["classnames"]) == NAMES[:4]
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert [p.name for p in path.parent.iterdir()] == ["head.safetensors"]  # no temp file left
    bare = TextHead(torch.randn(3, 4))
    bare.save(tmp_path / "bare.safetensors")
    loaded = TextHead.load(tmp_path / "bare.safetensors")
    assert loaded.classnames is None and loaded.templates is None and torch.equal(loaded.weight, bare.weight)


def _good_metadata() -> dict[str, str]:
    return {
        "format": "clipood_plugin.TextHead",
        "format_version": str(FORMAT_VERSION),
        "classnames": json.dumps(["a", "b"]),
        "templates": json.dumps(["a photo of a {}."]),
    }


@pytest.mark.parametrize(
    ("tensors", "metadata", "match"),
    [
        ("ok", None, "not a TextHead file"),
        ("ok", {"format_version": "2"}, "unsupported TextHead format_version '2'"),
        ("ok", {"format_version": None}, "unsupported TextHead format_version None"),
        ("no-scale", {}, r"lacks tensor\(s\) \['scale'\]"),
        ("ok", {"classnames": None}, "lacks the 'classnames' metadata"),
        ("ok", {"templates": "[not json"}, "malformed 'templates'"),
        ("ok", {"classnames": json.dumps([1, 2])}, "list of strings"),
        ("not-unit", {}, "not unit-norm"),
        ("ok", {"classnames": json.dumps(["a"])}, "1 class names for 2 weight rows"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, tensors: str, metadata: dict | None, match: str) -> None:
    weight = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    payload = {"weight": weight * (2.0 if tensors == "not-unit" else 1.0), "scale": torch.tensor(100.0)}
    if tensors == "no-scale":
        del payload["scale"]
    meta = None
    if metadata is not None:
        meta = {k: v for k, v in {**_good_metadata(), **metadata}.items() if v is not None}
    path = tmp_path / "bad.safetensors"
    save_file(payload, str(path), metadata=meta)
    with pytest.raises(ValueError, match=match):
        TextHead.load(path)


def test_load_rejects_garbage_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01 this is not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TextHead.load(path)
    with pytest.raises(FileNotFoundError, match="no TextHead file"):
        TextHead.load(tmp_path / "absent.safetensors")


# -- cache -----------------------------------------------------------------------------------------


@pytest.fixture
def count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = text_head_module.encode_prompts

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(text_head_module, "encode_prompts", counting)
    return calls


def test_cache_hits_and_keys(tiny, tmp_path: Path, count_encodes: list[int]) -> None:
    model, tok = tiny
    model = copy.deepcopy(model)
    names, templates = NAMES[:3], ["a photo of a {}."]

    def build(m=model, n=names, t=templates) -> TextHead:
        return TextHead.from_open_clip(m, tok, n, t, cache_dir=tmp_path)

    def files() -> int:
        return len(list(tmp_path.glob("text_head-*.safetensors")))

    first = build()
    assert len(count_encodes) == 1 and files() == 1
    second = build()
    assert len(count_encodes) == 1, "second call must be served from the cache"
    assert torch.equal(first.weight, second.weight) and torch.equal(first.scale, second.scale)

    # same cleaned names: still a hit, and the head carries the names of this call
    spaced = build(n=[n.replace("_", " ") for n in names])
    assert len(count_encodes) == 1 and spaced.classnames == tuple(n.replace("_", " ") for n in names)

    # the image tower is not part of the key
    with torch.no_grad():
        model.visual.conv1.weight.add_(1.0)
    build()
    assert len(count_encodes) == 1

    build(n=[*names[:2], "other thing"])
    assert len(count_encodes) == 2 and files() == 2
    build(t=["a drawing of a {}."])
    assert len(count_encodes) == 3 and files() == 3
    with torch.no_grad():
        model.transformer.resblocks[0].mlp.c_fc.weight[0, 0] += 1e-3
    changed = build()
    assert len(count_encodes) == 4 and files() == 4
    assert not torch.equal(changed.weight, first.weight)


def test_cache_recovers_from_a_corrupt_file(tiny, tmp_path: Path, count_encodes: list[int]) -> None:
    model, tok = tiny
    first = TextHead.from_open_clip(model, tok, NAMES[:2], cache_dir=tmp_path)
    (cached,) = tmp_path.glob("text_head-*.safetensors")
    cached.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring TextHead cache file"):
        again = TextHead.from_open_clip(model, tok, NAMES[:2], cache_dir=tmp_path)
    assert len(count_encodes) == 2 and torch.equal(again.weight, first.weight)
    TextHead.from_open_clip(model, tok, NAMES[:2], cache_dir=tmp_path)  # rewritten: a clean hit
    assert len(count_encodes) == 2


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": torch.ones(4)}, ValueError, r"2-D \[C, D\] tensor, got shape \(4,\)"),
        ({"weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}, ValueError, r"zero-norm rows \[1\]"),
        ({"weight": torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])}, ValueError, r"non-finite.*rows \[1\]"),
        ({"weight": torch.tensor([[1.0, float("inf")]])}, ValueError, r"non-finite.*rows \[0\]"),
        ({"weight": torch.ones(2, 3, dtype=torch.long)}, TypeError, "floating-point"),
        ({"scale": 0.0}, ValueError, "scale must be a positive finite"),
        ({"scale": -3.0}, ValueError, "scale must be a positive finite"),
        ({"scale": float("inf")}, ValueError, "scale must be a positive finite"),
        ({"scale": torch.ones(2)}, ValueError, "single number"),
        ({"classnames": ["a", "b"]}, ValueError, "2 class names for 3 weight rows"),
        ({"classnames": ["a", " ", "c"]}, ValueError, r"class name 1 \(' '\) is empty"),
        ({"classnames": ["a", "b", "a"]}, ValueError, "duplicate class name 'a' at indices 0 and 2"),
        ({"templates": []}, ValueError, "templates is empty"),
    ],
)
def test_text_head_init_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"weight": torch.randn(3, 4), **kwargs}
    with pytest.raises(error, match=match):
        TextHead(**args)


def test_forward_dimension_mismatch_names_both_dims() -> None:
    head, _ = _rand_head()
    with pytest.raises(ValueError, match="dimension 5 does not match the TextHead embedding dimension 8"):
        head(torch.randn(2, 5))


@pytest.mark.parametrize(
    ("classnames", "templates", "error", "match"),
    [
        ([], ["a photo of a {}."], ValueError, "classnames is empty"),
        (["cat", "dog", "cat"], ["a photo of a {}."], ValueError, "duplicate class name 'cat' at indices 0 and 2"),
        (["alarm_clock", "alarm clock"], ["a photo of a {}."], ValueError, r"'alarm_clock' and 'alarm clock' \(both 'alarm clock'"),
        (["cat", " _ "], ["a photo of a {}."], ValueError, r"class name 1 \(' _ '\) is empty after cleaning"),
        (["cat"], ["a photo of a {}.", "a photo"], ValueError, r"'a photo' has no '\{\}'"),
        (["cat"], [], ValueError, "templates is empty"),
        ("cat", ["a photo of a {}."], TypeError, "sequence of strings"),
        (["cat", 3], ["a photo of a {}."], TypeError, "class name 1 must be a string"),
        (["cat"], "no_such_preset", ValueError, "unknown template preset"),
    ],
)
def test_from_open_clip_errors(tiny, classnames, templates, error, match, count_encodes) -> None:
    model, tok = tiny
    with pytest.raises(error, match=match):
        TextHead.from_open_clip(model, tok, classnames, templates)
    assert count_encodes == []  # rejected before any encoding


def test_model_without_logit_scale_is_rejected(tiny) -> None:
    _, tok = tiny

    class TextOnly(nn.Module):
        def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            out = torch.arange(1.0, 5.0, dtype=torch.float64).repeat(tokens.shape[0], 1)
            return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    with pytest.raises(ValueError, match="TextOnly has no logit_scale"):
        TextHead.from_open_clip(TextOnly(), tok, ["cat"])
    # encode_prompts needs only encode_text; a non-float32 output comes back as unit-norm float32
    out = encode_prompts(TextOnly(), tok, ["cat", "dog"], "clip")
    expected = (torch.arange(1.0, 5.0) / math.sqrt(30.0)).expand(2, 1, 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="num_classes_per_batch"):
        encode_prompts(TextOnly(), tok, ["cat"], "clip", num_classes_per_batch=-1)
    with pytest.raises(TypeError, match="has no encode_text"):
        encode_prompts(nn.Linear(2, 2), tok, ["cat"], "clip")


def test_templates_preset_name_is_accepted(tiny) -> None:
    model, tok = tiny
    head = TextHead.from_open_clip(model, tok, NAMES[:2], "OxfordFlowers")
    assert head.templates == get_templates("oxfordflowers") == ("a photo of a {}, a type of flower.",)


def test_duplicate_names_are_an_error_unless_allowed(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    names = ["missile", "tank", "missile"]  # ImageNet's standard list really repeats two names
    with pytest.raises(ValueError, match=r"duplicate class name.*allow_duplicates=True"):
        TextHead.from_open_clip(model, tokenizer, names)
    head = TextHead.from_open_clip(model, tokenizer, names, allow_duplicates=True)
    assert head.classnames == tuple(names)
    assert torch.equal(head.weight[0], head.weight[2])  # identical prompts: the logits tie
    head.save(tmp_path / "dup.safetensors")
    assert TextHead.load(tmp_path / "dup.safetensors").classnames == tuple(names)
