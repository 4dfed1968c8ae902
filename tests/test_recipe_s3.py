"""The recipe end to end on shards in a real S3-compatible store (moto's server on 127.0.0.1).

A run streams its training shards from the bucket (endpoint given the standard way,
``AWS_ENDPOINT_URL``); the server is killed mid-epoch; the run must stop with an error naming the
shard and the store (not count the failure as skipped samples and walk on), leave its checkpoints
loadable, and, once the store is back, ``--resume auto`` must end on bitwise the weights of an
uninterrupted run over the same shards on local disk.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from clipood_plugin.training.checkpoint import load_checkpoint  # noqa: E402
from tests.test_recipe import ENV, RECIPE, ROOT, base_args, run, shards  # noqa: E402, F401 (shards: the fixture)
from tests.test_s3_store import Server  # noqa: E402

BUCKET = "clipood-recipe"


def upload(folder: Path, env: dict[str, str]) -> None:
    code = ("import s3fs, sys; fs = s3fs.S3FileSystem(); fs.mkdir(sys.argv[1]); "
            "fs.put(sys.argv[2] + '/', sys.argv[1] + '/ds/', recursive=True)")
    subprocess.run([sys.executable, "-c", code, BUCKET, str(folder)], env=env, check=True, timeout=120)


def test_recipe_streams_from_s3_fails_clearly_when_the_store_dies_and_resumes_exactly(
        shards: Path, tmp_path: Path) -> None:  # noqa: F811 (the fixture imported above)
    extra = ("--total-steps", "20", "--checkpoint-interval", "5", "--in-memory", "off", "--no-eval-zero-shot")
    local = tmp_path / "local"
    proc = run(base_args(shards, local, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]

    server = Server()
    server.start()
    env = {**ENV, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"}
    for name in ("AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    try:
        upload(shards, env)
        out = tmp_path / "s3"
        args = base_args(shards, out, *extra)
        args[args.index("--train-shards") + 1] = f"s3://{BUCKET}/ds/train-{{000000..000003}}.tar"
        proc = subprocess.Popen([sys.executable, str(RECIPE), *args], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = out / "checkpoints" / "checkpoint-10.pt"
        deadline = time.monotonic() + 240
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert target.exists(), "the S3 run never reached step 10"
        server.stop()
        _, err = proc.communicate(timeout=240)
        assert proc.returncode != 0, "the run went on without its store"
        assert "ShardStoreError" in err and f"s3://{BUCKET}" in err and "train-0000" in err, err[-3000:]
        assert "not bad data" in err
        saved = load_checkpoint(out / "checkpoints" / "last.pt")  # what was written is intact
        assert saved["step"] >= 10

        server.start()  # same port, empty store: upload again
        upload(shards, env)
        resumed = subprocess.run([sys.executable, str(RECIPE), *args, "--resume", "auto"], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        server.stop()
    mine = load_checkpoint(out / "checkpoints" / "last.pt")
    ref = load_checkpoint(local / "checkpoints" / "last.pt")
    assert mine["step"] == ref["step"] == 20
    for part in ("state_dict", "state_dict_ema"):
        for key, value in ref[part].items():
            assert torch.equal(mine[part][key], value), (part, key)
