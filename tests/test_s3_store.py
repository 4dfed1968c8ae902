"""Shards on a real S3-compatible server (moto's, on 127.0.0.1, started here) read through s3fs.

The endpoint is given the standard ways, ``AWS_ENDPOINT_URL`` (which botocore, under s3fs, reads
itself) or fsspec's configuration; nothing in the package is told about the server. Checked: streaming from the bucket
gives bitwise the batches the same shards give from local disk; a server stopped mid-epoch ends
the iteration with an error naming the shard and the store (no skipped-sample count, no
walking through the other shards); a checkpoint written before the failure is intact; and once
the server is back a fresh loader replays the epoch exactly.
"""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from clipood_plugin.data.make_shards import write_shards  # noqa: E402
from clipood_plugin.data.stream import make_train_loader  # noqa: E402
from clipood_plugin.data.urls import ShardStoreError  # noqa: E402
from clipood_plugin.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

N, PER_SHARD, CLASSES, SIDE, CROP = 48, 4, 4, 12, 8
BUCKET = "clipood-test"


def augment(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    top, left = torch.randint(0, SIDE - CROP + 1, (2,)).tolist()
    return x[:, top:top + CROP, left:left + CROP] + random.random()


def png(index: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(index)
    Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "ds"
    samples = ({"__key__": f"s{i:03d}", "png": png(i), "cls": i % CLASSES} for i in range(N))
    write_shards(samples, out, classnames=list("abcd"), max_samples_per_shard=PER_SHARD, progress=False)
    return out


_SERVE = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes stdin, or kills this process
"""


class Server:
    """moto's S3 server on 127.0.0.1 (never another address) in a process of its own.

    Stopping kills that process, so every socket it held closes, keep-alive connections to the
    client included: the store is gone, as when its host dies. It restarts on the same port,
    empty (moto keeps objects in memory), so the test uploads the shards again.
    """

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(self.port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            pytest.fail(f"moto server did not start (said {line!r})")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def upload(local: Path) -> None:
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    fs.put(str(local) + "/", f"{BUCKET}/ds/", recursive=True)


@pytest.fixture(scope="module")
def store(local: Path) -> Iterator[tuple[Server, str]]:
    server = Server()
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", server.endpoint)  # the standard way; botocore reads it
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries: a dead server's failure stays quick
            # a server that hangs instead of refusing fails in seconds, not botocore's 60 s × retries
            mp.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10}})
            upload(local)
            yield server, f"s3://{BUCKET}/ds"
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


def loader(urls: str, workers: int):
    return make_train_loader(urls, batch_size=4, transform=augment, num_classes=CLASSES, workers=workers, seed=3,
                             shuffle_buffer=3)


def epoch(tl, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tl.set_epoch(index)
    return [(x.clone(), y.clone()) for x, y in tl]


def test_streaming_from_s3_equals_local_shards(store, local: Path) -> None:
    _, root = store
    names = sorted(p.name for p in local.glob("*.tar"))
    spec = f"{root}/train-{{000000..{len(names) - 1:06d}}}.tar"
    remote, here = loader(spec, workers=2), loader(str(local), workers=2)
    assert remote.num_samples == N  # from sizes.json in the bucket
    for e in (0, 1):
        got, want = epoch(remote, e), epoch(here, e)
        assert len(got) == len(want) == remote.steps_per_epoch
        for (xa, ya), (xb, yb) in zip(got, want):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert remote.num_skipped == 0
    # a directory URL lists the bucket's shards the same way
    assert loader(f"{root}/", workers=0).urls == [f"{root}/{n}" for n in names]


def test_server_stopped_mid_epoch_is_a_clear_error_not_skipped_data(store, local: Path, tmp_path: Path) -> None:
    server, root = store
    want = epoch(loader(str(local), workers=0), 0)
    tl = loader(f"{root}/", workers=1)
    tl.set_epoch(0)
    it = iter(tl)
    first = next(it)
    assert torch.equal(first[0], want[0][0])
    ckpt = save_checkpoint(tmp_path / "last.pt", {"step": 1, "weights": torch.arange(5.0)})
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    server.stop()
    try:
        with pytest.raises(ShardStoreError) as info:
            for _ in it:
                pass
        message = str(info.value)
        assert f"'{root}/train-" in message  # the shard
        assert f"s3://{BUCKET} at {server.endpoint} (from AWS_ENDPOINT_URL)" in message  # the store
        assert "not bad data" in message
        assert tl.num_skipped == 0  # not counted as skipped samples
    finally:
        server.start()  # the same port, so AWS_ENDPOINT_URL still points at it
        upload(local)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest  # nothing already written is damaged
    assert torch.equal(load_checkpoint(ckpt)["weights"], torch.arange(5.0))
    # the store is back: a fresh loader (a resumed run) replays epoch 0 exactly
    again = epoch(loader(f"{root}/", workers=1), 0)
    assert len(again) == len(want)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, want))


def test_endpoint_from_fsspec_configuration(store, local: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other standard way: the endpoint in fsspec's configuration for s3, which wins over the variable.

    AWS_ENDPOINT_URL is pointed at a dead local port rather than removed, so a configuration that
    were not applied would fail here instead of reaching out to AWS.
    """
    server, root = store
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    conf = {**fsspec.config.conf["s3"], "client_kwargs": {"endpoint_url": server.endpoint}}
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        got, want = epoch(loader(f"{root}/", workers=1), 1), epoch(loader(str(local), workers=1), 1)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    assert len(got) == len(want) > 0
