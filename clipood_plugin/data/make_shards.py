"""``clipood-make-shards``: pack an image dataset into WebDataset shards from the command line.

The CLI reads an ImageFolder tree, a CSV/TSV of ``path,label`` or a DomainBed tree
``root/<domain>/<class>/<image>`` (:mod:`clipood_plugin.data.shard_sources`) and writes them with
:func:`write_shards` (:mod:`clipood_plugin.data.shard_writer`: the shard layout and metadata).
Image files are fully decoded once to reject unreadable ones (skipped with a counted warning);
JPEG and PNG files are stored byte for byte, other formats are re-encoded to PNG. With
``--workers N`` the reading and checking runs in a process pool while one writer cuts shards
from the ordered result, so shard boundaries, including those set by ``--max-bytes``, do not
depend on N.

The writer's and the sources' public names are re-exported here, so
``from clipood_plugin.data.make_shards import write_shards`` keeps working.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from clipood_plugin.classnames import check_classnames
from clipood_plugin.data.shard_sources import (
    IMAGE_EXTENSIONS,
    ShardRecord,
    Source,
    csv_source,
    domainbed_source,
    imagefolder_source,
)
from clipood_plugin.data.shard_writer import ShardSetInfo, write_shards

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


def _read_classnames_file(path: str | os.PathLike[str], allow_duplicates: bool = False) -> list[str]:
    """A class list from a JSON list or a text file with one name per line."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        names = json.loads(text)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    return check_classnames(names, allow_duplicates=allow_duplicates, what=str(path))


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
