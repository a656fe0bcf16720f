"""Optimizer from the config: AdamW with linear warmup then cosine (or linear/constant) decay."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from zoo.config import OptimConfig


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then the configured decay."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = optim.lr * optim.end_lr_fraction
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_fraction)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(optim.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: biases, norms (ndim <= 1) are excluded, as in MAE/timm."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` with two changes that save passes over every gradient:

    * it takes the norm the train step already computed (``tx.update(..., grad_norm=n)``; the
      norm is computed here when not given), instead of a second reduction over all gradients;
    * it scales by one multiplication, ``g * min(1, max_norm / norm)``, which XLA fuses into the
      Adam moment updates; optax's ``where(norm < max, g, g / norm * max)`` holds a divide, which
      XLA will not duplicate into two consumers, so it wrote the clipped gradients out first.

    The state is optax's (``EmptyState``), so checkpoints are interchangeable with optax's clip.

    Example: ``tx = clip_by_global_norm(1.0)``; ``tx.update({"w": jnp.array([3.0, 4.0])},
    tx.init(None))`` gives ``{"w": [0.6, 0.8]}`` (norm 5 scaled to 1).
    """
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(optim: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                   optax.Schedule]:
    schedule = make_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm:
        parts.append(clip_by_global_norm(optim.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                             weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
