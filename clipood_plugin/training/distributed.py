"""Distributed set-up under torchrun, SLURM (``srun``) or MPI (``mpirun``): one process per device, DDP.

:func:`launch_from_env` reads who this process is from the launcher's variables, the first
launcher found winning, so ``srun torchrun ...`` is torchrun's layout (the names are timm's
``world_info_from_env`` and open_clip's ``init_distributed_device``):

====================  ================  ==========================  ======================
launcher              rank              world size                  local rank
====================  ================  ==========================  ======================
torchrun              ``RANK``          ``WORLD_SIZE``              ``LOCAL_RANK``
SLURM (``srun``)      ``SLURM_PROCID``  ``SLURM_NTASKS``            ``SLURM_LOCALID``
Open MPI              ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK``
MPICH / Intel MPI     ``PMI_RANK``      ``PMI_SIZE``                ``MPI_LOCALRANKID``
====================  ================  ==========================  ======================

torchrun also publishes the rendezvous (``MASTER_ADDR``, ``MASTER_PORT``); the others do not,
so an address given in the environment is used, and otherwise SLURM's is derived as Lightning's
``SLURMEnvironment`` does: the first host of the step's (else the job's) node list,
``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` (``scontrol show hostnames | head -n1``, what
open_clip's SLURM script exports) and port ``15000 +`` the job id's last four digits, the same on
every task of the job (torch's 29500 without a job id). An MPI job on one node defaults to ``127.0.0.1``; across nodes
it needs ``MASTER_ADDR``.

:func:`init_distributed` picks the backend by device (NCCL on CUDA, gloo on CPU) and initialises
the process group with the rank and world size passed explicitly, so the environment is read,
never edited. Without a launcher it is a single process and nothing is initialised. Only the
primary rank writes files.

The trap: ``sbatch --ntasks=4`` running ``python train.py`` *without* ``srun`` is one process
whose environment still says ``SLURM_NTASKS=4``; it would wait at the rendezvous for three
ranks that never come. The task count of the ``srun`` step itself (``SLURM_STEP_NUM_TASKS``) is
preferred where SLURM sets it, but start every rank with ``srun`` (or torchrun, whose variables
win).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "Launch",
    "all_gather_objects",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "first_host",
    "init_distributed",
    "launch_from_env",
]

_CPU = torch.device("cpu")
#: torch's default rendezvous port (torchrun's ``--master-port`` default).
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as the launcher's environment gives it."""

    #: ``"torchrun"``, ``"slurm"``, ``"mpi"`` or ``"none"`` (a single process).
    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: Rendezvous address and port (None for a single process, or torchrun: its env:// has them).
    master_addr: str | None = None
    master_port: int | None = None


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"launcher variable {name}={value!r} is not an integer") from None


def _first_of(env: Mapping[str, str], names: tuple[str, ...], default: int | None = None) -> int:
    for name in names:
        if env.get(name, "") != "":
            return _int(env, name)
    if default is None:
        raise ValueError(f"none of {', '.join(names)} is set")
    return default


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``"gpu[003-005,9],cpu1"`` → ``"gpu003"``.

    What ``scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1`` prints, without running it:
    the first comma-separated entry outside brackets, each bracket group replaced by its first
    number (zero padding kept).
    """
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = text[:end]
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], entry)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read the first host of SLURM node list {nodelist!r}")
    return host


def _rendezvous(env: Mapping[str, str], launcher: str, world_size: int, single_node: bool) -> tuple[str, int]:
    """(address, port) of rank 0: the environment's, else derived (SLURM), else local on one node."""
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
    if launcher == "slurm":
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if addr is None and nodelist:
            addr = first_host(nodelist)
        if port is None and env.get("SLURM_JOB_ID"):
            port = 15000 + _int(env, "SLURM_JOB_ID") % 10000  # Lightning's SLURMEnvironment.main_port
    if addr is None and single_node:
        addr = "127.0.0.1"  # every rank on this node
    if addr is None:
        raise ValueError(
            f"{launcher} launched {world_size} ranks but the rendezvous address is unknown: set MASTER_ADDR "
            "(and MASTER_PORT) to the first rank's host, e.g. `export MASTER_ADDR=$(hostname)` before the launch"
        )
    return addr, DEFAULT_PORT if port is None else port


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """Who this process is, from the launcher's variables (module docstring); ``os.environ`` by default.

    Raises ValueError for a variable that is not an integer, or a layout that cannot be
    (a rank outside ``[0, world_size)``, a local rank below 0, an unknown multi-node address).
    """
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE", "") != "" or env.get("RANK", "") != "":
        launch = Launch("torchrun", _first_of(env, ("RANK",), 0), _first_of(env, ("WORLD_SIZE",), 1),
                        _first_of(env, ("LOCAL_RANK",), 0))
    elif env.get("SLURM_PROCID", "") != "":
        launch = Launch("slurm", _int(env, "SLURM_PROCID"), _first_of(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), 1),
                        _first_of(env, ("SLURM_LOCALID",), 0))
        nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
        single_node = nodes == "1"
    elif env.get("OMPI_COMM_WORLD_RANK", "") != "":
        launch = Launch("mpi", _int(env, "OMPI_COMM_WORLD_RANK"), _first_of(env, ("OMPI_COMM_WORLD_SIZE",), 1),
                        _first_of(env, ("OMPI_COMM_WORLD_LOCAL_RANK",), 0))
        single_node = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") == str(launch.world_size)
    elif env.get("PMI_RANK", "") != "":
        launch = Launch("mpi", _int(env, "PMI_RANK"), _first_of(env, ("PMI_SIZE",), 1),
                        _first_of(env, ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), 0))
        local_size = env.get("MPI_LOCALNRANKS") or env.get("PMI_LOCAL_SIZE")
        single_node = local_size == str(launch.world_size)
    else:
        return Launch("none")
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ValueError(
            f"{launch.launcher} gives rank {launch.rank}, local rank {launch.local_rank} of world size "
            f"{launch.world_size}: that layout cannot be"
        )
    if launch.launcher != "torchrun" and launch.world_size > 1:
        addr, port = _rendezvous(env, launch.launcher, launch.world_size, single_node)
        launch = Launch(launch.launcher, launch.rank, launch.world_size, launch.local_rank, addr, port)
    return launch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", environ: Mapping[str, str] | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun, SLURM or MPI; pick this rank's device.

    ``environ`` stands in for ``os.environ`` (tests). The device of a CUDA rank is its local rank.
    """
    launch = launch_from_env(environ)
    world_size, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if launch.launcher == "torchrun":
            dist.init_process_group(backend=backend, init_method="env://")
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                    rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """Mean of a float over ranks (for logging)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item() / info.world_size


def all_gather_objects(value: object, info: DistInfo) -> list[object]:
    """Every rank's ``value``, in rank order (a list of one without distribution)."""
    if not info.distributed:
        return [value]
    gathered: list[object] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
