"""Transformers over token sequences: a bidirectional encoder, a decoder-only model (causal or
prefix-LM attention) and a T5-style encoder-decoder. They reuse the ViT's pre-norm ``Block``.

Tokens are embedded with one table that is also the output projection (tied, as in BERT and T5);
learned (default) or fixed sin-cos 1-D position embeddings are added. Pad tokens (id 0) are
never attended to. ``features(tokens)`` is the frozen view for probes: the mean of the final
hidden states over non-pad tokens.

Example::

    enc = TextTransformer(vocab_size=363, max_len=128, width=64, depth=2, num_heads=2,
                          mlp_dim=128, rngs=nnx.Rngs(0))
    hidden = enc(tokens)                     # [B, L, 64]
    logits = enc.logits(hidden)              # [B, L, 363]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.mesh import shard_activation
from zoo.models.layers import (Attention, Block, Mlp, ScannedBlocks, blas_attention, call_block,
                               dense, fused_attention, layer_norm, param, resolve_attention,
                               softmax)
from zoo.models.posemb import sincos_1d
from zoo.text import PAD

TEXT_POSEMB_KINDS = ("learn", "sincos1d", "none")
ARCHITECTURES = ("encoder", "decoder", "encdec")


def causal_mask(length: int) -> jax.Array:
    """[1, 1, L, L] bool, True where query i may attend to key j <= i."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def prefix_mask(prefix_len: jax.Array, length: int) -> jax.Array:
    """[B, 1, L, L]: bidirectional among the first ``prefix_len`` tokens, causal after."""
    keys = jnp.arange(length)
    in_prefix = keys[None, :] < prefix_len[:, None]                        # [B, L] over keys
    return causal_mask(length) | in_prefix[:, None, None, :]


def key_padding_mask(tokens: jax.Array) -> jax.Array:
    """[B, 1, 1, L]: True at keys that are not padding."""
    return (tokens != PAD)[:, None, None, :]


