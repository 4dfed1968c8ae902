"""Which shard URLs we open, and how: brace expansion, the ``pipe:`` policy, object-store openers.

webdataset opens shards through ``webdataset.gopen``, a table of URL scheme → opener. That table
reads ``http(s)://`` with ``curl``, ``gs://`` with ``gsutil``, ``hf://`` through huggingface_hub
and ``curl`` (and ``sftp``, ``scp``, ``ais``, … in the same way), has no ``s3://`` entry at all
(webdataset#184), and has a ``pipe:`` scheme that hands the rest of the URL to a shell. This
module sets the policy the streaming pipeline applies before it opens anything:

- local paths and ``file://`` are read directly; a directory stands for its sorted ``*.tar`` files;
- ``pipe:`` URLs run a shell command, so they are refused unless the caller opts in
  (``allow_pipe=True``), and always refused under webdataset's ``WDS_SECURE=1``;
- the schemes webdataset lacks, ``s3://``, ``gcs://``, ``az://``, ``abfs://`` (and fsspec's
  built-in ``memory://``), are read through fsspec (:data:`FSSPEC_SCHEMES`), which
  :func:`register_fsspec_handlers` plugs into the gopen table. A missing backend package is
  reported by name (``pip install s3fs``) at start-up, not as an opaque failure inside a
  DataLoader worker;
- the schemes webdataset opens itself keep webdataset's openers (:func:`webdataset_schemes`), so
  a base install reads ``https://`` shards with ``curl`` and needs no aiohttp;
- any other scheme is an error naming the scheme.

The endpoint of an S3-compatible store (MinIO, Ceph, a local test server) is given the standard
way, read by s3fs / botocore themselves: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), or
fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``, or ``endpoint_url`` in an fsspec config file).

:func:`read_json` reads the ``sizes.json`` / ``_info.json`` metadata beside the shards through
fsspec, so the sample count of a bucket-hosted dataset is found the same way as a local one; for
a scheme webdataset opens itself that needs fsspec's backend for the scheme (aiohttp for
``https://``), and without it the count is unknown (:func:`metadata_readable`).

A store that cannot be reached is not bad data: :func:`is_network_failure` tells the two apart,
and :class:`ShardStoreError` is the error that names the shard and the store. We add no retries
of our own; the client's apply (botocore's ``AWS_MAX_ATTEMPTS``, s3fs's ``retries``). The trap: a
store that stops *answering* rather than refusing is only noticed at the client's read timeout,
60 s per attempt in botocore; set it in fsspec's configuration, e.g.
``fsspec.config.conf["s3"] = {"config_kwargs": {"read_timeout": 10}}`` (or the same JSON in
``FSSPEC_S3`` before fsspec is imported).

Network failures are recognised on the fsspec path (s3fs, gcsfs, adlfs, fsspec's HTTP) and from
the exit status of webdataset's ``curl`` opener (``http(s)://``, ``hf://``). ``gsutil`` (webdataset's
``gs://``) exits 1 for every failure, so a ``gs://`` shard it cannot fetch is still counted as an
unreadable shard.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

__all__ = [
    "FSSPEC_SCHEMES",
    "ShardStoreError",
    "check_url",
    "describe_store",
    "expand_urls",
    "is_local",
    "is_network_failure",
    "local_path",
    "metadata_readable",
    "read_json",
    "register_fsspec_handlers",
    "sibling_url",
    "url_scheme",
    "webdataset_schemes",
]

#: Schemes webdataset's gopen table lacks, read through fsspec, mapped to the pip package that
#: provides the backend (``None``: built into fsspec).
FSSPEC_SCHEMES: dict[str, str | None] = {
    "s3": "s3fs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "memory": None,
}


def webdataset_schemes() -> frozenset[str]:
    """The schemes webdataset's own gopen table opens (``http``, ``https``, ``gs``, ``hf``, …), ``pipe`` aside.

    Read from the installed webdataset's table, so a scheme an older release lacks is refused
    here rather than failing inside a worker; our fsspec entries are not counted.
    """
    import webdataset

    table = webdataset.gopen_schemes
    return frozenset(k for k, opener in table.items()
                     if k not in ("__default__", "pipe") and k not in FSSPEC_SCHEMES and opener is not _fsspec_gopen)


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
    theirs = webdataset_schemes()
    if scheme in theirs:
        return scheme
    known = ", ".join(f"{s}://" for s in [*FSSPEC_SCHEMES, *sorted(theirs)])
    raise ValueError(
        f"{url!r}: unsupported URL scheme {scheme!r}; use a local path, file://, {known} or pipe: (opt-in)"
    )


def metadata_readable(url: str) -> bool:
    """Whether :func:`read_json` can read files beside ``url``: local, or an fsspec backend for its scheme is installed."""
    if is_local(url):
        return True
    scheme = url_scheme(url)
    if scheme == "pipe":
        return False
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        return False
    return True


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """A ``webdataset.gopen`` opener reading through fsspec; returns an already-open file object."""
    import fsspec

    scheme = url_scheme(url)
    _require_backend(url, scheme)
    return fsspec.open(url, mode).open()


def register_fsspec_handlers() -> list[str]:
    """Install fsspec-backed openers in ``webdataset.gopen_schemes`` for :data:`FSSPEC_SCHEMES` only.

    The schemes webdataset opens itself keep its openers (the trap: replacing its ``https``
    opener with fsspec's would make a base install ask for aiohttp). Idempotent (the same
    function object is stored each time). Every fsspec scheme is registered, even when its
    backend is missing, so a missing ``s3fs`` surfaces as an ImportError naming the package
    rather than webdataset's generic "no gopen handler defined". The streaming pipeline calls
    this inside each DataLoader worker too, so it also holds under the ``spawn`` start method,
    where workers start with webdataset's default table. Returns the registered schemes.
    """
    import webdataset

    registered = []
    for scheme in FSSPEC_SCHEMES:
        if webdataset.gopen_schemes.get(scheme) in (None, _fsspec_gopen):  # a webdataset opener stays
            webdataset.gopen_schemes[scheme] = _fsspec_gopen
            registered.append(scheme)
    return registered


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
        elif url.endswith("/") and (url_scheme(url) in FSSPEC_SCHEMES or metadata_readable(url)):
            import fsspec

            if url_scheme(url) in FSSPEC_SCHEMES:
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
    if not metadata_readable(url):
        raise ValueError(f"{url!r}: metadata over {scheme}:// is read through fsspec, and fsspec has no backend "
                         f"for {scheme!r} installed (https: `pip install aiohttp`)")
    import fsspec

    try:
        with fsspec.open(url, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    except Exception as exc:
        if is_network_failure(exc):
            raise ShardStoreError.from_failure(url, exc, "metadata file") from exc
        raise


# -- stores that cannot be reached ---------------------------------------------------------------

#: (module, class name) of the exceptions that mean "the store could not be reached", wherever
#: they sit in an exception's class hierarchy or its chain of causes. Matched by name, so none
#: of these packages is imported to check.
_NETWORK_ERRORS: frozenset[tuple[str, str]] = frozenset({
    ("builtins", "ConnectionError"),  # refused, reset, aborted, broken pipe
    ("builtins", "TimeoutError"),  # socket.timeout too
    ("socket", "gaierror"),  # the host name does not resolve
    ("botocore.exceptions", "ConnectionError"),  # EndpointConnectionError, ConnectTimeoutError, …
    ("botocore.exceptions", "HTTPClientError"),  # ReadTimeoutError, ConnectionClosedError, …
    ("aiohttp.client_exceptions", "ClientConnectionError"),  # ClientConnectorError, ServerDisconnectedError
    ("aiohttp.client_exceptions", "ServerTimeoutError"),
    ("fsspec.exceptions", "FSTimeoutError"),
    ("requests.exceptions", "ConnectionError"),
    ("requests.exceptions", "Timeout"),
    ("urllib3.exceptions", "ProtocolError"),
    ("urllib3.exceptions", "NewConnectionError"),
})


#: curl's exit codes for "could not reach the server" (``man curl``): resolve proxy / host (5, 6),
#: connect (7), timeout (28), TLS handshake (35), empty reply (52), send / receive failure (55, 56).
_CURL_NETWORK_EXITS = frozenset({5, 6, 7, 28, 35, 52, 55, 56})
_CURL_STATUS = re.compile(r"\['curl'.*\]: exit (\d+)")


def _curl_exit(exc: BaseException) -> int | None:
    """curl's exit status when ``exc`` comes from webdataset's curl opener (``http(s)``, ``hf``), else None.

    webdataset hands the opened stream to the handler with the error: its ``Pipe`` holds the
    curl process, which has ended (or is ending: its output is closed) when the tar is found empty.
    """
    for arg in getattr(exc, "args", ()):
        proc = getattr(arg, "proc", None)
        if isinstance(proc, subprocess.Popen) and isinstance(proc.args, (list, tuple)) and proc.args[:1] == ["curl"]:
            try:
                return proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return None
        if isinstance(arg, str):
            found = _CURL_STATUS.search(arg)
            if found:
                return int(found.group(1))
    return None


def is_network_failure(exc: BaseException) -> bool:
    """True when ``exc``, or an exception it was raised from, says the store could not be reached.

    Connection refused or reset, a timeout, an unresolvable host, botocore's and aiohttp's
    connection errors, curl's exit codes for the same (webdataset's ``http(s)`` and ``hf``
    opener): a failure of the network or the server, not of the data. A missing object (curl's
    22, an HTTP error), a permission error or a corrupt tar is not one.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ShardStoreError):
            return True
        if any((cls.__module__, cls.__name__) in _NETWORK_ERRORS for cls in type(current).__mro__):
            return True
        if _curl_exit(current) in _CURL_NETWORK_EXITS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _endpoint(scheme: str) -> str | None:
    """The endpoint an S3-compatible client will use, from the standard variables and fsspec's config."""
    if scheme != "s3":
        return None
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
        if os.environ.get(name):
            return f"{os.environ[name]} (from {name})"
    try:
        import fsspec

        conf = fsspec.config.conf.get("s3", {})
    except Exception:  # an unreadable fsspec config is not ours to report here
        return None
    endpoint = conf.get("endpoint_url") or (conf.get("client_kwargs") or {}).get("endpoint_url")
    return f"{endpoint} (from fsspec's configuration)" if endpoint else None


