"""Position prediction (MP3): Zhai et al., "Position Prediction as an Effective Pretraining
Strategy", ICML 2022.

The encoder gets NO position embeddings, so the content of the tokens is all it has. A random
subset of the tokens (``mask_ratio`` of them, default 0.75) is removed from the keys and values
of every attention layer: every token is still a query, but only the kept "context" tokens (and
the cls token, if any) can be attended to. A linear head classifies each token's position among
all N positions; the loss is the cross-entropy over all tokens of the batch, reported with the
position accuracy.

The algorithm is modality-agnostic: ``position`` runs it on image patches (N = grid cells) and
``token_position`` on packed token rows (N = seq_len; padding is neither a target nor context).
The context is drawn as MAE's keep set: ``int(N * (1 - mask_ratio))`` tokens per row with the
smallest uniform noise.

Example::

    obj = objectives.get("position", mask_ratio=0.75, patch_size=4)
    inputs, targets = obj.prepare({"image": images}, rng)
    logits = obj.apply(model, inputs)            # [B, N, N]
    loss, metrics = obj.loss(logits, targets)    # metrics["position_accuracy"]
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from objectives.base import ImageObjective, image_to_float, patchify
from objectives.mae import masking_indices
from objectives.text_base import TextObjective
from zoo.flops import dense_flops, transformer_flops
from zoo.models.layers import dense
from zoo.text import PAD


def context_mask(rng: jax.Array, batch: int, length: int, mask_ratio: float,
                 valid: jax.Array | None = None) -> jax.Array:
    """bool [B, L], True at the ``int(L * (1 - mask_ratio))`` context tokens of each row (MAE's
    keep set: the smallest uniform noise).

    With ``valid`` (bool [B, L], e.g. not padding) the context is drawn among each row's n
    valid tokens only: ``max(1, int(n * (1 - mask_ratio)))`` of them (none if n = 0), so a
    short row still has a context and padding never is one.
    """
    if valid is None:
        _, removed, _ = masking_indices(rng, batch, length, mask_ratio)
        return removed == 0
    noise = jnp.where(valid, jax.random.uniform(rng, (batch, length)), 2.0)  # invalid: last
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    count = valid.sum(axis=1, keepdims=True)
    keep = jnp.maximum(1, jnp.floor(count * (1 - mask_ratio)).astype(jnp.int32))
    return (rank < keep) & valid


def position_loss(logits: jax.Array, weights: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of each token's true position (its index) over the batch.

    Args:
      logits: [B, L, N] position scores, N >= L.
      weights: optional [B, L], 0 for tokens that are not targets (padding).

    Returns:
      ``(loss, {"loss", "position_accuracy"})``: means over the (weighted) tokens of the batch.
    """
    logits = logits.astype(jnp.float32)
    batch, length, _ = logits.shape
    if weights is None:
        weights = jnp.ones((batch, length), jnp.float32)
    positions = jnp.arange(length)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    true_log_prob = jnp.diagonal(log_probs[:, :, :length], axis1=1, axis2=2)   # [B, L]
    total = jnp.maximum(weights.sum(), 1.0)
    loss = -(true_log_prob * weights).sum() / total
    correct = (jnp.argmax(logits, axis=-1) == positions).astype(jnp.float32)
    accuracy = (correct * weights).sum() / total
    return loss, {"loss": loss, "position_accuracy": accuracy}


class PositionHead(nnx.Module):
    """A linear classifier from each token's feature to one of ``num_positions`` positions."""

    def __init__(self, width: int, num_positions: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.classifier = dense(width, num_positions, ("embed", None), rngs=rngs, dtype=dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.classifier(tokens)


def _check_mask_ratio(mask_ratio: float, length: int, what: str) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"objective.mask_ratio: must be in [0, 1), got {mask_ratio}")
    if int(length * (1 - mask_ratio)) < 1:
        raise ValueError(f"objective.mask_ratio: {mask_ratio} leaves no context among the "
                         f"{length} {what}; lower it")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Position(ImageObjective):
    """MP3 on image patches: predict each patch's grid cell without position embeddings.

    Attributes:
      mask_ratio: fraction of patches removed from the attention context, in [0, 1).
    """

    name: ClassVar[str] = "position"
    reference: ClassVar[str] = "Zhai et al. 2022, Position Prediction as an Effective Pretraining Strategy"
    required_posemb: ClassVar[str] = "none"
    mask_ratio: float = 0.75

    def validate(self, *, image_shape):
        super().validate(image_shape=image_shape)
        _check_mask_ratio(self.mask_ratio, self.num_patches(image_shape), "patches")

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return PositionHead(encoder.width, encoder.num_patches, rngs=rngs, dtype=dtype)

    def prepare(self, batch, rng):
        patches = patchify(image_to_float(batch["image"]), self.patch_size)
        context = context_mask(rng, patches.shape[0], patches.shape[1], self.mask_ratio)
        return {"patches": patches, "context": context}, None

    def apply(self, model, inputs):
        tokens = model.encoder.encode(model.encoder.embed(inputs["patches"]), inputs["context"])
        if model.encoder.has_cls:
            tokens = tokens[:, 1:]
        return model.heads(tokens)

    def loss(self, outputs, targets):
        return position_loss(outputs)

    def forward_flops(self, model) -> float:
        # Every patch is a query and the masked keys are computed (then ignored), so the
        # encoder costs what a full forward pass costs.
        enc = model.encoder
        return enc.forward_flops() + dense_flops(enc.num_patches, enc.width, enc.num_patches)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenPosition(TextObjective):
    """MP3 on packed token rows: predict each token's index in the row, encoder without
    position embeddings. Padding is never context and never a target."""

    name: ClassVar[str] = "token_position"
    architecture: ClassVar[str] = "encoder"
    reference: ClassVar[str] = Position.reference + " (1-D token sequences)"
    required_posemb: ClassVar[str] = "none"
    mask_ratio: float = 0.75

    def validate(self, *, seq_len: int) -> None:
        if seq_len >= 4:   # shorter rows: the base class names data.seq_len
            _check_mask_ratio(self.mask_ratio, seq_len, "tokens")
        super().validate(seq_len=seq_len)

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return PositionHead(encoder.width, encoder.max_len, rngs=rngs, dtype=dtype)

    def prepare(self, batch, rng):
        tokens = batch["tokens"]
        real = tokens != PAD
        context = context_mask(rng, *tokens.shape, self.mask_ratio, valid=real)
        return {"tokens": tokens, "context": context}, real.astype(jnp.float32)

    def apply(self, model, inputs):
        return model.heads(model.encoder(inputs["tokens"], key_mask=inputs["context"]))

    def loss(self, outputs, targets):
        return position_loss(outputs, targets)

    def forward_flops(self, model, *, seq_len: int) -> float:
        enc = model.encoder
        return (transformer_flops(seq_len, enc.width, enc.depth, enc.mlp_dim)
                + dense_flops(seq_len, enc.width, enc.max_len))
