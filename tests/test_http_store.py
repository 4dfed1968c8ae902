"""http:// shards through webdataset's own curl opener, from a server on 127.0.0.1 started here.

The route a base install takes (no aiohttp needed for the shards): streaming matches local
shards bitwise; a missing shard on a live server is bad data (skipped and counted); a server
that is gone is not (ShardStoreError naming the shard and the store, nothing counted).
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import webdataset
from _helpers import solid_png, to_tensor

from clipood_plugin.data.make_shards import write_shards
from clipood_plugin.data.stream import make_train_loader
from clipood_plugin.data.urls import ShardStoreError

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset's http opener runs curl")
N, PER_SHARD, CLASSES = 16, 4, 4


def png(index: int) -> bytes:
    return solid_png(8, (9 * index, 7, 5))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str, http.server.ThreadingHTTPServer]]:
    out = tmp_path / "ds"
    samples = ({"__key__": f"s{i:03d}", "png": png(i), "cls": i % CLASSES} for i in range(N))
    write_shards(samples, out, classnames=list("abcd"), max_samples_per_shard=PER_SHARD, progress=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(out)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield out, f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


def make(urls, **kw):
    return make_train_loader(urls, batch_size=4, transform=to_tensor, num_classes=CLASSES, num_samples=N, seed=2,
                             shuffle_buffer=3, **kw)


def test_http_shards_through_curl_match_local(served) -> None:
    out, base, _ = served
    remote, local = make(f"{base}/train-{{000000..000003}}.tar", workers=1), make(str(out), workers=1)
    assert webdataset.gopen_schemes["http"].__name__ == "gopen_curl"
    got, want = list(remote), list(local)
    assert len(got) == len(want) == 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    assert remote.num_skipped == 0


def test_missing_shard_is_bad_data_but_a_dead_server_is_not(served) -> None:
    _, base, server = served
    urls = [f"{base}/train-00000{i}.tar" for i in range(4)] + [f"{base}/no-such-shard.tar"]
    tl = make(urls, workers=0)
    assert len(list(tl)) == 4  # the 404 (curl exit 22) is a skipped, counted shard; the rest still serve
    assert tl.num_skipped >= 1
    server.shutdown()
    server.server_close()  # nothing listens on the port any more: connection refused (curl exit 7)
    tl = make(urls[:4], workers=0)
    with pytest.raises(ShardStoreError, match=rf"shard '{base}/train-.*the store {base} could not be reached.*"
                                              "curl exit 7"):
        list(tl)
    assert tl.num_skipped == 0
