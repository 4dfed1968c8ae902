"""URL policy: expansion, the pipe: refusal, fsspec openers (exercised through memory://, no network)."""

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
    check_url,
    expand_urls,
    read_json,
    register_fsspec_handlers,
    sibling_url,
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
    with pytest.raises(ValueError, match="'hf'"):
        check_url("hf://datasets/x/y.tar")
    with pytest.raises(ValueError, match="non-empty"):
        check_url("")


def test_missing_backend_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make the backends unimportable whether or not they are installed here.
    for module in ("s3fs", "gcsfs", "adlfs"):
        monkeypatch.setitem(sys.modules, module, None)
    registry = sys.modules["fsspec.registry"]._registry  # drop any cached backend classes
    for scheme in ("s3", "gs", "gcs", "az", "abfs"):
        monkeypatch.delitem(registry, scheme, raising=False)
    for url, package in [("s3://b/x.tar", "s3fs"), ("gs://b/x.tar", "gcsfs"), ("gcs://b/x.tar", "gcsfs"), ("az://c/x.tar", "adlfs")]:
        with pytest.raises(ImportError, match=f"pip install {package}"):
            check_url(url)
    assert FSSPEC_SCHEMES["abfs"] == "adlfs"


def test_register_is_idempotent_and_opens_through_fsspec(memdir: str) -> None:
    first = register_fsspec_handlers()
    opener = webdataset.gopen_schemes["s3"]
    second = register_fsspec_handlers()
    assert first == second and set(first) >= {"s3", "gs", "gcs", "az", "abfs", "http", "https", "memory"}
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
