"""Prompt templates for building a :class:`~clipood_plugin.TextHead`, and the small helpers around them.

CLIPood uses one template per dataset and no prompt ensembling (docs/official_code.md §2.1):
``"a photo of a {}."`` for the DomainBed tasks, and CoOp's per-dataset table for the open-class
(base-to-new) benchmarks. Class names are cleaned by turning ``_`` into spaces, keeping case.

A template is either a ``str.format`` string with one positional ``{}`` or a callable that maps a
class name to a prompt, the two forms open_clip's ``build_zero_shot_classifier`` accepts. The
ImageNet template ensembles and class names come from ``open_clip.zero_shot_metadata`` by import,
so they are always the installed open_clip's own objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

from clipood_plugin.classnames import clean_classname  # re-exported: the class-name rule lives there

__all__ = [
    "CLIPOOD_TEMPLATES",
    "DEFAULT_TEMPLATE",
    "PRESETS",
    "Template",
    "check_templates",
    "clean_classname",
    "get_templates",
    "imagenet_classnames",
    "render_template",
    "template_text",
]

#: One prompt template: a format string with a positional ``{}``, or a callable ``name -> prompt``.
Template: TypeAlias = "str | Callable[[str], str]"

#: CLIP's plain prompt, CLIPood's template for every DomainBed task (official ``engine.py``).
DEFAULT_TEMPLATE = "a photo of a {}."

#: CLIPood's single template per dataset. The open-class entries are CoOp's per-dataset table,
#: which CLIPood's ``converter_dassl.py`` reuses unchanged (docs/official_code.md §2.1).
CLIPOOD_TEMPLATES: dict[str, str] = {
    # DomainBed (domain shift, in the wild)
    "PACS": DEFAULT_TEMPLATE,
    "VLCS": DEFAULT_TEMPLATE,
    "OfficeHome": DEFAULT_TEMPLATE,
    "TerraIncognita": DEFAULT_TEMPLATE,
    "DomainNet": DEFAULT_TEMPLATE,
    # CoOp datasets (open class, base-to-new)
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "Food101": "a photo of {}, a type of food.",
    "UCF101": "a photo of a person doing {}.",
    "StanfordCars": DEFAULT_TEMPLATE,
    "SUN397": DEFAULT_TEMPLATE,
    "Caltech101": DEFAULT_TEMPLATE,
    # ImageNet and its distribution-shift variants
    "ImageNet": DEFAULT_TEMPLATE,
    "ImageNetV2": DEFAULT_TEMPLATE,
    "ImageNetSketch": DEFAULT_TEMPLATE,
    "ImageNetA": DEFAULT_TEMPLATE,
    "ImageNetR": DEFAULT_TEMPLATE,
}

#: Preset names :func:`get_templates` knows besides the dataset names of ``CLIPOOD_TEMPLATES``.
PRESETS: tuple[str, ...] = ("clip", "default", "openai_imagenet", "simple_imagenet")


def get_templates(spec: str | Template | Sequence[Template]) -> tuple[Template, ...]:
    """Resolve a template spec to a tuple of templates.

    ``spec`` is one of:

    - a preset name: ``"clip"`` / ``"default"`` (CLIPood's single ``"a photo of a {}."``),
      ``"openai_imagenet"`` (open_clip's 80 OpenAI ImageNet templates), ``"simple_imagenet"``
      (open_clip's 7-template subset), or a dataset name of :data:`CLIPOOD_TEMPLATES`
      (case-insensitive, e.g. ``"oxfordflowers"``);
    - one template string containing ``{}``, or one callable;
    - a sequence of template strings and/or callables.

    The open_clip presets are returned as open_clip's own tuples (the same objects), not copies.
    """
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name in ("clip", "default"):
            return (DEFAULT_TEMPLATE,)
        if name == "openai_imagenet":
            from open_clip import OPENAI_IMAGENET_TEMPLATES

            return tuple(OPENAI_IMAGENET_TEMPLATES)
        if name == "simple_imagenet":
            from open_clip import SIMPLE_IMAGENET_TEMPLATES

            return tuple(SIMPLE_IMAGENET_TEMPLATES)
        datasets = {key.lower(): value for key, value in CLIPOOD_TEMPLATES.items()}
        if name in datasets:
            return (datasets[name],)
        if "{}" in spec:
            return check_templates((spec,))
        known = ", ".join([*PRESETS, *CLIPOOD_TEMPLATES])
        raise ValueError(
            f"unknown template preset {spec!r} (and it is not a template: it has no '{{}}'). "
            f"Known presets: {known}"
        )
    if callable(spec):
        return (spec,)
    if isinstance(spec, Sequence):
        return check_templates(spec)
    raise TypeError(
        f"templates must be a preset name, a template string, a callable or a sequence of them, "
        f"got {type(spec).__name__}"
    )


def check_templates(templates: Sequence[Template]) -> tuple[Template, ...]:
    """Validate a sequence of templates and return it as a tuple.

    Raises ``ValueError`` for an empty sequence or a string template that has no positional ``{}``
    (or that ``str.format`` cannot fill with one argument), and ``TypeError`` for an element that
    is neither a string nor a callable. Callables are accepted as they are.
    """
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise TypeError(f"templates must be a sequence of templates, got {type(templates).__name__}")
    if len(templates) == 0:
        raise ValueError("templates is empty: give at least one prompt template")
    for i, template in enumerate(templates):
        if isinstance(template, str):
            if "{}" not in template:
                raise ValueError(f"template {i} {template!r} has no '{{}}' placeholder for the class name")
            try:
                template.format("x")
            except (IndexError, KeyError, ValueError) as err:
                raise ValueError(f"template {i} {template!r} is not a valid format string: {err}") from err
        elif not callable(template):
            raise TypeError(f"template {i} must be a string or a callable, got {type(template).__name__}")
    return tuple(templates)


def imagenet_classnames() -> tuple[str, ...]:
    """open_clip's 1000 cleaned ImageNet class names (``open_clip.IMAGENET_CLASSNAMES``)."""
    from open_clip import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def render_template(template: Template, classname: str) -> str:
    """Fill one template with a class name (``str.format`` for strings, a call for callables)."""
    if isinstance(template, str):
        return template.format(classname)
    return template(classname)


def template_text(template: Template) -> str:
    """A template's canonical text: the string itself, or a callable's output for ``"{}"``.

    For the usual ``lambda c: f"a photo of a {c}."`` this gives ``"a photo of a {}."``, which is
    what gets hashed and saved, since callables cannot be stored.
    """
    if isinstance(template, str):
        return template
    text = template("{}")
    if not isinstance(text, str):
        raise TypeError(f"template callable {template!r} returned {type(text).__name__}, not str")
    return text
