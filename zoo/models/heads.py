"""Small heads that contrastive and self-distillation objectives put on a backbone.

* ``BatchNorm``: training-mode batch normalisation over the GLOBAL batch (what SimCLR and BYOL
  get from cross-replica / SyncBN): statistics of the current batch, no running averages (only
  the pretraining step uses these heads; evaluation reads the backbone).
* ``ProjectionMLP``: Linear -> BN -> ReLU blocks then a final Linear (SimCLR's projection head,
  BYOL's projector and predictor).
* ``DinoHead``: DINO's 3-layer GELU MLP (optionally with BN after each hidden Linear, the
  reference's ``use_bn``), bottleneck, L2 normalisation and a weight-normalised last layer whose
  norms are fixed to 1 (``norm_last_layer=True``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.models.layers import dense, gelu, param

BN_EPS = 1e-5   # torch.nn.BatchNorm1d's and SimCLR's BATCH_NORM_EPSILON


class BatchNorm(nnx.Module):
    """Normalises ``x [..., B, D]`` over the batch axis (-2) with the biased variance, as
    PyTorch's BatchNorm does in training; leading axes (e.g. views) keep separate statistics."""

    def __init__(self, width: int, *, use_scale: bool = True, use_bias: bool = True,
                 rngs: nnx.Rngs):
        self.scale = (param(rngs, nnx.initializers.ones_init(), (width,), ("embed",))
                      if use_scale else None)
        self.bias = (param(rngs, nnx.initializers.zeros_init(), (width,), ("embed",))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-2, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-2, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + BN_EPS)
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


class ProjectionMLP(nnx.Module):
    """``num_layers`` Linear layers; every one but the last is followed by BN and ReLU.

    ``last_bn`` adds a BN without bias after the last layer (SimCLR v2's head; its last Linear
    has no bias). BYOL's projector/predictor: ``num_layers=2, last_bn=False``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int = 2,
                 last_bn: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nnx.List([
            dense(a, b, ("embed", "mlp") if i < num_layers - 1 else ("mlp", "embed"),
                  rngs=rngs, dtype=dtype, use_bias=not (last_bn and i == num_layers - 1))
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
        self.norms = nnx.List([BatchNorm(hidden_dim, rngs=rngs) for _ in range(num_layers - 1)])
        self.last_norm = BatchNorm(out_dim, use_bias=False, rngs=rngs) if last_bn else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer, norm in zip(self.layers[:-1], self.norms):
            x = jax.nn.relu(norm(layer(x)))
        x = self.layers[-1](x)
        return self.last_norm(x) if self.last_norm is not None else x


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along the last axis (torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DinoHead(nnx.Module):
    """DINO's projection head: MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised
    linear layer without bias whose per-output weight vectors are normalised to unit length
    (``norm_last_layer=True``: the weight-norm gain is fixed to 1).

    ``use_bn`` (the reference's ``--use_bn_in_head``): a BatchNorm over the batch after every
    hidden Linear (before the GELU), as in ``DINOHead(use_bn=True)``; the batch is every row of
    ``x [N, D]`` (the reference runs the head once over all crops of the batch).
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, use_bn: bool = False,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        self.layers = nnx.List([dense(a, b, ("embed", "mlp"), rngs=rngs, dtype=dtype)
                                for a, b in zip(dims[:-1], dims[1:])])
        self.norms = (nnx.List([BatchNorm(hidden_dim, rngs=rngs) for _ in dims[1:-1]])
                      if use_bn else None)
        self.last = param(rngs, nnx.initializers.truncated_normal(0.02),
                          (bottleneck_dim, out_dim), ("embed", "mlp"))

    def __call__(self, x: jax.Array, *, freeze_last: jax.Array | bool = False) -> jax.Array:
        """``freeze_last`` (may be traced): no gradient reaches the last layer's weights."""
        for i, layer in enumerate(self.layers[:-1]):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = gelu(x)
        x = l2_normalize(self.layers[-1](x))
        weight = self.last[...]
        weight = jnp.where(freeze_last, jax.lax.stop_gradient(weight), weight)
        weight = weight / jnp.linalg.norm(weight, axis=0, keepdims=True)
        return x @ weight