def describe_store(url: str) -> str:
    """The store holding ``url`` in words: ``"s3://bucket at http://127.0.0.1:9000 (from AWS_ENDPOINT_URL)"``."""
    parsed = urlparse(url)
    store = f"{parsed.scheme}://{parsed.netloc}"
    endpoint = _endpoint(parsed.scheme.lower())
    return f"{store} at {endpoint}" if endpoint else store


class ShardStoreError(OSError):
    """A shard (or its metadata) could not be read because its store could not be reached.

    Not bad data, so never counted as a skipped sample: the run stops with this error, which
    names the shard and the store, and can resume (``--resume auto``) once the store is back.
    """

    @classmethod
    def from_failure(cls, url: str, exc: BaseException, what: str = "shard") -> ShardStoreError:
        """The error for ``what`` (``"shard"``, ``"metadata file"``) at ``url`` failing with ``exc``."""
        first = next((a for a in getattr(exc, "args", ()) if isinstance(a, str)), "") or repr(exc)
        curl = _curl_exit(exc)
        if curl is not None:
            first = f"{first}; curl exit {curl}"
        return cls(
            f"{what} {url!r}: the store {describe_store(url)} could not be reached ({type(exc).__name__}: "
            f"{first[:300]}). A network failure is not bad data: the run stops here instead of skipping it "
            "(nothing was counted as skipped); resume once the store is reachable again"
        )
