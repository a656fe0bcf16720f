"""LayerNorm over the last axis with a hand-written backward pass (the layer every zoo block uses).

Values are torch.nn.LayerNorm's: mean and biased variance over the last axis (two passes, not
E[x^2] - E[x]^2), ``(x - mean) / sqrt(var + eps) * scale + bias``, statistics in float32 for
16-bit inputs. The backward pass is the textbook one,
``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`` with ``dxhat = dy * scale``,
from the saved input, mean and ``rstd``; autodiff's version of the same formula compiles on
XLA:CPU into more passes over the activations (MAE ViT-S/16 bench step: ~-2%, same-process A/B).
On a one-device float32 CPU run both directions go through ``zoo.models.cpu_kernel``'s
LayerNorm (one pass over the rows each way; the same formulas). Forward-mode AD needs
``zoo.models.backward.backward_mode("autodiff")``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from zoo.models import cpu_kernel
from zoo.models.backward import hand_written


def _statistics(x, eps):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return x, mean, rstd


def _normalise(x, scale, bias, eps):
    x32, mean, rstd = _statistics(x, eps)
    y = (x32 - mean) * rstd * scale + bias
    return y.astype(x.dtype), (x, mean, rstd)


def _kernel_takes(x, scale) -> bool:
    """Whether this trace runs the CPU kernel (``cpu_kernel.layer_norm_forward``): float32
    input and parameters on a one-device CPU run with the kernel built. On the MAE ViT-S/16
    bench step it is 2-5% faster than XLA's passes (same-process A/Bs)."""
    return scale.dtype == jnp.float32 and cpu_kernel.applies(x.dtype) is None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    if _kernel_takes(x, scale):
        y, mean, rstd = cpu_kernel.layer_norm_forward(x, scale, bias, eps)
        return y, (x, mean, rstd, scale)
    y, (x, mean, rstd) = _normalise(x, scale, bias, eps)
    return y, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, dy):
    x, mean, rstd, scale = residuals
    if _kernel_takes(x, scale):
        return cpu_kernel.layer_norm_backward(x, scale, mean, rstd, dy)
    dy = dy.astype(mean.dtype)
    xhat = (x.astype(mean.dtype) - mean) * rstd
    rows, xhat_rows = dy.reshape(-1, dy.shape[-1]), xhat.reshape(-1, xhat.shape[-1])
    d_scale = jnp.sum(rows * xhat_rows, axis=0).astype(scale.dtype)
    d_bias = jnp.sum(rows, axis=0).astype(scale.dtype)
    d_xhat = dy * scale
    d_x = rstd * (d_xhat - jnp.mean(d_xhat, axis=-1, keepdims=True)
                  - xhat * jnp.mean(d_xhat * xhat, axis=-1, keepdims=True))
    return d_x.astype(x.dtype), d_scale, d_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# LayerNorm that also passes its input through, for pre-norm residual blocks
# (``y, x = norm(x); x = x + branch(y)``). The input's two uses then meet in this backward pass,
# which adds the residual path's gradient while it writes dx: on CPU one kernel pass instead of
# the kernel plus an XLA add over the activations (32 of them in the MAE bench step).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_and_input(x, scale, bias, eps):
    return _layer_norm_fwd(x, scale, bias, eps)[0], x


def _layer_norm_and_input_fwd(x, scale, bias, eps):
    y, residuals = _layer_norm_fwd(x, scale, bias, eps)
    return (y, x), residuals


def _layer_norm_and_input_bwd(eps, residuals, cotangents):
    dy, d_input = cotangents
    x, mean, rstd, scale = residuals
    if _kernel_takes(x, scale):
        return cpu_kernel.layer_norm_backward(x, scale, mean, rstd, dy, d_residual=d_input)
    d_x, d_scale, d_bias = _layer_norm_bwd(eps, residuals, dy)
    return d_x + d_input.astype(d_x.dtype), d_scale, d_bias


_layer_norm_and_input.defvjp(_layer_norm_and_input_fwd, _layer_norm_and_input_bwd)


def _check_shapes(x, scale, bias) -> None:
    if scale.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ValueError(f"apply_layer_norm: input {x.shape} needs scale and bias of shape "
                         f"{x.shape[-1:]}, got {scale.shape} and {bias.shape}")


def apply_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     eps: float = 1e-6) -> jax.Array:
    """LayerNorm of ``x`` over its last axis with ``scale`` and ``bias`` of that size.

    >>> apply_layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), eps=0.0)
    Array([[-1.,  1.]], dtype=float32)
    """
    _check_shapes(x, scale, bias)
    if hand_written():
        return _layer_norm(x, scale, bias, float(eps))
    return _normalise(x, scale, bias, eps)[0]


def apply_layer_norm_and_input(x: jax.Array, scale: jax.Array, bias: jax.Array,
                               eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """``(apply_layer_norm(x, scale, bias, eps), x)``: the same values, for a pre-norm block
    that adds its branch back onto ``x``; the backward pass adds the two uses' gradients of
    ``x`` inside the LayerNorm's own pass (see ``_layer_norm_and_input``)."""
    if hand_written():
        _check_shapes(x, scale, bias)
        return _layer_norm_and_input(x, scale, bias, float(eps))
    return apply_layer_norm(x, scale, bias, eps), x


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters and names) computed through ``apply_layer_norm``;
    settings it does not cover (a mask, other axes, no scale or bias, a device axis name) use
    flax's."""

    def _plain(self, mask) -> bool:
        return (mask is None and self.scale is not None and self.bias is not None
                and self.axis_name is None and self.reduction_axes in (-1, (-1,))
                and self.feature_axes in (-1, (-1,)))

    def __call__(self, x, *, mask=None):
        if not self._plain(mask):
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return apply_layer_norm(x, scale, bias, self.epsilon)

    def with_input(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(self(x), x)`` for a pre-norm residual block: the same values, with the backward
        pass of ``x``'s two uses in one pass (``apply_layer_norm_and_input``)."""
        if not self._plain(None):
            return self(x), x
        promoted, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]),
                                                   dtype=self.dtype)
        if promoted.dtype != x.dtype:   # the residual keeps x's own dtype
            return apply_layer_norm(promoted, scale, bias, self.epsilon), x
        return apply_layer_norm_and_input(x, scale, bias, self.epsilon)
