"""Contrastive objectives: SimCLR on two augmented views, CLIP and SigLIP on paired data.

Every loss here is written over the GLOBAL batch: under ``jax.jit`` with a sharded batch the
compiler inserts the collectives, so the loss and its gradients are those of one big device
(tests/test_contrastive.py checks 1 vs 8 devices). There are no hand-written gather layers, the
source of the 1/world_size gradient bugs some libraries shipped.

* ``simclr`` (Chen et al. 2020; google-research/simclr ``objective.py``): NT-Xent.
* ``clip`` (Radford et al. 2021; open_clip ``ClipLoss``): symmetric InfoNCE, learnable
  temperature.
* ``siglip`` (Zhai et al. 2023; big_vision ``siglip``): pairwise sigmoid loss.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from objectives.base import ImageObjective, Objective, patchify
from zoo import augment
from zoo.flops import dense_flops
from zoo.models.heads import ProjectionMLP, l2_normalize
from zoo.models.layers import dense, param
from zoo.models.text import TextTransformer

LARGE_NUM = 1e9   # SimCLR masks self-similarity with logits - LARGE_NUM


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels (a one-hot select, no gather)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.sum(jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), logits, 0.),
                     axis=-1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def nt_xent_loss(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """SimCLR's NT-Xent over the global batch; returns ``(loss, accuracy)``.

    ``z1, z2 [B, D]`` are the L2-normalised projections of the two views. As in SimCLR's
    ``add_contrastive_loss``: for a view of image i the positive is the other view of i, the
    negatives are the other 2B - 2 views, self-similarity is excluded, and the loss is the SUM
    of the two directions' batch means (``loss_a + loss_b``), i.e. twice the mean over all 2B
    anchors. Accuracy: how often the positive has the largest logit.
    """
    batch = z1.shape[0]
    z = jnp.concatenate([z1, z2]).astype(jnp.float32)
    logits = z @ z.T / temperature
    logits = logits - LARGE_NUM * jnp.eye(2 * batch)
    labels = (jnp.arange(2 * batch) + batch) % (2 * batch)
    loss = 2.0 * cross_entropy(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, accuracy


def clip_loss(za: jax.Array, zb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """open_clip's ``ClipLoss``: ``(CE(s * za zb^T, i) + CE(s * zb za^T, i)) / 2`` with
    ``s = exp(logit_scale)``; ``za, zb [B, D]`` L2-normalised, pair i is row i of each."""
    logits = jnp.exp(logit_scale) * (za.astype(jnp.float32) @ zb.astype(jnp.float32).T)
    labels = jnp.arange(za.shape[0])
    return (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2


def siglip_loss(za: jax.Array, zb: jax.Array, log_scale: jax.Array, bias: jax.Array) -> jax.Array:
    """big_vision's sigmoid loss: ``logits = exp(log_scale) * za zb^T + bias``, labels +1 on the
    diagonal and -1 elsewhere, loss = ``-sum(log_sigmoid(labels * logits)) / B``."""
    logits = jnp.exp(log_scale) * (za.astype(jnp.float32) @ zb.astype(jnp.float32).T) + bias
    labels = 2.0 * jnp.eye(za.shape[0]) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / za.shape[0]


def image_features(encoder, images: jax.Array, patch_size: int,
                   pool: str = "mean") -> jax.Array:
    """Float images [B, h, w, C] in [-1, 1] (any size divisible by the patch) -> the encoder's
    pooled features [B, width]: the mean of the patch tokens (what the probes read), or with
    ``pool="cls"`` the cls token's output."""
    grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
    tokens = encoder.encode(encoder.embed(patchify(images, patch_size), grid))
    if pool == "cls":
        return tokens[:, 0].astype(jnp.float32)
    if encoder.has_cls:
        tokens = tokens[:, 1:]
    return tokens.astype(jnp.float32).mean(axis=1)


