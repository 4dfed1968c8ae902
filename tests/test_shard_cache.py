"""ShardCache: a split part written once as shards, named by its content, keys from the files' paths."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from PIL import Image

from clipood_plugin.data.shard_cache import ShardCache, safe_name, sample_key
from clipood_plugin.protocols import ImageRecord


def _members(urls: str) -> list[str]:
    names: list[str] = []
    for shard in sorted(Path(urls).glob("*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


def test_a_part_is_written_once_named_by_its_content(tmp_path: Path) -> None:
    base = tmp_path / "data"
    (base / "a").mkdir(parents=True)
    for name, fmt in (("x.1.png", "PNG"), ("x.1.jpg", "JPEG"), ("y.png", "PNG")):
        Image.new("RGB", (4, 4), (10, 20, 30)).save(base / "a" / name, format=fmt)
    (base / "a" / "bad.png").write_bytes(b"not an image")
    records = [ImageRecord(str(base / "a" / n), label, "photo")
               for n, label in (("x.1.png", 0), ("x.1.jpg", 1), ("y.png", 1), ("bad.png", 0))]
    cache = ShardCache(tmp_path / "cache", "toy", base, progress=False)

    first = cache.shards("part one", records, ["cat", "dog"])
    assert Path(first.urls).name.startswith("part_one-") and first.num_samples == 3  # the bad file skipped
    marker = json.loads((Path(first.urls) / "_complete.json").read_text())
    assert marker["num_unreadable"] == 1 and marker["unreadable"] == [str(base / "a" / "bad.png")]
    assert [n for n in _members(first.urls) if n.endswith(".cls")] == ["a/x_1.cls", "a/x_1~1.cls", "a/y.cls"]
    stamp = [p.stat().st_mtime_ns for p in sorted(Path(first.urls).iterdir())]
    assert cache.shards("part one", records, ["cat", "dog"]) == first  # found, not written again
    assert [p.stat().st_mtime_ns for p in sorted(Path(first.urls).iterdir())] == stamp
    assert cache.shards("part one", records[:2], ["cat", "dog"]).urls != first.urls  # other records, other set
    assert cache.shards("part one", records, ["cat", "hound"]).urls != first.urls  # other class list too
    assert cache.names(["cat", "dog"]) == cache.names(["cat", "dog"]) != cache.names(["dog", "cat"])
    assert json.loads(cache.names(["cat", "dog"]).read_text()) == ["cat", "dog"]


def test_keys_and_names() -> None:
    base = Path("/data/imagenet")
    assert sample_key("/data/imagenet/images/n01/a.b.JPEG", base) == "images/n01/a_b"
    assert sample_key("/data/imagenet-r/n01/x.png", base) == "imagenet-r/n01/x"  # beside the dataset
    assert safe_name("Real World/../x") == "Real_World_.._x" and safe_name("...") == "part"
