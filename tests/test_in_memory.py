"""In-memory few-shot batches: uniform draws over the whole set, whatever the shard layout.

The set is written the way ``recipes/paper.py`` wrote base-to-new training sets: records grouped
by class, ``ceil(N / 16)`` samples per shard, so each shard holds about three of the 50 classes.
Every image is an 8×8 PNG whose pixels spell its index (red = index mod 256, green = index // 256),
so a batch tells which samples it holds without help from the code under test. The benchmark for
"random" is the expectation of a uniform draw, computed here in exact rational arithmetic.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from _helpers import solid_png, to_tensor, write_tar
from PIL import Image

from clipood_plugin.data.in_memory import make_in_memory_loader, use_in_memory
from clipood_plugin.data.make_shards import write_shards
from clipood_plugin.data.stream import make_train_loader

CLASSES, SHOTS, BATCH = 50, 16, 36
N = CLASSES * SHOTS
PER_PASS = N // BATCH  # drop_last: 22 full batches, 8 samples sit each pass out


def png(index: int) -> bytes:
    return solid_png(8, (index % 256, index // 256, 7))


def augment(img: Image.Image) -> torch.Tensor:
    """A random transform drawing from both torch's and Python's RNG (as torchvision and timm do)."""
    x = to_tensor(img).float()
    return x + torch.rand(()) + random.random()


def ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


def expected_distinct_classes(classes: int, per_class: int, draw: int) -> float:
    """E[#classes hit] drawing ``draw`` of ``classes × per_class`` items without replacement.

    Linearity of expectation: a class is missed with probability C(N − m, n) / C(N, n).
    """
    total = classes * per_class
    miss = Fraction(math.comb(total - per_class, draw), math.comb(total, draw))
    return float(classes * (1 - miss))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("fewshot")
    samples = ({"__key__": f"c{i // SHOTS:02d}/s{i:03d}", "png": png(i), "cls": i // SHOTS} for i in range(N))
    info = write_shards(samples, out, classnames=[f"class{c}" for c in range(CLASSES)],
                        max_samples_per_shard=math.ceil(N / 16), progress=False)
    return info.pattern


def batches(loader, epochs: range, label_of=lambda i: i // SHOTS) -> list[list[int]]:  # type: ignore[no-untyped-def]
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for images, labels in loader:
            got = ids(images)
            assert labels.tolist() == [label_of(i) for i in got]  # each label travels with its image
            out.append(got)
    return out


def mean_distinct_classes(bs: list[list[int]]) -> float:
    return sum(len({i // SHOTS for i in b}) for b in bs) / len(bs)


def test_expectation_matches_a_hypergeometric_sum() -> None:
    # The same number by a second route: E = Σ_k P(class 0 holds k of the draw) summed over classes
    # as C · P(k ≥ 1), P(k) = C(m, k) C(N − m, n − k) / C(N, n).
    p_hit = sum(Fraction(math.comb(SHOTS, k) * math.comb(N - SHOTS, BATCH - k), math.comb(N, BATCH))
                for k in range(1, SHOTS + 1))
    assert float(CLASSES * p_hit) == pytest.approx(expected_distinct_classes(CLASSES, SHOTS, BATCH), rel=1e-12)


def test_batches_are_uniform_draws_over_class_grouped_shards(shards: str) -> None:
    expected = expected_distinct_classes(CLASSES, SHOTS, BATCH)  # 25.8
    loader = make_in_memory_loader(shards, batch_size=BATCH, transform=to_tensor, num_classes=CLASSES, workers=2)
    assert (loader.num_samples, loader.steps_per_epoch, loader.num_skipped) == (N, PER_PASS, 0)
    got = batches(loader, range(5))
    assert len(got) == 5 * PER_PASS
    assert all(len(set(b)) == BATCH for b in got)  # no sample twice in a batch
    for epoch in range(5):  # an epoch is one pass: its batches are disjoint
        seen = [i for b in got[epoch * PER_PASS:(epoch + 1) * PER_PASS] for i in b]
        assert len(set(seen)) == len(seen) == PER_PASS * BATCH
    assert mean_distinct_classes(got) == pytest.approx(expected, rel=0.05)

    # The stream on the same shards (the recipe's defaults) is the bug this loader fixes: each
    # worker reads its own class-grouped shards, so a batch sees about half the classes.
    stream = make_train_loader(shards, batch_size=BATCH, transform=to_tensor, num_classes=CLASSES, workers=2,
                               shuffle_buffer=2000)
    assert mean_distinct_classes(batches(stream, range(3))) < 0.9 * expected


def test_a_fixed_epoch_length_continues_the_passes(shards: str) -> None:
    """The official 500-iteration "epoch": passes run on across epochs, no batch straddles two."""
    loader = make_in_memory_loader(shards, batch_size=BATCH, transform=to_tensor, num_classes=CLASSES,
                                   steps_per_epoch=30)
    got = batches(loader, range(3))  # 90 batches = passes 0–3 (22 each) and two batches of pass 4
    assert len(got) == 90
    for p in range(4):
        seen = [i for b in got[p * PER_PASS:(p + 1) * PER_PASS] for i in b]
        assert len(set(seen)) == len(seen)
    assert got[:PER_PASS] != got[PER_PASS:2 * PER_PASS]  # each pass its own permutation
    assert all(len(set(b)) == BATCH for b in got)


def test_two_ranks_partition_every_global_batch(shards: str) -> None:
    ranks = [make_in_memory_loader(shards, batch_size=BATCH // 2, transform=to_tensor, num_classes=CLASSES,
                                   world_size=2, rank=r) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == PER_PASS
    per_rank = [batches(loader, range(2)) for loader in ranks]
    for a, b in zip(*per_rank):
        assert len(a) == len(b) == BATCH // 2 and not set(a) & set(b)
    for epoch in range(2):  # together the ranks take a whole pass, each sample once
        seen = [i for r in per_rank for b in r[epoch * PER_PASS:(epoch + 1) * PER_PASS] for i in b]
        assert len(set(seen)) == len(seen) == PER_PASS * BATCH


def test_a_resumed_epoch_replays_the_same_batches_and_augmentation(shards: str) -> None:
    def epoch_batches(workers: int) -> list[torch.Tensor]:
        loader = make_in_memory_loader(shards, batch_size=BATCH, transform=augment, num_classes=CLASSES,
                                       workers=workers, seed=3)
        loader.set_epoch(4)
        return [images for images, _ in loader]

    uninterrupted = epoch_batches(workers=0)
    k = 7  # a fresh process resumes at batch k of epoch 4, with two workers this time
    resumed = epoch_batches(workers=2)[k:]
    assert len(resumed) == PER_PASS - k
    for a, b in zip(uninterrupted[k:], resumed):
        assert torch.equal(a, b)  # same samples, same random augmentation, bitwise
    loader = make_in_memory_loader(shards, batch_size=BATCH, transform=augment, num_classes=CLASSES)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = loader.loader.dataset[(0, 123)][0]  # what a workers=0 run does in the main process
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state  # left alone
    assert torch.equal(loader.loader.dataset[(0, 123)][0], first)
    noise = torch.stack([b[:, 0, 0, 0] - b[:, 0, 0, 0].floor() for b in uninterrupted])
    assert noise.unique().numel() > PER_PASS  # the augmentation is random across samples, not constant


def test_bad_samples_are_counted_and_dropped_a_bad_label_is_an_error(tmp_path: Path) -> None:
    members: dict[str, bytes] = {}
    for i in range(6):  # a sample's files must be adjacent in the tar
        members |= {f"g{i}.png": png(i), f"g{i}.cls": b"1"}
    members |= {"bad.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 8, "bad.cls": b"0"}
    write_tar(tmp_path / "a.tar", members)
    loader = make_in_memory_loader(str(tmp_path / "a.tar"), batch_size=3, transform=to_tensor, num_classes=2)
    assert (loader.num_samples, loader.num_skipped, loader.steps_per_epoch) == (6, 1, 2)
    assert sorted(i for b in batches(loader, range(1), lambda i: 1) for i in b) == list(range(6))

    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_in_memory_loader(str(tmp_path / "a.tar"), batch_size=4, transform=to_tensor, num_classes=2,
                              world_size=2)
    write_tar(tmp_path / "b.tar", {"k0.png": png(0), "k0.cls": b"9"})
    with pytest.raises(ValueError, match=r"b\.tar.*sample 'k0'.*label 9"):
        make_in_memory_loader(str(tmp_path / "b.tar"), batch_size=1, transform=to_tensor, num_classes=2)


def test_auto_holds_small_sets_and_leaves_stream_settings_to_the_stream(shards: str) -> None:
    assert use_in_memory("auto", shards)  # 800 samples, per sizes.json
    assert not use_in_memory("auto", shards, max_samples=N - 1)
    assert not use_in_memory("auto", shards, resampled=True)
    assert not use_in_memory("auto", shards, num_samples=N)
    assert use_in_memory("on", shards) and not use_in_memory("off", shards)
    with pytest.raises(ValueError, match="resampled"):
        use_in_memory("on", shards, resampled=True)
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        use_in_memory("yes", shards)
