"""Analytic model FLOPs and the matmul peak they are measured against (MFU).

Counts follow the PaLM appendix convention: a multiply-add is 2 FLOPs, only matmuls and attention
contractions count, and a train step costs 3x the forward pass (backward = 2x forward). Each part
counts the tokens it really sees (MAE's encoder sees only the kept patches).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def dense_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int,
                      last_rows: int | None = None) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks over ``tokens`` tokens (one example).
    ``last_rows``: the last block's output projection and MLP run on that many tokens only
    (``TransformerStack``'s ``rows``); its qkv projection and attention still see them all."""
    def block(rows: int) -> float:
        qkv = dense_flops(tokens, width, 3 * width)
        attention = 2 * 2.0 * tokens * tokens * width  # q @ k^T and attn @ v
        rest = (dense_flops(rows, width, width) + dense_flops(rows, width, mlp_dim)
                + dense_flops(rows, mlp_dim, width))
        return qkv + attention + rest
    if depth == 0:
        return 0.0
    return (depth - 1) * block(tokens) + block(tokens if last_rows is None else last_rows)


def train_step_flops(forward_flops_per_example: float, batch_size: int) -> float:
    return 3.0 * forward_flops_per_example * batch_size


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA reports for a compiled program (None if the backend does not say)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def measure_matmul_peak(size: int | None = None, dtype=jnp.float32, repeats: int = 5,
                        device=None) -> float:
    """Best achieved FLOP/s of a ``size``x``size`` matmul on one device (the MFU denominator).

    ``size`` defaults to 2048 on CPU and 8192 on accelerators, where a smaller product is too
    short to fill the chip. On accelerators each timing covers 10 back-to-back products, so the
    host's dispatch of one call does not count against the device. On a CPU where zoo's dense
    layers run float32 products on AMX tiles (``cpu_kernel.amx_matmul``, float32-accurate), the
    peak is the faster of that product and XLA's: MFU is then against the best float32 product
    this machine offers, not against its float32 FMAs alone.
    """
    device = device or jax.devices()[0]
    on_cpu = device.platform == "cpu"
    size = size or (2048 if on_cpu else 8192)
    chained = 1 if on_cpu else 10
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((size, size)),
                                   dtype), device)
    products = [jax.jit(lambda x, y: x @ y)]
    if on_cpu and jnp.dtype(dtype) == jnp.float32 and _amx_products_on():
        from zoo.models import cpu_kernel
        products.append(jax.jit(lambda x, y: cpu_kernel.amx_matmul(x, y)))
    best = float("inf")
    for matmul in products:
        matmul(a, a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(chained):
                out = matmul(a, a)
            out.block_until_ready()
            best = min(best, (time.perf_counter() - start) / chained)
    return 2.0 * size**3 / best


def _amx_products_on() -> bool:
    """Whether zoo's dense layers run their float32 products on AMX tiles in this process."""
    from zoo.models import cpu_kernel, linear
    return linear.USE_AMX["on"] and cpu_kernel.amx_available()
