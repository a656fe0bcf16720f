"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2021).

Matches facebookresearch/mae ``models_mae.py``: per-example uniform noise, keep the
``int(L * (1 - mask_ratio))`` patches with the smallest noise, position embeddings added before
the gather, decoder inputs un-shuffled with mask tokens plus fixed sin-cos decoder position
embeddings, and a pixel loss averaged over each patch's pixels and over removed patches only.

Work the loss never reads is skipped, with the same loss and gradients: only the kept patches
are embedded (each with its own position's embedding, the values of embedding all and
gathering), and the decoder's last block (after its attention) and prediction head run on the
removed patches only. ``MAE.reconstruct`` predicts every patch, as the reference's forward does.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from objectives.base import ImageObjective, image_to_float, patchify
from zoo.flops import dense_flops, transformer_flops
from zoo.models.layers import TransformerStack, dense, param
from zoo.models.posemb import sincos_2d

NORM_PIX_EPS = 1e-6


def masking_plan(rng: jax.Array, batch: int, length: int, mask_ratio: float):
    """``masking_indices`` plus the removed positions: ``(ids_keep, ids_removed [B, L -
    len_keep], mask, ids_restore)``, the removed ones in the order of increasing noise too."""
    len_keep = int(length * (1 - mask_ratio))
    noise = jax.random.uniform(rng, (batch, length))
    ids_shuffle = jnp.argsort(noise, axis=1)          # ascending: small noise is kept
    ids_restore = jnp.argsort(ids_shuffle, axis=1)    # inverse permutation
    # In shuffled order the first len_keep entries are kept; un-shuffling that 0/1 vector puts
    # 1 exactly where ids_restore points past len_keep.
    mask = (ids_restore >= len_keep).astype(jnp.float32)
    return ids_shuffle[:, :len_keep], ids_shuffle[:, len_keep:], mask, ids_restore


def masking_indices(rng: jax.Array, batch: int, length: int, mask_ratio: float):
    """Random per-example masking plan, as in MAE's ``random_masking``.

    Returns ``(ids_keep [B, len_keep], mask [B, L], ids_restore [B, L])``: the kept positions in
    the order of increasing noise, a float mask that is 1 for removed patches, and the inverse of
    the noise-sorting permutation.
    """
    ids_keep, _, mask, ids_restore = masking_plan(rng, batch, length, mask_ratio)
    return ids_keep, mask, ids_restore


def random_masking(rng: jax.Array, x: jax.Array, mask_ratio: float):
    """MAE's ``random_masking``: ``x [B, L, D] -> (x_kept [B, len_keep, D], mask, ids_restore)``."""
    ids_keep, mask, ids_restore = masking_indices(rng, x.shape[0], x.shape[1], mask_ratio)
    x_kept = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    return x_kept, mask, ids_restore


def mae_loss(pred: jax.Array, patches: jax.Array, mask: jax.Array | None,
             norm_pix_loss: bool):
    """Mean squared error per patch, averaged over removed patches of the whole batch
    (``mask`` 1 where removed; ``None``: every patch given is a removed one).

    With ``norm_pix_loss`` each target patch is normalised by its own mean and UNBIASED variance
    (ddof=1, as ``torch.Tensor.var`` defaults to in the reference), eps 1e-6.
    """
    target = patches
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    per_patch = ((pred.astype(jnp.float32) - target) ** 2).mean(axis=-1)
    return per_patch.mean() if mask is None else (per_patch * mask).sum() / mask.sum()


class MaeDecoder(nnx.Module):
    """MAE's light decoder: embed, append mask tokens, un-shuffle, add sin-cos positions, blocks."""

    def __init__(self, *, encoder_width: int, width: int, depth: int, num_heads: int,
                 grid: tuple[int, int], patch_dim: int, has_cls: bool, rngs: nnx.Rngs,
                 dtype=jnp.float32, masked: bool = True):
        self.grid = tuple(grid)
        self.width = width
        self.has_cls = has_cls
        self.embed = dense(encoder_width, width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        if masked:   # a decoder that always sees every patch has no use for a mask token
            self.mask_token = param(rngs, nnx.initializers.normal(0.02), (1, 1, width),
                                    (None, None, "embed"))
        self.decoder = TransformerStack(width, depth, num_heads, 4 * width, rngs=rngs,
                                        dtype=dtype)
        self.pred = dense(width, patch_dim, ("embed", "patch"), rngs=rngs, dtype=dtype)

    def __call__(self, latent: jax.Array, ids_restore: jax.Array | None = None,
                 rows: jax.Array | None = None) -> jax.Array:
        """Encoder tokens of the kept patches (cls first, if any) -> pixels of every patch
        [B, L, patch_dim], or with ``rows`` (int [B, n] patch positions) of those patches only
        [B, n, patch_dim]: the same values, with the last block's output projection and MLP and
        the prediction head run on n tokens instead of all. ``ids_restore=None``: the encoder
        saw every patch, in order (nothing to un-shuffle)."""
        x = self.embed(latent)
        if self.has_cls:
            cls, x = x[:, :1], x[:, 1:]
        if ids_restore is not None:
            batch, length = ids_restore.shape
            mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                           (batch, length - x.shape[1], self.width))
            x = jnp.concatenate([x, mask_tokens], axis=1)
            x = jnp.take_along_axis(x, ids_restore[..., None], axis=1)   # un-shuffle
        x = x + jnp.asarray(sincos_2d(self.width, *self.grid)).astype(x.dtype)
        if self.has_cls:
            x = jnp.concatenate([cls, x], axis=1)   # the cls position embedding is zero
        if rows is not None:   # positions in the decoder's sequence (the cls token is first)
            return self.pred(self.decoder(x, rows=rows + 1 if self.has_cls else rows))
        x = self.pred(self.decoder(x))
        return x[:, 1:] if self.has_cls else x


