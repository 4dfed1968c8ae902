"""Image files as shard samples: ImageFolder, DomainBed and CSV/TSV sources for :func:`write_shards`.

A source is a scan: the class list and the ordered :class:`ShardRecord` s (file, label, sample
key, domain) to write. :meth:`Source.samples` reads the files when the writer asks for them:
each image is fully decoded once to reject unreadable ones (skipped with a counted warning);
JPEG and PNG files are stored byte for byte, other formats are re-encoded to PNG. With
``workers > 1`` the reading and checking runs in a process pool while the writer cuts shards
from the ordered result, so shard boundaries do not depend on the number of workers.

Layouts: an ImageFolder tree ``root/<class>/<image>`` (:func:`imagefolder_source`), a DomainBed
tree ``root/<domain>/<class>/<image>`` (:func:`domainbed_source`), or a CSV/TSV of
``path,label[,domain]`` (:func:`csv_source`).
"""

from __future__ import annotations

import csv
import io
import logging
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from clipood_plugin.classnames import check_classnames
from clipood_plugin.data.shard_writer import IMAGE_MAGIC

__all__ = [
    "IMAGE_EXTENSIONS",
    "ShardRecord",
    "Source",
    "csv_source",
    "domainbed_source",
    "imagefolder_source",
]

_LOG = logging.getLogger(__name__)

#: Files a source scan treats as images (torchvision's ImageFolder list, plus .gif).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)


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
            if fmt in ("JPEG", "MPO") and data.startswith(IMAGE_MAGIC["jpg"]):
                ext, payload = "jpg", data
            elif fmt == "PNG" and data.startswith(IMAGE_MAGIC["png"]):
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
