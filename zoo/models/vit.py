"""Vision Transformer encoder over a sequence of patch embeddings.

The encoder never sees images: it takes flattened patches ``[batch, num_patches, patch_dim]`` so
objectives can drop, shuffle or gather tokens (MAE keeps 25% of them) and the same encoder works
for any sequence of embeddings. Follows MAE's ``models_mae.py`` encoder (timm ViT blocks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.flops import dense_flops, transformer_flops
from zoo.models.layers import TransformerStack, dense, param
from zoo.models.posemb import sincos_2d

POSEMB_KINDS = ("sincos2d", "learn", "none")


class ViT(nnx.Module):
    """ViT encoder. ``embed`` adds position embeddings; ``encode`` runs cls token + blocks.

    Example::

        vit = ViT(grid=(8, 8), patch_dim=16, width=64, depth=2, num_heads=2, mlp_dim=128,
                  rngs=nnx.Rngs(0))
        tokens = vit(patches)            # [B, 64, 64]
    """

    def __init__(self, *, grid: tuple[int, int], patch_dim: int, width: int, depth: int,
                 num_heads: int, mlp_dim: int, posemb: str = "sincos2d",
                 cls_token: bool = True, dtype=jnp.float32, rngs: nnx.Rngs,
                 remat: str = "none", scan: bool = False):
        if posemb not in POSEMB_KINDS:
            raise ValueError(f"model.posemb: unknown {posemb!r}; allowed: {POSEMB_KINDS}")
        if posemb == "sincos2d" and width % 4:
            raise ValueError(f"model.width: {width} must be a multiple of 4 with posemb="
                             "'sincos2d'")
        self.grid = tuple(grid)
        self.patch_dim = patch_dim
        self.width = width
        self.depth = depth
        self.mlp_dim = mlp_dim
        self.num_patches = grid[0] * grid[1]
        self.posemb_kind = posemb
        self.dtype = dtype
        self.patch_embed = dense(patch_dim, width, ("patch", "embed"), rngs=rngs, dtype=dtype)
        if posemb == "learn":
            self.posemb = param(rngs, nnx.initializers.normal(0.02),
                                (self.num_patches, width), (None, "embed"))
        self.has_cls = cls_token
        if cls_token:
            self.cls = param(rngs, nnx.initializers.normal(0.02), (1, 1, width),
                             (None, None, "embed"))
        self.encoder = TransformerStack(width, depth, num_heads, mlp_dim, rngs=rngs, dtype=dtype,
                                        remat=remat, scan=scan)

    def position_embeddings(self, grid: tuple[int, int] | None = None) -> jax.Array | None:
        """[grid_h * grid_w, width] or None when the encoder has no position embeddings.

        Another ``grid`` than the model's (e.g. DINO's small local crops) gets the table
        resized bicubically, as DINO's ``interpolate_pos_encoding`` does."""
        if self.posemb_kind == "sincos2d":
            pos = jnp.asarray(sincos_2d(self.width, *self.grid))
        elif self.posemb_kind == "learn":
            pos = self.posemb[...]
        else:
            return None
        grid = tuple(grid or self.grid)
        if grid != self.grid:
            table = pos.reshape(*self.grid, self.width)
            pos = jax.image.resize(table, (*grid, self.width), "bicubic").reshape(-1, self.width)
        return pos

    def embed(self, patches: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
        """Linear patch embedding plus position embedding: [B, L, patch_dim] -> [B, L, width].
        ``grid``: the patch grid of ``patches`` when it is not the model's."""
        x = self.patch_embed(patches)
        pos = self.position_embeddings(grid)
        if pos is not None:
            x = x + pos.astype(x.dtype)
        return x

    def embed_at(self, patches: jax.Array, ids: jax.Array) -> jax.Array:
        """``embed(patches)`` at the positions ``ids`` (int [B, n]) only -> [B, n, width]: the
        same values as embedding every patch and gathering (MAE's order: position embeddings
        before the gather), with the patch embedding run on n patches instead of L."""
        x = self.patch_embed(jnp.take_along_axis(patches, ids[..., None], axis=1))
        pos = self.position_embeddings()
        return x if pos is None else x + pos.astype(x.dtype)[ids]

    def encode(self, tokens: jax.Array, key_mask: jax.Array | None = None, *,
               return_layers: bool = False):
        """Prepends the cls token (its position embedding is zero, as in MAE) and runs blocks.

        ``key_mask`` (optional, bool [B, L] over ``tokens``) limits every layer's keys and
        values to the True tokens (plus the cls token); every token is still a query. With
        ``return_layers``: ``(output, [each block's output])``, cls included.
        """
        mask = None
        if key_mask is not None:
            if self.has_cls:
                key_mask = jnp.concatenate(
                    [jnp.ones((key_mask.shape[0], 1), bool), key_mask], axis=1)
            mask = key_mask[:, None, None, :]
        if self.has_cls:
            cls = jnp.broadcast_to(self.cls[...].astype(tokens.dtype),
                                   (tokens.shape[0], 1, self.width))
            tokens = jnp.concatenate([cls, tokens], axis=1)
        return self.encoder(tokens, mask, return_layers=return_layers)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.encode(self.embed(patches))

    def forward_flops(self, encoded: int | None = None) -> float:
        """Forward FLOPs of one example: every patch embedded, ``encoded`` patches (default:
        all) plus the cls token through the blocks."""
        encoded = self.num_patches if encoded is None else encoded
        return (dense_flops(self.num_patches, self.patch_dim, self.width)
                + transformer_flops(encoded + int(self.has_cls), self.width, self.depth,
                                    self.mlp_dim))

    def features(self, patches: jax.Array) -> jax.Array:
        """Frozen-feature view for probes: mean of the patch tokens (cls excluded) -> [B, width]."""
        tokens = self(patches)
        if self.has_cls:
            tokens = tokens[:, 1:]
        return tokens.astype(jnp.float32).mean(axis=1)
