"""Transformer building blocks shared by every backbone and head (pre-norm, as in timm's ViT).

Parameters carry logical axis names ("embed", "mlp", "heads"); ``zoo.mesh`` maps them to mesh
axes. ``dtype`` is the compute dtype (e.g. bfloat16); parameters are always float32.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.mesh import shard_activation
from zoo.models import cpu_kernel
from zoo.models.backward import hand_written
from zoo.models.layer_norm import LayerNorm
from zoo.models.linear import Dense

LN_EPS = 1e-6  # MAE/timm use LayerNorm(eps=1e-6)


# Flax 0.12 shards annotated parameters eagerly, which needs a mesh at construction time. Ours
# keep their logical axes as metadata instead and the trainer shards them with
# jit(out_shardings=...), so modules build anywhere: notebooks, tests, eval_shape.
def _lazy_sharding():
    return nnx.use_eager_sharding(False)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
    """A float32 parameter with logical axis names, e.g. a cls token ``(None, None, "embed")``."""
    with _lazy_sharding():
        return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape))


def dense(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
          rngs: nnx.Rngs, dtype=jnp.float32, use_bias: bool = True) -> Dense:
    """A Linear layer with xavier-uniform kernel and zero bias (MAE's ``_init_weights``); its
    backward pass is ``zoo.models.linear``'s."""
    with _lazy_sharding():
        return Dense(
            in_features, out_features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias,
            kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), axes),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
            rngs=rngs)


def layer_norm(width: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> LayerNorm:
    """LayerNorm(eps=1e-6) over the last axis, with ``zoo.models.layer_norm``'s backward pass."""
    with _lazy_sharding():
        return LayerNorm(
            width, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
            scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, ``x * Phi(x)``, in the formula of torch.nn.GELU() (the references' default):
    ``0.5 * x * (1 + erf(x / sqrt(2)))``. ``jax.nn.gelu(x, approximate=False)`` gives the same
    values through ``erfc``, which XLA:CPU evaluates about twice as slowly as ``erf`` (the MAE
    ViT-S/16 bench step: ~60 ms of ~1.5 s, same-process A/B)."""
    return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))


# How attention is computed (``model.attention``); every choice gives the same values up to
# rounding:
#   "einsum": scores, softmax and weighted sum as separate ops in a heads-major layout (on
#             XLA:CPU ~10% faster for the whole MAE step than jax.nn.dot_product_attention's
#             [B, L, H, D] einsums; bench_mae),
#   "blas":   the same values through zoo.models.cpu_kernel (CPU, float32, one device):
#             self-attention as one fused kernel per (batch, head) over the packed qkv
#             projection (``packed_blas_attention``), cross-attention with its six matmuls as
#             BLAS sgemms (``blas_attention``); the MAE ViT-S/16 bench step is 6% faster than
#             with the sgemm version for self-attention too, which was 5-8% faster than "einsum",
#   "fused":  jax.nn.dot_product_attention, with cuDNN's fused (flash) kernel on GPU where
#             ``cudnn_takes`` (unmasked, 16-bit, head size <= 128), XLA's kernel otherwise,
#   "auto":   "fused" on GPU with 16-bit compute and no mask; "blas" where it applies (and the
#             kernel built); "einsum" otherwise.
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "blas", "fused")


def blas_applies(dtype) -> str | None:
    """Why "blas" attention cannot run in this trace (None when it can): it needs the CPU
    backend, float32 compute, at most one device in the current mesh (a custom call has no
    sharding rule, so a sharded run would gather every operand) and the hand-written backward
    mode (``backward_mode("autodiff")`` is for forward-mode AD, which a custom_vjp lacks)."""
    if not hand_written():
        return 'backward_mode("autodiff") is active'
    return cpu_kernel.applies(dtype)   # CPU, float32, one device, kernel built (warns once)


def _check_attention_name(implementation: str) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention: unknown {implementation!r}; allowed: "
                         f"{ATTENTION_IMPLEMENTATIONS}")


def resolve_attention(implementation: str, dtype, masked: bool) -> str:
    """"einsum", "blas" or "fused" for this trace (``auto`` looks at the backend, dtype and
    mesh). An explicit "blas" that cannot run here raises a one-line error saying why."""
    _check_attention_name(implementation)
    if implementation == "blas":
        why_not = blas_applies(dtype)
        if why_not is not None:
            raise ValueError(f"model.attention='blas' cannot run here: {why_not}; use 'auto' "
                             "or 'einsum'")
    if implementation != "auto":
        return implementation
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if on_gpu and half and not masked:
        return "fused"
    return "blas" if blas_applies(dtype) is None else "einsum"


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis, differentiated as ``y * (t - sum(y * t))`` from its output
    ``y`` alone. (``jax.nn.softmax`` does the same only under the ``jax_softmax_custom_jvp``
    flag, off by default; otherwise autodiff goes through exp / sum and its backward reads two
    [B, H, L, L] tensors: the MAE ViT-S/16 bench step is ~1-3% faster with this one.)

    >>> softmax(jnp.array([0.0, jnp.log(3.0)]))
    Array([0.25, 0.75], dtype=float32)
    """
    unnormalised = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis=-1, keepdims=True))


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     mask: jax.Array | None) -> jax.Array:
    """Softmax attention over heads-major [B, H, L, D] queries and [B, H, S, D] keys/values ->
    [B, H, L, D]; ``mask`` (optional, bool, broadcastable to [B, H, L, S]) is True where
    allowed. Scores and softmax are in float32 whatever the compute dtype."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q * q.shape[-1]**-0.5, k).astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = softmax(scores).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def blas_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                   mask: jax.Array | None) -> jax.Array:
    """``einsum_attention`` (float32, same layouts and mask) with its matmuls, forward and
    backward, through ``cpu_kernel.batched_matmul``. The backward pass is written out: with
    ``p = softmax(s)``, ``ds = p * (dp - sum(p * dp))``, zero where the mask removes a key.
    Its backward is not differentiable again (the kernel has no derivative): second-order
    gradients, like forward mode, need ``backward_mode("autodiff")``. Remat policies that keep
    dots do not see the kernel's products as dots, so they recompute the scores."""
    return _blas_attention(q, k, v, mask)


