"""Which shard URLs we open, and how: brace expansion, the ``pipe:`` policy, fsspec for object stores.

webdataset opens shards through ``webdataset.gopen``, a table of URL scheme → opener. Out of the
box that table has no ``s3://`` entry at all (webdataset#184), reads ``gs://`` through the
``gsutil`` command line tool, and has a ``pipe:`` scheme that hands the rest of the URL to a shell.
This module sets the policy the streaming pipeline applies before it opens anything:

- local paths and ``file://`` are read directly; a directory stands for its sorted ``*.tar`` files;
- ``pipe:`` URLs run a shell command, so they are refused unless the caller opts in
  (``allow_pipe=True``), and always refused under webdataset's ``WDS_SECURE=1``;
- ``s3://``, ``gs://``, ``gcs://``, ``az://``, ``abfs://``, ``http(s)://`` (and fsspec's built-in
  ``memory://``) are read through fsspec, which :func:`register_fsspec_handlers` plugs into the
  gopen table. A missing backend package is reported by name (``pip install s3fs``) at start-up,
  not as an opaque failure inside a DataLoader worker.
- any other scheme is an error naming the scheme.

:func:`read_json` reads the ``sizes.json`` / ``_info.json`` metadata beside the shards through
the same layer, so the sample count of a bucket-hosted dataset is found the same way as a local one.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

__all__ = [
    "FSSPEC_SCHEMES",
    "check_url",
    "expand_urls",
    "is_local",
    "local_path",
    "read_json",
    "register_fsspec_handlers",
    "sibling_url",
    "url_scheme",
]

#: Schemes read through fsspec, mapped to the pip package that provides the backend
#: (``None``: built into fsspec). fsspec's own HTTP backend needs aiohttp and requests.
FSSPEC_SCHEMES: dict[str, str | None] = {
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "http": "aiohttp requests",
    "https": "aiohttp requests",
    "memory": None,
}


def url_scheme(url: str) -> str:
    """The URL's scheme in lower case; ``""`` for a plain local path (a Windows drive letter too)."""
    if url.startswith("pipe:"):  # urlparse would accept it, but be explicit: the rest is a command
        return "pipe"
    scheme = urlparse(url).scheme.lower()
    return "" if len(scheme) <= 1 else scheme


def is_local(url: str) -> bool:
    """True for a local path or a ``file://`` URL."""
    return url_scheme(url) in ("", "file")


def local_path(url: str) -> Path:
    """The filesystem path of a local path or ``file://`` URL."""
    if url_scheme(url) == "file":
        return Path(url2pathname(urlparse(url).path))
    return Path(url)


def _pipe_allowed_by_env() -> bool:
    """webdataset's ``WDS_SECURE=1`` switches ``pipe:`` off globally; respect it here too."""
    return not bool(int(os.environ.get("WDS_SECURE", "0") or 0))


def _require_backend(url: str, scheme: str) -> None:
    """Import the fsspec filesystem class for ``scheme``; on failure name the package to install."""
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package = FSSPEC_SCHEMES.get(scheme) or scheme
        raise ImportError(
            f"{url!r}: reading '{scheme}://' URLs needs the fsspec backend package(s) {package!r}; "
            f"install with `pip install {package}`"
        ) from exc


