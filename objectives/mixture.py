"""Several objectives on one shared backbone, in the one jitted train step.

An experiment declares ``config.objectives = {key: dict(kind=..., weight=..., **hparams)}``
(``zoo/mixture.py`` builds it). Each component is an ordinary objective; the mixture runs the
ACTIVE components on their batches and sums their weighted losses:

* weighted sums: ``weight`` (default 1);
* weight schedules: ``start_step`` / ``end_step`` bound when a component is active (e.g. add
  self-distillation late in training, as SigLIP 2 does), ``ramp_steps`` ramps its weight linearly
  from 0 after ``start_step``;
* sequential phases: components whose windows do not overlap (CLM then MLM, the biphasic recipe);
* per-example sampling (``mixing="per_example"``, UL2-style): each example of the shared batch
  goes to one active component, in fixed proportions (``weight`` / sum of active weights; the
  counts are static so shapes are), chosen by a fresh random permutation every step; the loss is
  the count-weighted mean of the components' losses;
* components on different data and modalities (MAE on photos + span corruption on code): each
  component names its ``data``; all backbones share one Transformer trunk.

The set of active components is fixed within a phase, so the trainer compiles one step per phase
(``phase(step)``), not per step; weights inside a phase are computed from the traced step. Metrics
are namespaced per component: ``mae/loss``, ``clip/batch_recall@1``.
"""
from __future__ import annotations

import dataclasses
import types
import zlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from objectives.base import Objective, StepContext

MIXING = ("sum", "per_example")


@dataclasses.dataclass(frozen=True)
class Component:
    """One objective of a mixture: ``key`` names it in metrics, params and state."""

    key: str
    objective: Objective
    weight: float = 1.0
    start_step: int = 0
    end_step: int | None = None    # exclusive; None: until the end
    ramp_steps: int = 0
    data: str = ""                 # dataset name (the batch key it reads)

    def active(self, step: int) -> bool:
        return self.start_step <= step and (self.end_step is None or step < self.end_step)

    def weight_at(self, step) -> jax.Array:
        """The weight at (traced) ``step``: ramped linearly over ``ramp_steps`` after start."""
        if self.ramp_steps <= 0:
            return jnp.float32(self.weight)
        done = (jnp.asarray(step, jnp.float32) - self.start_step + 1) / self.ramp_steps
        return self.weight * jnp.clip(done, 0.0, 1.0)


def component_view(model, key: str):
    """What a component's objective sees as its model: its backbone and its heads."""
    heads = model.heads[key] if key in model.heads else None
    return types.SimpleNamespace(encoder=model.towers[key], heads=heads)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mixture(Objective):
    """A weighted mixture of objectives (built by ``zoo.mixture.build_mixture``)."""

    name: ClassVar[str] = "mixture"
    modality: ClassVar[str] = "mixture"
    stateful: ClassVar[bool] = True   # always: weight schedules read the step
    components: tuple[Component, ...]
    mixing: str = "sum"
    active: tuple[str, ...] | None = None   # the phase's active keys (None: all)

    def __post_init__(self):
        if self.mixing not in MIXING:
            raise ValueError(f"mixing: unknown {self.mixing!r}; allowed: {MIXING}")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.components)

    def running(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components if self.active is None or c.key in self.active)

    def phase(self, step: int) -> tuple[str, ...]:
        """Keys of the components active at Python ``step`` (the trainer compiles per phase)."""
        return tuple(c.key for c in self.components if c.active(step))

    def data_modalities(self) -> tuple[tuple[str, str], ...]:
        """The distinct (dataset name, modality) pairs the components read."""
        return tuple(dict.fromkeys((c.data, c.objective.modality) for c in self.components))

    def for_phase(self, keys: tuple[str, ...]) -> "Mixture":
        return dataclasses.replace(self, active=tuple(keys))

    def sample_counts(self, batch_size: int) -> dict[str, int]:
        """Per-example mixing: how many of the batch's examples each running component gets
        (proportional to weight; rounding leftovers go to the largest remainders first)."""
        running = self.running()
        total = sum(c.weight for c in running)
        exact = [batch_size * c.weight / total for c in running]
        counts = [int(x) for x in exact]
        order = sorted(range(len(running)), key=lambda i: exact[i] - counts[i], reverse=True)
        for i in order[:batch_size - sum(counts)]:
            counts[i] += 1
        return {c.key: n for c, n in zip(running, counts)}

    # -- state ------------------------------------------------------------------------------

    def init_state(self, params):
        return {c.key: c.objective.init_state(params) for c in self.components}

    def update_state(self, state, *, params, outputs, step, total_steps):
        new = dict(state)
        for c in self.running():
            if c.objective.stateful:
                new[c.key] = c.objective.update_state(
                    state[c.key], params=params, outputs=outputs[c.key], step=step,
                    total_steps=total_steps)
        return new

    def constrain_params(self, params):
        for c in self.running():
            params = c.objective.constrain_params(params)
        return params

    # -- the step ---------------------------------------------------------------------------

    def prepare(self, batch, rng):
        inputs, targets = {}, {}
        running = self.running()
        if self.mixing == "per_example":
            data = batch[running[0].data]
            size = jax.tree.leaves(data)[0].shape[0]
            order = jax.random.permutation(jax.random.fold_in(rng, 0), size)
            start = 0
            parts = {}
            for key, count in self.sample_counts(size).items():
                rows = order[start:start + count]
                parts[key] = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), data)
                start += count
        for c in running:
            sub = parts[c.key] if self.mixing == "per_example" else batch[c.data]
            salt = zlib.crc32(c.key.encode()) & 0x7FFFFFFF
            inputs[c.key], targets[c.key] = c.objective.prepare(sub, jax.random.fold_in(rng, salt))
        return inputs, targets

    def apply(self, model, inputs, context: StepContext):
        outputs: dict[str, Any] = {}
        for c in self.running():
            view = component_view(model, c.key)
            if c.objective.stateful:
                state = context.state[c.key]
                teacher = (component_view(context.merge(state["teacher"]), c.key)
                           if "teacher" in state else None)
                sub = dataclasses.replace(context, state=state, teacher=teacher)
                outputs[c.key] = c.objective.apply(view, inputs[c.key], sub)
            else:
                outputs[c.key] = c.objective.apply(view, inputs[c.key])
        outputs["_weights"] = self._weights(context.step, inputs)
        return outputs

    def _weights(self, step, inputs) -> dict[str, jax.Array]:
        running = self.running()
        if self.mixing == "per_example":
            counts = {k: jax.tree.leaves(inputs[k])[0].shape[0] for k in inputs}
            total = sum(counts.values())
            return {c.key: jnp.float32(counts[c.key] / total) for c in running}
        return {c.key: c.weight_at(step) for c in running}

    def loss(self, outputs, targets):
        total = jnp.float32(0.0)
        metrics = {}
        for c in self.running():
            loss, sub = c.objective.loss(outputs[c.key], targets[c.key])
            weight = outputs["_weights"][c.key]
            total = total + weight * loss
            metrics.update({f"{c.key}/{name}": value for name, value in sub.items()})
            metrics[f"{c.key}/loss"] = loss
            metrics[f"{c.key}/weight"] = weight
        return total, {"loss": total, **metrics}