def _blas_attention_forward(q, k, v, mask):
    scaled_q = q * q.shape[-1]**-0.5
    scores = cpu_kernel.batched_matmul(scaled_q, k, transpose_b=True)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = softmax(scores)
    return cpu_kernel.batched_matmul(weights, v), (scaled_q, k, v, weights, mask)


def _blas_attention_backward(residuals, d_out):
    scaled_q, k, v, weights, mask = residuals
    d_weights = cpu_kernel.batched_matmul(d_out, v, transpose_b=True)
    d_scores = weights * (d_weights - jnp.sum(weights * d_weights, axis=-1, keepdims=True))
    if mask is not None:  # fully masked rows have uniform weights but no gradient
        d_scores = jnp.where(mask, d_scores, 0.0)
    d_q = cpu_kernel.batched_matmul(d_scores, k) * scaled_q.shape[-1]**-0.5
    d_k = cpu_kernel.batched_matmul(d_scores, scaled_q, transpose_a=True)
    d_v = cpu_kernel.batched_matmul(weights, d_out, transpose_a=True)
    return d_q, d_k, d_v, None  # no cotangent for the (boolean or absent) mask


@jax.custom_vjp
def _blas_attention(q, k, v, mask):
    return _blas_attention_forward(q, k, v, mask)[0]


_blas_attention.defvjp(_blas_attention_forward, _blas_attention_backward)


def packed_blas_attention(qkv: jax.Array, mask: jax.Array | None,
                          bias: jax.Array | None = None) -> jax.Array:
    """Self-attention of a packed float32 qkv projection [B, L, 3, H, D] -> [B, L, H, D] (the
    values of ``einsum_attention`` on its heads-major views, same mask) through the CPU
    kernel's fused forward and backward (``cpu_kernel.packed_attention_forward``): no
    transposes to a heads-major layout, and each (batch, head)'s scores stay in the core's
    cache (MAE decoder attention, forward + backward: ~0.75x ``blas_attention``'s time).
    ``bias`` ([3, H, D], optional): the projection's bias, which the kernel folds in (the same
    values as ``qkv + bias``, without XLA's pass over the projection to add it).
    Not differentiable twice, as ``blas_attention``."""
    return _packed_blas_attention(qkv, mask, bias)


def _packed_forward(qkv, mask, bias):
    out, weights = cpu_kernel.packed_attention_forward(qkv, mask, qkv.shape[-1]**-0.5, bias)
    return out, (qkv, weights, mask, bias)


def _packed_backward(residuals, d_out):
    qkv, weights, mask, bias = residuals
    grads = cpu_kernel.packed_attention_backward(qkv, weights, d_out, mask,
                                                 qkv.shape[-1]**-0.5, bias)
    d_qkv, d_bias = grads if bias is not None else (grads, None)
    return d_qkv, None, d_bias  # no cotangent for the (boolean or absent) mask


