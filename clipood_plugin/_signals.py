"""One rule for preemption signals, shared by the data loaders and the training loop.

SIGTERM is what a scheduler (and torchrun, which forwards it to each worker's whole process
group) sends to preempt a job; SLURM sends SIGUSR1 first when asked to warn (``--signal``). The
training loop turns both into a flag (:mod:`clipood_plugin.training.preemption`); DataLoader
worker processes must not die of them before the main process has written its checkpoint.

The trap: a worker must not simply *ignore* SIGTERM. multiprocessing ends leftover daemon
children at interpreter exit with SIGTERM and then joins them, so a worker that ignores it hangs
the exit forever. So a worker leaves its parent's process group instead (a group-wide SIGTERM,
torchrun's, no longer reaches it, while a SIGTERM sent to it alone still ends it; torch's own
watchdog ends it if the main process dies), and ignores SIGUSR1, which nothing else uses.
"""

from __future__ import annotations

import os
import signal

__all__ = ["PREEMPTION_SIGNALS", "shield_worker_from_preemption"]

#: SIGTERM (the kill a scheduler or torchrun sends) and SIGUSR1 (SLURM's advance warning).
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


def shield_worker_from_preemption(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves group-wide preemption signals to the main
    process (its own process group) and ignores SIGUSR1; a SIGTERM sent to it alone still ends it."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
