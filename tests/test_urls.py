"""URL policy: expansion, the pipe: refusal, scheme routing, network failures (memory://, no network)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import webdataset

from clipood_plugin.data.urls import (
    FSSPEC_SCHEMES,
    ShardStoreError,
    check_url,
    describe_store,
    expand_urls,
    is_network_failure,
    metadata_readable,
    read_json,
    register_fsspec_handlers,
    sibling_url,
    webdataset_schemes,
)


@pytest.fixture
def memdir() -> Iterator[str]:
    """A fresh memory:// directory, removed afterwards (the memory filesystem is process-global)."""
    root = f"memory://test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_brace_and_double_colon_expansion() -> None:
    assert expand_urls("d/train-{000..002}.tar") == ["d/train-000.tar", "d/train-001.tar", "d/train-002.tar"]
    assert expand_urls("a/{0..1}.tar::s3://b/x-{7..8}.tar") == ["a/0.tar", "a/1.tar", "s3://b/x-7.tar", "s3://b/x-8.tar"]
    assert expand_urls(["a/{0..1}.tar", "c.tar"]) == ["a/0.tar", "a/1.tar", "c.tar"]
    with pytest.raises(ValueError, match="expands to no URLs"):
        expand_urls(" :: ")
    with pytest.raises(TypeError):
        expand_urls(42)  # type: ignore[arg-type]


def test_directory_means_its_sorted_tars(tmp_path: Path, memdir: str) -> None:
    for name in ("b.tar", "a.tar", "c.tar.tmp", "sizes.json"):
        (tmp_path / name).write_bytes(b"x")
    expected = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_urls(str(tmp_path)) == expected
    assert expand_urls(f"file://{tmp_path}") == expected
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.tar"):
        expand_urls(str(tmp_path / "empty"))
    fs = fsspec.filesystem("memory")
    for name in ("z.tar", "m.tar", "info.json"):
        fs.pipe(f"{memdir}/{name}", b"x")
    assert expand_urls(f"{memdir}/") == [f"{memdir}/m.tar", f"{memdir}/z.tar"]


def test_pipe_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"pipe:.*shell command"):
        check_url("pipe:curl -s http://example.com/x.tar")
    assert check_url("pipe:cat x.tar", allow_pipe=True) == "pipe"
    monkeypatch.setenv("WDS_SECURE", "1")
    with pytest.raises(ValueError, match="WDS_SECURE"):
        check_url("pipe:cat x.tar", allow_pipe=True)


def test_scheme_policy() -> None:
    assert check_url("/data/x.tar") == ""
    assert check_url("relative/x.tar") == ""
    assert check_url("file:///data/x.tar") == "file"
    assert check_url("memory://bucket/x.tar") == "memory"
    with pytest.raises(ValueError, match="'ftp'"):
        check_url("ftp://host/x.tar")
    # webdataset opens these itself: accepted, whatever fsspec backends are installed
    assert check_url("hf://datasets/x/y.tar") == "hf"
    assert check_url("https://host/x.tar") == "https"
    assert check_url("gs://bucket/x.tar") == "gs"
    with pytest.raises(ValueError, match="non-empty"):
        check_url("")


def test_missing_backend_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make the backends unimportable whether or not they are installed here.
    for module in ("s3fs", "gcsfs", "adlfs"):
        monkeypatch.setitem(sys.modules, module, None)
    registry = sys.modules["fsspec.registry"]._registry  # drop any cached backend classes
    for scheme in ("s3", "gs", "gcs", "az", "abfs"):
        monkeypatch.delitem(registry, scheme, raising=False)
    for url, package in [("s3://b/x.tar", "s3fs"), ("gcs://b/x.tar", "gcsfs"), ("az://c/x.tar", "adlfs")]:
        with pytest.raises(ImportError, match=f"pip install {package}"):
            check_url(url)
    assert FSSPEC_SCHEMES["abfs"] == "adlfs"
    assert check_url("gs://b/x.tar") == "gs"  # webdataset's gsutil opener: gcsfs not needed


def test_register_is_idempotent_and_opens_through_fsspec(memdir: str) -> None:
    first = register_fsspec_handlers()
    opener = webdataset.gopen_schemes["s3"]
    second = register_fsspec_handlers()
    assert first == second == ["s3", "gcs", "az", "abfs", "memory"]  # what webdataset lacks, only
    assert all(webdataset.gopen_schemes[s] is opener for s in first)
    assert webdataset.gopen_schemes["pipe"] is not opener  # pipe: keeps webdataset's own handler
    payload = bytes(range(256)) * 10
    fsspec.filesystem("memory").pipe(f"{memdir}/blob.tar", payload)
    with webdataset.gopen(f"{memdir}/blob.tar") as fh:
        assert fh.read() == payload


