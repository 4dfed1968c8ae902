"""A random-init open_clip model from a shrunk config, for tests that encode prompts."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from torch import nn


def tiny_open_clip(directory: Path, name: str, config: dict, logit_scale: float) -> tuple[nn.Module, object]:
    """Register ``config`` as open_clip model ``name``, build it (seed 0, eval) and its tokenizer.

    ``logit_scale`` is the log of the scale, as open_clip stores it.
    """
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    return model, open_clip.get_tokenizer(name)
