"""A batched float32 matmul for XLA:CPU that calls BLAS once per matrix (``cpu_kernel.cc``).

XLA:CPU runs batched dots of many small matrices slowly: for the MAE decoder's attention
([16, 8, 197, 32] queries) its products take 1.4-2.2x the time of one single-threaded sgemm per
matrix spread over the same two cores (2-core Xeon, side by side), and the whole MAE ViT-S/16
bench step is 5-8% faster with attention's six matmuls here (``model.attention="blas"``, the
default on a one-device CPU run; ``zoo.models.layers.blas_attention``).

The kernel is an XLA FFI custom call compiled on first use with the system C++ compiler
(``$CXX``, else ``g++``/``c++``/``clang++``) against jaxlib's FFI headers, cached under
``<$XDG_CACHE_HOME or ~/.cache>/zoo/kernels``, and given scipy's BLAS ``sgemm``. Where any of
that is missing (no compiler, a BLAS without a per-thread thread setting) ``available()`` is
False, zoo warns once and attention stays on XLA's einsum. ``ZOO_CPU_KERNEL=0`` turns it off.

Side effect: each kernel thread asks OpenBLAS for one thread (``openblas_set_num_threads_local``).
In scipy's pthreads build of OpenBLAS that setting is process-wide, so after the first kernel call
scipy's own BLAS routines run single-threaded in this process (numpy has its own OpenBLAS and is
not affected).

>>> a, b = jnp.ones((4, 3, 5)), jnp.ones((4, 5, 2))
>>> batched_matmul(a, b).shape  # == jnp.matmul(a, b) when available() else the same via XLA
(4, 3, 2)
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

TARGET = "zoo_batched_sgemm"
SOURCE = Path(__file__).with_suffix(".cc")


def _cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "zoo" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str) -> Path:
    """Compiles the kernel once per (source, jaxlib, compile command); concurrent processes each
    write a temporary file and rename it into place, so no process loads a half-written library.
    Temporary files older than an hour (a build that was killed) are removed."""
    import jaxlib
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir()]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(
        [jaxlib.__version__, compiler, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("build-*.so"):
        if time.time() - stale.stat().st_mtime > 3600:
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp],
                       check=True, capture_output=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _capsule_pointer(capsule) -> int:
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))


def _blas() -> tuple[int, int]:
    """scipy's sgemm and its OpenBLAS's per-thread thread-count setter (each matrix must run on
    one thread: the kernel already spreads matrices over XLA's pool)."""
    import scipy
    from scipy.linalg import cython_blas
    sgemm = _capsule_pointer(cython_blas.__pyx_capi__["sgemm"])
    libs = Path(scipy.__file__).parent.parent / "scipy.libs"
    for path in sorted(glob.glob(str(libs / "libscipy_openblas*.so*"))):
        lib = ctypes.CDLL(path)
        for name in ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local"):
            if hasattr(lib, name):
                return sgemm, ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    raise RuntimeError(f"no OpenBLAS with a per-thread thread setting under {libs}")


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernel; the reason it is unavailable, or None."""
    if os.environ.get("ZOO_CPU_KERNEL", "1") == "0":
        return "ZOO_CPU_KERNEL=0"
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler ($CXX, g++, c++ or clang++)"
    try:
        sgemm, set_threads = _blas()
        library = ctypes.CDLL(str(_build(compiler)))
        library.zoo_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        library.zoo_set_blas(sgemm, set_threads)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.ZooBatchedSgemm),
                                    platform="cpu")
    except (OSError, RuntimeError, ImportError, KeyError, subprocess.SubprocessError) as error:
        detail = (getattr(error, "stderr", b"") or b"").decode(errors="replace").strip()
        return f"{type(error).__name__}: {error} {detail[-400:]}".strip()  # the error's end
    return None


def unavailable_reason() -> str | None:
    """Why the kernel cannot run in this process (None when it can)."""
    return _load()


@functools.cache
def available() -> bool:
    """True when the kernel is built and registered (warns once with the reason if not)."""
    reason = _load()
    if reason is not None and reason != "ZOO_CPU_KERNEL=0":
        warnings.warn(f"zoo: CPU BLAS kernel unavailable, attention uses XLA's einsum ({reason})",
                      stacklevel=2)
    return reason is None


def batched_matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False,
                   transpose_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` over the last two axes, for float32 ``a`` and ``b`` with the same
    leading (batch) dimensions; ``op`` transposes the last two axes when asked. Runs the BLAS
    kernel when ``available()``, else XLA's batched dot (same values up to rounding)."""
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"batched_matmul: operands {a.shape} and {b.shape} need the same "
                         "rank >= 2 and the same leading dimensions")
    m, k = (a.shape[-1], a.shape[-2]) if transpose_a else a.shape[-2:]
    k_b, n = (b.shape[-1], b.shape[-2]) if transpose_b else b.shape[-2:]
    if k != k_b:
        raise ValueError(f"batched_matmul: contracted sizes differ ({a.shape}, {b.shape}, "
                         f"transpose_a={transpose_a}, transpose_b={transpose_b})")
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"batched_matmul: float32 only, got {a.dtype} and {b.dtype}")
    if not available():
        batch = tuple(range(a.ndim - 2))
        contract_a = a.ndim - 2 if transpose_a else a.ndim - 1
        contract_b = b.ndim - 1 if transpose_b else b.ndim - 2
        return lax.dot_general(a, b, (((contract_a,), (contract_b,)), (batch, batch)))
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32),
                            vmap_method="broadcast_all")
    return call(a, b, trans_a=bool(transpose_a), trans_b=bool(transpose_b))
