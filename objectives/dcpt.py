"""Restoration pretraining by degradation classification, and the restoration task itself.

* ``dcpt``: "Universal Image Restoration Pre-training via Degradation Classification" (Hu et
  al., ICLR 2025). Every image of the batch gets a random degradation type (the label) from
  ``kinds`` (default: the five of all-in-one restoration: noise, blur, haze, rain, low light;
  see ``zoo.degradations``). The encoder reads the degraded image; a degradation classifier
  fuses features from ALL encoder layers (a learned softmax-weighted sum of the block outputs,
  mean-pooled over the patch tokens, LayerNorm, linear) and predicts the type; the restoration
  network (encoder + a light Transformer decoder predicting a residual per patch) also
  reconstructs the clean image. ``loss = cls_weight * CE + rec_weight * L1(restored, clean)``.
* ``mask_dcpt``: MaskDCPT ("Universal Image Restoration Pre-training via Masked Degradation
  Classification"). Additionally removes ``mask_ratio`` (default 50%) of the degraded input's
  patches (MAE's random masking); the classifier reads the visible tokens; the decoder (with
  mask tokens, as MAE's) predicts the CLEAN image at every patch, L1 over the whole image.
* ``restore``: the task both pretrain for (used to fine-tune and evaluate): degraded in,
  ``degraded + decoder(encoder(degraded))`` out, L1 to the clean image, PSNR reported.

Pixels are in [-1, 1] for the model (``image_to_float``); degradations act in [0, 1]. PSNR is
measured in [0, 1] (peak 1). Reconstructions: 8 x 8 patches of 3 channels of a 32 x 32 photo
crop at ``patch_size=4`` etc.; the decoder is MAE's (``MaeDecoder``), its size set by
``decoder_width/depth/heads``.

Example::

    obj = objectives.get("dcpt", patch_size=4)
    inputs, targets = obj.prepare({"image": uint8_images}, rng)   # degrades on device
    outputs = obj.apply(model, inputs)
    loss, metrics = obj.loss(outputs, targets)    # metrics: degradation_accuracy, l1, psnr
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from objectives.base import ImageObjective, patchify
from objectives.mae import MaeDecoder, masking_indices
from zoo import degradations
from zoo.flops import dense_flops, transformer_flops
from zoo.models.layers import dense, layer_norm, param


def psnr(restored: jax.Array, clean: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio per image, in dB, of images in [-1, 1] measured in [0, 1]
    (peak 1): ``-10 log10(mean((x - y)^2))`` over [B, ...] -> [B]."""
    x = (jnp.clip(restored.astype(jnp.float32), -1, 1) + 1) / 2
    y = (clean.astype(jnp.float32) + 1) / 2
    mse = ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def degrade_batch(images: jax.Array, rng: jax.Array, kinds: tuple[str, ...]):
    """uint8 [B, H, W, C] -> (clean, degraded) in [-1, 1] and the int32 degradation labels."""
    clean01 = images.astype(jnp.float32) / 255.0
    degraded01, labels = degradations.random_degradations(clean01, rng, kinds)
    return clean01 * 2 - 1, degraded01 * 2 - 1, labels