def check_url(url: str, allow_pipe: bool = False) -> str:
    """Check that ``url`` may be opened under the policy above; return its scheme (``""`` if local).

    Raises:
        ValueError: for a ``pipe:`` URL without ``allow_pipe`` (or with ``WDS_SECURE=1``), and for
            a scheme we do not know how to read (the message names it).
        ImportError: when the fsspec backend for an object-store scheme is not installed (the
            message names the pip package).
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"shard URL must be a non-empty string, got {url!r}")
    scheme = url_scheme(url)
    if scheme in ("", "file"):
        return scheme
    if scheme == "pipe":
        if not allow_pipe:
            raise ValueError(
                f"{url!r}: 'pipe:' URLs run a shell command; refusing to open it. Pass allow_pipe=True "
                "(recipes: --allow-pipe) only for URLs you wrote yourself"
            )
        if not _pipe_allowed_by_env():
            raise ValueError(f"{url!r}: 'pipe:' URLs are disabled by WDS_SECURE=1")
        return scheme
    if scheme in FSSPEC_SCHEMES:
        _require_backend(url, scheme)
        return scheme
    known = ", ".join(f"{s}://" for s in FSSPEC_SCHEMES)
    raise ValueError(
        f"{url!r}: unsupported URL scheme {scheme!r}; use a local path, file://, {known} or pipe: (opt-in)"
    )


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """A ``webdataset.gopen`` opener reading through fsspec; returns an already-open file object."""
    import fsspec

    scheme = url_scheme(url)
    _require_backend(url, scheme)
    return fsspec.open(url, mode).open()


def register_fsspec_handlers() -> list[str]:
    """Install fsspec-backed openers in ``webdataset.gopen_schemes`` for :data:`FSSPEC_SCHEMES`.

    Idempotent (the same function object is stored each time). Every scheme is registered, even
    when its backend is missing, so a missing ``s3fs`` surfaces as an ImportError naming the package
    rather than webdataset's generic "no gopen handler defined". The streaming pipeline calls this
    inside each DataLoader worker too, so it also holds under the ``spawn`` start method, where
    workers start with webdataset's default table. Returns the registered schemes.
    """
    import webdataset

    for scheme in FSSPEC_SCHEMES:
        webdataset.gopen_schemes[scheme] = _fsspec_gopen
    return list(FSSPEC_SCHEMES)


def _expand_one(pattern: str) -> list[str]:
    """Brace-expand one URL pattern; a directory (local, or remote ending in '/') → its sorted tars."""
    import braceexpand

    out: list[str] = []
    for url in braceexpand.braceexpand(pattern):
        if is_local(url):
            path = local_path(url)
            if path.is_dir():
                tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
                if not tars:
                    raise ValueError(f"{url!r}: directory holds no *.tar shards")
                out.extend(str(p) for p in tars)
                continue
        elif url.endswith("/") and url_scheme(url) in FSSPEC_SCHEMES:
            import fsspec

            _require_backend(url, url_scheme(url))
            fs, root = fsspec.core.url_to_fs(url)
            tars = sorted(fs.glob(posixpath.join(root, "*.tar")))
            if not tars:
                raise ValueError(f"{url!r}: directory holds no *.tar shards")
            out.extend(f"{url.rstrip('/')}/{posixpath.basename(t)}" for t in tars)  # keep the caller's spelling
            continue
        out.append(url)
    return out


def expand_urls(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand a shard specification into the ordered list of shard URLs.

    ``spec`` is a string or a sequence of strings. Each string may hold several sources separated
    by ``::`` (open_clip's convention), each of which may use brace patterns (``train-{000..009}.tar``).
    A local directory (or a remote fsspec URL ending in ``/``) stands for its sorted ``*.tar`` files.
    Environment variables are *not* substituted (webdataset's ``${WDS_...}`` rule would be a second,
    surprising expansion language).

    Raises:
        ValueError: if the specification expands to nothing.
    """
    items: list[str]
    if isinstance(spec, (str, os.PathLike)):
        items = [os.fspath(spec)]
    elif isinstance(spec, Sequence):
        items = [os.fspath(s) for s in spec]
    else:
        raise TypeError(f"shard spec must be a string or a sequence of strings, got {type(spec).__name__}")
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"shard spec entries must be strings, got {item!r}")
        for part in item.split("::"):
            if part.strip():
                urls.extend(_expand_one(part.strip()))
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no URLs")
    return urls


def sibling_url(url: str, name: str) -> str:
    """The URL of file ``name`` in the same directory as ``url`` (local path or remote URL)."""
    if is_local(url):
        return str(local_path(url).parent / name)
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}"


def read_json(url: str, *, missing_ok: bool = False) -> Any:
    """Read a JSON file from a local path, ``file://`` or an fsspec URL.

    With ``missing_ok`` a file that does not exist gives ``None`` instead of FileNotFoundError
    (used to probe for ``sizes.json`` / ``_info.json``).
    """
    if is_local(url):
        path = local_path(url)
        if missing_ok and not path.exists():
            return None
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    scheme = check_url(url)
    if scheme not in FSSPEC_SCHEMES:
        raise ValueError(f"{url!r}: metadata can be read from local paths or fsspec URLs only")
    import fsspec

    try:
        with fsspec.open(url, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
