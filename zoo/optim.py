"""Optimizer from the config: AdamW with linear warmup then cosine (or linear/constant) decay."""
from __future__ import annotations

import jax
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


def make_optimizer(optim: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                   optax.Schedule]:
    schedule = make_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                             weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