class LayerFusionClassifier(nnx.Module):
    """DCPT's degradation classifier: softmax(w) . block outputs, mean over patch tokens,
    LayerNorm, linear. ``w`` starts uniform (all layers weighted 1/depth)."""

    def __init__(self, width: int, num_layers: int, num_classes: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.layer_logits = param(rngs, nnx.initializers.zeros_init(), (num_layers,), (None,))
        self.norm = layer_norm(width, rngs=rngs, dtype=dtype)
        self.fc = dense(width, num_classes, ("embed", None), rngs=rngs, dtype=dtype)

    def layer_weights(self) -> jax.Array:
        return jax.nn.softmax(self.layer_logits[...])

    def __call__(self, layers: list[jax.Array], *, skip_cls: bool) -> jax.Array:
        stacked = jnp.stack(layers)                                     # [D, B, T, W]
        if skip_cls:
            stacked = stacked[:, :, 1:]
        fused = jnp.einsum("d,dbtw->btw", self.layer_weights().astype(stacked.dtype), stacked)
        return self.fc(self.norm(fused.mean(axis=1)))


class RestorationHeads(nnx.Module):
    """The decoder of the restoration network and (for pretraining) the classifier."""

    def __init__(self, encoder, *, width: int, depth: int, num_heads: int, masked: bool,
                 num_classes: int | None, rngs: nnx.Rngs, dtype=jnp.float32):
        self.decoder = MaeDecoder(encoder_width=encoder.width, width=width, depth=depth,
                                  num_heads=num_heads, grid=encoder.grid,
                                  patch_dim=encoder.patch_dim, has_cls=encoder.has_cls,
                                  masked=masked, rngs=rngs, dtype=dtype)
        if not masked:
            # The unmasked decoder predicts a residual: a zero output layer makes the network
            # start as the identity (restored = degraded), as restoration nets are usually set
            # up, instead of adding unit-scale noise to every pixel at step 0.
            pred = self.decoder.pred.kernel
            pred.set_value(jnp.zeros_like(pred.get_value()))
        if num_classes is not None:
            self.classifier = LayerFusionClassifier(encoder.width, encoder.depth, num_classes,
                                                    rngs=rngs, dtype=dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RestorationObjective(ImageObjective):
    """Shared fields and checks: degradation kinds and the decoder's size."""

    suite: ClassVar[str | None] = "restoration"
    kinds: tuple[str, ...] = degradations.ALL_IN_ONE
    decoder_width: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4

    def __post_init__(self):
        try:
            object.__setattr__(self, "kinds", degradations.check_kinds(self.kinds))
        except ValueError as error:
            raise ValueError(f"objective.kinds: {str(error).removeprefix('kinds: ')}") from None
        if self.decoder_width % 4 or self.decoder_width % self.decoder_heads:
            raise ValueError(f"objective.decoder_width: {self.decoder_width} must be a multiple "
                             f"of 4 and of decoder_heads={self.decoder_heads}")

    def validate(self, *, image_shape):
        super().validate(image_shape=image_shape)
        height, width, channels = image_shape
        if channels != 3:
            raise ValueError(f"data.name: restoration objectives need RGB images (e.g. "
                             f"'photos/32x32'), got {channels} channel(s)")
        if "jpeg" in self.kinds and (height % 8 or width % 8):
            raise ValueError(f"objective.kinds: 'jpeg' needs image sides divisible by 8, got "
                             f"{height}x{width}")

    def prepare(self, batch, rng):
        """Degrades each image with a random kind (the label), on device; patchified pixels."""
        clean, degraded, labels = degrade_batch(batch["image"], rng, self.kinds)
        degraded = patchify(degraded, self.patch_size)
        return {"patches": degraded}, {"clean": patchify(clean, self.patch_size),
                                       "degraded": degraded, "labels": labels}

    def _decoder_flops(self, model, visible: int) -> float:
        enc, dec = model.encoder, model.heads.decoder
        cls = int(enc.has_cls)
        length = enc.num_patches
        return (dense_flops(visible + cls, enc.width, dec.width)
                + transformer_flops(length + cls, dec.width, self.decoder_depth, 4 * dec.width)
                + dense_flops(length + cls, dec.width, enc.patch_dim))


def l1(prediction: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.abs(prediction.astype(jnp.float32) - target).mean()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DCPT(_RestorationObjective):
    """DCPT: degradation classification from fused multi-layer encoder features, plus the
    restoration network's reconstruction of the clean image (L1).

    Attributes:
      kinds: degradation types (labels are their indices), from ``zoo.degradations``.
      cls_weight, rec_weight: loss weights of the classification and reconstruction terms.
      decoder_width, decoder_depth, decoder_heads: the restoration decoder.
    """

    name: ClassVar[str] = "dcpt"
    reference: ClassVar[str] = "Hu et al. 2025, Universal Image Restoration Pre-training via Degradation Classification (ICLR)"
    cls_weight: float = 1.0
    rec_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.cls_weight < 0 or self.rec_weight < 0 or self.cls_weight + self.rec_weight == 0:
            raise ValueError("objective.cls_weight, rec_weight: need non-negative weights, "
                             "not both zero")

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return RestorationHeads(encoder, width=self.decoder_width, depth=self.decoder_depth,
                                num_heads=self.decoder_heads, masked=False,
                                num_classes=len(self.kinds), rngs=rngs, dtype=dtype)

    def apply(self, model, inputs):
        encoder = model.encoder
        latent, layers = encoder.encode(encoder.embed(inputs["patches"]), return_layers=True)
        logits = model.heads.classifier(layers, skip_cls=encoder.has_cls)
        residual = model.heads.decoder(latent)
        return {"logits": logits, "restored": inputs["patches"] + residual}

    def loss(self, outputs, targets):
        return classification_and_reconstruction(outputs, targets, self.cls_weight,
                                                 self.rec_weight)

    def forward_flops(self, model) -> float:
        enc = model.encoder
        return (enc.forward_flops() + self._decoder_flops(model, enc.num_patches)
                + dense_flops(1, enc.width, len(self.kinds)))


def classification_and_reconstruction(outputs, targets, cls_weight: float, rec_weight: float):
    logits = outputs["logits"].astype(jnp.float32)
    labels = targets["labels"]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1).mean()
    rec = l1(outputs["restored"], targets["clean"])
    loss = cls_weight * ce + rec_weight * rec
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
    return loss, {"loss": loss, "classification_loss": ce, "l1": rec,
                  "degradation_accuracy": accuracy,
                  "psnr": psnr(outputs["restored"], targets["clean"]).mean()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskDCPT(DCPT):
    """MaskDCPT: DCPT on a masked degraded input. The encoder sees ``1 - mask_ratio`` of the
    patches (MAE's keep set); the classifier fuses the visible tokens of every layer; the
    decoder predicts the CLEAN image at every patch (L1 over the whole image).

    Attributes:
      mask_ratio: fraction of the degraded input's patches removed, in (0, 1); default 0.5.
      (and DCPT's kinds, loss weights and decoder size)
    """

    name: ClassVar[str] = "mask_dcpt"
    reference: ClassVar[str] = "Hu et al. 2025, Universal Image Restoration Pre-training via Masked Degradation Classification"
    mask_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio: must be in (0, 1), got {self.mask_ratio}")

    def validate(self, *, image_shape):
        super().validate(image_shape=image_shape)
        length = self.num_patches(image_shape)
        if not 0 < int(length * (1 - self.mask_ratio)) < length:
            raise ValueError(f"objective.mask_ratio: {self.mask_ratio} must keep at least one "
                             f"and remove at least one of the {length} patches")

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return RestorationHeads(encoder, width=self.decoder_width, depth=self.decoder_depth,
                                num_heads=self.decoder_heads, masked=True,
                                num_classes=len(self.kinds), rngs=rngs, dtype=dtype)

    def prepare(self, batch, rng):
        degrade_rng, mask_rng = jax.random.split(rng)
        inputs, targets = super().prepare(batch, degrade_rng)
        patches = inputs["patches"]
        ids_keep, _, ids_restore = masking_indices(mask_rng, patches.shape[0],
                                                   patches.shape[1], self.mask_ratio)
        return {**inputs, "ids_keep": ids_keep, "ids_restore": ids_restore}, targets

    def apply(self, model, inputs):
        encoder = model.encoder
        tokens = encoder.embed(inputs["patches"])           # positions added before the gather
        kept = jnp.take_along_axis(tokens, inputs["ids_keep"][..., None], axis=1)
        latent, layers = encoder.encode(kept, return_layers=True)
        logits = model.heads.classifier(layers, skip_cls=encoder.has_cls)
        return {"logits": logits, "restored": model.heads.decoder(latent, inputs["ids_restore"])}

    def forward_flops(self, model) -> float:
        enc = model.encoder
        kept = int(enc.num_patches * (1 - self.mask_ratio))
        return (enc.forward_flops(kept) + self._decoder_flops(model, kept)
                + dense_flops(1, enc.width, len(self.kinds)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restore(_RestorationObjective):
    """All-in-one restoration (the fine-tuning task): random degradation from ``kinds``, the
    encoder-decoder predicts a residual, L1 to the clean image; PSNR in the metrics."""

    name: ClassVar[str] = "restore"
    suite: ClassVar[str | None] = None      # a task to fine-tune on, not a pretraining objective
    reference: ClassVar[str] = "all-in-one restoration (e.g. PromptIR, Potlapalli et al. 2023): L1 with a global residual"

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return RestorationHeads(encoder, width=self.decoder_width, depth=self.decoder_depth,
                                num_heads=self.decoder_heads, masked=False, num_classes=None,
                                rngs=rngs, dtype=dtype)

    def apply(self, model, inputs):
        encoder = model.encoder
        residual = model.heads.decoder(encoder.encode(encoder.embed(inputs["patches"])))
        return {"restored": inputs["patches"] + residual}

    def loss(self, outputs, targets):
        rec = l1(outputs["restored"], targets["clean"])
        return rec, {"loss": rec, "l1": rec,
                     "psnr": psnr(outputs["restored"], targets["clean"]).mean()}

    def forward_flops(self, model) -> float:
        return model.encoder.forward_flops() + self._decoder_flops(model,
                                                                   model.encoder.num_patches)
