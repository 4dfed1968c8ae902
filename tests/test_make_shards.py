"""Shard writer and CLI: read back with plain ``tarfile``/``json``/PIL, never with our own reader."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
from PIL import Image

from clipood_plugin.data.make_shards import main, write_shards

CLASSES = ["ant", "bee", "cat", "dog"]


def encode(value: int, fmt: str, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, (value * 7) % 256)).save(buf, format=fmt)
    return buf.getvalue()


def make_samples(n: int = 40) -> list[dict]:
    out = []
    for i in range(n):
        ext = "jpg" if i % 3 == 0 else "png"
        sample = {"__key__": f"item{i:03d}", ext: encode(i * 6, "JPEG" if ext == "jpg" else "PNG"), "cls": i % 4}
        if i % 2 == 0:
            sample["domain"] = f"dom{i % 5}"
        if i % 5 == 0:
            sample["txt"] = f"a photo of a {CLASSES[i % 4]} number {i} ✓"
        out.append(sample)
    return out


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def group(members: list[tuple[str, bytes]]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    return samples


def test_round_trip_every_sample_and_field(tmp_path: Path) -> None:
    samples = make_samples()
    info = write_shards(samples, tmp_path / "ds", classnames=CLASSES, max_samples_per_shard=10, progress=False)
    assert [p.name for p in info.shards] == [f"train-{i:06d}.tar" for i in range(4)]
    assert info.shard_lengths == (10, 10, 10, 10) and info.num_samples == 40
    assert list(braceexpand.braceexpand(info.pattern)) == [str(p) for p in info.shards]

    members = [m for p in info.shards for m in read_tar(p)]
    # Members appear in sample order, image first, then cls, domain, txt.
    expected_names = []
    for s in samples:
        expected_names += [f"{s['__key__']}.{e}" for e in ("jpg", "png", "cls", "domain", "txt") if e in s]
    assert [name for name, _ in members] == expected_names
    back = group(members)
    for s in samples:
        got = back[s["__key__"]]
        ext = "jpg" if "jpg" in s else "png"
        assert got[ext] == s[ext]  # stored byte for byte
        assert int(got["cls"].decode()) == s["cls"]
        assert got.get("domain", b"").decode() == s.get("domain", "")
        assert got.get("txt", b"").decode("utf-8") == s.get("txt", "")
    with tarfile.open(info.shards[0]) as tar:  # no timestamps or owners: reproducible bytes
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()} == {(0, 0, 0, "", "")}


def test_metadata_files_and_split_updates(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    samples = make_samples(40)
    write_shards(samples, out, classnames=CLASSES, max_samples_per_shard=15, progress=False)
    write_shards(samples[:7], out, classnames=CLASSES, split="val", max_samples_per_shard=3, progress=False)

    assert json.loads((out / "classnames.json").read_text()) == CLASSES
    info = json.loads((out / "_info.json").read_text())
    assert info["name"] == "ds"
    train_files = [f"train-{i:06d}.tar" for i in range(3)]
    val_files = [f"val-{i:06d}.tar" for i in range(3)]
    assert info["splits"]["train"] == {
        "name": "train",
        "num_samples": 40,
        "filenames": train_files,
        "shard_lengths": [15, 15, 10],
    }
    assert info["splits"]["val"]["shard_lengths"] == [3, 3, 1]
    sizes = json.loads((out / "sizes.json").read_text())
    # sizes.json agrees with the tars themselves.
    assert sizes == {f: len(group(read_tar(out / f))) for f in train_files + val_files}

    # Rewriting train with fewer shards removes the stale shard and its sizes entry; val is untouched.
    write_shards(samples[:20], out, classnames=CLASSES, max_samples_per_shard=15, progress=False)
    assert not (out / "train-000002.tar").exists()
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 15, "train-000001.tar": 5, "val-000000.tar": 3, "val-000001.tar": 3, "val-000002.tar": 1}
    assert json.loads((out / "_info.json").read_text())["splits"]["val"]["num_samples"] == 7

    with pytest.raises(ValueError, match="different class list"):
        write_shards(samples, out, classnames=[*CLASSES, "eel"], split="test", progress=False)
    with pytest.raises(ValueError, match="belongs to split 'train'"):
        write_shards(samples[:3], out, classnames=CLASSES, split="other", prefix="train", progress=False)
    assert (out / "train-000000.tar").exists() and "other" not in json.loads((out / "_info.json").read_text())["splits"]


def test_max_bytes_cuts_greedily(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{i:02d}", "png": encode(i * 9, "PNG", size=8 + i), "cls": i % 4} for i in range(24)]
    cap = 6 * 1024
    info = write_shards(samples, tmp_path, classnames=CLASSES, max_bytes_per_shard=cap, progress=False)
    assert sum(info.shard_lengths) == 24 and len(info.shards) > 2
    members = [read_tar(p) for p in info.shards]
    for i, path in enumerate(info.shards):
        assert path.stat().st_size <= cap or info.shard_lengths[i] == 1
        if i + 1 < len(info.shards):
            # Independent check with tarfile's own writer: adding the next sample would overflow.
            nxt = members[i + 1][:2]
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, data in members[i] + nxt:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
            assert len(buf.getvalue()) > cap


@pytest.mark.parametrize(
    ("sample", "match"),
    [
        ({"__key__": "noimg", "cls": 1}, "'noimg'.*exactly one image"),
        ({"__key__": "twoimg", "jpg": encode(1, "JPEG"), "png": encode(1, "PNG"), "cls": 1}, "'twoimg'.*exactly one"),
        ({"__key__": "far", "png": encode(1, "PNG"), "cls": 4}, "'far'.*label 4 out of range"),
        ({"__key__": "neg", "png": encode(1, "PNG"), "cls": -1}, "'neg'.*out of range"),
        ({"__key__": "boolean", "png": encode(1, "PNG"), "cls": True}, "'boolean'.*must be an int"),
        ({"__key__": "nolabel", "png": encode(1, "PNG")}, "'nolabel'.*missing 'cls'"),
        ({"__key__": "liar", "jpg": encode(1, "PNG"), "cls": 0}, "'liar'.*not JPG data"),
        ({"__key__": "a.b", "png": encode(1, "PNG"), "cls": 0}, "'a.b'.*must not contain '.'"),
        ({"__key__": "extra", "png": encode(1, "PNG"), "cls": 0, "json": b"{}"}, "'extra'.*unexpected entries"),
        ({"__key__": "item001", "png": encode(1, "PNG"), "cls": 0}, "'item001'.*duplicate key"),
    ],
)
def test_invalid_sample_named_and_nothing_written(tmp_path: Path, sample: dict, match: str) -> None:
    good = make_samples(3)
    with pytest.raises(ValueError, match=match):
        write_shards([*good, sample], tmp_path / "ds", classnames=CLASSES, max_samples_per_shard=1, progress=False)
    # The shards already written for the good samples were temporary and are gone.
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == []


def test_same_samples_same_bytes(tmp_path: Path) -> None:
    samples = make_samples(12)
    a = write_shards(samples, tmp_path / "a" / "ds", classnames=CLASSES, max_samples_per_shard=5, progress=True, total=12)
    b = write_shards(samples, tmp_path / "b" / "ds", classnames=CLASSES, max_samples_per_shard=5, progress=False)
    for pa, pb in zip(a.shards, b.shards, strict=True):
        assert pa.read_bytes() == pb.read_bytes()


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def save(path: Path, value: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, 40, 200 - value)).save(path, format=fmt)


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def all_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        samples.update(group(read_tar(tar)))
    return samples


def test_cli_imagefolder_parallel_output_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "folder"
    for c, name in enumerate(["zebra", "ant", "moth"]):  # sorted → ant=0, moth=1, zebra=2
        for i in range(5):
            save(root / name / f"img{i}.jpg", 10 * i + c, "JPEG")
        save(root / name / "sub" / "deep.v2.png", 99, "PNG")
        save(root / name / "odd.bmp", 50 + c, "BMP")
    (root / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "ant" / "notes.txt").write_text("not an image")

    outs = []
    for workers in (1, 2):
        out = tmp_path / f"run{workers}" / "shards"
        args = ["--source", "imagefolder", "--input", str(root), "--output", str(out)]
        assert main([*args, "--max-samples", "4", "--workers", str(workers), "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert "wrote 21 samples of 3 classes in 6 shards" in printed and "skipped 1 unreadable" in printed
        outs.append(out)
    assert tree_files(outs[0]) == tree_files(outs[1])  # byte-identical whatever --workers

    out = outs[0]
    assert json.loads((out / "classnames.json").read_text()) == ["ant", "moth", "zebra"]
    samples = all_samples(out)
    assert "ant/broken" not in samples and len(samples) == 21
    for key, entry in samples.items():
        cls_name = key.split("/")[0]
        assert int(entry["cls"]) == ["ant", "moth", "zebra"].index(cls_name)
    # JPEG and PNG are stored as the original file bytes; BMP is re-encoded losslessly as PNG.
    assert samples["moth/img3"]["jpg"] == (root / "moth" / "img3.jpg").read_bytes()
    assert samples["zebra/sub/deep_v2"]["png"] == (root / "zebra" / "sub" / "deep.v2.png").read_bytes()
    bmp = np.asarray(Image.open(root / "ant" / "odd.bmp").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples["ant/odd"]["png"])).convert("RGB")), bmp)


def test_cli_csv_names_and_integers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(6):
        save(data / "imgs" / f"p{i}.png", i * 30, "PNG")
    rows = ["path,label", *[f"imgs/p{i}.png,{['owl', 'cat'][i % 2]}" for i in range(6)]]
    (data / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["--source", "csv", "--input", str(data / "list.csv"), "--output", str(out), "--no-progress"]) == 0
    assert json.loads((out / "classnames.json").read_text()) == ["cat", "owl"]
    samples = all_samples(out)
    assert {k: int(v["cls"]) for k, v in samples.items()} == {f"imgs/p{i}": 1 - i % 2 for i in range(6)}

    # TSV with integer labels, class names from a file, a third domain column.
    (data / "list.tsv").write_text("".join(f"imgs/p{i}.png\t{i % 3}\tsite{i % 2}\n" for i in range(6)))
    (data / "names.txt").write_text("red\ngreen\nblue\n")
    out2 = tmp_path / "out2"
    argv = ["--source", "csv", "--input", str(data / "list.tsv"), "--output", str(out2), "--no-progress"]
    assert main([*argv, "--classnames", str(data / "names.txt")]) == 0
    assert json.loads((out2 / "classnames.json").read_text()) == ["red", "green", "blue"]
    samples = all_samples(out2)
    assert {k: (int(v["cls"]), v["domain"].decode()) for k, v in samples.items()} == {
        f"imgs/p{i}": (i % 3, f"site{i % 2}") for i in range(6)
    }

    (data / "bad.csv").write_text("imgs/p0.png,owl\nimgs/p1.png,heron\n")
    (data / "two.txt").write_text("owl\ncat\n")
    with pytest.raises(SystemExit) as exc:
        main(["--source", "csv", "--input", str(data / "bad.csv"), "--output", str(tmp_path / "o3"), "--classnames", str(data / "two.txt")])
    assert exc.value.code == 2


def test_cli_domainbed_subset(tmp_path: Path) -> None:
    root = tmp_path / "PACS"
    layout = {"art": ["dog", "elephant"], "photo": ["dog", "elephant", "giraffe"], "sketch": ["dog", "giraffe"]}
    for d, classes in layout.items():
        for c in classes:
            for i in range(2):
                save(root / d / c / f"{i}.png", i, "PNG")
    out = tmp_path / "out"
    argv = ["--source", "domainbed", "--input", str(root), "--output", str(out), "--split", "train", "--no-progress"]
    assert main([*argv, "--domains", "sketch", "art"]) == 0
    # Class indices cover every domain, not only the chosen ones.
    assert json.loads((out / "classnames.json").read_text()) == ["dog", "elephant", "giraffe"]
    samples = all_samples(out)
    assert len(samples) == 8
    for key, entry in samples.items():
        domain, cls_name, _ = key.split("/")
        assert domain in ("art", "sketch") and entry["domain"].decode() == domain
        assert int(entry["cls"]) == ["dog", "elephant", "giraffe"].index(cls_name)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--domains", "cartoon"])
    assert exc.value.code == 2


def test_cli_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--source", "--input", "--output", "--split", "--prefix", "--max-samples", "--max-bytes",
                 "--workers", "--domains", "--classnames", "--no-progress"):
        assert flag in text
    proc = subprocess.run(
        [sys.executable, "-m", "clipood_plugin.data.make_shards", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--max-bytes" in proc.stdout
