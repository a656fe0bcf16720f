"""Preemption: SIGTERM asks the training loop to checkpoint at the next step boundary and exit.

Cloud schedulers (TPU VMs, Kubernetes, Slurm) send SIGTERM some seconds before they kill a job.
One process: a Python handler sets a flag that the loop polls after each step. Several
processes: JAX's preemption sync manager (started by ``jax.distributed.initialize``) catches the
SIGTERM of ANY process, agrees in the background on the next safe step (max over processes + 1)
and ``reached_preemption_sync_point(step)`` turns True on every process at that same step, so
all of them write that step's checkpoint together. Polling it is a host-side check: no device
collective per step, so hosts still dispatch ahead of the devices. Without the sync manager
(``jax_enable_preemption_service`` off) the flags are all-gathered after every step instead.
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
        self._sync_manager = _preemption_sync_manager()
        if self._sync_manager is not None:
            return self      # JAX's notifier owns SIGTERM; a Python handler would replace it
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def stop_requested(self, step: int | None = None) -> bool:
        """True on every process at the same step once any process got the signal. ``step``
        (the number of steps done) is required with several processes: every process must
        poll at every step, starting from the same one."""
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils
        if getattr(self, "_sync_manager", None) is not None and step is not None:
            return self._flag or multihost_utils.reached_preemption_sync_point(step)
        flags = multihost_utils.process_allgather(np.array([self._flag], np.int32))
        return bool(np.asarray(flags).any())


def _preemption_sync_manager():
    """JAX's preemption sync manager of a multi-process run, or None."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed   # no public accessor; reached_preemption_sync_point uses it
    return getattr(distributed.global_state, "preemption_sync_manager", None)
