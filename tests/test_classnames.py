"""One class-name rule for every caller: protocols, shard writer, TextHead and CAR-FT's ContextBank."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_open_clip import tiny_open_clip

from clipood_plugin.carft import ContextBank, build_head_and_context_bank
from clipood_plugin.classnames import check_classnames, clean_classname, duplicate_classnames
from clipood_plugin.data.make_shards import main as make_shards_main
from clipood_plugin.data.make_shards import write_shards
from clipood_plugin.protocols import (
    base_to_new_split,
    imagenet_split,
    in_the_wild_split,
    leave_one_domain_out,
)
from clipood_plugin.protocols.records import ImageRecord
from clipood_plugin.templates import clean_classname as templates_clean_classname
from clipood_plugin.templates import imagenet_classnames
from clipood_plugin.text_head import TextHead

TINY = "clipood-test-tiny-classnames"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
IMAGENET = list(imagenet_classnames())  # the real list: 'missile' and 'sunglasses' twice


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object]:
    return tiny_open_clip(tmp_path_factory.mktemp("open_clip_cfg"), TINY, TINY_CFG, math.log(50.0))


def test_imagenet_duplicates_found_as_counted_independently() -> None:
    counts = Counter(n.replace("_", " ").strip() for n in IMAGENET)
    expected = {name: [i for i, n in enumerate(IMAGENET) if n.replace("_", " ").strip() == name]
                for name, c in counts.items() if c > 1}
    assert sorted(expected) == ["missile", "sunglasses"]  # what the docs say the list holds
    assert duplicate_classnames(IMAGENET) == expected
    assert templates_clean_classname is clean_classname  # one implementation, re-exported


def _record(label: int, domain: str | None = None) -> ImageRecord:
    return ImageRecord(f"/data/{domain or 'x'}/{label}.jpg", label, domain)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 99, 199)).save(buf, format="JPEG")
    return buf.getvalue()


def _domains() -> dict[str, list[ImageRecord]]:
    return {d: [_record(label, d) for label in range(4) for _ in range(5)] for d in ("art", "photo", "sketch")}


TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


def callers(tmp_path: Path, tiny: tuple) -> dict[str, Callable[[list[str], bool], object]]:
    model, tok = tiny
    return {
        "base_to_new_split": lambda names, dup: base_to_new_split(
            [_record(i) for i in range(4)], [_record(i) for i in range(4)], classnames=names, shots=None,
            allow_duplicates=dup),
        "imagenet_split": lambda names, dup: imagenet_split(
            [_record(i) for i in range(4)], [_record(i) for i in range(4)], classnames=names, shots=None,
            allow_duplicates=dup),
        "leave_one_domain_out": lambda names, dup: leave_one_domain_out(
            _domains(), 0, classnames=names, allow_duplicates=dup),
        "in_the_wild_split": lambda names, dup: in_the_wild_split(
            _domains(), 0, classnames=names, allow_duplicates=dup),
        "write_shards": lambda names, dup: write_shards(
            [{"__key__": "k0", "jpg": _jpeg(), "cls": 0}], tmp_path / f"shards-{dup}", classnames=names,
            progress=False, allow_duplicates=dup),
        "TextHead": lambda names, dup: TextHead(torch.randn(len(names), 16), classnames=names, allow_duplicates=dup),
        "TextHead.from_open_clip": lambda names, dup: TextHead.from_open_clip(
            model, tok, names, num_classes_per_batch=None, allow_duplicates=dup),
        "ContextBank.from_open_clip": lambda names, dup: ContextBank.from_open_clip(
            model, tok, names, TEMPLATES, num_classes_per_batch=None, allow_duplicates=dup),
        "build_head_and_context_bank": lambda names, dup: build_head_and_context_bank(
            model, tok, names, TEMPLATES, num_classes_per_batch=None, allow_duplicates=dup),
    }


CALLERS = ["base_to_new_split", "imagenet_split", "leave_one_domain_out", "in_the_wild_split", "write_shards",
           "TextHead", "TextHead.from_open_clip", "ContextBank.from_open_clip", "build_head_and_context_bank"]


@pytest.mark.parametrize("caller", CALLERS)
def test_every_caller_rejects_imagenets_repeats_unless_allowed(caller: str, tmp_path: Path, tiny) -> None:
    call = callers(tmp_path, tiny)[caller]
    first, second = duplicate_classnames(IMAGENET)["missile"]
    with pytest.raises(ValueError, match=rf"duplicate class name 'missile' at indices {first} and {second}.*"
                                         "allow_duplicates=True"):
        call(IMAGENET, False)
    call(IMAGENET, True)  # CAR-FT included: the recipe's --allow-duplicate-classnames reaches it


@pytest.mark.parametrize("caller", CALLERS)
def test_every_caller_applies_the_same_cleaning_and_emptiness_rule(caller: str, tmp_path: Path, tiny) -> None:
    call = callers(tmp_path, tiny)[caller]
    with pytest.raises(ValueError, match=r"'Alarm_Clock' and 'Alarm Clock' \(both 'Alarm Clock' after cleaning\)"):
        call(["Alarm_Clock", "Bed", "Alarm Clock", "Desk"], False)
    with pytest.raises(ValueError, match=r"class name 2 \(' _ '\) is empty after cleaning"):
        call(["a", "b", " _ ", "c"], True)  # allow_duplicates never lets an empty name through
    with pytest.raises(TypeError, match="sequence of strings"):
        call("abcd", True)  # type: ignore[arg-type]


def test_kept_as_given_and_ties_are_real(tiny) -> None:
    model, tok = tiny
    names = ["missile", "tank_engine", "missile"]
    assert check_classnames(names, allow_duplicates=True) == names
    head, bank = build_head_and_context_bank(model, tok, names, TEMPLATES, allow_duplicates=True)
    assert head.classnames == tuple(names)  # as given, not cleaned
    # identical prompts: the same row (up to the batch position's rounding), so the logits tie
    torch.testing.assert_close(head.weight[0], head.weight[2], rtol=0, atol=1e-6)
    assert not torch.allclose(head.weight[0], head.weight[1], atol=1e-3)
    # the bank averages each template over the classes, the repeated one counted twice
    single = ContextBank.from_open_clip(model, tok, ["missile", "missile", "tank_engine"], TEMPLATES,
                                        allow_duplicates=True)
    torch.testing.assert_close(bank.directions, single.directions, rtol=0, atol=1e-6)


def test_make_shards_cli_flag(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(_jpeg())
    (data / "rows.csv").write_text("path,label\na.jpg,0\n")
    (data / "names.txt").write_text("missile\ntank\nmissile\n")
    argv = ["--source", "csv", "--input", str(data / "rows.csv"), "--classnames", str(data / "names.txt"),
            "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        make_shards_main([*argv, "--output", str(tmp_path / "o1")])
    assert exc.value.code == 2
    assert make_shards_main([*argv, "--output", str(tmp_path / "o2"), "--allow-duplicate-classnames"]) == 0
    assert json.loads((tmp_path / "o2" / "classnames.json").read_text()) == ["missile", "tank", "missile"]
