"""Loss-spike skipping (OLMo 2's skip-step): an update whose loss or gradient norm lies far
above the recent running statistics is not applied.

The statistics are a ring buffer of the last ``window`` APPLIED steps' (loss, grad norm) kept
in the train state (checkpointed, so a resumed run decides exactly as an uninterrupted one).
A step is a spike when, with a full window, ``value > mean + threshold * std`` for the loss or
the gradient norm. Skipped steps do not enter the window, so a burst of spikes cannot raise
the bar for the next one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init_stats(spike_config):
    """The train state's ``spike_stats`` (None when skipping is off: no state at all)."""
    if not spike_config.enabled:
        return None
    return {"values": jnp.zeros((spike_config.window, 2), jnp.float32),
            "count": jnp.int32(0),       # applied steps seen (saturates past the window)
            "skipped": jnp.int32(0)}     # spikes skipped so far


def is_spike(spike_config, stats, loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """bool scalar: ``loss`` or ``grad_norm`` above mean + threshold * std of the window."""
    values = stats["values"]
    mean, std = values.mean(axis=0), values.std(axis=0)
    now = jnp.stack([loss, grad_norm]).astype(jnp.float32)
    above = jnp.any(now > mean + spike_config.threshold * std)
    return above & (stats["count"] >= values.shape[0])


def update_stats(stats, loss: jax.Array, grad_norm: jax.Array, *, applied: jax.Array,
                 spike: jax.Array):
    """Appends an applied step's values (ring buffer) and counts skipped spikes."""
    window = stats["values"].shape[0]
    slot = stats["count"] % window
    now = jnp.stack([loss, grad_norm]).astype(jnp.float32)
    values = jnp.where(applied, stats["values"].at[slot].set(now), stats["values"])
    # count keeps growing only up to 2 * window so the slot index stays a ring position.
    count = jnp.where(applied, stats["count"] + 1, stats["count"])
    count = jnp.where(count >= 2 * window, count - window, count)
    return {"values": values, "count": count,
            "skipped": stats["skipped"] + spike.astype(jnp.int32)}
