"""Preemption: SIGTERM asks the training loop to checkpoint at the next step boundary and exit.

Cloud schedulers (TPU VMs, Kubernetes, Slurm) send SIGTERM some seconds before they kill a job.
The handler only sets a flag; the loop polls it after each step. With several processes, the
processes agree (an all-gather of the flags, so every process stops after the SAME step even
if only one of them got the signal), and all write that step's checkpoint together.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)


class PreemptionWatcher:
    """Context manager: ``with PreemptionWatcher() as watcher: ... watcher.stop_requested()``.

    Installs a SIGTERM handler (main thread only; elsewhere it watches nothing) and restores
    the previous handler on exit."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._flag = False
        self._previous = {}

    def _handle(self, signum, frame):
        self._flag = True
        log.warning("received signal %d: will checkpoint after the current step and exit", signum)

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def request(self) -> None:
        """Asks for a stop as SIGTERM would (tests, notebooks)."""
        self._flag = True

    def stop_requested(self) -> bool:
        """True on every process as soon as any process got the signal."""
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([self._flag], np.int32))
        return bool(np.asarray(flags).any())