def masked_mean(hidden: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean over the non-pad positions: [B, L, W] -> [B, W] (float32)."""
    weights = (tokens != PAD).astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class TokenEmbedding(nnx.Module):
    """Token table (tied input/output) plus position embeddings."""

    def __init__(self, vocab_size: int, max_len: int, width: int, *, posemb: str = "learn",
                 rngs: nnx.Rngs, dtype=jnp.float32):
        if posemb not in TEXT_POSEMB_KINDS:
            raise ValueError(f"model.posemb: unknown {posemb!r} for text; allowed: "
                             f"{TEXT_POSEMB_KINDS}")
        self.vocab_size, self.max_len, self.width = vocab_size, max_len, width
        self.posemb_kind, self.dtype = posemb, dtype
        self.table = param(rngs, nnx.initializers.normal(0.02), (vocab_size, width),
                           ("vocab", "embed"))
        if posemb == "learn":
            self.posemb = param(rngs, nnx.initializers.normal(0.02), (max_len, width),
                                (None, "embed"))

    def __call__(self, tokens: jax.Array, offset: int = 0) -> jax.Array:
        length = tokens.shape[-1]
        if offset + length > self.max_len:
            raise ValueError(f"model: sequence of {length} tokens is longer than the position "
                             f"table ({self.max_len}); raise data.seq_len")
        x = jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)
        if self.posemb_kind == "learn":
            x = x + self.posemb[offset:offset + length].astype(self.dtype)
        elif self.posemb_kind == "sincos1d":
            x = x + jnp.asarray(sincos_1d(self.width, np.arange(offset, offset + length)),
                                self.dtype)
        return shard_activation(x, ("batch", "seq", "act_embed"))

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection: [..., W] -> [..., vocab] logits (float32)."""
        return jnp.einsum("...w,vw->...v", hidden, self.table[...].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)


class TextTransformer(nnx.Module):
    """Encoder (``causal=False``) or decoder-only model (``causal=True``) over tokens.

    A decoder given ``prefix_len`` [B] attends bidirectionally within each example's prefix and
    causally after it (prefix LM)."""

    def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int,
                 num_heads: int, mlp_dim: int, causal: bool = False, posemb: str = "learn",
                 dtype=jnp.float32, rngs: nnx.Rngs, remat: str = "none", scan: bool = False):
        self.vocab_size, self.max_len, self.width, self.depth = vocab_size, max_len, width, depth
        self.mlp_dim, self.causal, self.dtype, self.remat = mlp_dim, causal, dtype, remat
        self.num_heads, self.scan = num_heads, scan
        self.embedding = TokenEmbedding(vocab_size, max_len, width, posemb=posemb, rngs=rngs,
                                        dtype=dtype)
        make = lambda rngs: Block(width, num_heads, mlp_dim, rngs=rngs, dtype=dtype)  # noqa
        self.blocks = (ScannedBlocks(depth, make, rngs=rngs, remat=remat) if scan
                       else nnx.List([make(rngs) for _ in range(depth)]))
        self.norm = layer_norm(width, rngs=rngs, dtype=dtype)

    def attention_mask(self, tokens: jax.Array, prefix_len: jax.Array | None) -> jax.Array:
        mask = key_padding_mask(tokens)
        if prefix_len is not None:
            mask = mask & prefix_mask(prefix_len, tokens.shape[1])
        elif self.causal:
            mask = mask & causal_mask(tokens.shape[1])
        return mask

    def __call__(self, tokens: jax.Array, prefix_len: jax.Array | None = None,
                 key_mask: jax.Array | None = None) -> jax.Array:
        """int tokens [B, L] -> final hidden states [B, L, width] (after the last LayerNorm).

        ``key_mask`` (optional, bool [B, L]) further limits every layer's keys and values to
        the True tokens; every token is still a query."""
        if prefix_len is not None and not self.causal:
            raise ValueError("prefix_len is for decoder models (causal=True)")
        mask = self.attention_mask(tokens, prefix_len)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
        x = self.embedding(tokens)
        if self.scan:
            return self.norm(self.blocks(x, mask))
        for block in self.blocks:
            x = call_block(block, x, mask, remat=self.remat)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.embedding.attend(hidden)

    def features(self, tokens: jax.Array) -> jax.Array:
        """Probe view: mean of the final hidden states over non-pad tokens -> [B, width]."""
        return masked_mean(self(tokens), tokens)


