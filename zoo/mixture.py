"""Building a mixture of objectives from ``config.objectives``: validation, the shared-trunk
model, and one batch stream per dataset. The mixture itself is ``objectives.mixture.Mixture``.

Example (MAE on digits, and an MLM phase on code added at step 100 with a ramped weight)::

    config = zoo.config.Config(
        model=zoo.config.ModelConfig(size="test"),
        objectives={
            "mae": {"kind": "mae", "decoder_width": 32, "decoder_depth": 1},
            "mlm": {"kind": "mlm", "data": "pycode", "start_step": 100, "ramp_steps": 50,
                    "weight": 0.5},
        },
        data=zoo.config.DataConfig(name="digits", batch_size=16, seq_len=64), steps=300)
    zoo.train(config, "/tmp/mix")

The backbones of all components share ONE Transformer trunk (the blocks and the final norm);
components of the same modality and data share the input embedding too (a causal decoder and an
encoder are then one model run with two masks: CLM then MLM trains a single set of weights).
Each component keeps its own heads. Parameter paths: the first component's backbone is
``encoder`` (shared modules are listed once, under ``encoder`` where they belong to it); heads are
``heads/<key>``; what only a later component's backbone has is under ``towers/<key>``.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

import objectives
import zoo.models
from objectives.mixture import Component, Mixture
from zoo import config as config_lib

COMPONENT_FIELDS = ("kind", "weight", "start_step", "end_step", "ramp_steps", "data")


def _component_settings(key: str, entry: dict, config) -> tuple[dict, dict]:
    """Splits one ``config.objectives`` entry into mixture settings and objective hparams."""
    if "kind" not in entry:
        raise ValueError(f"objectives.{key}: needs a 'kind' (an objective name), e.g. "
                         f"{{'kind': 'mae'}}; known: {objectives.names()}")
    settings = {f: entry[f] for f in COMPONENT_FIELDS if f in entry}
    hparams = {k: v for k, v in entry.items() if k not in COMPONENT_FIELDS}
    if settings["kind"] == "mixture" or settings["kind"] not in objectives.names():
        raise ValueError(f"objectives.{key}.kind: unknown {settings['kind']!r}; known "
                         f"objectives: {objectives.names()}")
    weight = settings.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"objectives.{key}.weight: must be a number >= 0, got {weight!r}")
    start, end = settings.get("start_step", 0), settings.get("end_step")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"objectives.{key}.start_step: must be an int >= 0, got {start!r}")
    if end is not None and (not isinstance(end, int) or end <= start):
        raise ValueError(f"objectives.{key}.end_step: must be an int > start_step ({start}) "
                         f"or None, got {end!r}")
    ramp = settings.get("ramp_steps", 0)
    if not isinstance(ramp, int) or ramp < 0:
        raise ValueError(f"objectives.{key}.ramp_steps: must be an int >= 0, got {ramp!r}")
    settings.setdefault("data", config.data.name)
    return settings, hparams


def build_mixture(config, data_spec=None) -> tuple[Mixture, dict[str, Any]]:
    """The mixture of ``config.objectives`` and the spec of each dataset it reads.

    ``data_spec`` (optional) replaces the lookup of every dataset (synthetic data in tests).
    Raises one-line ValueErrors naming the field, before anything compiles."""
    from zoo.train import dataset_spec, make_objective

    if config.objective != {"name": "mae"}:
        raise ValueError("objective: set either `objective` or `objectives` (a mixture), not "
                         "both")
    components, specs = [], {}
    for key, entry in config.objectives.items():
        if "/" in key or not key:
            raise ValueError(f"objectives: key {key!r} must be a non-empty name without '/'")
        settings, hparams = _component_settings(key, entry, config)
        name, data = settings["kind"], settings["data"]
        field = f"objectives.{key}.data"
        # Looked up per component: each one's modality is checked against its data.
        spec = data_spec if data_spec is not None else dataset_spec(
            config, data, objective_name=name, field=field)
        specs[data] = spec
        try:
            objective = make_objective(config, spec, name=name, hparams=hparams)
        except ValueError as error:
            raise ValueError(f"objectives.{key}: {error}") from None
        if objective.modality == "image":
            objective.validate(image_shape=spec.image_shape)
        else:
            objective.validate(seq_len=config.data.seq_len)
        components.append(Component(
            key=key, objective=objective, weight=float(settings.get("weight", 1.0)),
            start_step=settings.get("start_step", 0), end_step=settings.get("end_step"),
            ramp_steps=settings.get("ramp_steps", 0), data=data))
    mixture = Mixture(components=tuple(components), mixing=config.mixing)
    _check_phases(mixture, config.steps)
    if config.mixing == "per_example":
        if not any(c.weight > 0 for c in components):
            raise ValueError("objectives: mixing 'per_example' needs a component with weight > 0")
        if len({c.data for c in components}) > 1:
            raise ValueError("mixing: 'per_example' splits ONE batch between the components; "
                             "they all need the same data (use 'sum' for several datasets)")
        if any(c.ramp_steps for c in components):
            raise ValueError("mixing: 'per_example' uses fixed proportions; ramp_steps must be "
                             "0")
        for phase in _phases(mixture, config.steps):
            counts = mixture.for_phase(phase).sample_counts(config.data.batch_size)
            empty = [k for k, n in counts.items() if n == 0]
            if empty:
                raise ValueError(f"objectives.{empty[0]}.weight: gets 0 of the "
                                 f"{config.data.batch_size} examples per batch; raise its "
                                 "weight or data.batch_size")
    return mixture, specs


def _phase_starts(mixture: Mixture, steps: int) -> list[int]:
    """The steps in [0, steps) where the set of active components may change."""
    return sorted({0} | {c.start_step for c in mixture.components if c.start_step < steps}
                  | {c.end_step for c in mixture.components
                     if c.end_step is not None and c.end_step < steps})


def _phases(mixture: Mixture, steps: int) -> list[tuple[str, ...]]:
    """The active sets, in order, over steps [0, steps)."""
    return [mixture.phase(step) for step in _phase_starts(mixture, steps)]


def _check_phases(mixture: Mixture, steps: int) -> None:
    for step in _phase_starts(mixture, steps):
        if not mixture.phase(step):
            raise ValueError(f"objectives: no objective is active at step {step}; cover every "
                             "step with some component's [start_step, end_step)")


# ---------------------------------------------------------------------------------------------
# The model: one backbone per component, all on one trunk.
# ---------------------------------------------------------------------------------------------

class MixtureModel(nnx.Module):
    """Backbones (one per component key; shared modules) and each component's heads."""

    def __init__(self, backbones: dict[str, nnx.Module], heads: dict[str, nnx.Module]):
        # What probes, init_from and teacher_workdir read. A shared module is listed under its
        # alphabetically first path, so the per-key dict is named to sort after "encoder".
        self.encoder = next(iter(backbones.values()))
        self.towers = nnx.Dict(backbones)
        self.heads = nnx.Dict(heads)


