"""Selfie: Self-supervised Pretraining for Image Embedding (Trinh, Luong and Le, 2019).

Masked patch selection. Some patches of each image are masked out; the visible ones are
summarised into one vector ``u`` by an attention-pooling network (Transformer layers over a
learned pooling token ``u0`` followed by the visible patches, ``u`` = the pooling token's output).
For each masked location ``j`` the query ``v_j = u + pos_j`` (a learned position embedding of the
location) must pick the correct patch among ALL the image's masked patches (the distractors are
the other masked patches of the same image) by a dot-product softmax: a CPC-style
cross-entropy, ``-log softmax_k(v_j . h_k)[j]``, averaged over every masked location of the
batch. Reported with the selection accuracy.

Mapping onto the zoo's ViT (the paper pretrains ResNet blocks):

* patch processing network P = the ViT's linear patch embedding, followed for the candidates
  by a per-patch MLP in the head; candidates carry no position information (else the choice
  is trivial);
* attention pooling A = the ViT encoder itself over the visible patches (with its position
  embeddings), its cls token playing ``u0`` (mean of the outputs when the ViT has no cls);
* the masked count is ``L - int(L * (1 - mask_ratio))``, the complement of MAE's keep set.

Example::

    obj = objectives.get("selfie", mask_ratio=0.25, patch_size=4)
    inputs, targets = obj.prepare({"image": images}, rng)
    scores = obj.apply(model, inputs)            # [B, masked, masked]
    loss, metrics = obj.loss(scores, targets)    # metrics["selection_accuracy"]
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from objectives.base import ImageObjective, image_to_float, patchify
from objectives.mae import masking_indices
from zoo.flops import dense_flops, transformer_flops
from zoo.models.layers import dense, gelu, param


def selfie_split(rng: jax.Array, batch: int, length: int, mask_ratio: float
                 ) -> tuple[jax.Array, jax.Array]:
    """``(ids_visible [B, len_keep], ids_masked [B, L - len_keep])``: a random partition of
    each row's positions, ``len_keep = int(L * (1 - mask_ratio))`` as in MAE."""
    ids_keep, _, ids_restore = masking_indices(rng, batch, length, mask_ratio)
    ids_shuffle = jnp.argsort(ids_restore, axis=1)     # inverse of the inverse permutation
    return ids_keep, ids_shuffle[:, ids_keep.shape[1]:]


def selection_loss(scores: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CPC-style patch selection: ``scores[b, j, k]`` rates candidate k for location j; the
    correct candidate of location j is k = j. Mean cross-entropy over all locations."""
    scores = scores.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(scores, axis=-1)
    loss = -jnp.diagonal(log_probs, axis1=1, axis2=2).mean()
    picked = jnp.argmax(scores, axis=-1)
    accuracy = (picked == jnp.arange(scores.shape[1])).astype(jnp.float32).mean()
    return loss, {"loss": loss, "selection_accuracy": accuracy}


class SelfieHead(nnx.Module):
    """Query side (``u + pos_j``) and candidate side (per-patch MLP) of the selection."""

    def __init__(self, width: int, num_patches: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.position = param(rngs, nnx.initializers.normal(0.02), (num_patches, width),
                              (None, "embed"))
        self.candidate_fc1 = dense(width, width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        # No bias: adding b to every candidate adds q.b to a whole row of scores, which the
        # softmax ignores, so its gradient is structurally zero (only float noise for Adam).
        self.candidate_fc2 = dense(width, width, ("mlp", "embed"), rngs=rngs, dtype=dtype,
                                   use_bias=False)

    def candidates(self, patch_embeddings: jax.Array) -> jax.Array:
        return self.candidate_fc2(gelu(self.candidate_fc1(patch_embeddings)))

    def queries(self, summary: jax.Array, ids_masked: jax.Array) -> jax.Array:
        pos = jnp.take(self.position[...], ids_masked, axis=0).astype(summary.dtype)
        return summary[:, None, :] + pos


@dataclasses.dataclass(frozen=True, kw_only=True)
class Selfie(ImageObjective):
    """Selfie masked patch selection.

    Attributes:
      mask_ratio: fraction of patches masked out (they become the candidates), in (0, 1);
        at least two must be masked (one correct patch and one distractor).
    """

    name: ClassVar[str] = "selfie"
    reference: ClassVar[str] = "Trinh, Luong and Le 2019, Selfie (arXiv:1906.02940)"
    mask_ratio: float = 0.25

    def validate(self, *, image_shape):
        super().validate(image_shape=image_shape)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        length = self.num_patches(image_shape)
        keep = int(length * (1 - self.mask_ratio))
        if keep < 1 or length - keep < 2:
            raise ValueError(f"objective.mask_ratio: {self.mask_ratio} masks {length - keep} of "
                             f"{length} patches; Selfie needs at least 2 masked and 1 visible")

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return SelfieHead(encoder.width, encoder.num_patches, rngs=rngs, dtype=dtype)

    def prepare(self, batch, rng):
        patches = patchify(image_to_float(batch["image"]), self.patch_size)
        ids_visible, ids_masked = selfie_split(rng, patches.shape[0], patches.shape[1],
                                               self.mask_ratio)
        return {"patches": patches, "ids_visible": ids_visible, "ids_masked": ids_masked}, None

    def apply(self, model, inputs):
        encoder, head = model.encoder, model.heads
        tokens = encoder.embed(inputs["patches"])                 # with position embeddings
        visible = jnp.take_along_axis(tokens, inputs["ids_visible"][..., None], axis=1)
        pooled = encoder.encode(visible)
        summary = pooled[:, 0] if encoder.has_cls else pooled.mean(axis=1)
        masked = jnp.take_along_axis(inputs["patches"], inputs["ids_masked"][..., None], axis=1)
        candidates = head.candidates(encoder.patch_embed(masked))  # no position information
        queries = head.queries(summary, inputs["ids_masked"])
        return jnp.einsum("bjw,bkw->bjk", queries, candidates,
                          preferred_element_type=jnp.float32)

    def loss(self, outputs, targets):
        return selection_loss(outputs)

    def forward_flops(self, model) -> float:
        enc = model.encoder
        length = enc.num_patches
        keep = int(length * (1 - self.mask_ratio))
        masked = length - keep
        return (dense_flops(length + masked, enc.patch_dim, enc.width)
                + transformer_flops(keep + int(enc.has_cls), enc.width, enc.depth, enc.mlp_dim)
                + 2 * dense_flops(masked, enc.width, enc.width)
                + 2.0 * masked * masked * enc.width)
