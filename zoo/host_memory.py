"""Keeps freed host memory mapped, so XLA:CPU does not page-fault through its buffers every step.

XLA:CPU allocates a train step's temporaries (~1.2 GB for the MAE ViT-S/16 benchmark) from the
C heap at every execution and frees them at the end. glibc hands blocks that large to ``mmap``
and returns them with ``munmap``, and a worker thread's arena deletes heaps it no longer uses,
so every step touches ~345,000 fresh pages: each is a page fault plus the kernel zeroing 4 KiB,
~0.7 s of system CPU time per step on the 2-core dev machine. Measured in one process,
alternating (``experiments/bench_host_memory.py``): 1.63 s per step with memory kept vs 2.06 s
without.

``keep_freed_memory()`` (called when ``zoo`` is imported) tells glibc to serve every allocation
from one heap (``M_ARENA_MAX=1``), never to use ``mmap`` for large blocks (``M_MMAP_MAX=0``) and
to give memory back only when more than 2 GiB lie free at the heap's top (``M_TRIM_THRESHOLD``;
mallopt takes a C int, so a step freeing more than that at once is still trimmed), so after the
first step the buffers are reused pages. The cost: the process keeps its peak heap size until
it exits (what a training process needs anyway). Set ``ZOO_HOST_MALLOC=system`` to keep glibc's
defaults. It only takes full effect before JAX creates its CPU threads (their arenas already
exist otherwise), so import ``zoo`` before running JAX computations. A no-op where the C library
is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: 2 GiB is the most it accepts
_KEEP = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
ENV = "ZOO_HOST_MALLOC"
CHOICES = ("keep", "system")

_applied: bool | None = None


def glibc_library():
    """The C library as a ctypes handle where it is glibc with ``mallopt``; None elsewhere."""
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a glibc system
        return None
    if platform.system() != "Linux" or not libc_version.startswith("glibc"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Applies the settings above once per process (unless ``ZOO_HOST_MALLOC=system``); returns
    whether they are in force. ``ZOO_HOST_MALLOC`` other than ``keep``/``system`` is an error."""
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "keep").strip().lower() or "keep"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: allowed values are {CHOICES}")
    libc = glibc_library() if choice == "keep" else None
    _applied = bool(libc) and all(libc.mallopt(param, value) == 1 for param, value in _KEEP)
    return _applied
