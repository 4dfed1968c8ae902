"""Template presets and helpers: open_clip metadata re-used by identity, CLIPood's per-dataset table."""

from __future__ import annotations

import open_clip
import pytest

from clipood_plugin.templates import (
    CLIPOOD_TEMPLATES,
    DEFAULT_TEMPLATE,
    check_templates,
    clean_classname,
    get_templates,
    imagenet_classnames,
    render_template,
    template_text,
)

DOMAINBED = ("PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet")
PLAIN_COOP = ("StanfordCars", "SUN397", "Caltech101", "ImageNet", "ImageNetV2", "ImageNetSketch")
PLAIN_COOP += ("ImageNetA", "ImageNetR")


def test_clipood_table_covers_every_benchmark_with_one_placeholder() -> None:
    for name in (*DOMAINBED, *PLAIN_COOP):
        assert CLIPOOD_TEMPLATES[name] == DEFAULT_TEMPLATE == "a photo of a {}."
    # docs/official_code.md §2.1: CoOp's table, where "…" stands for "a photo of a {},"
    assert CLIPOOD_TEMPLATES["OxfordPets"] == "a photo of a {}, a type of pet."
    assert CLIPOOD_TEMPLATES["OxfordFlowers"] == "a photo of a {}, a type of flower."
    assert CLIPOOD_TEMPLATES["FGVCAircraft"] == "a photo of a {}, a type of aircraft."
    assert CLIPOOD_TEMPLATES["DescribableTextures"] == "{} texture."
    assert CLIPOOD_TEMPLATES["EuroSAT"] == "a centered satellite photo of {}."
    assert CLIPOOD_TEMPLATES["Food101"] == "a photo of {}, a type of food."
    assert CLIPOOD_TEMPLATES["UCF101"] == "a photo of a person doing {}."
    for name, template in CLIPOOD_TEMPLATES.items():
        assert template.count("{}") == 1, name
        assert check_templates([template]) == (template,)


def test_openai_and_simple_presets_are_open_clips_own_objects() -> None:
    openai = get_templates("openai_imagenet")
    assert len(openai) == 80
    assert all(a is b for a, b in zip(openai, open_clip.OPENAI_IMAGENET_TEMPLATES, strict=True))
    simple = get_templates("SIMPLE_IMAGENET")
    assert len(simple) == len(open_clip.SIMPLE_IMAGENET_TEMPLATES) == 7
    assert all(a is b for a, b in zip(simple, open_clip.SIMPLE_IMAGENET_TEMPLATES, strict=True))


def test_plain_presets_and_dataset_names_are_case_insensitive() -> None:
    assert get_templates("clip") == get_templates("Default") == (DEFAULT_TEMPLATE,)
    for name, template in CLIPOOD_TEMPLATES.items():
        assert (
            get_templates(name) == get_templates(name.lower()) == get_templates(name.upper()) == (template,)
        )


def test_template_strings_callables_and_sequences() -> None:
    assert get_templates("a sketch of a {}.") == ("a sketch of a {}.",)

    def fn(c: str) -> str:
        return f"itap of a {c}."

    assert get_templates(fn) == (fn,)
    mixed = ["a photo of a {}.", fn]
    out = get_templates(mixed)
    assert isinstance(out, tuple) and out[0] == mixed[0] and out[1] is fn


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown template preset 'imagenet_sketchy'.*openai_imagenet.*OxfordFlowers"
    ):
        get_templates("imagenet_sketchy")
    with pytest.raises(TypeError, match="preset name, a template string"):
        get_templates(3)  # type: ignore[arg-type]


def test_check_templates_names_the_bad_template() -> None:
    with pytest.raises(ValueError, match="empty"):
        check_templates([])
    with pytest.raises(ValueError, match=r"template 1 'a photo' has no '\{\}'"):
        check_templates(["a photo of a {}.", "a photo"])
    with pytest.raises(ValueError, match="not a valid format string"):
        check_templates(["a {} of a {name}"])
    with pytest.raises(TypeError, match="template 0 must be a string or a callable"):
        check_templates([42])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="sequence of templates"):
        check_templates("a photo of a {}.")
    assert check_templates([lambda c: "no placeholder needed"])  # callables are accepted as they are


def test_imagenet_classnames_come_from_open_clip() -> None:
    names = imagenet_classnames()
    assert isinstance(names, tuple) and len(names) == 1000
    assert all(a is b for a, b in zip(names, open_clip.IMAGENET_CLASSNAMES, strict=True))


def test_clean_classname_follows_clipood() -> None:
    assert clean_classname("Alarm_Clock") == "Alarm Clock"  # OfficeHome; case is kept
    assert clean_classname("  __golden_retriever ") == "golden retriever"
    assert clean_classname("already clean") == "already clean"
    with pytest.raises(TypeError, match="class names must be strings"):
        clean_classname(7)  # type: ignore[arg-type]


def test_render_and_canonical_text_agree_for_every_openai_template() -> None:
    assert render_template("a photo of a {}.", "dog") == "a photo of a dog."
    for fn in open_clip.OPENAI_IMAGENET_TEMPLATES:
        text = template_text(fn)
        assert "{}" in text
        # the canonical text is a faithful stand-in: formatting it gives what the callable gives
        assert text.format("tabby cat") == render_template(fn, "tabby cat") == fn("tabby cat")
    assert template_text("{} texture.") == "{} texture."
    with pytest.raises(TypeError, match="returned int"):
        template_text(lambda c: 3)  # type: ignore[arg-type, return-value]
