"""Write image-classification samples into WebDataset tar shards, plus the metadata readers expect.

A shard is a plain tar whose members are ``<key>.<ext>`` files; webdataset groups consecutive
members with the same key into one sample. We write, per sample, in this order:

- ``<key>.jpg`` or ``<key>.png`` — the encoded image, stored as given (never re-encoded here);
- ``<key>.cls`` — the class index as ASCII digits (timm's ``target_key='cls'``);
- ``<key>.domain`` — optional domain name (DomainBed), UTF-8;
- ``<key>.txt`` — optional caption, UTF-8 (open_clip's ``text`` key).

Beside the shards, updated per split so train and val can share one directory:

- ``classnames.json`` — the class list (index → name), shared by every split in the directory;
- ``_info.json`` — timm's ``ReaderWds`` split metadata (``splits.<split>.{name, num_samples,
  filenames, shard_lengths}``);
- ``sizes.json`` — open_clip's map from shard basename to sample count.

Every file is written atomically (temporary file + ``os.replace``), and the shard files of one
call only appear once the whole split has been written: a crash or a bad sample halfway leaves
the directory as it was. Tar headers carry no timestamps or owners, so the same samples give
byte-identical shards on every run.

Samples come from anywhere; :mod:`clipood_plugin.data.shard_sources` reads them from image
files, and :mod:`clipood_plugin.data.make_shards` is the command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import operator
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipood_plugin._io import atomic_path
from clipood_plugin.classnames import check_classnames

__all__ = ["IMAGE_MAGIC", "ShardSetInfo", "write_shards"]

_IMAGE_KEYS = ("jpg", "png")
_OPTIONAL_TEXT_KEYS = ("domain", "txt")
_ALLOWED_KEYS = frozenset({"__key__", "cls", *_IMAGE_KEYS, *_OPTIONAL_TEXT_KEYS})
#: The bytes a stored image starts with, by sample key: a ``jpg`` entry must be JPEG data, a ``png`` PNG.
IMAGE_MAGIC: dict[str, bytes] = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
_TAR_FORMAT = tarfile.PAX_FORMAT
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ShardSetInfo:
    """What :func:`write_shards` wrote for one split."""

    split: str
    out_dir: Path
    shards: tuple[Path, ...]
    shard_lengths: tuple[int, ...]
    num_samples: int
    #: Brace pattern covering the shards, e.g. ``dir/train-{000000..000003}.tar``; feed it to the loaders.
    pattern: str


# --------------------------------------------------------------------------------------------
# Validation and tar members
# --------------------------------------------------------------------------------------------


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{what} must be a plain file-name fragment (letters, digits, '_', '-', '.'), got {value!r}")
    return value


def _check_key(key: Any) -> str:
    """Keys become tar member names ``<key>.<ext>``; reject what webdataset would misread.

    webdataset splits a member name at the *first* dot of its last path component, so a dot
    there would cut the key short; ``__name__`` directories are skipped as metadata.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    parts = key.split("/")
    if "." in parts[-1]:
        raise ValueError(f"sample {key!r}: key must not contain '.' after its last '/' (webdataset splits there)")
    for part in parts:
        if part in ("", ".", "..") or (part.startswith("__") and part.endswith("__")):
            raise ValueError(f"sample {key!r}: key has an empty, relative or '__meta__' path component {part!r}")
    if any(ord(ch) < 32 for ch in key):
        raise ValueError(f"sample {key!r}: key contains control characters")
    return key


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, data


