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
byte-identical shards on every run, whatever ``--workers`` is.

The CLI (``clipood-make-shards``) reads an ImageFolder tree, a CSV/TSV of ``path,label`` or a
DomainBed tree ``root/<domain>/<class>/<image>``. Image files are fully decoded once to reject
unreadable ones (skipped with a counted warning); JPEG and PNG files are stored byte for byte,
other formats are re-encoded to PNG. With ``--workers N`` the reading and checking runs in a
process pool while one writer cuts shards from the ordered result, so shard boundaries, including
those set by ``--max-bytes``, do not depend on N.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import multiprocessing
import operator
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from clipood_plugin._io import atomic_path
from clipood_plugin.classnames import check_classnames

__all__ = [
    "IMAGE_EXTENSIONS",
    "ShardRecord",
    "ShardSetInfo",
    "Source",
    "csv_source",
    "domainbed_source",
    "imagefolder_source",
    "main",
    "write_shards",
]

_LOG = logging.getLogger(__name__)

#: Files a source scan treats as images (torchvision's ImageFolder list, plus .gif).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
_IMAGE_KEYS = ("jpg", "png")
_OPTIONAL_TEXT_KEYS = ("domain", "txt")
_ALLOWED_KEYS = frozenset({"__key__", "cls", *_IMAGE_KEYS, *_OPTIONAL_TEXT_KEYS})
_MAGIC = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
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
    if not data.startswith(_MAGIC[ext]):
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


# --------------------------------------------------------------------------------------------
# Sources for the CLI
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRecord:
    """One image file to write as a shard sample: its path, label, sample key and domain (if any)."""

    path: str
    label: int
    key: str
    domain: str | None = None


