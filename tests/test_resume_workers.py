"""Exact resume with DataLoader workers: epoch e's augmented batches do not depend on the workers' history.

Persistent workers are seeded once when they start; a resumed run starts fresh ones. Each
sample's transform must therefore draw from a seed of its own place in the run, not from the
worker's RNG stream. The transform here draws from torch (a random crop offset and a flip) and
from Python's ``random`` (a brightness shift), as torchvision and timm transforms do.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from clipood_plugin.data.balanced import make_balanced_loader
from clipood_plugin.data.make_shards import write_shards
from clipood_plugin.data.stream import make_train_loader

N, PER_SHARD, CLASSES, SIDE, CROP = 32, 4, 4, 12, 8


def augment(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    top, left = torch.randint(0, SIDE - CROP + 1, (2,)).tolist()
    x = x[:, top:top + CROP, left:left + CROP]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x + random.random()


def png(index: int) -> bytes:
    rng = np.random.default_rng(index)  # a textured image: crops and flips are visible
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("shards")
    samples = ({"__key__": f"s{i:03d}", "png": png(i), "cls": i % CLASSES} for i in range(N))
    return write_shards(samples, out, classnames=list("abcd"), max_samples_per_shard=PER_SHARD,
                        progress=False).pattern


def batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)  # bitwise: the same crops, flips and shifts


@pytest.mark.parametrize("world_size", [1, 2])
def test_fresh_workers_at_epoch_1_give_the_uninterrupted_epoch_1(shards: str, world_size: int) -> None:
    for rank in range(world_size):
        def make(rank: int = rank):
            return make_train_loader(shards, batch_size=4, transform=augment, num_classes=CLASSES, workers=2,
                                     world_size=world_size, rank=rank, seed=5, shuffle_buffer=3)
        through = make()
        epoch0 = batches(through, 0)
        epoch1 = batches(through, 1)  # the same persistent workers, RNGs advanced by epoch 0
        torch.manual_seed(1234)  # the resumed process: another main-process RNG state
        resumed = batches(make(), 1)
        assert_same(epoch1, resumed)
        # and the augmentation is random: a sample appears with other crops in epoch 0 and 1
        first = {}
        for images, labels in epoch0:
            for x, y in zip(images, labels):
                first.setdefault(y.item(), []).append(x)
        assert not all(any(torch.equal(x, y) for y in first[lab.item()]) for images, labels in epoch1
                       for x, lab in zip(images, labels))


def test_augmentation_does_not_depend_on_the_worker_count(shards: str) -> None:
    """workers=0 and workers=1 read the same single stream; their augmentations now agree too."""
    def run(workers: int, transform=augment):
        loader = make_train_loader(shards, batch_size=4, transform=transform, num_classes=CLASSES, workers=workers,
                                   seed=9, shuffle_buffer=3)
        return batches(loader, 2)
    torch.manual_seed(0)
    in_process = run(0)
    after_augmenting = torch.get_rng_state()
    torch.manual_seed(0)
    run(0, transform=lambda img: torch.zeros(3, CROP, CROP))  # draws nothing
    # the transforms' draws in this process leave its RNG where the DataLoader alone leaves it
    assert torch.equal(after_augmenting, torch.get_rng_state())
    assert_same(in_process, run(1))


def test_balanced_loader_resumes_exactly(shards: str) -> None:
    def make():
        return make_balanced_loader({"a": shards, "b": shards}, batch_per_domain=2, transform=augment,
                                    num_classes=CLASSES, steps_per_epoch=3, workers=1, seed=4, shuffle_buffer=3)
    through = make()
    batches(through, 0)
    assert_same(batches(through, 1), batches(make(), 1))