def _members_for(sample: Any, num_classes: int, seen: set[str]) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Validate one sample dict and return its tar members in the fixed order."""
    if not isinstance(sample, dict):
        raise TypeError(f"each sample must be a dict, got {type(sample).__name__}")
    key = _check_key(sample.get("__key__"))
    if key in seen:
        raise ValueError(f"sample {key!r}: duplicate key")
    unknown = sorted(set(sample) - _ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"sample {key!r}: unexpected entries {unknown}; allowed: {sorted(_ALLOWED_KEYS)}")
    images = [k for k in _IMAGE_KEYS if k in sample]
    if len(images) != 1:
        raise ValueError(f"sample {key!r}: needs exactly one image entry ('jpg' or 'png'), found {images}")
    ext = images[0]
    data = sample[ext]
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ValueError(f"sample {key!r}: {ext!r} must be non-empty encoded bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(IMAGE_MAGIC[ext]):
        raise ValueError(f"sample {key!r}: {ext!r} entry is not {ext.upper()} data (starts with {data[:8]!r})")
    if "cls" not in sample:
        raise ValueError(f"sample {key!r}: missing 'cls' label")
    label = sample["cls"]
    try:
        if isinstance(label, bool):
            raise TypeError
        label = operator.index(label)
    except TypeError:
        raise ValueError(f"sample {key!r}: 'cls' must be an int, got {label!r}") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"sample {key!r}: label {label} out of range [0, {num_classes})")
    members = [_member(f"{key}.{ext}", data), _member(f"{key}.cls", str(label).encode("ascii"))]
    for name in _OPTIONAL_TEXT_KEYS:
        if name in sample:
            text = sample[name]
            if not isinstance(text, str):
                raise ValueError(f"sample {key!r}: {name!r} must be a str, got {type(text).__name__}")
            members.append(_member(f"{key}.{name}", text.encode("utf-8")))
    seen.add(key)
    return members


def _member_bytes(info: tarfile.TarInfo) -> int:
    """Exact bytes a member takes in the archive: header(s) plus data padded to a block."""
    header = len(info.tobuf(_TAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    return header + math.ceil(info.size / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _archive_bytes(member_bytes: int) -> int:
    """Final file size: members, the end-of-archive blocks, padded to tarfile's record size."""
    return math.ceil((member_bytes + _END_OF_ARCHIVE) / tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardFile:
    """One open shard: a deterministic tar at a temporary path."""

    def __init__(self, path: Path) -> None:
        self._tar: tarfile.TarFile | None = tarfile.open(path, "w", format=_TAR_FORMAT)  # noqa: SIM115 (closed by close())
        self.count = 0
        self.member_bytes = 0

    def add(self, members: list[tuple[tarfile.TarInfo, bytes]], nbytes: int) -> None:
        assert self._tar is not None
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.member_bytes += nbytes

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> _ShardFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None, description: str) -> Iterator[Any]:
    """A rich progress bar on stderr (stdout stays clean for the CLI summary), or a no-op."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_existing_metadata(out: Path, split: str, classnames: list[str], filenames: Iterable[str]) -> None:
    """Refuse to mix class lists in one directory, or to overwrite another split's shards."""
    existing = _read_json(out / "classnames.json")
    if existing is not None and existing != classnames:
        raise ValueError(
            f"{out / 'classnames.json'} holds a different class list ({len(existing)} classes); splits sharing "
            "a directory must share classes. Use another --output directory."
        )
    info = _read_json(out / "_info.json") or {}
    owner = {f: name for name, s in info.get("splits", {}).items() if name != split for f in s.get("filenames", ())}
    clash = sorted(f for f in filenames if f in owner)
    if clash:
        raise ValueError(f"shard {clash[0]!r} belongs to split {owner[clash[0]]!r}; pick another prefix")


