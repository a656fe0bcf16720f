"""Self-distillation with an EMA teacher: BYOL and DINO.

The teacher is a copy of the whole parameter tree kept in the objective's state
(``TrainState.objective_state["teacher"]``): it is checkpointed and resumed exactly like the
parameters, gets no gradient (only ``params`` are differentiated), and after every applied update
moves towards the student, ``teacher = m * teacher + (1 - m) * student``, with the cosine momentum
schedule both papers use, ``m = 1 - (1 - base) * (cos(pi * step / steps) + 1) / 2`` (``base`` at
the first step, 1 at the last). Parts of the student the teacher never runs (BYOL's predictor)
are copied too; they are small and keep the teacher a plain mirror of ``params``.

Representations are the encoder's pooled features (mean of the patch tokens, what the probes
read); DINO's ViT uses the cls token instead.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from objectives.base import ImageObjective, cosine_momentum, ema
from objectives.contrastive import _check_scale, _mlp_flops, image_features
from zoo import augment
from zoo.flops import dense_flops, transformer_flops
from zoo.models.heads import DinoHead, ProjectionMLP, l2_normalize


def byol_regression_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """BYOL's ``2 - 2 cos(p, z)`` per example (= squared distance of the L2-normalised
    vectors), averaged over the batch."""
    p, z = l2_normalize(prediction), l2_normalize(target)
    return jnp.mean(jnp.sum(jnp.square(p - z), axis=-1))


class ByolHeads(nnx.Module):
    def __init__(self, width: int, *, hidden: int, out: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.projector = ProjectionMLP(width, hidden, out, rngs=rngs, dtype=dtype)
        self.predictor = ProjectionMLP(out, hidden, out, rngs=rngs, dtype=dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BYOL(ImageObjective):
    """BYOL (Grill et al. 2020; deepmind-research/byol).

    Online network = encoder + projector + predictor; target = EMA of encoder + projector. Two
    views with BYOL's asymmetric augmentations (colour jitter 0.4/0.4/0.2/0.1, blur p 1.0 / 0.1,
    solarize p 0 / 0.2); loss =
    ``l(p1, z2') + l(p2, z1')`` with ``l = 2 - 2 cos``. Each view goes through the projector
    separately (BN statistics per view, as the reference's two forward passes).

    Attributes:
      base_momentum: the target EMA momentum at step 0 (reference 0.996), rising to 1.
      proj_hidden, proj_dim: projector/predictor sizes (reference 4096 / 256).
    """

    name: ClassVar[str] = "byol"
    reference: ClassVar[str] = "Grill et al. 2020; deepmind-research/byol byol_experiment.py"
    stateful: ClassVar[bool] = True
    base_momentum: float = 0.996
    proj_hidden: int = 4096
    proj_dim: int = 256
    crop_scale: tuple[float, float] = (0.08, 1.0)

    def __post_init__(self):
        if not 0.0 <= self.base_momentum <= 1.0:
            raise ValueError(f"objective.base_momentum: must be in [0, 1], got "
                             f"{self.base_momentum}")
        _check_scale("crop_scale", self.crop_scale)

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return ByolHeads(encoder.width, hidden=self.proj_hidden, out=self.proj_dim, rngs=rngs,
                         dtype=dtype)

    def init_state(self, params):
        return {"teacher": params}

    def prepare(self, batch, rng):
        view1, view2 = augment.simclr_views(rng, batch["image"], scale=tuple(self.crop_scale),
                                            blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2),
                                            jitter=augment.DINO_JITTER)
        return {"views": jnp.stack([view1, view2])}, None

    def _project(self, model, views):
        two, batch = views.shape[:2]
        features = image_features(model.encoder, views.reshape(two * batch, *views.shape[2:]),
                                  self.patch_size)
        return model.heads.projector(features.reshape(two, batch, -1))   # BN per view

    def apply(self, model, inputs, context):
        online = model.heads.predictor(self._project(model, inputs["views"]))
        target = self._project(context.teacher, inputs["views"])
        return {"online": online, "target": target}

    def loss(self, outputs, targets):
        online, target = outputs["online"], outputs["target"]
        loss = (byol_regression_loss(online[0], target[1])
                + byol_regression_loss(online[1], target[0]))
        return loss, {"loss": loss}

    def update_state(self, state, *, params, outputs, step, total_steps):
        momentum = cosine_momentum(self.base_momentum, step, total_steps)
        return {**state, "teacher": ema(state["teacher"], params, momentum)}

    def forward_flops(self, model) -> float:
        # Two views through the online network and through the target (no predictor).
        heads = model.heads
        return (4 * model.encoder.forward_flops() + 4 * _mlp_flops(heads.projector)
                + 2 * _mlp_flops(heads.predictor))


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array,
              student_temp: float, teacher_temp: jax.Array) -> jax.Array:
    """DINO's ``DINOLoss``: ``student [V, B, K]`` logits of all V crops, ``teacher [2, B, K]``
    of the two global crops. Teacher targets = ``softmax((teacher - center) / teacher_temp)``;
    every (teacher crop iq, student crop v != iq) pair contributes the batch mean of
    ``-sum(q * log_softmax(student / student_temp))``; the result is their average."""
    log_p = jax.nn.log_softmax(student.astype(jnp.float32) / student_temp, axis=-1)
    q = jax.nn.softmax((teacher.astype(jnp.float32) - center) / teacher_temp, axis=-1)
    # cross[iq, v] = batch mean of -sum_k q[iq] log_p[v]
    cross = -jnp.einsum("ibk,vbk->iv", q, log_p) / student.shape[1]
    num_views = student.shape[0]
    keep = 1.0 - jnp.eye(teacher.shape[0], num_views)   # skip a crop against itself
    return jnp.sum(cross * keep) / jnp.sum(keep)


def dino_target_entropies(teacher: jax.Array, center: jax.Array,
                          teacher_temp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Collapse monitors for DINO's teacher targets ``q`` (the paper's Fig. 7 tracks the first):
    ``teacher_entropy`` = mean over crops of ``H(q)`` (ln K: uniform collapse; 0: one prototype)
    and ``target_information`` = ``H(mean q) - mean H(q)``, the information the targets carry
    about which crop they came from (0 in either collapse)."""
    q = jax.nn.softmax((teacher.astype(jnp.float32) - center) / teacher_temp, axis=-1)
    q = q.reshape(-1, q.shape[-1])

    def entropy(p):
        return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)

    mean_entropy = jnp.mean(entropy(q))
    return mean_entropy, entropy(q.mean(axis=0)) - mean_entropy