def _load_record(record: ShardRecord) -> tuple[dict | None, str | None]:
    """Read and fully decode one image file; return (sample, None) or (None, why it was skipped).

    Runs in pool workers, so it must be a module-level function of picklable arguments.
    """
    from PIL import Image

    try:
        data = Path(record.path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()  # decode now: a truncated file fails here, not in a training worker
            if fmt in ("JPEG", "MPO") and data.startswith(_MAGIC["jpg"]):
                ext, payload = "jpg", data
            elif fmt == "PNG" and data.startswith(_MAGIC["png"]):
                ext, payload = "png", data
            else:
                frame = img if img.mode in ("1", "L", "LA", "P", "RGB", "RGBA") else img.convert("RGB")
                buf = io.BytesIO()
                frame.save(buf, format="PNG")
                ext, payload = "png", buf.getvalue()
    except Exception as exc:  # PIL raises many types for bad files; all mean "unreadable"
        return None, f"{type(exc).__name__}: {exc}"
    sample: dict[str, Any] = {"__key__": record.key, ext: payload, "cls": record.label}
    if record.domain is not None:
        sample["domain"] = record.domain
    return sample, None


@dataclass
class Source:
    """A scanned source: the class list and the ordered records to load.

    :meth:`samples` yields the sample dicts :func:`write_shards` takes, reading and decoding the
    files (in a process pool when ``workers > 1``, results kept in record order). Unreadable
    files are skipped with a logged warning and counted in :attr:`num_unreadable`.
    """

    classnames: list[str]
    records: list[ShardRecord]
    num_unreadable: int = 0
    unreadable: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def samples(self, workers: int = 1) -> Iterator[dict]:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if workers == 1 or len(self.records) < 2:
            results: Iterable[tuple[dict | None, str | None]] = map(_load_record, self.records)
            yield from self._skipping(results)
            return
        chunk = max(1, min(32, len(self.records) // (4 * workers)))
        with multiprocessing.get_context().Pool(workers) as pool:
            yield from self._skipping(pool.imap(_load_record, self.records, chunksize=chunk))

    def _skipping(self, results: Iterable[tuple[dict | None, str | None]]) -> Iterator[dict]:
        for record, (sample, why) in zip(self.records, results):
            if sample is None:
                self.num_unreadable += 1
                self.unreadable.append(record.path)
                _LOG.warning("skipping unreadable image %s (%s); %d skipped so far", record.path, why, self.num_unreadable)
                continue
            yield sample


def _key_from_relpath(rel: PurePath) -> str:
    """Sample key from a path relative to the source root: no extension, no dots, '/' separators."""
    parts = [p for p in PurePosixPath(*rel.parts).parts if p not in ("", ".", "..", "/")]
    if not parts:
        raise ValueError(f"cannot derive a sample key from path {str(rel)!r}")
    parts[-1] = PurePosixPath(parts[-1]).stem
    return "/".join(p.replace(".", "_") for p in parts)


def _subdirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in sorted order (hidden files ignored)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found)


def _require_dir(root: str | os.PathLike[str]) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"input directory {str(path)!r} does not exist")
    return path


def imagefolder_source(root: str | os.PathLike[str]) -> Source:
    """``root/<class>/**/<image>``: classes are the sorted sub-folder names (torchvision's rule)."""
    base = _require_dir(root)
    classnames = _subdirs(base)
    if not classnames:
        raise ValueError(f"{str(base)!r} has no class sub-folders (expected root/<class>/<image>)")
    records = []
    for label, name in enumerate(classnames):
        files = _image_files(base / name)
        if not files:
            _LOG.warning("class folder %s holds no images", base / name)
        records.extend(ShardRecord(str(f), label, _key_from_relpath(f.relative_to(base))) for f in files)
    return Source(classnames, records)


def domainbed_source(root: str | os.PathLike[str], domains: Sequence[str] | None = None) -> Source:
    """``root/<domain>/<class>/<image>`` (DomainBed's layout); every sample gets a ``domain`` entry.

    The class list is the sorted union over *all* domains in ``root``, not just the selected
    ones, so a split of training domains and a split of the held-out domain share label indices.
    """
    base = _require_dir(root)
    all_domains = _subdirs(base)
    if not all_domains:
        raise ValueError(f"{str(base)!r} has no domain sub-folders (expected root/<domain>/<class>/<image>)")
    if domains:
        unknown = sorted(set(domains) - set(all_domains))
        if unknown:
            raise ValueError(f"unknown domains {unknown}; {str(base)!r} has {all_domains}")
        chosen = [d for d in all_domains if d in set(domains)]
    else:
        chosen = all_domains
    per_domain = {d: _subdirs(base / d) for d in all_domains}
    classnames = sorted(set().union(*per_domain.values()))
    if not classnames:
        raise ValueError(f"no class folders under the domains of {str(base)!r}")
    for d, classes in per_domain.items():
        if classes != classnames:
            _LOG.warning("domain %r lacks classes %s", d, sorted(set(classnames) - set(classes)))
    index = {name: i for i, name in enumerate(classnames)}
    records = []
    for d in chosen:
        for name in per_domain[d]:
            for f in _image_files(base / d / name):
                records.append(ShardRecord(str(f), index[name], _key_from_relpath(f.relative_to(base)), d))
    return Source(classnames, records)


_CSV_HEADER_NAMES = frozenset({"path", "file", "filename", "filepath", "image", "image_path", "img"})


def _read_classnames_file(path: str | os.PathLike[str], allow_duplicates: bool = False) -> list[str]:
    """A class list from a JSON list or a text file with one name per line."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        names = json.loads(text)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    return check_classnames(names, allow_duplicates=allow_duplicates, what=str(path))


def csv_source(path: str | os.PathLike[str], classnames: Sequence[str] | None = None, *,
               allow_duplicates: bool = False) -> Source:
    """Rows ``path,label[,domain]`` (tab-separated for ``.tsv``); paths relative to the CSV's folder.

    The first row is a header when its first field is a column name like ``path`` or ``image``.
    Labels are either all integers (class indices; names default to ``"0"``, ``"1"``, … unless
    ``classnames`` is given) or class names (sorted unless ``classnames`` fixes the order).
    Rows keep the file's order.
    """
    table = Path(path)
    if not table.is_file():
        raise FileNotFoundError(f"CSV file {str(table)!r} does not exist")
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    with open(table, newline="", encoding="utf-8") as fh:
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(fh, delimiter=delimiter), 1)]
    rows = [(n, row) for n, row in rows if any(row)]
    if rows and rows[0][1][0].lower() in _CSV_HEADER_NAMES:
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{str(table)!r} has no data rows")
    for n, row in rows:
        if len(row) < 2 or len(row) > 3 or not row[0] or not row[1]:
            raise ValueError(f"{table}:{n}: expected 'path,label[,domain]', got {row!r}")
    fixed = (check_classnames(classnames, allow_duplicates=allow_duplicates, what=str(table))
             if classnames is not None else None)
    labels = [row[1] for _, row in rows]
    if all(re.fullmatch(r"-?\d+", x) for x in labels):
        indices = [int(x) for x in labels]
        for (n, _), i in zip(rows, indices):
            if i < 0 or (fixed is not None and i >= len(fixed)):
                limit = len(fixed) if fixed is not None else "inf"
                raise ValueError(f"{table}:{n}: label {i} out of range [0, {limit})")
        names = fixed if fixed is not None else [str(i) for i in range(max(indices) + 1)]
        if fixed is None:
            _LOG.warning("integer labels and no class names given; naming classes '0'..'%d'", len(names) - 1)
    else:
        names = fixed if fixed is not None else sorted(set(labels))
        index = {name: i for i, name in enumerate(names)}
        for n, row in rows:
            if row[1] not in index:
                raise ValueError(f"{table}:{n}: label {row[1]!r} is not among the given class names")
        indices = [index[x] for x in labels]
    records = []
    for (_, row), label in zip(rows, indices):
        rel = PurePath(row[0].replace("\\", "/"))
        file = rel if rel.is_absolute() else table.parent / rel
        domain = row[2] if len(row) == 3 and row[2] else None
        records.append(ShardRecord(str(file), label, _key_from_relpath(rel), domain))
    return Source(names, records)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    """``123``, ``500K``, ``64M``, ``1G`` (binary multiples) → bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1000000, 500K, 64M, 1G)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]
    value = int(match.group(1)) * scale
    if value < 1:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipood-make-shards",
        description=(
            "Pack an image-classification dataset into WebDataset tar shards (<key>.jpg|png, <key>.cls, "
            "optional <key>.domain) with classnames.json, timm's _info.json and open_clip's sizes.json "
            "beside them. JPEG/PNG files are stored unchanged, other formats re-encoded to PNG, "
            "unreadable files skipped and counted. Output is byte-identical for any --workers."
        ),
    )
    parser.add_argument(
        "--source",
        required=True,
        choices=("imagefolder", "csv", "domainbed"),
        help="input layout: imagefolder = INPUT/<class>/<image>; csv = a CSV/TSV of path,label[,domain] "
        "(labels are class names or integer indices; a header row is allowed); "
        "domainbed = INPUT/<domain>/<class>/<image>",
    )
    parser.add_argument("--input", required=True, metavar="PATH", help="the dataset root folder, or the CSV/TSV file")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for the shards and metadata")
    parser.add_argument(
        "--split", default="train", metavar="NAME", help="split name recorded in _info.json (default: train)"
    )
    parser.add_argument("--prefix", default=None, metavar="NAME", help="shard file prefix (default: the split name)")
    parser.add_argument(
        "--max-samples", type=_positive_int, default=1000, metavar="N", help="samples per shard at most (default: 1000)"
    )
    parser.add_argument(
        "--max-bytes",
        type=_parse_size,
        default=None,
        metavar="N",
        help="bytes per shard file at most, e.g. 500000000, 500M or 1G (default: no limit)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="processes reading and checking images (default: 1); the output does not depend on it",
    )
    parser.add_argument(
        "--domains",
        nargs="+",
        default=None,
        metavar="D",
        help="domainbed only: the domains to include (default: all); class indices always cover all domains",
    )
    parser.add_argument(
        "--classnames",
        default=None,
        metavar="FILE",
        help="csv only: class names in index order (JSON list, or one name per line)",
    )
    parser.add_argument(
        "--allow-duplicate-classnames",
        action="store_true",
        help="accept class names that repeat after '_' -> space (ImageNet's standard list names two classes "
        "'missile'); by default a repeat is an error",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``clipood-make-shards`` / ``python -m clipood_plugin.data.make_shards``."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.domains and args.source != "domainbed":
        parser.error("--domains applies to --source domainbed only")
    if args.classnames and args.source != "csv":
        parser.error("--classnames applies to --source csv only")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.source == "imagefolder":
            source = imagefolder_source(args.input)
        elif args.source == "domainbed":
            source = domainbed_source(args.input, args.domains)
        else:
            dup = args.allow_duplicate_classnames
            names = _read_classnames_file(args.classnames, dup) if args.classnames else None
            source = csv_source(args.input, names, allow_duplicates=dup)
        if not source.records:
            raise ValueError(f"no image files found under {args.input!r}")
        info = write_shards(
            source.samples(args.workers),
            args.output,
            classnames=source.classnames,
            split=args.split,
            prefix=args.prefix,
            max_samples_per_shard=args.max_samples,
            max_bytes_per_shard=args.max_bytes,
            progress=not args.no_progress,
            total=len(source),
            allow_duplicates=args.allow_duplicate_classnames,
        )
    except (ValueError, TypeError, OSError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(
        f"wrote {info.num_samples} samples of {len(source.classnames)} classes in {len(info.shards)} shards: "
        f"{info.pattern}"
    )
    if source.num_unreadable:
        print(f"skipped {source.num_unreadable} unreadable image files (see warnings above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
