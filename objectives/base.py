"""The objective interface every pretraining objective implements.

An objective is a frozen, keyword-only dataclass of Python hyperparameters (hashable, safe to close
over in jit) plus pure functions, in the spirit of optax's ``GradientTransformation``:

* ``prepare(batch, rng) -> (inputs, targets)``: corrupts or views the batch on device, inside
  jit, with static shapes (counts come from Python, positions from ``rng``);
* ``make_heads(encoder, rngs)``: the modules it adds on top of the shared backbone;
* ``apply(model, inputs) -> outputs``: runs backbone and heads;
* ``loss(outputs, targets) -> (scalar, metrics)``.

Learnable loss parameters (a temperature, a bias) belong in a head, so objectives stay stateless.
Objectives that carry state between steps (an EMA teacher, DINO's centre) set ``stateful = True``:
their state lives in the train state (checkpointed and resumed like parameters), their ``apply``
also gets a ``StepContext``, and ``update_state`` advances the state after each applied update.

Adding an objective::

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Rotation(ImageObjective):
        name: ClassVar[str] = "rotation"
        def make_heads(self, encoder, *, rngs): return nnx.Linear(encoder.width, 4, rngs=rngs)
        def prepare(self, batch, rng): ...
        def apply(self, model, inputs): ...
        def loss(self, outputs, targets): ...

and list it in ``objectives/__init__.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from einops import rearrange

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a stateful objective's ``apply`` sees besides the model and inputs.

    Attributes:
      state: the objective's state (``init_state``'s pytree; read-only here).
      teacher: the model with the teacher's parameters (``state["teacher"]``), or None. No
        gradient flows into it: only the train state's ``params`` are differentiated.
      step: int32 scalar, the 0-based index of this step.
      total_steps: the run's length (``config.steps``), for schedules.
      merge: ``params -> model`` (rebuilds a model from a parameter tree, e.g. a teacher's).
    """

    state: Any
    teacher: Any
    step: jax.Array
    total_steps: int
    merge: Any = None


def cosine_momentum(base: float, step, total_steps: int):
    """BYOL's / DINO's EMA momentum: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``,
    ``base`` at step 0 rising to 1 at the last step."""
    progress = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def ema(teacher, student, momentum):
    """``momentum * teacher + (1 - momentum) * student``, leaf by leaf."""
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    """Base class: subclasses add hyperparameter fields and implement the four functions."""

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""     # "image", "text", ...: which `zoo compare --suite` runs it
    reference: ClassVar[str] = ""    # paper / reference code it matches
    required_posemb: ClassVar[str | None] = None   # e.g. "none": the backbone must not get any
    suite: ClassVar[str | None] = None   # the `zoo compare --suite` that runs it (None: none)
    stateful: ClassVar[bool] = False     # True: apply(model, inputs, context); see StepContext
    # False: the loss couples a batch's examples (in-batch negatives, BatchNorm), so gradient
    # accumulation over micro-batches would change it (zoo refuses grad_accum_steps > 1).
    per_example_loss: ClassVar[bool] = True

    def validate(self, *, image_shape: tuple[int, int, int]) -> None:
        """Checks hyperparameters against the data before anything compiles."""

    def make_heads(self, encoder: nnx.Module, *, rngs: nnx.Rngs,
                   dtype=jnp.float32) -> nnx.Module | None:
        return None

    def prepare(self, batch: Batch, rng: jax.Array) -> tuple[Any, Any]:
        raise NotImplementedError

    def apply(self, model: nnx.Module, inputs: Any) -> Any:
        raise NotImplementedError

    def loss(self, outputs: Any, targets: Any) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError

    def init_state(self, params) -> dict:
        """The objective's state at step 0 (stateful objectives), e.g. ``{"teacher": params}``."""
        return {}

    def update_state(self, state: dict, *, params, outputs, step: jax.Array,
                     total_steps: int) -> dict:
        """The state after an applied update: ``params`` are the new parameters, ``outputs``
        this step's ``apply`` outputs (no gradient)."""
        return state

    def phase(self, step: int):
        """Which parts run at Python ``step`` (mixtures compile one step per phase)."""
        return None

    def constrain_params(self, params):
        """Projects parameters after each optimizer update (e.g. CLIP's logit-scale clamp)."""
        return params

    def forward_flops(self, model: nnx.Module) -> float | None:
        """Model FLOPs of one example's forward pass (multiply-adds count 2); None if unknown,
        in which case MFU is not reported."""
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageObjective(Objective):
    """An objective over images cut into square patches. ``patch_size`` comes from the model."""

    modality: ClassVar[str] = "image"
    suite: ClassVar[str | None] = "image"
    patch_size: int = 16

    def validate(self, *, image_shape: tuple[int, int, int]) -> None:
        height, width, _ = image_shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"model.patch_size: image size {height}x{width} is not divisible by "
                             f"patch size {self.patch_size}; choose a divisor of both")

    def num_patches(self, image_shape: tuple[int, int, int]) -> int:
        return (image_shape[0] // self.patch_size) * (image_shape[1] // self.patch_size)


def image_to_float(image: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 in [-1, 1]."""
    return image.astype(jnp.float32) / 127.5 - 1.0


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major patches, (row, col, channel) inside.

    The same order as MAE's ``patchify`` (``nchpwq->nhwpqc``), for channel-last images.
    """
    return rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int]) -> jax.Array:
    """Inverse of ``patchify``: [B, L, p*p*C] -> [B, H, W, C]."""
    return rearrange(patches, "b (h w) (p q c) -> b (h p) (w q) c", h=grid[0], w=grid[1],
                     p=patch, q=patch)