@dataclasses.dataclass(frozen=True, kw_only=True)
class DINO(ImageObjective):
    """DINO (Caron et al. 2021; facebookresearch/dino ``main_dino.py``).

    Student and EMA teacher share the architecture (encoder + ``DinoHead``). The teacher sees the
    two global crops, the student all crops (2 global + ``num_local`` local ones at a smaller
    resolution, position embeddings resized). Teacher outputs are centred (centre EMA
    ``center_momentum`` of the teacher's batch mean over the global batch) and sharpened
    (temperature warming up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``teacher_temp_warmup_steps``); student temperature ``student_temp``.
    ``freeze_last_layer_steps``: the prototypes (last layer) get no gradient before this step,
    as the reference's ``freeze_last_layer`` (1 epoch there; 0, off, here). ``pool``: the head reads
    the mean of the patch tokens (default, what the probes read) or the cls token (the reference;
    needs ``model.cls_token``). ``use_bn_in_head``: the reference's ``--use_bn_in_head`` (off by
    default there). ``color_strength`` scales the reference's colour jitter (1.0 = 0.4/0.4/0.2/0.1).

    Logged collapse monitors (see :func:`dino_target_entropies`): ``teacher_entropy`` near ln K
    and ``target_information`` near 0 mean the targets went uniform.
    """

    name: ClassVar[str] = "dino"
    reference: ClassVar[str] = "Caron et al. 2021; facebookresearch/dino main_dino.py"
    stateful: ClassVar[bool] = True
    out_dim: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    base_momentum: float = 0.996
    center_momentum: float = 0.9
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    teacher_temp_warmup_steps: int = 0
    num_local: int = 6
    local_size: int = 0            # 0: half the image size (rounded to the patch size)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    pool: str = "mean"             # head input: "mean" of patch tokens or the "cls" token (ref.)
    freeze_last_layer_steps: int = 0   # the reference freezes the prototypes for the 1st epoch
    use_bn_in_head: bool = False   # the reference's --use_bn_in_head (BN after hidden Linears)
    color_strength: float = 1.0    # scales the reference's jitter (0.4, 0.4, 0.2, 0.1); 0: none

    def __post_init__(self):
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"objective.pool: unknown {self.pool!r}; allowed: ('mean', 'cls')")
        for field in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, field) <= 0:
                raise ValueError(f"objective.{field}: must be positive, got "
                                 f"{getattr(self, field)}")
        for field in ("base_momentum", "center_momentum"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"objective.{field}: must be in [0, 1], got "
                                 f"{getattr(self, field)}")
        if self.num_local < 0:
            raise ValueError(f"objective.num_local: must be >= 0, got {self.num_local}")
        if self.freeze_last_layer_steps < 0:
            raise ValueError("objective.freeze_last_layer_steps: must be >= 0, got "
                             f"{self.freeze_last_layer_steps}")
        _check_scale("global_scale", self.global_scale)
        _check_scale("local_scale", self.local_scale)
        if not 0 <= self.color_strength <= 5:   # hue strength 0.1 s must stay <= 0.5
            raise ValueError(f"objective.color_strength: must be in [0, 5], got "
                             f"{self.color_strength}")

    def local_crop_size(self, image_shape) -> int:
        size = self.local_size or max(self.patch_size, image_shape[0] // 2)
        return size - size % self.patch_size

    def validate(self, *, image_shape):
        super().validate(image_shape=image_shape)
        size = self.local_crop_size(image_shape)
        if self.local_size and (self.local_size % self.patch_size or size <= 0):
            raise ValueError(f"objective.local_size: {self.local_size} must be a positive "
                             f"multiple of the patch size {self.patch_size}")

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return DinoHead(encoder.width, self.out_dim, hidden_dim=self.head_hidden,
                        bottleneck_dim=self.head_bottleneck, use_bn=self.use_bn_in_head,
                        rngs=rngs, dtype=dtype)

    def init_state(self, params):
        return {"teacher": params, "center": jnp.zeros((1, self.out_dim), jnp.float32)}

    def teacher_temperature(self, step) -> jax.Array:
        """Linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up steps."""
        if self.teacher_temp_warmup_steps == 0:
            return jnp.float32(self.teacher_temp)
        fraction = jnp.minimum(
            jnp.asarray(step, jnp.float32) / self.teacher_temp_warmup_steps, 1.0)
        return self.warmup_teacher_temp + fraction * (self.teacher_temp - self.warmup_teacher_temp)

    def prepare(self, batch, rng):
        images = batch["image"]
        size = self.local_crop_size(images.shape[1:])
        global_crops, local_crops = augment.multi_crop(
            rng, images, num_local=self.num_local, local_size=(size, size),
            global_scale=tuple(self.global_scale), local_scale=tuple(self.local_scale),
            jitter=tuple(self.color_strength * j for j in augment.DINO_JITTER))
        return {"global": global_crops, "local": local_crops}, None

    def _features(self, model, crops):
        views, batch = crops.shape[:2]
        features = image_features(model.encoder, crops.reshape(views * batch, *crops.shape[2:]),
                                  self.patch_size, self.pool)
        return features.reshape(views, batch, -1)

    def _logits(self, model, features, freeze_last=False):
        # One head call over every crop (the reference's MultiCropWrapper), so a BN head
        # normalises over all of them together.
        views, batch = features.shape[:2]
        logits = model.heads(features.reshape(views * batch, -1), freeze_last=freeze_last)
        return logits.reshape(views, batch, -1)

    def apply(self, model, inputs, context):
        freeze = jnp.asarray(context.step) < self.freeze_last_layer_steps
        features = self._features(model, inputs["global"])
        if self.num_local:
            features = jnp.concatenate([features, self._features(model, inputs["local"])])
        student = self._logits(model, features, freeze)
        teacher = self._logits(context.teacher, self._features(context.teacher, inputs["global"]))
        return {"student": student, "teacher": teacher, "center": context.state["center"],
                "teacher_temp": self.teacher_temperature(context.step)}

    def loss(self, outputs, targets):
        loss = dino_loss(outputs["student"], outputs["teacher"], outputs["center"],
                         self.student_temp, outputs["teacher_temp"])
        entropy, information = dino_target_entropies(outputs["teacher"], outputs["center"],
                                                     outputs["teacher_temp"])
        return loss, {"loss": loss, "teacher_temp": outputs["teacher_temp"],
                      "teacher_entropy": entropy, "target_information": information}

    def forward_flops(self, model) -> float:
        """Student: 2 global + num_local local crops; teacher: the 2 global crops."""
        enc = model.encoder
        size = self.local_crop_size((enc.grid[0] * self.patch_size,))
        local = (size // self.patch_size) ** 2
        local_flops = (dense_flops(local, enc.patch_dim, enc.width)
                       + transformer_flops(local + int(enc.has_cls), enc.width, enc.depth,
                                           enc.mlp_dim))
        head = model.heads
        head_flops = (sum(dense_flops(1, layer.in_features, layer.out_features)
                          for layer in head.layers)
                      + dense_flops(1, *head.last.get_value().shape))
        views = 2 + self.num_local
        return 4 * enc.forward_flops() + self.num_local * local_flops + (views + 2) * head_flops

    def update_state(self, state, *, params, outputs, step, total_steps):
        momentum = cosine_momentum(self.base_momentum, step, total_steps)
        teacher = outputs["teacher"].astype(jnp.float32)
        batch_center = teacher.reshape(-1, teacher.shape[-1]).mean(axis=0, keepdims=True)
        center = (state["center"] * self.center_momentum
                  + batch_center * (1.0 - self.center_momentum))
        return {"teacher": ema(state["teacher"], params, momentum), "center": center}