class CrossAttention(nnx.Module):
    """Queries from the decoder, keys and values from the encoder's output (T5's EncDecAttn)."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 implementation: str = "auto"):
        self.num_heads = num_heads
        self.attention_implementation = implementation  # layers.ATTENTION_IMPLEMENTATIONS
        self.q = dense(width, width, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.kv = dense(width, 2 * width, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.proj = dense(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, memory: jax.Array, mask: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        heads, head_dim = self.num_heads, width // self.num_heads
        q = self.q(x).reshape(batch, length, heads, head_dim)
        k, v = jnp.moveaxis(self.kv(memory).reshape(batch, -1, 2, heads, head_dim), 2, 0)
        how = resolve_attention(self.attention_implementation, q.dtype, mask is not None)
        if how == "fused":
            out = fused_attention(q, k, v, mask)
        elif how == "blas":
            swap = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731  [B, L, H, D] <-> [B, H, L, D]
            out = swap(blas_attention(swap(q), swap(k), swap(v), mask))
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k).astype(jnp.float32)
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            weights = softmax(scores).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.proj(out.reshape(batch, length, width))


class DecoderBlock(nnx.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention, MLP."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.norm_self = layer_norm(width, rngs=rngs, dtype=dtype)
        self.attn = Attention(width, num_heads, rngs=rngs, dtype=dtype)
        self.norm_cross = layer_norm(width, rngs=rngs, dtype=dtype)
        self.cross = CrossAttention(width, num_heads, rngs=rngs, dtype=dtype)
        self.norm_mlp = layer_norm(width, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x, self_mask, memory, cross_mask):
        x = x + self.attn(self.norm_self(x), self_mask)
        x = x + self.cross(self.norm_cross(x), memory, cross_mask)
        x = x + self.mlp(self.norm_mlp(x))
        return shard_activation(x, ("batch", "seq", "act_embed"))


class EncoderDecoder(nnx.Module):
    """T5-style encoder-decoder with one shared, tied token table.

    ``encode(inputs)`` -> memory; ``decode(decoder_inputs, memory, inputs)`` -> hidden states;
    ``logits(hidden)``. Decoder inputs are the targets shifted right behind a BOS token
    (``shift_right``)."""

    def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int,
                 num_heads: int, mlp_dim: int, posemb: str = "learn", dtype=jnp.float32,
                 rngs: nnx.Rngs, decoder_depth: int | None = None, remat: str = "none",
                 scan: bool = False):
        self.vocab_size, self.max_len, self.width, self.depth = vocab_size, max_len, width, depth
        self.mlp_dim, self.dtype, self.remat, self.scan = mlp_dim, dtype, remat, scan
        self.num_heads = num_heads
        self.decoder_depth = depth if decoder_depth is None else decoder_depth
        self.encoder = TextTransformer(vocab_size=vocab_size, max_len=max_len, width=width,
                                       depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                                       posemb=posemb, dtype=dtype, rngs=rngs, remat=remat,
                                       scan=scan)
        make = lambda rngs: DecoderBlock(width, num_heads, mlp_dim, rngs=rngs, dtype=dtype)  # noqa
        self.decoder_blocks = (
            ScannedBlocks(self.decoder_depth, make, rngs=rngs, remat=remat) if scan
            else nnx.List([make(rngs) for _ in range(self.decoder_depth)]))
        self.decoder_norm = layer_norm(width, rngs=rngs, dtype=dtype)

    @property
    def embedding(self) -> TokenEmbedding:
        return self.encoder.embedding

    def encode(self, inputs: jax.Array) -> jax.Array:
        return self.encoder(inputs)

    def decode(self, decoder_inputs: jax.Array, memory: jax.Array,
               inputs: jax.Array) -> jax.Array:
        length = decoder_inputs.shape[1]
        self_mask = causal_mask(length) & key_padding_mask(decoder_inputs) | jnp.eye(
            length, dtype=bool)[None, None]   # a pad query still sees itself: no empty rows
        cross_mask = key_padding_mask(inputs)
        x = self.embedding(decoder_inputs)
        if self.scan:
            return self.decoder_norm(self.decoder_blocks(x, self_mask, memory, cross_mask))
        for block in self.decoder_blocks:
            x = call_block(block, x, self_mask, memory, cross_mask, remat=self.remat)
        return self.decoder_norm(x)

    def __call__(self, inputs: jax.Array, decoder_inputs: jax.Array) -> jax.Array:
        return self.decode(decoder_inputs, self.encode(inputs), inputs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.embedding.attend(hidden)

    def features(self, tokens: jax.Array) -> jax.Array:
        """Probe view: the encoder's mean-pooled hidden states."""
        return self.encoder.features(tokens)


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
    """Decoder inputs for teacher forcing: ``[start, t0, t1, ..., t_{T-2}]``."""
    start = jnp.full(targets.shape[:-1] + (1,), start_id, targets.dtype)
    return jnp.concatenate([start, targets[..., :-1]], axis=-1)


def text_forward_flops(model, lengths: dict[str, int], *, logits_positions: int) -> float:
    """Model FLOPs of one example's forward pass (multiply-adds count 2).

    ``lengths`` gives the tokens each stack sees: ``{"encoder": L}`` or ``{"encoder": I,
    "decoder": T}``; ``logits_positions`` is how many positions get the output projection."""
    from zoo.flops import transformer_flops
    width = model.width
    total = 0.0
    if "encoder" in lengths:
        total += transformer_flops(lengths["encoder"], width, model.depth, model.mlp_dim)
    if "decoder" in lengths:
        t, i = lengths["decoder"], lengths["encoder"]
        depth = model.decoder_depth
        total += transformer_flops(t, width, depth, model.mlp_dim)
        # cross attention: q and out projections on T, k/v on I, scores and mix T x I.
        total += depth * (2 * 2 * t * width * width + 2 * 2 * i * width * width
                          + 2 * 2 * t * i * width)
    total += 2 * logits_positions * width * model.vocab_size
    return total