def trunk_of(backbone) -> nnx.Module:
    """The module holding a backbone's Transformer ``blocks`` and final ``norm``."""
    if isinstance(backbone, zoo.models.ViT):
        return backbone.encoder
    if isinstance(backbone, zoo.models.EncoderDecoder):
        return backbone.encoder
    return backbone


def create_mixture_model(config, mixture: Mixture, specs: dict[str, Any],
                         rngs: nnx.Rngs) -> MixtureModel:
    from zoo.train import create_backbone

    dtype = config_lib.DTYPES[config.model.dtype]
    backbones, heads, first_of = {}, {}, {}
    trunk = None
    for c in mixture.components:
        backbone = create_backbone(config, c.objective, specs[c.data], rngs)
        kind = type(backbone).__name__
        same = first_of.get((c.data, kind))
        if same is not None and _same_shapes(same, backbone):
            backbone = same                              # literally the same backbone
        elif (same is not None and kind == "TextTransformer"
              and _same_shapes(same, backbone, skip="posemb")):
            # A causal decoder and an encoder on the same tokens (CLM's rows are one token
            # shorter): one embedding, the longer position table; one model, two masks.
            longer = max(same.embedding, backbone.embedding, key=lambda e: e.max_len)
            same.embedding = backbone.embedding = longer
            same.max_len = backbone.max_len = longer.max_len
        elif same is None:
            first_of[(c.data, kind)] = backbone
        if trunk is None:
            trunk = trunk_of(backbone)
        elif trunk_of(backbone) is not trunk:
            holder = trunk_of(backbone)
            holder.blocks, holder.norm = trunk.blocks, trunk.norm
        backbones[c.key] = backbone
        head = c.objective.make_heads(backbone, rngs=rngs, dtype=dtype)
        if head is not None:
            heads[c.key] = head
    return MixtureModel(backbones, heads)


def _same_shapes(a, b, skip: str | None = None) -> bool:
    """Same parameter names and shapes (ignoring paths that contain ``skip``)."""
    def shapes(module):
        leaves = jax.tree_util.tree_leaves_with_path(nnx.state(module))
        return [(jax.tree_util.keystr(p), x.shape) for p, x in leaves
                if skip is None or skip not in jax.tree_util.keystr(p)]
    return shapes(a) == shapes(b)


# ---------------------------------------------------------------------------------------------
# Data: one resumable stream per dataset.
# ---------------------------------------------------------------------------------------------

class MixtureBatches:
    """Batches ``{dataset: batch}`` from one iterator per dataset; its state is theirs."""

    def __init__(self, iterators: dict[str, Any]):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, dict]:
        return {name: next(it) for name, it in self.iterators.items()}

    def get_state(self) -> dict:
        return {name: it.get_state() for name, it in self.iterators.items()}

    def set_state(self, state: dict) -> None:
        if set(state) != set(self.iterators):
            raise ValueError(f"iterator state is for datasets {sorted(state)}, not "
                             f"{sorted(self.iterators)}")
        for name, it in self.iterators.items():
            it.set_state(state[name])
