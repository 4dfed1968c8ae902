"""One rule for preemption signals, shared by the data loaders and the training loop.

SIGTERM is what a scheduler (and torchrun, which forwards it to each worker's whole process
group) sends to preempt a job; SLURM sends SIGUSR1 first when asked to warn. The training loop
turns them into a flag (:mod:`clipood_plugin.training.preemption`); DataLoader worker processes
must ignore them, or they die before the main process has written its checkpoint.
"""

from __future__ import annotations

import signal

__all__ = ["PREEMPTION_SIGNALS", "ignore_preemption_signals"]

#: SIGTERM (the kill a scheduler or torchrun sends) and SIGUSR1 (SLURM's advance warning).
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores the preemption signals (the main process
    handles them, and the workers end with it)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
