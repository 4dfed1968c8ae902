"""Split rules of clipood_plugin.protocols, checked against independent computations.

References are written here from their definitions (hashlib md5 for seed_hash, numpy RandomState
for DomainBed's split_dataset, module-level ``random`` for CoOp's few-shot draws, torchvision's
ImageFolder for the listing order) rather than taken from the code under test. Folder trees are
empty placeholder files: nothing is decoded.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from clipood_plugin.protocols import ImageRecord, Split
from clipood_plugin.protocols.base_to_new import (
    base_new_labels,
    base_to_new_split,
    few_shot,
    harmonic_mean,
)
from clipood_plugin.protocols.domainbed import (
    domain_batch,
    holdout_split,
    leave_one_domain_out,
    list_domainbed,
    per_domain_batches,
    seed_hash,
)
from clipood_plugin.protocols.imagenet import (
    imagenet_records,
    imagenet_split,
    imagenet_v2_records,
    parse_classnames,
    subset_classes,
    subset_records,
)
from clipood_plugin.protocols.in_the_wild import in_the_wild_split, num_base_classes

PACS = ["art_painting", "cartoon", "photo", "sketch"]


# ---------------------------------------------------------------- independent references


def ref_seed_hash(*args: object) -> int:
    digest = hashlib.md5(repr(tuple(args)).encode("utf-8")).hexdigest()
    return int(digest, 16) % 2147483648


def ref_split(items: list, n_out: int, seed: int) -> tuple[list, list]:
    """DomainBed split_dataset from its definition: returns (out, in)."""
    keys = list(range(len(items)))
    np.random.RandomState(seed).shuffle(keys)
    return [items[k] for k in keys[:n_out]], [items[k] for k in keys[n_out:]]


def ref_fewshot(items: list[ImageRecord], shots: int) -> list[ImageRecord]:
    """dassl generate_fewshot_dataset with the *global* random module (seeded by the caller)."""
    groups: dict[int, list[ImageRecord]] = {}
    for r in items:
        groups.setdefault(r.label, []).append(r)
    out: list[ImageRecord] = []
    for g in groups.values():
        out += random.sample(g, shots) if len(g) >= shots else g
    return out


def with_global_random(seed: int, fn):
    state = random.getstate()
    try:
        random.seed(seed)
        return fn()
    finally:
        random.setstate(state)


# ---------------------------------------------------------------- fake trees


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def make_domainbed_tree(root: Path, domains: list[str], classes: list[str], count) -> Path:
    """root/<domain>/<class>/<image>, with noise ImageFolder must skip or keep the same way we do."""
    for d in domains:
        for c in classes:
            n = count(d, c)
            for i in range(n):
                ext = ".JPG" if i % 3 == 0 else ".png"  # upper-case extensions count, as ImageFolder
                touch(root / d / c / f"{n - i:03d}_img{ext}")  # created in reverse name order
            touch(root / d / c / "notes.txt")  # not an image
            touch(root / d / c / "sub" / "nested.jpg")  # nested files count, after the sorted walk
    (root / ".cache").mkdir()  # hidden folder: not a domain
    touch(root / "README.md")  # a file at the top: not a domain
    return root


@pytest.fixture
def pacs(tmp_path: Path) -> Path:
    classes = ["dog", "elephant", "giraffe", "guitar", "horse"]
    return make_domainbed_tree(
        tmp_path / "PACS", PACS[::-1], classes, lambda d, c: 6 + 3 * PACS.index(d) + classes.index(c)
    )


def image_folder_reference(domain_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    ds = ImageFolder(str(domain_dir))  # lists only; nothing is loaded until __getitem__
    return ds.classes, ds.samples


# ---------------------------------------------------------------- DomainBed


@pytest.mark.parametrize(
    "args",
    [(0, 0), (0, 3), (1, 2), (0, 1, "base"), (0, 1, "open"), (7,), ("a", "b"), (0, 5, "base", 2.5), ()],
)
def test_seed_hash_matches_md5_definition(args: tuple) -> None:
    assert seed_hash(*args) == ref_seed_hash(*args)
    assert 0 <= seed_hash(*args) < 2**31


def test_seed_hash_depends_on_every_argument_and_its_type() -> None:
    values = {seed_hash(0, 1), seed_hash(0, 2), seed_hash(1, 1), seed_hash(0, "1"), seed_hash(0, 1, "base")}
    assert len(values) == 5


@pytest.mark.parametrize("n", [0, 1, 4, 5, 9, 10, 37, 1000])
@pytest.mark.parametrize("seed", [0, 12345, 2**31 - 1])
def test_holdout_split_matches_split_dataset(n: int, seed: int) -> None:
    records = [ImageRecord(f"x/{i}.jpg", i % 3) for i in range(n)]
    in_, out = holdout_split(records, 0.2, seed)
    assert len(out) == int(n * 0.2)
    assert len(in_) + len(out) == n
    assert {r.path for r in in_}.isdisjoint({r.path for r in out})
    assert {r.path for r in in_} | {r.path for r in out} == {r.path for r in records}
    ref_out, ref_in = ref_split(records, int(n * 0.2), seed)
    assert out == ref_out and in_ == ref_in  # same records in the same (shuffled) order
    assert holdout_split(records, 0.2, seed) == (in_, out)  # stable across calls


def test_holdout_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="fraction"):
        holdout_split([ImageRecord("a.jpg", 0)], 1.5, 0)


def test_list_domainbed_matches_imagefolder_order(pacs: Path) -> None:
    domains, classnames, records = list_domainbed(pacs)
    assert domains == sorted(PACS) == list(records)  # sorted folder order, hidden/file entries skipped
    for d in domains:
        ref_classes, ref_samples = image_folder_reference(pacs / d)
        assert classnames == ref_classes
        assert [(r.path, r.label) for r in records[d]] == ref_samples
        assert all(r.domain == d for r in records[d])
        assert not any(r.path.endswith(".txt") for r in records[d])


def test_list_domainbed_rejects_mismatched_classes_and_empty_classes(tmp_path: Path) -> None:
    touch(tmp_path / "one" / "a" / "cat" / "1.jpg")
    touch(tmp_path / "one" / "b" / "dog" / "1.jpg")
    with pytest.raises(ValueError, match="different classes"):
        list_domainbed(tmp_path / "one")
    touch(tmp_path / "two" / "a" / "cat" / "1.txt")  # a class folder without an image
    with pytest.raises(ValueError, match="no image files"):
        list_domainbed(tmp_path / "two")
    (tmp_path / "three" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        list_domainbed(tmp_path / "three")
    with pytest.raises(ValueError, match="not a directory"):
        list_domainbed(tmp_path / "missing")


def reference_lodo(records: dict[str, list[ImageRecord]], target: str, which: str):
    train, val, test = [], [], []
    for i, d in enumerate(sorted(records)):
        out, in_ = ref_split(records[d], int(len(records[d]) * 0.2), ref_seed_hash(0, i))
        if d == target:
            test += {"out": out, "in": in_, "all": in_ + out}[which]
        else:
            train += in_
            val += out
    return train, val, test


@pytest.mark.parametrize("which", ["out", "in", "all"])
def test_leave_one_domain_out_matches_reference(pacs: Path, which: str) -> None:
    domains, classnames, records = list_domainbed(pacs)
    split = leave_one_domain_out(records, 1, classnames=classnames, test_split=which)  # 1 = cartoon
    assert split.info["targets"] == ["cartoon"]
    train, val, test = reference_lodo(records, "cartoon", which)
    assert (split["train"], split["val"], split["test"]) == (train, val, test)
    assert all(r.domain != "cartoon" for r in split["train"] + split["val"])
    assert all(r.domain == "cartoon" for r in split["test"])
    n_target = len(records["cartoon"])
    expected = {"out": int(n_target * 0.2), "in": n_target - int(n_target * 0.2), "all": n_target}[which]
    assert len(split["test"]) == expected
    assert split.domain_sizes("train") == {
        d: len(records[d]) - int(len(records[d]) * 0.2) for d in domains if d != "cartoon"
    }
    assert split.classnames["test"] == classnames


def test_leave_one_domain_out_target_by_name_and_order_independence(pacs: Path) -> None:
    _, classnames, records = list_domainbed(pacs)
    by_index = leave_one_domain_out(records, 3, classnames=classnames)
    shuffled = {d: records[d] for d in ["photo", "sketch", "art_painting", "cartoon"]}
    by_name = leave_one_domain_out(shuffled, "sketch", classnames=classnames)
    assert by_index.parts == by_name.parts  # environment index = sorted position, not mapping order
    with pytest.raises(ValueError, match="unknown target domain"):
        leave_one_domain_out(records, "clipart", classnames=classnames)
    with pytest.raises(ValueError, match="out of range"):
        leave_one_domain_out(records, 4, classnames=classnames)
    with pytest.raises(ValueError, match="test_split"):
        leave_one_domain_out(records, 0, classnames=classnames, test_split="val")  # type: ignore[arg-type]


def test_per_domain_batches_balanced_deterministic_resumable() -> None:
    sizes = {"a": 5, "b": 40, "c": 13}
    batches = list(per_domain_batches(sizes, 12, seed=3, steps=300))
    assert len(batches) == 300
    assert len({tuple(b) for b in batches}) == 300  # every step draws afresh
    offsets = [0, 5, 45, 58]
    seen = [set(), set(), set()]
    for batch in batches:
        assert len(batch) == 36
        for d in range(3):
            chunk = batch[12 * d : 12 * (d + 1)]
            assert all(offsets[d] <= i < offsets[d + 1] for i in chunk)
            seen[d] |= set(chunk)
    assert [len(s) for s in seen] == [5, 40, 13]  # with replacement, every record is reached
    assert any(len(set(b[:12])) < 12 for b in batches)  # 12 draws from 5: repeats must occur
    again = list(per_domain_batches([5, 40, 13], 12, seed=3, steps=300))
    assert again == batches
    resumed = list(per_domain_batches(sizes, 12, seed=3, start_step=150, steps=150))
    assert resumed == batches[150:]
    assert domain_batch(sizes, 12, 7, seed=3) == batches[7]
    assert list(per_domain_batches(sizes, 12, seed=4, steps=300)) != batches
    # domain "a": 5 records, 3600 draws; each count ~ Binomial(3600, 0.2) (sd 24), far from 720 ± 150
    counts = np.bincount([i for b in batches for i in b[:12]], minlength=5)
    assert np.all(np.abs(counts - 720) < 150)
    with pytest.raises(ValueError, match="size"):
        per_domain_batches([5, 0], 12)
    with pytest.raises(ValueError, match="batch_per_domain"):
        per_domain_batches([5], 0)


# ---------------------------------------------------------------- base-to-new (CoOp)


@pytest.mark.parametrize(("k", "base", "new"), [(65, 33, 32), (100, 50, 50), (47, 24, 23), (2, 1, 1)])
def test_base_new_counts_use_ceiling(k: int, base: int, new: int) -> None:
    b, n = base_new_labels(reversed(range(k)))
    assert (len(b), len(n)) == (base, new) == (math.ceil(k / 2), k - math.ceil(k / 2))
    assert b == list(range(base)) and n == list(range(base, k))


def make_labelled(k: int, count) -> list[ImageRecord]:
    out = []
    for i in range(200):  # interleaved classes, so "first appearance" order is not sorted order
        for c in [(3 * j) % k for j in range(k)]:
            if i < count(c):
                out.append(ImageRecord(f"train/{c}/{i}.jpg", c))
    return out


def test_few_shot_counts_determinism_and_coop_parity() -> None:
    counts = lambda c: 3 + (c * 5) % 30  # noqa: E731 — some classes below 16, some above
    records = make_labelled(65, counts)
    fs = few_shot(records, 16, seed=0)
    per_class = np.bincount([r.label for r in fs], minlength=65)
    assert per_class.tolist() == [min(16, counts(c)) for c in range(65)]
    assert len({r.path for r in fs}) == len(fs)  # without replacement
    assert few_shot(records, 16, seed=0) == fs
    assert few_shot(records, 16, seed=1) != fs
    assert fs == with_global_random(0, lambda: ref_fewshot(records, 16))
    assert few_shot(records, 16, seed=5) == with_global_random(5, lambda: ref_fewshot(records, 16))


def test_base_to_new_split_matches_coop() -> None:
    k = 65
    names = [f"class_{c:02d}" for c in range(k)]
    train = make_labelled(k, lambda c: 10 + c % 20)
    val = [ImageRecord(f"val/{c}/{i}.jpg", c) for c in range(k) for i in range(6)]
    test = [ImageRecord(f"test/{c}/{i}.jpg", c) for c in range(k) for i in range(3)]
    split = base_to_new_split(train, test, classnames=names, val=val, shots=16, seed=0)

    def ref():  # CoOp: few-shot train, then val from the same stream, then subsample classes
        return ref_fewshot(train, 16), ref_fewshot(val, 4)

    ref_train, ref_val = with_global_random(0, ref)
    original = {r.path: r.label for r in train + val + test}
    base = list(range(33))
    assert split.classnames["train"] == split.classnames["test_base"] == names[:33]
    assert split.classnames["test_new"] == names[33:]
    assert [r.path for r in split["train"]] == [r.path for r in ref_train if r.label < 33]
    assert [r.path for r in split["val"]] == [r.path for r in ref_val if r.label < 33]
    for part, offset in (("train", 0), ("val", 0), ("test_base", 0), ("test_new", 33)):
        assert all(original[r.path] == r.label + offset for r in split[part])  # relabelled from 0
    assert sorted({r.label for r in split["test_base"]}) == base
    assert sorted({r.label for r in split["test_new"]}) == list(range(32))
    assert len(split["test_base"]) == 33 * 3 and len(split["test_new"]) == 32 * 3
    other = base_to_new_split(train, test, classnames=names, val=val, shots=16, seed=1)
    assert other["train"] != split["train"] and other["test_new"] == split["test_new"]


def test_harmonic_mean() -> None:
    assert harmonic_mean(83.9, 74.5) == pytest.approx(1 / ((1 / 83.9 + 1 / 74.5) / 2))
    assert harmonic_mean(50.0, 50.0) == pytest.approx(50.0)
    assert harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean(-1.0, 5.0)


# ---------------------------------------------------------------- in the wild


@pytest.mark.parametrize(("k", "base"), [(65, 32), (345, 172), (10, 5), (3, 1)])
def test_in_the_wild_base_count_uses_floor(k: int, base: int) -> None:
    assert num_base_classes(k) == base == k // 2


def test_in_the_wild_split(tmp_path: Path) -> None:
    domains_ = ["Art", "Clipart", "Product", "Real_World"]
    classes = [f"c{j}" for j in range(9)]  # 4 base, 5 new
    root = make_domainbed_tree(
        tmp_path / "OH", domains_, classes, lambda d, c: 5 + domains_.index(d) + classes.index(c)
    )
    domains, classnames, records = list_domainbed(root)
    split = in_the_wild_split(records, "Product", classnames=classnames)
    assert split.info["num_base"] == 4 and split.info["num_new"] == 5
    assert split.classnames["train"] == split.classnames["val"] == classnames[:4]
    for part in ("test_base", "test_new", "test_all"):
        assert split.classnames[part] == classnames

    target = records["Product"]
    assert sorted(r.path for r in split["test_all"]) == sorted(r.path for r in target)  # whole domain
    assert {r.label for r in split["test_base"]} == set(range(4))
    assert {r.label for r in split["test_new"]} == set(range(4, 9))
    original = {r.path: r.label for d in domains for r in records[d]}
    assert all(original[r.path] == r.label for p in split.parts.values() for r in p)  # original indices
    assert all(r.label < 4 and r.domain != "Product" for r in split["train"] + split["val"])

    train, val = [], []
    for i, d in enumerate(domains):
        base_env = [r for r in records[d] if r.label < 4]
        out, in_ = ref_split(base_env, int(len(base_env) * 0.2), ref_seed_hash(0, i, "base"))
        open_env = [r for r in records[d] if r.label >= 4]
        o_out, o_in = ref_split(open_env, int(len(open_env) * 0.2), ref_seed_hash(0, i, "open"))
        if d == "Product":
            assert split["test_base"] == in_ + out
            assert split["test_new"] == o_in + o_out
        else:
            train += in_
            val += out
    assert split["train"] == train and split["val"] == val


# ---------------------------------------------------------------- ImageNet variants


@pytest.fixture
def fake_imagenet(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    wnids = [f"n0{7 * i + 3:07d}" for i in range(10)]  # already in sorted order, like classnames.txt
    names = [f"thing {i}" for i in range(10)]
    (tmp_path / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)) + "\n")
    for w in wnids:
        for i in range(20):
            touch(tmp_path / "train" / w / f"{w}_{i}.JPEG")
        touch(tmp_path / "val" / w / f"val_{w}.JPEG")
    for label in range(10):
        touch(tmp_path / "v2" / str(label) / "a.jpeg")
    subset = [wnids[7], wnids[2], wnids[9], wnids[4]]  # created out of order
    for w in subset:
        for i in range(3):
            touch(tmp_path / "r" / w / f"{i}.jpg")
    touch(tmp_path / "r" / "README.txt")
    return tmp_path, wnids, names


def test_subset_classes_maps_into_full_list(fake_imagenet) -> None:
    root, wnids, names = fake_imagenet
    parsed_wnids, parsed_names = parse_classnames((root / "classnames.txt").read_text())
    assert (parsed_wnids, parsed_names) == (wnids, names)
    sub, recs = subset_records(root / "r", parsed_wnids, parsed_names)
    assert sub.indices == [2, 4, 7, 9]  # sorted wnids → their positions among the 10
    assert sub.wnids == [wnids[i] for i in (2, 4, 7, 9)]
    assert sub.names == ["thing 2", "thing 4", "thing 7", "thing 9"]
    for r in recs:  # label = position of the folder among the 4 sorted subset folders
        assert sub.wnids[r.label] == Path(r.path).parent.name
    assert len(recs) == 12 and not any(r.path.endswith("README.txt") for r in recs)
    head = torch.arange(10, dtype=torch.float64)[:, None] * torch.ones(1, 3, dtype=torch.float64)
    rows = head[sub.indices]  # a 1000-class head subset the same way
    assert rows[:, 0].tolist() == [float(wnids.index(w)) for w in sub.wnids]
    shuffled = subset_classes([wnids[9], wnids[2], wnids[7], wnids[4]], wnids, names)
    assert shuffled == sub  # CoOp sorts the folders it finds; the listing order does not matter
    with pytest.raises(ValueError, match="not wnids"):
        subset_classes(["n99999999"], wnids, names)


def test_imagenet_split(fake_imagenet) -> None:
    root, wnids, names = fake_imagenet
    train = imagenet_records(root / "train", wnids)
    assert all(wnids[r.label] == Path(r.path).parent.name for r in train)
    test = imagenet_records(root / "val", wnids)
    v2 = imagenet_v2_records(root / "v2", num_classes=10)
    assert sorted(r.label for r in v2) == list(range(10))
    sub, r_recs = subset_records(root / "r", wnids, names)
    split = imagenet_split(
        train,
        test,
        classnames=names,
        shots=16,
        seed=0,
        variants={"imagenet_v2": v2},
        subset_variants={"imagenet_r": (sub, r_recs)},
    )
    assert np.bincount([r.label for r in split["train"]]).tolist() == [16] * 10
    assert split["train"] == with_global_random(0, lambda: ref_fewshot(train, 16))
    assert split.classnames["imagenet_v2"] == names
    assert split.classnames["imagenet_r"] == sub.names
    assert split.info["class_index"]["imagenet_r"] == [2, 4, 7, 9]
    with pytest.raises(ValueError, match="not one of"):
        imagenet_records(root / "r", wnids[:5])


# ---------------------------------------------------------------- data model


def test_split_validates_labels_and_parts() -> None:
    recs = [ImageRecord("a.jpg", 0, "x"), ImageRecord("b.jpg", 2, "x")]
    with pytest.raises(ValueError, match="out of range"):
        Split(parts={"test": recs}, classnames={"test": ["p", "q"]})
    with pytest.raises(ValueError, match="no classnames"):
        Split(parts={"test": recs}, classnames={})
    with pytest.raises(ValueError, match="not contiguous"):
        Split(
            parts={"train": [*recs, ImageRecord("c.jpg", 0, "y"), ImageRecord("d.jpg", 0, "x")]},
            classnames={"train": ["p", "q", "r"]},
        ).domain_sizes("train")
    with pytest.raises(KeyError, match="no split part"):
        Split(parts={}, classnames={})["train"]
    with pytest.raises(ValueError, match=">= 0"):
        ImageRecord("a.jpg", -1)
    with pytest.raises(TypeError, match="int"):
        ImageRecord("a.jpg", True)  # type: ignore[arg-type]
