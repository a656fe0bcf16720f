"""Float32 kernels for XLA:CPU (``cpu_kernel.cc``, XLA FFI custom calls): attention, LayerNorm and
the dense layers' products.

* ``amx_matmul``: ``op(a) @ op(b) (+ bias)`` for float32 matrices on Intel AMX's bfloat16 tiles
  (Sapphire Rapids and later; ``amx_available()``). Each operand is split into three bfloat16
  pieces as it is packed and six products of pieces are summed in float32: as accurate as a
  float32 product (the split TPUs use for ``Precision.HIGHEST``; tests bound the error by XLA's
  own float32 dot's). ``zoo.models.linear`` runs every dense layer's forward, input-gradient and
  weight-gradient products through it on a one-device float32 CPU run where the CPU has AMX
  (``ZOO_AMX=0`` keeps XLA's dots): 0.61-0.66x XLA's time for the MAE bench's products,
  0.77-0.85x for its whole step (2-core Xeon, same-process A/Bs). ``lax.Precision.HIGH`` on a
  layer asks for three passes (~2^-16 relative).

* ``packed_attention_forward`` / ``packed_attention_backward``: self-attention over the packed
  qkv projection [B, L, 3, H, D], one (batch, head) block per task: q, k and v are read in place
  (no heads-major transposes), and the block's scores, softmax and weighted sum (and in the
  backward its five products) run in the core's cache with a register-tiled matmul written for
  these shapes (~110-130 GFLOP/s per core on the MAE decoder's 197 x 197 x 32 products, where
  OpenBLAS's sgemm reaches ~60). Used by ``zoo.models.layers.Attention`` with
  ``model.attention="blas"`` (``auto``'s choice on a one-device float32 CPU run): the MAE
  ViT-S/16 bench step is ~6% faster than with the batched products below (themselves 5-8%
  faster than "einsum").
* ``batched_matmul``: ``op(a) @ op(b)`` over leading batch dimensions, one single-threaded BLAS
  sgemm per matrix spread over XLA's thread pool (XLA:CPU runs batched dots of many small
  matrices 1.4-2.2x slower); text cross-attention uses it (``layers.blas_attention``).
* ``layer_norm_forward`` / ``layer_norm_backward``: LayerNorm over the last axis, one pass over
  the rows each way (``zoo.models.layer_norm`` uses them on a one-device float32 CPU run).
* ``dense_weight_gradient``: a dense layer's ``x^T g`` and bias sums in one pass over blocks of
  packed operands (``zoo.models.linear``'s backward on a one-device float32 CPU run without AMX,
  for layers of at most 2^20 weights), 11-30% faster than XLA:CPU's transposed-operand product
  alone on the MAE bench's layers; ~1-3% of its step, as XLA runs it beside the input-gradient
  product (one core each).
* ``applies(dtype)``: whether the kernels may run in the current trace (the one gate for all);
  ``with disabled():`` turns them off for the traces made inside it.

The kernel is an XLA FFI custom call compiled on first use with the system C++ compiler
(``$CXX``, else ``g++``/``c++``/``clang++``) against jaxlib's FFI headers, cached under
``<$XDG_CACHE_HOME or ~/.cache>/zoo/kernels`` (per CPU: it is built with ``-march=native``), and
given scipy's BLAS ``sgemm``. Where any of that is missing (no compiler, a BLAS without a
per-thread thread setting) ``available()`` is False, zoo warns once and attention, LayerNorm and
the dense layers' gradients stay on XLA's ops. ``ZOO_CPU_KERNEL=0`` turns the kernels off.

Side effect: each kernel thread asks OpenBLAS for one thread (``openblas_set_num_threads_local``).
In scipy's pthreads build of OpenBLAS that setting is process-wide, so after the first kernel call
scipy's own BLAS routines run single-threaded in this process (numpy has its own OpenBLAS and is
not affected).

>>> a, b = jnp.ones((4, 3, 5)), jnp.ones((4, 5, 2))
>>> batched_matmul(a, b).shape  # == jnp.matmul(a, b) when available() else the same via XLA
(4, 3, 2)
"""
from __future__ import annotations

