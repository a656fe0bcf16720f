"""Which backward pass zoo's dense and layer-norm layers use while a model is traced.

Both layers have a hand-written backward pass (``jax.custom_vjp``; see ``zoo.models.linear``
and ``zoo.models.layer_norm`` for why: XLA:CPU compiles autodiff's version into extra copies
and passes). A ``custom_vjp`` supports reverse mode (grad, vjp, remat, scan, vmap) but not
forward mode, so ``jax.jvp``/``jax.jacfwd`` through a zoo model need ``backward_mode("autodiff")``,
which traces the same layers as plain JAX code (and makes ``model.attention="auto"`` take the
einsum path instead of the "blas" kernel, whose backward is hand-written too).
"""
from __future__ import annotations

import contextlib

BACKWARD_MODES = ("hand", "autodiff")
_MODE = {"value": "hand"}


@contextlib.contextmanager
def backward_mode(mode: str):
    """Sets the backward pass of the layers traced inside the block: "hand" (default) or
    "autodiff" (JAX's own, which also supports forward-mode AD). Tracing happens at a jitted
    function's first call, so make that call inside the block.

    >>> with backward_mode("autodiff"):
    ...     y, tangent = jax.jvp(model, (x,), (dx,))  # doctest: +SKIP
    """
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward_mode: unknown mode {mode!r}; allowed: {BACKWARD_MODES}")
    old = _MODE["value"]
    _MODE["value"] = mode
    try:
        yield
    finally:
        _MODE["value"] = old


def hand_written() -> bool:
    """True unless a ``backward_mode("autodiff")`` block is active."""
    return _MODE["value"] == "hand"
