"""Small helpers shared by several test files: images as tensors, hand-made tar shards, the recipe as a module."""

from __future__ import annotations

import importlib
import io
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A decoded image as a uint8 ``[C, H, W]`` tensor, pixel values kept (a batch row names its sample)."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def solid_png(size: int, rgb: tuple[int, int, int]) -> bytes:
    """A ``size`` × ``size`` PNG of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar of ``members`` (name → bytes) in order, as a hand-made shard (a sample's files must be adjacent)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def import_recipe(name: str = "imagenet_webdataset") -> ModuleType:
    """``recipes/<name>.py`` as a module (recipes/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(RECIPES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