import contextlib
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
import numpy as np
from jax import lax

TARGET = "zoo_batched_sgemm"
ATTENTION_TARGETS = {"forward": "zoo_packed_attention_forward",
                     "backward": "zoo_packed_attention_backward"}
LAYER_NORM_TARGETS = {"forward": "zoo_layer_norm_forward", "backward": "zoo_layer_norm_backward"}
DENSE_GRADIENT_TARGET = "zoo_dense_weight_gradient"
AMX_MATMUL_TARGET = "zoo_amx_matmul"
SOURCE = Path(__file__).with_suffix(".cc")


def _cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "zoo" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine_tag(compiler: str) -> str:
    """What ``-march=native`` means here: the compiler's version and the target options its
    driver passes on (``-###``), plus the CPU's flags where Linux lists them. The kernel is
    built for this CPU, so a cache shared between machines must not hand one's build to
    another, and a compiler upgraded in place must rebuild."""
    parts = []
    for args in (["--version"], ["-march=native", "-###", "-E", "-x", "c++", os.devnull]):
        try:
            done = subprocess.run([compiler, *args], capture_output=True, text=True, timeout=60)
            parts.append(done.stdout + done.stderr)
        except (OSError, subprocess.SubprocessError):
            parts.append("")
    try:
        with open("/proc/cpuinfo") as f:
            parts.append(next((line for line in f if line.startswith(("flags", "Features"))), ""))
    except OSError:
        pass
    return "\n".join(parts)


# Tuned for the CPU it runs on first; without these (a compiler that refuses -march=native, as
# some do on ARM) the same source builds for the baseline instruction set, slower but correct.
ARCH_FLAGS = (("-march=native", "-fopenmp-simd"), ())


def _build(compiler: str) -> Path:
    """Compiles the kernel with the first of ``ARCH_FLAGS`` the compiler accepts and returns the
    library's path. A source that fails to build with flags the compiler accepts is an error,
    not a reason to build for the baseline instruction set: that build would silently lose the
    AVX-512 and AMX code (the MAE bench step ran ~25x slower)."""
    for arch in ARCH_FLAGS:
        if _accepts(compiler, arch):
            return _build_with(compiler, list(arch))
    raise RuntimeError(f"{compiler} accepts none of the kernel's target flags {ARCH_FLAGS}")


def _accepts(compiler: str, arch) -> bool:
    """Whether the compiler takes these target flags at all (checked on an empty C++ file)."""
    if not arch:
        return True
    try:
        subprocess.run([compiler, *arch, "-fsyntax-only", "-x", "c++", os.devnull],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _build_with(compiler: str, arch: list[str]) -> Path:
    """Compiles the kernel once per (source, jaxlib, compile command, CPU); concurrent processes
    each write a temporary file and rename it into place, so no process loads a half-written
    library. Temporary files older than an hour (a build that was killed) are removed.
    ``-march=native -fopenmp-simd`` vectorise the kernels' loops for this CPU."""
    import jaxlib
    flags = ["-O3", *arch, "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir()]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(
        [jaxlib.__version__, compiler, *flags, _machine_tag(compiler)]).encode()).hexdigest()[:16]
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


