"""Balanced per-domain batches (DomainBed's sampler) over WebDataset shards, and the recipe on them."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import import_recipe
from PIL import Image

from clipood_plugin.data.balanced import domain_seed, make_balanced_loader, parse_domain_urls
from clipood_plugin.data.make_shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
CLASSNAMES = ["circle", "square", "star", "heart"]
#: domain → number of samples: deliberately unequal, and the first smaller than one epoch's draws
SIZES = {"art": 7, "photo": 12, "sketch": 30}


def _png(domain_index: int, sample_index: int) -> bytes:
    """An 8×8 PNG whose pixels spell out (domain, sample), so a batch row can be traced to its file."""
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0] = domain_index
    pixels[..., 1] = sample_index
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core machine: a second thread only spins (30x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("balanced")
    urls = {}
    for d, (domain, n) in enumerate(SIZES.items()):
        samples = [{"__key__": f"{domain}-{i:03d}", "png": _png(d, i), "cls": i % len(CLASSNAMES), "domain": domain}
                   for i in range(n)]
        info = write_shards(samples, root / domain, classnames=CLASSNAMES, split="train", max_samples_per_shard=3,
                            progress=False)
        urls[domain] = info.pattern
    return urls


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def loader(urls: dict[str, str], **kwargs: object):  # type: ignore[no-untyped-def]
    options: dict = {"batch_per_domain": 3, "transform": to_tensor, "num_classes": len(CLASSNAMES),
                     "steps_per_epoch": 5, "with_domain": True, "shuffle_buffer": 50, **kwargs}
    return make_balanced_loader(urls, **options)


def ids(images: torch.Tensor) -> list[tuple[int, int]]:
    """(domain index, sample index) of every row, read back from the pixels."""
    return [(int(img[0, 0, 0]), int(img[1, 0, 0])) for img in images]


def test_every_batch_holds_b_samples_of_every_domain_in_order(shards: dict[str, str]) -> None:
    bal = loader(shards)
    names = list(SIZES)
    for epoch in range(2):
        bal.set_epoch(epoch)
        batches = list(bal)
        assert len(batches) == len(bal) == 5  # a fixed step count, not a data pass
        for images, labels, domains in batches:
            assert images.shape == (9, 3, 8, 8) and labels.shape == (9,)
            assert domains == [n for n in names for _ in range(3)]  # exactly b of each, in the given order
            for (d, i), label, domain in zip(ids(images), labels.tolist(), domains):
                assert names[d] == domain and label == i % len(CLASSNAMES)  # the row is the file it claims
    assert bal.batch_size == 9 and bal.num_skipped == 0


def test_a_small_domain_cycles_and_each_pass_sees_every_image_once(shards: dict[str, str]) -> None:
    bal = loader(shards)
    bal.set_epoch(0)
    art = [i for images, _, _ in bal for d, i in ids(images) if d == 0]
    assert len(art) == 15  # 5 steps × 3 drawn from a 7-image domain: it never runs out
    n = SIZES["art"]
    assert sorted(art[:n]) == list(range(n)) and sorted(art[n:2 * n]) == list(range(n))
    sketch = [i for images, _, _ in bal for d, i in ids(images) if d == 2]
    assert len(set(sketch)) == len(sketch) == 15  # the big domain: no repeats within a pass


def test_the_stream_is_a_function_of_seed_and_epoch(shards: dict[str, str]) -> None:
    def draw(seed: int, epoch: int) -> list[tuple[int, int]]:
        bal = loader(shards, seed=seed)
        bal.set_epoch(epoch)
        return [row for images, _, _ in bal for row in ids(images)]

    first = draw(0, 0)
    assert draw(0, 0) == first
    assert draw(1, 0) != first and draw(0, 1) != first
    assert domain_seed(0, "art") != domain_seed(0, "photo") != domain_seed(1, "photo")
    assert domain_seed(3, "art") == int(__import__("hashlib").sha256(b"clipood-balanced/3/art").hexdigest(), 16) % 2**31


def test_default_epoch_is_one_data_pass(shards: dict[str, str]) -> None:
    bal = loader(shards, steps_per_epoch=None)
    assert bal.steps_per_epoch == math.ceil(sum(SIZES.values()) / (3 * len(SIZES)))  # ceil(49 / 9) = 6
    bal.set_epoch(0)
    assert sum(1 for _ in bal) == 6


def test_worker_processes_keep_the_step_count(shards: dict[str, str]) -> None:
    bal = loader(shards, workers=2)  # 5 steps: not a multiple of the 2 workers
    for epoch in range(2):
        bal.set_epoch(epoch)
        batches = list(bal)
        assert len(batches) == 5
        assert all(b[2] == [n for n in SIZES for _ in range(3)] for b in batches)


def test_bad_arguments_are_named() -> None:
    assert parse_domain_urls(["Real World=/a/{0..3}.tar", "art=/b"]) == {"Real World": "/a/{0..3}.tar", "art": "/b"}
    with pytest.raises(ValueError, match="DOMAIN=URLS"):
        parse_domain_urls(["/no/domain"])
    with pytest.raises(ValueError, match="twice"):
        parse_domain_urls(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="no domains"):
        make_balanced_loader({}, batch_per_domain=2, transform=to_tensor, num_classes=2)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_balanced_loader({"a": "/x"}, batch_per_domain=2, transform=to_tensor, num_classes=2, steps_per_epoch=0)
    with pytest.raises(ValueError, match="batch_per_domain"):
        make_balanced_loader({"a": "/x"}, batch_per_domain=0, transform=to_tensor, num_classes=2)


# ---------------------------------------------------------------------------------------------
# The recipe with --train-shards-per-domain: balanced steps, and a mid-epoch resume that replays


def recipe_argv(shards: dict[str, str], out: Path, *extra: str) -> list[str]:
    argv = []
    for domain in ("art", "photo"):
        argv += ["--train-shards-per-domain", f"{domain}={shards[domain]}"]
    return [*argv, "--eval-shards", f"sketch={shards['sketch']}", "--model", "clipood-tiny", "--batch-size", "2",
            "--iters-per-epoch", "4", "--total-steps", "6", "--lr", "1e-3", "--workers", "0", "--shuffle-buffer", "8",
            "--output", str(out), "--log-interval", "1", "--no-eval-zero-shot", "--device", "cpu", *extra]


def test_recipe_balanced_run_resumes_mid_epoch_bit_for_bit(shards: dict[str, str], tmp_path: Path) -> None:
    from clipood_plugin.training.checkpoint import load_checkpoint

    recipe = import_recipe()
    reference = tmp_path / "reference"
    results = recipe.main(recipe_argv(shards, reference, "--checkpoint-interval", "3"))
    assert results["step"] == results["total_steps"] == 6  # 2 epochs of 4 steps, cut at 6
    assert (reference / "summary.csv").read_text().count("\n") == 3  # header + 2 epochs
    mid = reference / "checkpoints" / "checkpoint-3.pt"
    assert load_checkpoint(mid)["batches_in_epoch"] == 3  # step 3 is inside epoch 0 (4 steps)

    resumed = tmp_path / "resumed"
    again = recipe.main(recipe_argv(shards, resumed, "--resume", str(mid)))
    assert again["step"] == 6
    ref = load_checkpoint(reference / "checkpoints" / "last.pt")
    mine = load_checkpoint(resumed / "checkpoints" / "last.pt")
    for key in ("state_dict", "state_dict_ema"):
        for name, value in ref[key].items():
            assert torch.equal(mine[key][name], value), (key, name)


def test_recipe_rejects_both_kinds_of_training_shards(shards: dict[str, str], tmp_path: Path) -> None:
    recipe = import_recipe()
    argv = recipe_argv(shards, tmp_path / "x", "--train-shards", shards["sketch"])
    with pytest.raises(ValueError, match="not both"):
        recipe.main(argv)