# ---------------------------------------------------------------------------------------------
# SimCLR
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class SimCLR(ImageObjective):
    """SimCLR: two augmented views per image, projection head, NT-Xent over the global batch.

    Attributes:
      temperature: NT-Xent temperature (reference default for large batches: 0.1).
      proj_dim, proj_hidden: projection head output / hidden size (reference: 128 / width).
      proj_layers: Linear layers in the head (SimCLR v1: 2; v2: 3).
      crop_scale: random-resized-crop area range (reference (0.08, 1)).
      color_strength: colour-jitter strength s (reference 1.0: 0.8s brightness/contrast/
        saturation, 0.2s hue).
      blur_p: Gaussian-blur probability (reference 0.5 on ImageNet; 0 on CIFAR).
    """

    name: ClassVar[str] = "simclr"
    per_example_loss: ClassVar[bool] = False     # global-batch negatives and BatchNorm
    reference: ClassVar[str] = "Chen et al. 2020; google-research/simclr objective.py"
    temperature: float = 0.1
    proj_dim: int = 128
    proj_hidden: int = 0          # 0: the encoder's width
    proj_layers: int = 2
    crop_scale: tuple[float, float] = (0.08, 1.0)
    color_strength: float = 1.0
    blur_p: float = 0.5

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"objective.temperature: must be positive, got {self.temperature}")
        if self.proj_layers < 1:
            raise ValueError(f"objective.proj_layers: must be >= 1, got {self.proj_layers}")
        _check_scale("crop_scale", self.crop_scale)

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return ProjectionMLP(encoder.width, self.proj_hidden or encoder.width, self.proj_dim,
                             num_layers=self.proj_layers, last_bn=True, rngs=rngs, dtype=dtype)

    def prepare(self, batch, rng):
        view1, view2 = augment.simclr_views(
            rng, batch["image"], scale=tuple(self.crop_scale), strength=self.color_strength,
            blur_p=(self.blur_p, self.blur_p))
        return {"views": jnp.concatenate([view1, view2])}, None

    def apply(self, model, inputs):
        features = image_features(model.encoder, inputs["views"], self.patch_size)
        # Both views through one head call: SimCLR's BN statistics cover all 2B views.
        z = l2_normalize(model.heads(features))
        return jnp.split(z, 2)

    def loss(self, outputs, targets):
        loss, accuracy = nt_xent_loss(*outputs, self.temperature)
        return loss, {"loss": loss, "contrast_accuracy": accuracy}

    def forward_flops(self, model) -> float:
        return 2 * model.encoder.forward_flops() + 2 * _mlp_flops(model.heads)


def _check_scale(field: str, scale) -> None:
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"objective.{field}: need 0 < low <= high <= 1, got {tuple(scale)}")


def _mlp_flops(mlp) -> float:
    return sum(dense_flops(1, layer.in_features, layer.out_features) for layer in mlp.layers)


# ---------------------------------------------------------------------------------------------
# CLIP and SigLIP: two towers over paired data.
# ---------------------------------------------------------------------------------------------