_AMX = {"enabled": False}


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
        for target, symbol in ((TARGET, library.ZooBatchedSgemm),
                               (ATTENTION_TARGETS["forward"], library.ZooPackedAttentionForward),
                               (ATTENTION_TARGETS["backward"], library.ZooPackedAttentionBackward),
                               (LAYER_NORM_TARGETS["forward"], library.ZooLayerNormForward),
                               (LAYER_NORM_TARGETS["backward"], library.ZooLayerNormBackward),
                               (DENSE_GRADIENT_TARGET, library.ZooDenseWeightGradient),
                               (AMX_MATMUL_TARGET, library.ZooAmxMatmul)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
        _AMX["enabled"] = bool(library.zoo_amx_enable())
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
        warnings.warn("zoo: CPU kernels unavailable, attention, LayerNorm and dense "
                      f"gradients use XLA ops ({reason})", stacklevel=2)
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


def _require_kernel() -> None:
    if not available():
        raise RuntimeError(f"zoo CPU kernel unavailable: {unavailable_reason()}")


def _mask_operand(mask: jax.Array | None, qkv: jax.Array) -> tuple[jax.Array, bool]:
    if mask is None:
        return jnp.ones((1, 1, 1, 1), jnp.bool_), False
    batch, length, _, heads, _ = qkv.shape
    full = (batch, heads, length, length)
    if mask.ndim < 4:   # numpy broadcasting: missing leading dimensions are 1
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.ndim != 4 or any(m not in (1, f) for m, f in zip(mask.shape, full)):
        raise ValueError(f"packed attention: mask {mask.shape} does not broadcast to {full} "
                         "along its own dimensions")
    return mask.astype(jnp.bool_), True


def _bias_operand(bias: jax.Array | None, qkv: jax.Array) -> tuple[jax.Array, bool]:
    """The kernel's bias operand (float32 [3, H, D], or an empty array) and whether there is one."""
    if bias is None:
        return jnp.zeros((0,), jnp.float32), False
    if bias.shape != qkv.shape[2:] or bias.dtype != jnp.float32:
        raise ValueError(f"packed attention: the bias must be float32 {qkv.shape[2:]} "
                         f"([3, H, D]), got {bias.dtype} {bias.shape}")
    return bias, True


def packed_attention_forward(qkv: jax.Array, mask: jax.Array | None, scale: float,
                             bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Softmax self-attention of a packed float32 ``qkv`` [B, L, 3, H, D] (the fused projection's
    output, q/k/v along axis 2) -> ``(out [B, L, H, D], weights [B, H, L, L])``, with scores
    ``scale * q k^T`` set to float32's lowest value where the boolean ``mask`` (broadcastable to
    [B, H, L, L], True = allowed) is False. ``bias`` ([3, H, D], optional): the projection's
    bias, as if added to ``qkv`` first (the kernel folds it into its own passes). Needs
    ``available()``. Each (batch, head) block runs its scores, softmax and weighted sum in the
    core's cache (no BLAS: a register-tiled loop in ``cpu_kernel.cc``)."""
    batch, length, three, heads, dim = qkv.shape
    if three != 3 or qkv.dtype != jnp.float32:
        raise ValueError(f"packed attention: qkv must be float32 [B, L, 3, H, D], got "
                         f"{qkv.dtype} {qkv.shape}")
    _require_kernel()
    mask, masked = _mask_operand(mask, qkv)
    bias, has_bias = _bias_operand(bias, qkv)
    call = jax.ffi.ffi_call(ATTENTION_TARGETS["forward"], (
        jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, heads, length, length), jnp.float32)),
        vmap_method="sequential")
    return call(qkv, mask, bias, scale=np.float32(scale), masked=masked, has_bias=has_bias)


