"""Rank arithmetic under torchrun, SLURM and MPI, from fake environments (no real launch)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from clipood_plugin.training.distributed import Launch, first_host, init_distributed, launch_from_env

# 2 nodes × 4 tasks, this process the second task of the second node: global rank 4 + 1 = 5
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4123457",
         "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_NUM_NODES": "2"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29400"}


def test_no_launcher_is_one_process() -> None:
    assert launch_from_env({}) == Launch("none", 0, 1, 0)
    assert launch_from_env({"PATH": "/bin", "SLURM_NTASKS": "4"}).world_size == 1  # no task id: not an srun task


def test_torchrun() -> None:
    assert launch_from_env(TORCHRUN) == Launch("torchrun", 3, 4, 1)  # env:// reads the rendezvous itself


def test_slurm_rank_and_derived_rendezvous() -> None:
    got = launch_from_env(SLURM)
    # the first host of the list; the port 15000 + the job id's last four digits, the same on every task
    assert got == Launch("slurm", 5, 8, 1, "gpu007", 15000 + 3457)
    assert launch_from_env({**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).master_port == got.master_port
    # an address and port in the environment win over the derived ones
    given = launch_from_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (given.master_addr, given.master_port) == ("head", 1234)
    # the step's own task count wins over the job's
    assert launch_from_env({**SLURM, "SLURM_STEP_NUM_TASKS": "6"}).world_size == 6


def test_torchrun_takes_precedence_inside_slurm() -> None:
    """``srun torchrun ...``: each worker sees SLURM's per-node task and torchrun's own layout."""
    assert launch_from_env({**SLURM, **TORCHRUN}) == Launch("torchrun", 3, 4, 1)


@pytest.mark.parametrize(("nodelist", "host"), [
    ("node12", "node12"), ("gpu[003-005,9]", "gpu003"), ("a[1,3],b[2-4]", "a1"), ("c1,c2", "c1"),
    ("rack[2-3]-n[08-09]", "rack2-n08"),
])
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_open_mpi_and_pmi() -> None:
    ompi = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "23456"}
    assert launch_from_env(ompi) == Launch("mpi", 6, 8, 2, "n1", 23456)
    pmi = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    # all ranks on this node: the rendezvous is local, on torch's default port
    assert launch_from_env(pmi) == Launch("mpi", 1, 2, 1, "127.0.0.1", 29500)
    # several nodes and no address: say what to set instead of guessing
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        launch_from_env({k: v for k, v in ompi.items() if not k.startswith("MASTER")})
    assert launch_from_env({**ompi, **TORCHRUN}).launcher == "torchrun"


@pytest.mark.parametrize(("env", "message"), [
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID='x' is not an integer"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"}, "rank 2, local rank 0 of world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "world size 0"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "-1",
      "MASTER_ADDR": "h"}, "local rank -1"),
])
def test_impossible_layouts_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        launch_from_env(env)


def test_init_distributed_single_task_initialises_nothing() -> None:
    info = init_distributed("cpu", {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"})
    assert (info.rank, info.world_size, info.distributed) == (0, 1, False)
    assert not torch.distributed.is_initialized()


_WORKER = """
import os, sys, torch, torch.distributed as dist
from clipood_plugin.training.distributed import all_gather_objects, cleanup, init_distributed
info = init_distributed("cpu")
got = all_gather_objects((info.rank, info.local_rank, os.getpid()), info)
print("ranks", [g[0] for g in got], "world", info.world_size, flush=True)
cleanup(info)
"""


def test_two_slurm_tasks_meet_on_the_derived_rendezvous() -> None:
    """Two processes with srun's variables only (no MASTER_*): they find each other on 127.0.0.1."""
    port = None
    for candidate in random.Random().sample(range(15000, 25000), 50):  # the range job ids map onto
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = candidate
            break
    if port is None:
        pytest.skip("no free port in [15000, 25000) for a job id to map onto")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MASTER_"))
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(SLURM_NTASKS="2", SLURM_JOB_ID=str(70000 + port - 15000), SLURM_JOB_NODELIST="127.0.0.1",
                SLURM_JOB_NUM_NODES="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], env={**base, "SLURM_PROCID": str(r),
                              "SLURM_LOCALID": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("ranks [0, 1] world 2" in out for out in outs), outs
