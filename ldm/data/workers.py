"""DataLoader workers and preemption signals.

SLURM signals every process of a job step (SIGTERM at the end of its time, and the ``--signal`` this
project configures, USR1), and ``kill -TERM -- -PGID`` does the same. A DataLoader worker killed by such a
signal takes the run down (``RuntimeError: DataLoader worker ... is killed by signal: Terminated``) before
the main process can write its preemption checkpoint. So workers ignore both signals: they are forked with
the signals blocked (no window before ``init_worker`` runs), then ignore them. The main process stops its
workers when it is done, and a worker exits by itself when the main process dies.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from lightning_fabric.utilities.seed import pl_worker_init_function

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def init_worker(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM / SIGUSR1: one killed by a signal meant for the job step would take
    the run down (``DataLoader worker ... is killed by signal``) before the main process can checkpoint. The
    main process stops them when it is done; they also exit by themselves when it dies."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)  # blocked by the parent while forking
    if os.environ.get("PL_SEED_WORKERS") == "1":  # what Lightning would have installed (seed_everything)
        pl_worker_init_function(worker_id)


@contextmanager
def signals_blocked(signals: tuple[int, ...]) -> Iterator[None]:
    """Block ``signals`` in this thread for the ``with`` body; ones that arrive meanwhile are delivered after."""
    if not signals:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