def packed_attention_backward(qkv: jax.Array, weights: jax.Array, d_out: jax.Array,
                              mask: jax.Array | None, scale: float,
                              bias: jax.Array | None = None):
    """The gradient of ``packed_attention_forward``'s output with respect to ``qkv`` (same
    [B, L, 3, H, D] layout), given that output's cotangent ``d_out`` [B, L, H, D] and the
    forward's ``weights``; with ``bias`` the pair ``(d_qkv, d_bias)``. Masked scores get no
    gradient."""
    _require_kernel()
    batch, length, three, heads, dim = qkv.shape
    if (three != 3 or weights.shape != (batch, heads, length, length)
            or d_out.shape != (batch, length, heads, dim)):
        raise ValueError(f"packed attention backward: qkv {qkv.shape} [B, L, 3, H, D] needs "
                         f"weights [B, H, L, L] and d_out [B, L, H, D], got {weights.shape} "
                         f"and {d_out.shape}")
    mask, masked = _mask_operand(mask, qkv)
    bias, has_bias = _bias_operand(bias, qkv)
    call = jax.ffi.ffi_call(ATTENTION_TARGETS["backward"], (
        jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
        jax.ShapeDtypeStruct(bias.shape, jnp.float32)), vmap_method="sequential")
    d_qkv, d_bias = call(qkv, weights, d_out, mask, bias, scale=np.float32(scale),
                         masked=masked, has_bias=has_bias)
    return (d_qkv, d_bias) if has_bias else d_qkv


_disabled_depth = 0


@contextlib.contextmanager
def disabled():
    """Functions traced inside run XLA's own ops instead of the kernels, e.g. to read XLA's
    cost analysis, which does not look inside custom calls. ``jax.jit`` keeps a function's
    traces, so trace a function here that was not traced before (a new ``make_train_step``).

    >>> with disabled():
    ...     applies(jnp.float32)
    'turned off by cpu_kernel.disabled()'
    """
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


def applies(dtype) -> str | None:
    """Why the kernels cannot run in this trace (None when they can): they need the CPU backend,
    float32, at most one device in the current mesh (a custom call has no sharding rule, so a
    sharded run would gather every operand), the kernel built (warns once if not) and no
    ``disabled()`` around the trace."""
    if _disabled_depth:
        return "turned off by cpu_kernel.disabled()"
    if jax.default_backend() != "cpu":
        return f"backend is {jax.default_backend()}, not cpu"
    if jnp.dtype(dtype) != jnp.float32:
        return f"compute dtype is {jnp.dtype(dtype).name}, not float32"
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return f"the mesh has {mesh.size} devices"
    return None if available() else unavailable_reason()


def layer_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array,
                       eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LayerNorm of float32 ``x`` over its last axis -> ``(y, mean, rstd)``, ``mean`` and
    ``rstd`` (= 1 / sqrt(biased var + eps)) shaped ``x.shape[:-1] + (1,)``; torch's values
    (two-pass variance), one pass over the rows (``cpu_kernel.cc``). Needs ``available()``."""
    _require_kernel()
    if x.dtype != jnp.float32 or scale.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ValueError(f"layer_norm_forward: float32 x with scale and bias of its last axis, "
                         f"got {x.dtype} {x.shape}, {scale.shape}, {bias.shape}")
    stats = jax.ShapeDtypeStruct(x.shape[:-1] + (1,), jnp.float32)
    call = jax.ffi.ffi_call(LAYER_NORM_TARGETS["forward"],
                            (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats),
                            vmap_method="sequential")
    return call(x, scale.astype(jnp.float32), bias.astype(jnp.float32), eps=np.float32(eps))


def layer_norm_backward(x: jax.Array, scale: jax.Array, mean: jax.Array, rstd: jax.Array,
                        d_y: jax.Array, d_residual: jax.Array | None = None,
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dx, d_scale, d_bias)`` of ``layer_norm_forward`` given the output's cotangent;
    ``d_residual`` (x's shape), if given, is added to ``dx`` in the same pass."""
    _require_kernel()
    if (d_y.shape != x.shape or mean.size * x.shape[-1] != x.size or rstd.shape != mean.shape
            or (d_residual is not None and d_residual.shape != x.shape)):
        raise ValueError(f"layer_norm_backward: x {x.shape}, d_y {d_y.shape}, mean "
                         f"{mean.shape}, rstd {rstd.shape} and d_residual "
                         f"{None if d_residual is None else d_residual.shape} do not fit together")
    call = jax.ffi.ffi_call(LAYER_NORM_TARGETS["backward"], (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct(scale.shape, jnp.float32),
        jax.ShapeDtypeStruct(scale.shape, jnp.float32)), vmap_method="sequential")
    residual = (jnp.zeros((0,), jnp.float32) if d_residual is None
                else d_residual.astype(jnp.float32))
    return call(x, scale.astype(jnp.float32), mean, rstd, d_y.astype(jnp.float32), residual,
                add_residual=d_residual is not None)


