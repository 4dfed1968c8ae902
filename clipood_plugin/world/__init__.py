"""The embedded default world: procedural captioned multi-domain images and a tiny CLIP pretrained on them.

- :mod:`clipood_plugin.world.images` — the generator (:class:`WorldSpec`, :func:`render`,
  :func:`iter_samples`, :func:`make_tensors`, :func:`write_world_shards`); numpy + PIL only.
- :mod:`clipood_plugin.world.tiny_clip` — the ``clipood-tiny`` open_clip config, its contrastive
  pretraining (:func:`pretrain`) and the on-disk cache (:func:`load_pretrained`).

Together they let CLIPood run end to end on a laptop CPU without downloading weights or data.
"""

from __future__ import annotations

from clipood_plugin.world.images import (
    CAPTION_TEMPLATES,
    CLASS_PROMPT,
    CLASS_PROMPTS,
    CLASSNAMES,
    COLOURS,
    DOMAINS,
    GENERATOR_VERSION,
    LOOSE_NAME_RATE,
    LOOSE_NAMES,
    SPLITS,
    WorldSpec,
    WorldTensors,
    caption,
    iter_samples,
    make_tensors,
    render,
    write_world_shards,
)
from clipood_plugin.world.tiny_clip import (
    MODEL_NAME,
    QUICK_PRETRAIN,
    PretrainConfig,
    cache_key,
    class_text_embeddings,
    default_cache_dir,
    load_pretrained,
    pretrain,
    register_model_config,
    to_model_input,
    zero_shot_accuracy,
)

__all__ = [
    "CAPTION_TEMPLATES",
    "CLASSNAMES",
    "CLASS_PROMPT",
    "CLASS_PROMPTS",
    "COLOURS",
    "DOMAINS",
    "GENERATOR_VERSION",
    "LOOSE_NAMES",
    "LOOSE_NAME_RATE",
    "MODEL_NAME",
    "QUICK_PRETRAIN",
    "SPLITS",
    "PretrainConfig",
    "WorldSpec",
    "WorldTensors",
    "cache_key",
    "caption",
    "class_text_embeddings",
    "default_cache_dir",
    "iter_samples",
    "load_pretrained",
    "make_tensors",
    "pretrain",
    "register_model_config",
    "render",
    "to_model_input",
    "write_world_shards",
    "zero_shot_accuracy",
]
