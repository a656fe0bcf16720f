"""The dense layer every zoo module uses, with a hand-written backward pass.

The values and gradients are those of ``x @ kernel + bias``. The backward pass is written out
because of how XLA:CPU compiles autodiff's version: JAX transposes a dot over a [batch, seq,
features] input into ``transpose(dot(g, x))`` over two contracted dimensions, and XLA:CPU then
copies a transposed activation gradient (e.g. [1536, 800] floats for a ViT-S MLP) before every
weight-gradient product and pads/transposes around the fused qkv projection. Flattening the
leading dimensions and asking for ``dot(x^T, g)`` directly lets the matmul read both operands in
place: the MAE ViT-S/16 bench step drops from ~1.5 s to ~1.3 s (same-process A/B, 2-core CPU).
On a one-device float32 CPU run whose CPU has Intel AMX, all three products (forward, input
gradient, weight gradient) run on AMX's bfloat16 tiles with float32 accuracy
(``cpu_kernel.amx_matmul``, six bfloat16 passes; ``ZOO_AMX=0`` turns it off): the MAE bench
step takes 0.77-0.85x the time of XLA's float32 dots. Without AMX, the weight and bias gradients
of layers with at most 2^20 weights come from one CPU kernel (``cpu_kernel.dense_weight_gradient``:
both operands packed into cache-sized blocks, the bias sums taken on the way), 11-30% faster
than XLA:CPU's transposed-operand product on the MAE bench's layers.

Forward-mode AD (``jax.jvp``) needs ``zoo.models.backward.backward_mode("autodiff")``.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from zoo.models import cpu_kernel
from zoo.models.backward import hand_written


def _forward(x, kernel, bias, precision):
    passes = _amx_passes(x, kernel, precision)
    if passes:
        rows = cpu_kernel.amx_matmul(x.reshape(-1, x.shape[-1]), kernel, bias, passes=passes)
        return rows.reshape(x.shape[:-1] + rows.shape[-1:])
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return y if bias is None else y + bias


# Whether float32 products may run on AMX tiles (``cpu_kernel.amx_matmul``) where the CPU has
# them; False (or ZOO_AMX=0 in the environment) keeps XLA's float32 dots (for A/B comparisons
# and debugging). Read when a layer is traced.
USE_AMX = {"on": os.environ.get("ZOO_AMX", "1") != "0"}


def _amx_passes(x, kernel, precision) -> int:
    """bfloat16 passes per product if this trace runs the layer's products on AMX tiles, else 0:
    float32 operands on a one-device CPU run whose CPU has AMX. ``precision``
    ``lax.Precision.HIGH`` asks for 3 passes (~2^-16 relative, as on TPU); anything else for 6
    (float32's accuracy, what XLA:CPU gives a float32 dot)."""
    if not (USE_AMX["on"] and hand_written() and x.dtype == kernel.dtype == jnp.float32
            and cpu_kernel.applies(x.dtype) is None and cpu_kernel.amx_available()):
        return 0
    high = precision in (lax.Precision.HIGH, "high", "bfloat16_3x") or (
        isinstance(precision, tuple) and lax.Precision.HIGH in precision)
    return 3 if high else 6


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear(x, kernel, bias, precision):
    return _forward(x, kernel, bias, precision)


def _linear_fwd(x, kernel, bias, precision):
    return _forward(x, kernel, bias, precision), (x, kernel, bias)


# The kernel re-reads and re-writes the weight gradient once per 384-row block of inputs: up to
# 2^20 floats (4 MiB, about two cores' L2) that stays in cache and the kernel won 11-30% on the
# MAE layers; BERT-base's 768 x 3072 gradients went through L3 and lost 10-16%.
KERNEL_MAX_WEIGHTS = 1 << 20


def _kernel_takes(x, g, kernel) -> bool:
    """Whether this trace computes the weight gradient with the CPU kernel: float32 operands
    on a one-device CPU run with the kernel built (float32 on CPU is full precision whatever
    ``precision`` asks), for a weight of at most ``KERNEL_MAX_WEIGHTS`` entries."""
    return (x.dtype == g.dtype == kernel.dtype == jnp.float32
            and kernel.size <= KERNEL_MAX_WEIGHTS and cpu_kernel.applies(x.dtype) is None)


def _linear_bwd(precision, residuals, g):
    x, kernel, bias = residuals
    rows, x_rows = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    passes = _amx_passes(x, kernel, precision) if g.dtype == jnp.float32 else 0
    if passes:
        d_x = cpu_kernel.amx_matmul(rows, kernel, transpose_b=True, passes=passes).reshape(x.shape)
        d_kernel = cpu_kernel.amx_matmul(x_rows, rows, transpose_a=True, passes=passes)
        column_sums = None
    else:
        d_x = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
        if _kernel_takes(x, g, kernel):
            d_kernel, column_sums = cpu_kernel.dense_weight_gradient(x_rows, rows)
        else:
            d_kernel = lax.dot_general(x_rows, rows, (((0,), (0,)), ((), ())),
                                       precision=precision)
            column_sums = None
    if bias is not None and column_sums is None:
        column_sums = rows.sum(0, dtype=jnp.float32)
    d_bias = None if bias is None else column_sums.astype(bias.dtype)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype), d_bias


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
           precision=None) -> jax.Array:
    """``x @ kernel + bias`` over the last axis of ``x`` (any leading shape), with the backward
    pass described in the module docstring.

    >>> linear(jnp.ones((2, 5, 3)), jnp.ones((3, 4)), jnp.zeros(4)).shape
    (2, 5, 4)
    """
    if x.shape[-1] != kernel.shape[0] or (bias is not None and bias.shape != kernel.shape[1:]):
        raise ValueError(f"linear: input {x.shape}, kernel {kernel.shape} and bias "
                         f"{None if bias is None else bias.shape} do not fit together")
    if hand_written():
        return _linear(x, kernel, bias, precision)
    # Autodiff over flattened rows: over [batch, seq, features] XLA:CPU fuses the transposed
    # weight-gradient operand with the whole residual-gradient chain (the MAE step took 1.7x).
    rows = _forward(x.reshape(-1, x.shape[-1]), kernel, bias, precision)
    return rows.reshape(x.shape[:-1] + rows.shape[-1:])


class Dense(nnx.Linear):
    """``nnx.Linear`` (same parameters, names and initialisers) computed through ``linear``."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if out_sharding is not None or self.preferred_element_type is not None:
            return super().__call__(inputs, out_sharding=out_sharding)
        inputs, kernel, bias = self._promoted(inputs)
        return linear(inputs, kernel, bias, self.precision)

    def _promoted(self, inputs):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        return self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)

    def product_and_bias(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``(inputs @ kernel, bias)`` (the bias not yet added, None if the layer has none),
        dtypes as ``__call__``'s: for a consumer that adds the bias itself (the CPU attention
        kernel folds the qkv projection's bias into its own passes)."""
        if self.preferred_element_type is not None:
            return self(inputs), None
        inputs, kernel, bias = self._promoted(inputs)
        return linear(inputs, kernel, None, self.precision), bias