def _update_metadata(out: Path, split: str, classnames: list[str], names: list[str], lengths: list[int]) -> None:
    """Write classnames.json, and fold this split into _info.json and sizes.json."""
    if _read_json(out / "classnames.json") is None:
        _write_json(out / "classnames.json", classnames)
    info = _read_json(out / "_info.json") or {"name": out.name, "splits": {}}
    old = info.setdefault("splits", {}).get(split, {}).get("filenames", [])
    info["splits"][split] = {
        "name": split,
        "num_samples": sum(lengths),
        "filenames": names,
        "shard_lengths": lengths,
    }
    sizes = _read_json(out / "sizes.json") or {}
    for name in old:
        sizes.pop(name, None)
    sizes.update(zip(names, lengths))
    _write_json(out / "_info.json", info)
    _write_json(out / "sizes.json", sizes)
    for name in set(old) - set(names):  # shards a previous, longer write of this split left behind
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def _brace_pattern(out: Path, prefix: str, n: int) -> str:
    if n == 1:
        return str(out / f"{prefix}-000000.tar")
    return str(out / f"{prefix}-{{000000..{n - 1:06d}}}.tar")


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike[str],
    *,
    classnames: Sequence[str],
    split: str = "train",
    prefix: str | None = None,
    max_samples_per_shard: int = 1000,
    max_bytes_per_shard: int | None = None,
    progress: bool = True,
    total: int | None = None,
    allow_duplicates: bool = False,
) -> ShardSetInfo:
    """Write ``samples`` as WebDataset shards ``<prefix or split>-000000.tar``, … in ``out_dir``.

    Args:
        samples: dicts with ``"__key__"`` (unique str), exactly one of ``"jpg"`` / ``"png"``
            (encoded bytes, stored as given), ``"cls"`` (int in ``[0, len(classnames))``) and
            optionally ``"domain"`` and ``"txt"`` (str). Consumed once, in order.
        out_dir: destination directory (created if needed); may already hold other splits.
        classnames: class names by index; must equal any ``classnames.json`` already there, and
            follow :func:`~clipood_plugin.classnames.check_classnames` (no two equal after
            ``_`` → space unless ``allow_duplicates``).
        split: split name recorded in ``_info.json``.
        prefix: shard file-name prefix (default: ``split``).
        max_samples_per_shard: start a new shard after this many samples.
        max_bytes_per_shard: start a new shard before the tar file would exceed this size; a
            shard goes over it only when a single sample is larger.
        progress: show a rich progress bar on stderr.
        total: number of samples, for the progress bar only.

    Raises:
        ValueError: for an invalid sample (the message names its key: missing image, label out of
            range, duplicate key, …), an empty ``samples``, or a directory whose metadata
            conflicts. Nothing is replaced in ``out_dir`` when it raises.
    """
    names = check_classnames(classnames, allow_duplicates=allow_duplicates, what="write_shards")
    split = _check_name(split, "split")
    prefix = _check_name(prefix if prefix is not None else split, "prefix")
    if isinstance(max_samples_per_shard, bool) or not isinstance(max_samples_per_shard, int) or max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be a positive int, got {max_samples_per_shard!r}")
    if max_bytes_per_shard is not None and (not isinstance(max_bytes_per_shard, int) or max_bytes_per_shard < 1):
        raise ValueError(f"max_bytes_per_shard must be a positive int or None, got {max_bytes_per_shard!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_existing_metadata(out, split, names, [])

    paths: list[Path] = []
    lengths: list[int] = []
    seen: set[str] = set()
    # Every shard stays a temporary file until the last one is written; leaving the stack
    # normally renames them all into place, an exception removes them all.
    with contextlib.ExitStack() as pending, _progress_bar(progress, total, f"writing {split}") as advance:
        shard: _ShardFile | None = None
        for sample in samples:
            members = _members_for(sample, len(names), seen)
            nbytes = sum(_member_bytes(info) for info, _ in members)
            if shard is not None and (
                shard.count >= max_samples_per_shard
                or (max_bytes_per_shard is not None and _archive_bytes(shard.member_bytes + nbytes) > max_bytes_per_shard)
            ):
                shard.close()
                lengths.append(shard.count)
                shard = None
            if shard is None:
                path = out / f"{prefix}-{len(paths):06d}.tar"
                tmp = pending.enter_context(atomic_path(path))
                shard = pending.enter_context(_ShardFile(tmp))
                paths.append(path)
            shard.add(members, nbytes)
            advance()
        if shard is None:
            raise ValueError(f"no samples to write for split {split!r}")
        shard.close()
        lengths.append(shard.count)
        _check_existing_metadata(out, split, names, [p.name for p in paths])

    _update_metadata(out, split, names, [p.name for p in paths], lengths)
    return ShardSetInfo(
        split=split,
        out_dir=out,
        shards=tuple(paths),
        shard_lengths=tuple(lengths),
        num_samples=sum(lengths),
        pattern=_brace_pattern(out, prefix, len(paths)),
    )

