"""Generated inputs shared by the client tests: a tiny random-init open_clip model folder and
class-coloured 32 px images (learnable in a few steps, deterministic)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image

CLASSES = ["cat", "dog", "car", "tree"]
#: Embedding size 16, one layer per tower: a CLIP that trains in milliseconds per step on a CPU.
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_dir(folder: Path, seed: int = 0) -> Path:
    """An open_clip ``local-dir:`` model: config plus random-init weights (θ_0 of the tests)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in open_clip.CLIP(**TINY).state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def class_images(n: int, seed: int = 1) -> list[tuple[int, Image.Image]]:
    """``n`` (label, 32×32 RGB image) pairs, labels cycling over :data:`CLASSES`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % len(CLASSES)
        img = torch.zeros(3, 32, 32)
        img[label % 3] = 0.3 * (label + 1)
        img = (img + 0.3 * torch.rand(3, 32, 32, generator=gen)).clamp(0, 1)
        out.append((label, Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())))
    return out


def shard_samples(images: list[tuple[int, Image.Image]], split: str) -> list[dict]:
    """:func:`~clipood_plugin.data.make_shards.write_shards` input: PNG bytes and the label."""
    out = []
    for k, (label, img) in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append({"__key__": f"{split}{k:03d}", "png": buf.getvalue(), "cls": label})
    return out
