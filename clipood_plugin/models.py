"""Building the open_clip CLIP a run fine-tunes, and reading its class names, the same way everywhere.

The recipe, the post-hoc command and anyone reproducing a run need the same three rules, so they
live here once:

- **QuickGELU.** OpenAI's weights were trained with QuickGELU, and open_clip 3.x only *warns*
  when ``ViT-B-16`` is combined with the ``openai`` tag, then runs plain GELU. :func:`create_clip`
  forces QuickGELU wherever the pretrained tag says so.
- **Local weights.** ``pretrained`` may be a file: safetensors, or a torch file read with
  ``weights_only=True`` (so no code in it runs), with DDP / ``torch.compile`` prefixes stripped.
  open_clip's "No pretrained weights loaded" line is then wrong, and is filtered out.
- **The embedded world's tiny CLIP** (``clipood-tiny``) is registered on demand.

:func:`load_classnames` reads a class-name list: a JSON list, a text file with one name a line, or
``classnames.json`` beside a set of shards (local or in an object store).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipood_plugin._logging import no_random_init_warning
from clipood_plugin._wrappers import strip_wrapper_prefixes

__all__ = ["create_clip", "load_classnames", "load_local_weights"]


def create_clip(name: str, pretrained: str | None = None, device: torch.device | str = "cpu", *,
                verbose: bool = True) -> tuple[nn.Module, Any, Any, Any]:
    """``(model, train_transform, eval_transform, tokenizer)`` for open_clip model ``name``.

    ``pretrained``: an open_clip tag (``"openai"``, which downloads), a local weights file, or
    ``None`` (random init). ``verbose`` prints a note to stderr when QuickGELU is forced.
    """
    import open_clip

    if name.startswith("clipood-tiny"):  # the embedded world's tiny CLIP config
        from clipood_plugin.world.tiny_clip import register_model_config

        register_model_config()
    local = pretrained is not None and Path(pretrained).is_file()
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained and not local else {}
    model_cfg = open_clip.get_model_config(name) or {}
    force_quick_gelu = bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu", False)
    if force_quick_gelu and verbose:
        print(f"note: {name} with pretrained={pretrained!r} uses QuickGELU, as those weights were trained",
              file=sys.stderr)
    with no_random_init_warning(local):  # the weights load right below
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            name, pretrained=None if local else pretrained, device=device, force_quick_gelu=force_quick_gelu)
    if local:
        load_local_weights(model, Path(pretrained))  # type: ignore[arg-type]
    return model, train_tf, eval_tf, open_clip.get_tokenizer(name)


def load_local_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model``: safetensors, or a torch file read with
    ``weights_only=True`` (its ``state_dict`` entry if it has one); wrapper prefixes stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    model.load_state_dict(strip_wrapper_prefixes(state))


def load_classnames(spec: str | None, shards: str | None = None) -> list[str]:
    """Class names from ``spec`` (a ``.json`` list or a text file, one per line) or, with
    ``spec=None``, from ``classnames.json`` beside the first shard of ``shards``."""
    from clipood_plugin.data.urls import expand_urls, read_json, sibling_url

    if spec is None:
        if not shards:
            raise ValueError("no class names given and no shards to find classnames.json beside")
        names = read_json(sibling_url(expand_urls(shards.split("::")[0])[0], "classnames.json"))
    elif spec.endswith(".json"):
        names = json.loads(Path(spec).read_text())
    else:
        names = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    if not isinstance(names, list) or not names:
        raise ValueError(f"no class names found ({spec or 'classnames.json beside the shards'})")
    return [str(n) for n in names]
