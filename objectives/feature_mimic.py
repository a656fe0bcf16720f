"""Feature mimicking: MAE plus regression of a frozen teacher's features on the visible tokens.

After "Mimic before Reconstruct" (MR-MAE, Gao et al. 2022): the encoder sees MAE's visible
patches; its output tokens are projected by a linear head and regressed onto the features a
frozen, pretrained teacher computes for the same patches from the COMPLETE image, while the MAE
decoder still reconstructs the masked pixels. The teacher is the encoder of any checkpoint of this
zoo (``teacher_workdir``: e.g. a DINO-, CLIP- or MAE-pretrained workdir with the same model size),
loaded into the train state when the run starts (``TrainState.objective_state["teacher"]``, so it
is checkpointed with the run and never reloaded on resume) and never updated.

Targets are the teacher's last-layer patch tokens normalised per token by a parameter-free
LayerNorm (a common choice for feature targets, e.g. MaskFeat/MILAN); the mimic loss is their
mean squared error, averaged over visible tokens and feature dimensions.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from objectives.mae import MAE, MaeDecoder, reconstruction_loss
from zoo.models.layers import dense


def normalized_features(tokens: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-token zero mean / unit variance over features (LayerNorm without affine)."""
    tokens = tokens.astype(jnp.float32)
    mean = tokens.mean(axis=-1, keepdims=True)
    var = tokens.var(axis=-1, keepdims=True)
    return (tokens - mean) * jax.lax.rsqrt(var + eps)


class FeatureMimicHeads(nnx.Module):
    def __init__(self, decoder: MaeDecoder, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.decoder = decoder
        self.mimic = dense(width, width, ("embed", "mlp"), rngs=rngs, dtype=dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureMimic(MAE):
    """MAE + ``mimic_weight`` x MSE(linear(student visible tokens), LN(teacher tokens)).

    Attributes:
      teacher_workdir: a zoo workdir whose latest checkpoint's encoder is the teacher
        (required; same model size, patch size and image shape as this run).
      mimic_weight: weight of the feature loss next to MAE's pixel loss.
    """

    name: ClassVar[str] = "feature_mimic"
    reference: ClassVar[str] = "Gao et al. 2022, Mimic before Reconstruct (MR-MAE)"
    stateful: ClassVar[bool] = True
    suite: ClassVar[str | None] = None    # needs a teacher workdir: not in the image suite
    teacher_workdir: str = ""
    mimic_weight: float = 1.0

    def validate(self, *, image_shape):
        super().validate(image_shape=image_shape)
        if not self.teacher_workdir:
            raise ValueError("objective.teacher_workdir: feature_mimic needs the workdir of a "
                             "pretrained run (e.g. a dino or mae run) whose encoder is the teacher")
        if self.mimic_weight < 0:
            raise ValueError(f"objective.mimic_weight: must be >= 0, got {self.mimic_weight}")

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return FeatureMimicHeads(super().make_heads(encoder, rngs=rngs, dtype=dtype),
                                 encoder.width, rngs=rngs, dtype=dtype)

    def init_state(self, params):
        return {"teacher": params}   # its encoder is replaced from teacher_workdir at start

    def apply(self, model, inputs, context):
        encoder = model.encoder
        latent = self.encode_kept(model, inputs)
        pixels = model.heads.decoder(latent, inputs["ids_restore"], rows=inputs["ids_removed"])
        visible = latent[:, 1:] if encoder.has_cls else latent
        teacher_tokens = context.teacher.encoder(inputs["patches"])   # the complete image
        if context.teacher.encoder.has_cls:
            teacher_tokens = teacher_tokens[:, 1:]
        target = jnp.take_along_axis(teacher_tokens, inputs["ids_keep"][..., None], axis=1)
        return {"pixels": pixels, "mimic": model.heads.mimic(visible),
                "mimic_target": normalized_features(target)}

    def loss(self, outputs, targets):
        reconstruction = reconstruction_loss(outputs["pixels"], targets, self.norm_pix_loss)
        mimic = jnp.mean(jnp.square(outputs["mimic"].astype(jnp.float32)
                                    - outputs["mimic_target"]))
        loss = reconstruction + self.mimic_weight * mimic
        return loss, {"loss": loss, "reconstruction_loss": reconstruction, "mimic_loss": mimic}

    def forward_flops(self, model) -> float:
        # MAE's forward plus the teacher's full forward and the mimic head.
        kept = int(model.encoder.num_patches * (1 - self.mask_ratio))
        mae = MAE.forward_flops(self, _MaeView(model))
        return mae + model.encoder.forward_flops() + 2 * kept * model.encoder.width ** 2


class _MaeView:
    """``model`` seen as an MAE model (its decoder as the heads), for MAE's FLOP count."""

    def __init__(self, model):
        self.encoder, self.heads = model.encoder, model.heads.decoder