@dataclasses.dataclass(frozen=True, kw_only=True)
class MAE(ImageObjective):
    """Masked autoencoder objective.

    Attributes:
      mask_ratio: fraction of patches removed, in (0, 1).
      norm_pix_loss: regress per-patch normalised pixels (reference: unbiased variance, eps 1e-6).
      decoder_width, decoder_depth, decoder_heads: the light decoder (reference: 512, 8, 16).
    """

    name: ClassVar[str] = "mae"
    reference: ClassVar[str] = "He et al. 2021; facebookresearch/mae models_mae.py"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_width % 4:
            raise ValueError(f"objective.decoder_width: {self.decoder_width} must be a multiple "
                             "of 4 (fixed 2-D sin-cos decoder position embeddings)")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"objective.decoder_width: {self.decoder_width} is not divisible "
                             f"by decoder_heads={self.decoder_heads}")

    def validate(self, *, image_shape):
        super().validate(image_shape=image_shape)
        length = self.num_patches(image_shape)
        len_keep = int(length * (1 - self.mask_ratio))
        if not 0 < len_keep < length:
            raise ValueError(f"objective.mask_ratio: {self.mask_ratio} keeps {len_keep} of "
                             f"{length} patches; it must keep at least one and remove one")

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return MaeDecoder(encoder_width=encoder.width, width=self.decoder_width,
                          depth=self.decoder_depth, num_heads=self.decoder_heads,
                          grid=encoder.grid, patch_dim=encoder.patch_dim,
                          has_cls=encoder.has_cls, rngs=rngs, dtype=dtype)

    def prepare(self, batch, rng):
        patches = patchify(image_to_float(batch["image"]), self.patch_size)
        ids_keep, ids_removed, mask, ids_restore = masking_plan(
            rng, patches.shape[0], patches.shape[1], self.mask_ratio)
        inputs = {"patches": patches, "ids_keep": ids_keep, "ids_restore": ids_restore,
                  "ids_removed": ids_removed}
        return inputs, {"patches": patches, "mask": mask, "ids_removed": ids_removed}

    def encode_kept(self, model, inputs) -> jax.Array:
        """The encoder's tokens (cls first) of the kept patches. Only the kept patches are
        embedded, each with its own position's embedding: the reference embeds every patch,
        adds positions, then gathers; the values are the same."""
        return model.encoder.encode(model.encoder.embed_at(inputs["patches"], inputs["ids_keep"]))

    def apply(self, model, inputs):
        """Predicted pixels of the removed patches only, [B, L - len_keep, patch_dim] in the
        order of ``ids_removed``: the loss never reads the visible patches' predictions, so the
        decoder's last block and head skip them (``reconstruct`` predicts every patch)."""
        return model.heads(self.encode_kept(model, inputs), inputs["ids_restore"],
                           rows=inputs["ids_removed"])

    def reconstruct(self, model, inputs) -> jax.Array:
        """Predicted pixels of every patch, [B, L, patch_dim] (e.g. to show reconstructions;
        the reference's ``forward`` output). On the removed patches equal to ``apply``'s."""
        return model.heads(self.encode_kept(model, inputs), inputs["ids_restore"])

    def loss(self, outputs, targets):
        loss = reconstruction_loss(outputs, targets, self.norm_pix_loss)
        return loss, {"loss": loss}

    def forward_flops(self, model) -> float:
        enc, dec = model.encoder, model.heads
        cls = 1 if enc.has_cls else 0
        length = enc.num_patches
        len_keep = int(length * (1 - self.mask_ratio))
        removed = length - len_keep
        return (dense_flops(len_keep, enc.patch_dim, enc.width)   # embeds the kept patches
                + transformer_flops(len_keep + cls, enc.width, enc.depth, enc.mlp_dim)
                + dense_flops(len_keep + cls, enc.width, dec.width)
                + transformer_flops(length + cls, dec.width, self.decoder_depth, 4 * dec.width,
                                    last_rows=removed)
                + dense_flops(removed, dec.width, enc.patch_dim))  # predicts the removed ones


def reconstruction_loss(pred: jax.Array, targets: dict, norm_pix_loss: bool) -> jax.Array:
    """MAE's loss for predictions of the removed patches only (``MAE.apply``'s order,
    ``targets["ids_removed"]``): ``mae_loss`` over the patches they are predictions of."""
    removed = jnp.take_along_axis(targets["patches"], targets["ids_removed"][..., None], axis=1)
    return mae_loss(pred, removed, None, norm_pix_loss)