def test_read_json_local_and_fsspec(tmp_path: Path, memdir: str) -> None:
    (tmp_path / "sizes.json").write_text('{"a.tar": 3}')
    assert read_json(str(tmp_path / "sizes.json")) == {"a.tar": 3}
    assert read_json(str(tmp_path / "nope.json"), missing_ok=True) is None
    with pytest.raises(FileNotFoundError):
        read_json(str(tmp_path / "nope.json"))
    fsspec.filesystem("memory").pipe(f"{memdir}/_info.json", b'{"splits": {}}')
    assert read_json(f"{memdir}/_info.json") == {"splits": {}}
    assert read_json(f"{memdir}/missing.json", missing_ok=True) is None
    assert sibling_url(f"{memdir}/x-000.tar", "sizes.json") == f"{memdir}/sizes.json"
    assert sibling_url(str(tmp_path / "x.tar"), "sizes.json") == str(tmp_path / "sizes.json")


# webdataset's own openers, by name: the routing a base install (no aiohttp, no gcsfs) relies on
WEBDATASET_OPENERS = {"http": "gopen_curl", "https": "gopen_curl", "gs": "gopen_gsutil", "hf": "gopen_hf"}


@pytest.mark.parametrize("scheme", ["s3", "gcs", "az", "abfs", "memory", *WEBDATASET_OPENERS])
def test_each_scheme_routes_to_one_opener(scheme: str) -> None:
    register_fsspec_handlers()
    opener = webdataset.gopen_schemes[scheme]
    if scheme in WEBDATASET_OPENERS:
        assert opener.__module__ == "webdataset.gopen" and opener.__name__ == WEBDATASET_OPENERS[scheme]
        assert scheme in webdataset_schemes() and scheme not in FSSPEC_SCHEMES
    else:
        assert opener.__module__ == "clipood_plugin.data.urls"
        assert scheme in FSSPEC_SCHEMES and scheme not in webdataset_schemes()


def test_https_needs_no_aiohttp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A base install: aiohttp unimportable. https:// shards are accepted and opened by webdataset's curl."""
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    monkeypatch.setitem(sys.modules, "fsspec.implementations.http", None)  # even if imported earlier
    registry = sys.modules["fsspec.registry"]._registry
    for scheme in ("http", "https"):
        monkeypatch.delitem(registry, scheme, raising=False)
    from clipood_plugin.data.stream import dataset_size

    url = "https://127.0.0.1:9/shards/x-000.tar"  # never contacted
    assert check_url(url) == "https"
    register_fsspec_handlers()
    assert webdataset.gopen_schemes["https"].__name__ == "gopen_curl"
    assert not metadata_readable(url)
    assert dataset_size([url]) is None  # no sizes.json reader: the caller passes num_samples
    with pytest.raises(ValueError, match="pip install aiohttp"):
        read_json(f"{url.rsplit('/', 1)[0]}/sizes.json")


def test_network_failures_told_from_bad_data() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    wrapped = RuntimeError("read failed")
    wrapped.__cause__ = refused
    assert is_network_failure(refused) and is_network_failure(wrapped) and is_network_failure(TimeoutError())
    for exc in (FileNotFoundError("no such key"), PermissionError("denied"), ValueError("bad tar"), OSError("x")):
        assert not is_network_failure(exc)
    botocore = pytest.importorskip("botocore.exceptions")
    assert is_network_failure(botocore.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not is_network_failure(botocore.NoCredentialsError())


def test_store_named_with_its_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fsspec.config, "conf", {})
    assert describe_store("s3://bkt/a/x.tar") == "s3://bkt"
    monkeypatch.setattr(fsspec.config, "conf", {"s3": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}})
    assert describe_store("s3://bkt/x.tar") == "s3://bkt at http://127.0.0.1:1 (from fsspec's configuration)"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert describe_store("s3://bkt/x.tar") == "s3://bkt at http://127.0.0.1:2 (from AWS_ENDPOINT_URL)"
    err = ShardStoreError.from_failure("s3://bkt/x.tar", ConnectionRefusedError(111, "refused"))
    assert "shard 's3://bkt/x.tar'" in str(err) and "127.0.0.1:2" in str(err) and "not bad data" in str(err)
