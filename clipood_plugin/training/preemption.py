"""Preemption: turn SIGTERM (and SLURM's SIGUSR1 warning) into a flag a training loop polls.

A cluster preempts a job by sending SIGTERM (SLURM first sends SIGUSR1 when ``--signal`` is set,
then SIGTERM, then SIGKILL after a grace period; torchrun forwards SIGTERM to every worker). The
default action kills the process wherever it is, so everything since the last checkpoint is lost.
:class:`Preemption` replaces that action with setting a flag; the loop finishes the optimizer step
it is in, asks :meth:`Preemption.requested` (all ranks agree, see below), writes a checkpoint at
that step and exits with :func:`Preemption.exit_code`.

The trap under DDP/FSDP: each rank receives the signal at a slightly different moment, so one
rank may see it after step t and another after step t + 1; a checkpoint is a collective (FSDP) or
must at least describe the same step on every rank. :meth:`requested` therefore all-reduces the
flag (MAX) across ranks every call: one tiny collective per optimizer step, whose result is read
on the host (on GPU, right after the step's loss read, when the device is already drained).

DataLoader workers share the signal too (torchrun signals each worker's whole process group):
the package's loaders start their workers with ``clipood_plugin._signals.shield_worker_from_preemption``,
which moves each worker into its own process group (a group-wide SIGTERM no longer reaches it)
and ignores SIGUSR1, so a worker does not die before the checkpoint is
written. A loader of your own wants the same ``worker_init_fn``.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any

import torch

from clipood_plugin._signals import PREEMPTION_SIGNALS

__all__ = ["PREEMPTION_SIGNALS", "Preemption"]

class Preemption:
    """Record preemption signals instead of dying on them; poll with :meth:`requested`.

    Use as a context manager (the previous handlers come back on exit)::

        with Preemption() as preemption:
            for batch in loader:
                ...; optimizer.step()
                if preemption.requested(group_device):
                    save_checkpoint(); sys.exit(preemption.exit_code())

    Args:
        signals: the signals to catch (default SIGTERM and SIGUSR1).
    """

    def __init__(self, signals: Sequence[signal.Signals] = PREEMPTION_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> Preemption:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self, device: torch.device | None = None) -> bool:
        """Whether any rank received a preemption signal (a MAX all-reduce when distributed).

        ``device``: where the collective's one-element tensor lives (the process group's device:
        ``cuda`` for NCCL, ``cpu`` for gloo). Every rank must call this at the same point.
        """
        local = self.received is not None
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=device or torch.device("cpu"))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def exit_code(self) -> int:
        """128 + the signal received (143 for SIGTERM); 143 on a rank that only heard of it."""
        return 128 + int(self.received if self.received is not None else signal.SIGTERM)