class TwoTowerHeads(nnx.Module):
    """The second tower (a text encoder), one linear projection per tower (no bias, as CLIP's
    ``text_projection``/``visual.proj``) and the loss's learnable scalars."""

    def __init__(self, encoder, *, tower_b, embed_dim: int, scalars: dict[str, float],
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.tower_b = tower_b
        self.proj_a = dense(encoder.width, embed_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                            use_bias=False)
        self.proj_b = dense(tower_b.width, embed_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                            use_bias=False)
        for name, value in scalars.items():
            setattr(self, name, param(rngs, nnx.initializers.constant(value), (), ()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairObjective(Objective):
    """Base of two-tower objectives over paired batches (``zoo.data.pairs``).

    Tower A is the backbone (a ViT for ``image`` batches, a text encoder for ``code``); tower
    B, in the heads, is a text encoder of the backbone's size over the ``text`` key.
    """

    modality: ClassVar[str] = "pairs"
    per_example_loss: ClassVar[bool] = False     # in-batch negatives
    suite: ClassVar[str | None] = "retrieval"
    vocab_size: int = 363          # filled in from the tokenizer
    text_len: int = 64             # filled in from data.seq_len
    patch_size: int = 4            # filled in from the model (image towers only)
    embed_dim: int = 256

    def validate(self, *, seq_len: int) -> None:
        if seq_len < 2:
            raise ValueError(f"data.seq_len: must be >= 2 for paired text, got {seq_len}")

    def max_len(self, seq_len: int) -> int:
        return seq_len

    def scalars(self) -> dict[str, float]:
        raise NotImplementedError

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        stack = encoder.encoder if hasattr(encoder, "encoder") else encoder
        text_tower = TextTransformer(
            vocab_size=self.vocab_size, max_len=self.text_len, width=encoder.width,
            depth=encoder.depth, num_heads=stack.num_heads, mlp_dim=encoder.mlp_dim,
            dtype=dtype, rngs=rngs)
        return TwoTowerHeads(encoder, tower_b=text_tower, embed_dim=self.embed_dim,
                             scalars=self.scalars(), rngs=rngs, dtype=dtype)

    def prepare(self, batch, rng):
        key_a = "image" if "image" in batch else "code"
        a = batch[key_a]
        if key_a == "image":
            a = patchify(a.astype(jnp.float32) / 127.5 - 1.0, self.patch_size)
        return {"a": a, "b": batch["text"]}, None

    def embed(self, model, inputs) -> tuple[jax.Array, jax.Array]:
        """L2-normalised embeddings ``(za, zb)`` of both towers: what retrieval compares."""
        features_a = model.encoder.features(inputs["a"])
        features_b = model.heads.tower_b.features(inputs["b"])
        return (l2_normalize(model.heads.proj_a(features_a)),
                l2_normalize(model.heads.proj_b(features_b)))

    def apply(self, model, inputs):
        za, zb = self.embed(model, inputs)
        return {"za": za, "zb": zb, **{k: getattr(model.heads, k)[...] for k in self.scalars()}}

    def forward_flops(self, model, seq_len: int | None = None) -> float | None:
        return None


def retrieval_accuracy(za: jax.Array, zb: jax.Array) -> jax.Array:
    """In-batch top-1 accuracy of A->B retrieval (a training-time sanity metric)."""
    return jnp.mean(jnp.argmax(za @ zb.T, axis=-1) == jnp.arange(za.shape[0]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIP(PairObjective):
    """CLIP's symmetric InfoNCE. ``logit_scale`` starts at ``log(1/init_temperature)`` and is
    clamped to [0, log(max_scale)] after every update, as open_clip's training loop does."""

    name: ClassVar[str] = "clip"
    reference: ClassVar[str] = "Radford et al. 2021; mlfoundations/open_clip loss.py ClipLoss"
    init_temperature: float = 0.07
    max_scale: float = 100.0

    def __post_init__(self):
        if not 0 < self.init_temperature:
            raise ValueError(f"objective.init_temperature: must be positive, got "
                             f"{self.init_temperature}")
        if self.max_scale < 1 / self.init_temperature:
            raise ValueError(f"objective.max_scale: {self.max_scale} is below the initial "
                             f"scale 1/init_temperature = {1 / self.init_temperature:.4g}")

    def scalars(self):
        return {"logit_scale": math.log(1 / self.init_temperature)}

    def loss(self, outputs, targets):
        loss = clip_loss(outputs["za"], outputs["zb"], outputs["logit_scale"])
        return loss, {"loss": loss, "logit_scale": jnp.exp(outputs["logit_scale"]),
                      "batch_recall@1": retrieval_accuracy(outputs["za"], outputs["zb"])}

    def constrain_params(self, params):
        high = math.log(self.max_scale)

        def clamp(path, leaf):
            name = jax.tree_util.keystr(path)
            return jnp.clip(leaf, 0.0, high) if "'logit_scale'" in name else leaf

        return jax.tree_util.tree_map_with_path(clamp, params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SigLIP(PairObjective):
    """SigLIP's pairwise sigmoid loss with a learnable log-scale (init log 10) and bias
    (init -10), as big_vision's ``siglip`` config."""

    name: ClassVar[str] = "siglip"
    reference: ClassVar[str] = "Zhai et al. 2023; google-research/big_vision trainers/proj/image_text/siglip.py"
    init_log_scale: float = math.log(10.0)
    init_bias: float = -10.0

    def scalars(self):
        return {"log_scale": self.init_log_scale, "bias": self.init_bias}

    def loss(self, outputs, targets):
        loss = siglip_loss(outputs["za"], outputs["zb"], outputs["log_scale"], outputs["bias"])
        return loss, {"loss": loss, "logit_scale": jnp.exp(outputs["log_scale"]),
                      "logit_bias": outputs["bias"],
                      "batch_recall@1": retrieval_accuracy(outputs["za"], outputs["zb"])}