@jax.custom_vjp
def _packed_blas_attention(qkv, mask, bias):
    return _packed_forward(qkv, mask, bias)[0]


_packed_blas_attention.defvjp(_packed_forward, _packed_backward)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array | None) -> jax.Array:
    """The same over [B, L, H, D] layouts through jax.nn.dot_product_attention: cuDNN's fused
    kernel on GPU where ``cudnn_takes`` says it applies, XLA's kernel otherwise (decided from
    static shapes and dtypes, so remat and scan see the same choice as the plain forward)."""
    if jax.default_backend() == "gpu" and cudnn_takes(q, k, mask):
        return _padded_attention(q, k, v, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def cudnn_takes(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> bool:
    """Whether zoo sends this attention to cuDNN's flash kernel: 16-bit operands, a head size
    that is a multiple of 8 and at most 128, the same head size for keys, and no mask (jax
    turns a mask into a bias, which cuDNN refuses for many shapes when training)."""
    half = q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
    head = q.shape[-1]
    return mask is None and half and head % 8 == 0 and head <= 128 and k.shape[-1] == head


def _padded_attention(q, k, v, implementation="cudnn"):
    """Unmasked attention with odd lengths padded by one zero token: jax 0.11's cuDNN path
    refuses odd lengths when training (e.g. ViT-B/16's 197 tokens; seen on an H200). The
    padding is masked out through the kernel's sequence lengths and the extra query row dropped.
    (``implementation="xla"`` runs the same padding anywhere, for tests.)"""
    batch, length, source = q.shape[0], q.shape[1], k.shape[1]
    if length % 2 == 0 and source % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))  # noqa: E731
    out = jax.nn.dot_product_attention(
        pad(q), pad(k), pad(v), implementation=implementation,
        query_seq_lengths=jnp.full((batch,), length, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), source, jnp.int32))
    return out[:, :length]


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (bias on, as MAE's qkv_bias=True).

    ``implementation`` is one of ATTENTION_IMPLEMENTATIONS (``set_attention`` changes it for a
    whole model)."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 implementation: str = "auto"):
        if width % num_heads:
            raise ValueError(f"attention: width {width} is not divisible by heads {num_heads}")
        self.num_heads = num_heads
        self.attention_implementation = implementation
        self.qkv = dense(width, 3 * width, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.proj = dense(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rows: jax.Array | None = None) -> jax.Array:
        """``mask`` (optional, bool, broadcastable to [B, heads, L, L]) is True where allowed.
        ``rows`` (optional, int [B, n]): return only these query rows, [B, n, W] (every token
        is still a key and value; the output projection runs on the n rows only)."""
        batch, length, width = x.shape
        shape = (3, self.num_heads, width // self.num_heads)
        qkv, bias = self.qkv.product_and_bias(x)
        qkv = qkv.reshape(batch, length, *shape)
        how = resolve_attention(self.attention_implementation, qkv.dtype, mask is not None)
        if how == "blas":   # the kernel folds the bias in (no pass over qkv to add it)
            out = packed_blas_attention(qkv, mask, None if bias is None else bias.reshape(shape))
            return self._project(out.reshape(batch, length, width), rows)
        if bias is not None:
            qkv = qkv + bias.reshape(shape)
        if how == "fused":
            out = fused_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
        else:
            # One transpose to heads-major [3, B, H, L, D] (see ATTENTION_IMPLEMENTATIONS).
            out = einsum_attention(*jnp.transpose(qkv, (2, 0, 3, 1, 4)), mask)
            out = jnp.transpose(out, (0, 2, 1, 3))
        return self._project(out.reshape(batch, length, width), rows)

    def _project(self, out: jax.Array, rows: jax.Array | None) -> jax.Array:
        if rows is not None:
            out = jnp.take_along_axis(out, rows[..., None], axis=1)
        return self.proj(out)


def set_attention(model: nnx.Module, implementation: str) -> None:
    """Sets ``implementation`` on every attention module of ``model`` (in place)."""
    _check_attention_name(implementation)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "attention_implementation"):
            module.attention_implementation = implementation


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = dense(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm Transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.norm1 = layer_norm(width, rngs=rngs, dtype=dtype)
        self.attn = Attention(width, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(width, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rows: jax.Array | None = None) -> jax.Array:
        """``rows`` (optional, int [B, n]): compute only these tokens' outputs, [B, n, W]."""
        normed, x = self.norm1.with_input(x)
        attended = self.attn(normed, mask, rows)
        if rows is not None:
            x = jnp.take_along_axis(x, rows[..., None], axis=1)
        normed, x = self.norm2.with_input(x + attended)
        x = x + self.mlp(normed)
        return shard_activation(x, ("batch", "seq", "act_embed"))


# ``model.remat``: what a block keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,                                                  # keep everything
    "full": jax.checkpoint_policies.nothing_saveable,              # keep only block inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,   # keep weight matmuls
    "dots_with_batch": jax.checkpoint_policies.dots_saveable,     # keep every matmul output
}


def call_block(block: nnx.Module, *args, remat: str = "none"):
    """``block(*args)``, rematerialised under the ``remat`` policy (same values, less memory,
    more FLOPs in the backward pass)."""
    if remat == "none":
        return block(*args)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat: unknown {remat!r}; allowed: {tuple(REMAT_POLICIES)}")
    return nnx.remat(lambda b, *a: b(*a), policy=REMAT_POLICIES[remat])(block, *args)


class ScannedBlocks(nnx.Module):
    """``depth`` blocks whose parameters are stacked on a leading ``layers`` axis (never
    sharded), run with one ``nnx.scan``: the compiled program holds ONE block, so deep models
    compile in the time of a shallow one. ``make_block(rngs)`` builds one block.

    Initial values differ from the unscanned list (each layer's keys are split differently);
    ``stack_blocks`` converts a list's parameters into this layout."""

    def __init__(self, depth: int, make_block, *, rngs: nnx.Rngs, remat: str = "none"):
        self.depth, self.remat = depth, remat

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs):
            return make_block(rngs)

        self.layers = create(rngs)

    def __call__(self, x: jax.Array, *args, return_layers: bool = False):
        """``x`` through every layer; with ``return_layers`` also ``[depth, ...]`` outputs."""
        remat = self.remat

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(x, block):
            y = call_block(block, x, *args, remat=remat)
            return y, (y if return_layers else None)

        x, outputs = run(x, self.layers)
        return (x, outputs) if return_layers else x


def stack_blocks(block_states: list) -> Any:
    """Per-layer parameter states (``nnx.state(block, nnx.Param)``) -> the ``ScannedBlocks``
    layout (leaves stacked on a new leading axis)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *block_states)


class TransformerStack(nnx.Module):
    """``depth`` blocks followed by a final LayerNorm (``scan``: as one ``ScannedBlocks``)."""

    def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, remat: str = "none", scan: bool = False):
        self.remat, self.scan, self.num_heads = remat, scan, num_heads
        make = lambda rngs: Block(width, num_heads, mlp_dim, rngs=rngs, dtype=dtype)  # noqa
        self.blocks = (ScannedBlocks(depth, make, rngs=rngs, remat=remat) if scan
                       else nnx.List([make(rngs) for _ in range(depth)]))
        self.norm = layer_norm(width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
                 return_layers: bool = False, rows: jax.Array | None = None):
        """[B, L, W] -> [B, L, W] after the final norm; with ``return_layers`` also the list of
        every block's output (before the final norm), e.g. for multi-layer feature fusion.

        ``rows`` (optional, int [B, n]): only these tokens' outputs are wanted, [B, n, W]. The
        last block then runs its output projection and MLP on those rows alone (the same values
        for them: the rows' queries still attend over every token); a scanned stack computes
        every row and gathers at the end."""
        if rows is not None:
            if return_layers:
                raise ValueError("TransformerStack: rows and return_layers do not go together")
            blocks = [] if self.scan else list(self.blocks)
            if self.scan:   # one compiled block for all layers: every row, gathered below
                x = self.blocks(x, mask)
            for block in blocks[:-1]:
                x = call_block(block, x, mask, remat=self.remat)
            if blocks:
                return self.norm(call_block(blocks[-1], x, mask, rows, remat=self.remat))
            return self.norm(jnp.take_along_axis(x, rows[..., None], axis=1))
        if self.scan:
            if not return_layers:
                return self.norm(self.blocks(x, mask))
            x, stacked = self.blocks(x, mask, return_layers=True)
            return self.norm(x), [stacked[i] for i in range(stacked.shape[0])]
        layers = []
        for block in self.blocks:
            x = call_block(block, x, mask, remat=self.remat)
            layers.append(x)
        return (self.norm(x), layers) if return_layers else self.norm(x)