def dense_weight_gradient(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A dense layer's weight and bias gradients from its float32 input rows ``x`` [K, M] and
    output-gradient rows ``g`` [K, N]: ``(x^T g [M, N], g.sum(0) [N])``. Needs ``available()``.
    Both operands are packed into cache-sized blocks first (``cpu_kernel.cc``); XLA:CPU's
    transposed-operand product took 1.1-1.45x as long on the MAE bench's layers.

    >>> dw, db = dense_weight_gradient(jnp.ones((5, 3)), jnp.ones((5, 2)))
    >>> dw.shape, db.shape, float(dw[0, 0]), float(db[0])
    ((3, 2), (2,), 5.0, 5.0)
    """
    _require_kernel()
    if (x.ndim != 2 or g.ndim != 2 or x.shape[0] != g.shape[0]
            or x.dtype != jnp.float32 or g.dtype != jnp.float32):
        raise ValueError(f"dense_weight_gradient: float32 x [K, M] and g [K, N], got "
                         f"{x.dtype} {x.shape} and {g.dtype} {g.shape}")
    call = jax.ffi.ffi_call(DENSE_GRADIENT_TARGET, (
        jax.ShapeDtypeStruct((x.shape[1], g.shape[1]), jnp.float32),
        jax.ShapeDtypeStruct((g.shape[1],), jnp.float32)), vmap_method="sequential")
    return call(x, g)


def amx_available() -> bool:
    """True when the kernel is built with Intel AMX (bfloat16 tiles) and Linux lets this process
    use them: then ``amx_matmul`` runs."""
    return _load() is None and _AMX["enabled"]


AMX_PASSES = (1, 3, 6)


def amx_matmul(a: jax.Array, b: jax.Array, bias: jax.Array | None = None, *,
               transpose_a: bool = False, transpose_b: bool = False,
               passes: int = 6) -> jax.Array:
    """``op(a) @ op(b) (+ bias)`` for float32 matrices on AMX tiles (``cpu_kernel.cc``): each
    operand is split into bfloat16 pieces while it is packed and ``passes`` products of pieces
    are summed in float32: 6 (default) is as accurate as a float32 product (TPU's HIGHEST split),
    3 is ~2^-16 relative (TPU's HIGH), 1 plain bfloat16. Needs ``amx_available()``.

    >>> amx_matmul(jnp.ones((5, 3)), jnp.ones((3, 2))).shape  # doctest: +SKIP
    (5, 2)
    """
    if not amx_available():
        raise RuntimeError("cpu_kernel.amx_matmul: no AMX here "
                           f"({unavailable_reason() or 'the CPU or kernel lacks AMX'})")
    if passes not in AMX_PASSES:
        raise ValueError(f"amx_matmul: passes must be one of {AMX_PASSES}, got {passes!r}")
    if a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"amx_matmul: float32 matrices, got {a.dtype} {a.shape} and "
                         f"{b.dtype} {b.shape}")
    m, k = a.shape[::-1] if transpose_a else a.shape
    k_b, n = b.shape[::-1] if transpose_b else b.shape
    if k != k_b or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"amx_matmul: op(a) {(m, k)}, op(b) {(k_b, n)} and bias "
                         f"{None if bias is None else bias.shape} do not fit together")
    call = jax.ffi.ffi_call(AMX_MATMUL_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")
    bias_operand = jnp.zeros((0,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    return call(a, b, bias_operand, trans_a=transpose_a, trans_b=transpose_b,
                passes=np.int64(passes), has_bias=bias is not None)
