"""The one shared, sharded, jit-compiled train step and the training loop around it.

Every objective runs through ``make_train_step``:

    rng = fold_in(fold_in(base_rng, step), crc32(objective.name))
    inputs, targets = objective.prepare(batch, rng)      # on device, static shapes
    outputs = objective.apply(model, inputs)             # backbone + the objective's heads
    loss, metrics = objective.loss(outputs, targets)
    grads -> optax -> new state (skipped when the loss or gradient is not finite)

The state is donated; parameters are created already sharded (``eval_shape`` -> shardings ->
``jit(init, out_shardings=...)``); batches become global arrays from process-local data.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import objectives
import zoo.data
import zoo.models
import zoo.text
from zoo import config as config_lib
from zoo import spike as spike_lib
from zoo import storage
from zoo.checkpoint import Checkpointer, complete_steps
from zoo.flops import measure_matmul_peak, train_step_flops
from zoo.mesh import batch_sharding, data_parallel_size, logical_to_spec, make_mesh
from zoo.models.layers import set_attention
from zoo.metric_writer import MetricWriter, read_metrics
from zoo.optim import make_optimizer
from zoo.preemption import PreemptionWatcher
from zoo.text import subword

log = logging.getLogger(__name__)


class TrainState(NamedTuple):
    step: jax.Array                  # int32 scalar: steps taken so far
    params: Any                      # nnx.State of the model's Params
    opt_state: Any
    rng: jax.Array                   # uint32[2] base key; each step folds in its number
    nonfinite_steps: jax.Array       # int32: updates skipped for a non-finite loss/gradient
    first_nonfinite_step: jax.Array  # int32: the first such step, -1 if none
    objective_state: Any = None      # stateful objectives: EMA teacher, DINO centre, ...
    spike_stats: Any = None          # config.spike.enabled: recent (loss, grad norm) window


@dataclasses.dataclass
class Experiment:
    """Everything built and validated from a config before anything compiles."""

    config: config_lib.Config
    objective: objectives.Objective
    data_spec: Any
    mesh: jax.sharding.Mesh
    graphdef: Any
    abstract_state: TrainState       # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    forward_flops: float | None      # model FLOPs of one example's forward pass, if known
    init_fn: Any = None              # () -> TrainState, unsharded; see init_state
    tokenizer: Any = None            # text: None = from config.data.tokenizer; see attach_tokenizer

    @property
    def step_flops(self) -> float | None:
        if self.forward_flops is None:
            return None
        return train_step_flops(self.forward_flops, self.config.data.batch_size)


# ---------------------------------------------------------------------------------------------
# Building: validation, model, shardings.
# ---------------------------------------------------------------------------------------------

def make_objective(config: config_lib.Config, data_spec=None, *, name: str | None = None,
                   hparams: dict | None = None) -> objectives.Objective:
    """The objective of ``config`` (or ``name`` with ``hparams``, e.g. a mixture component),
    with the fields the backbone decides filled in: the patch size of image objectives, the
    tokenizer's vocabulary size for text objectives (the data spec's ``vocab_size`` if it has
    one, else the byte tokenizer's)."""
    if name is None:
        name = config.objective["name"]
        hparams = {k: v for k, v in config.objective.items() if k != "name"}
    hparams = dict(hparams or {})
    modality = objectives.modality_of(name)
    vocab_size = getattr(data_spec, "vocab_size", None) or zoo.text.VOCAB_SIZE
    if config.data.tokenizer != "byte":
        if modality != "text":
            raise ValueError(f"data.tokenizer: {config.data.tokenizer!r} is for text objectives; "
                             f"{name!r} ({modality}) reads bytes; allowed: 'byte'")
        vocab_size = subword.vocab_size(config.data.tokenizer)
    patch = ("patch_size", config.model.patch_size, "model.patch_size")
    vocab = ("vocab_size", vocab_size, "the tokenizer")
    pieces = ("subword", config.data.tokenizer != "byte", "data.tokenizer")
    injected = {"image": [patch], "text": [vocab, pieces],
                "pairs": [patch, vocab, ("text_len", config.data.seq_len, "data.seq_len")]
                }.get(modality, [])
    for field, value, source in injected:
        if field in hparams and hparams[field] != value:
            raise ValueError(f"objective.{field}: {hparams[field]} differs from {source} "
                             f"({value}); leave it out")
        hparams[field] = value
    return objectives.get(name, **hparams)


def backbone_kind(objective: objectives.Objective, data_spec=None) -> str:
    """The backbone an objective trains: a ViT for images, its own architecture for text, and
    for two-tower objectives the kind of the data's first tower (vit or a text encoder)."""
    if objective.modality == "pairs":
        return "vit" if data_spec is None or data_spec.towers[0] == "image" else "encoder"
    return "vit" if objective.modality == "image" else objective.architecture


def model_name(config: config_lib.Config, objective: objectives.Objective,
               data_spec=None) -> str:
    """The backbone ``config.model.name`` asks for ("auto": the one the objective trains)."""
    wanted = backbone_kind(objective, data_spec)
    name = config.model.name
    if name == "auto":
        return wanted
    if name not in zoo.models.KNOWN_MODELS:
        raise ValueError(f"model.name: unknown {name!r}; allowed: "
                         f"{('auto',) + zoo.models.KNOWN_MODELS}")
    if name != wanted:
        raise ValueError(f"model.name: objective {objective.name!r} trains a {wanted!r} "
                         f"backbone, not {name!r}; use 'auto' or {wanted!r}")
    return name


def model_posemb(config: config_lib.Config, objective: objectives.Objective,
                 data_spec=None) -> str:
    """The position embeddings ``config.model.posemb`` asks for ("auto": the objective's
    requirement if it has one, else sincos2d for the ViT and learned ones for text models)."""
    required = objective.required_posemb
    posemb = config.model.posemb
    if posemb == "auto":
        return required or ("sincos2d" if backbone_kind(objective, data_spec) == "vit"
                            else "learn")
    if required is not None and posemb != required:
        raise ValueError(f"model.posemb: objective {objective.name!r} needs {required!r} "
                         f"(got {posemb!r}); use 'auto' or {required!r}")
    return posemb


def create_model(config: config_lib.Config, objective: objectives.Objective, data_spec,
                 rngs: nnx.Rngs) -> zoo.models.PretrainModel:
    """Backbone from ``config.model`` plus the objective's heads (unsharded; see ``init_state``);
    every attention layer, heads' too, uses ``config.model.attention``."""
    if objective.modality == "mixture":
        from zoo.mixture import create_mixture_model
        model = create_mixture_model(config, objective, data_spec, rngs)
    else:
        encoder = create_backbone(config, objective, data_spec, rngs)
        dtype = config_lib.DTYPES[config.model.dtype]
        model = zoo.models.PretrainModel(
            encoder, objective.make_heads(encoder, rngs=rngs, dtype=dtype))
    set_attention(model, config.model.attention)
    return model


def create_backbone(config: config_lib.Config, objective: objectives.Objective, data_spec,
                    rngs: nnx.Rngs):
    """The backbone ``objective`` trains on ``data_spec``'s data, sized by ``config.model``."""
    m = config.model
    dtype = config_lib.DTYPES[m.dtype]
    name = model_name(config, objective, data_spec)
    posemb = model_posemb(config, objective, data_spec)
    dims = dict(size=m.size, width=m.width, depth=m.depth, num_heads=m.num_heads,
                mlp_dim=m.mlp_dim, dtype=dtype, rngs=rngs, remat=m.remat, scan=m.scan_layers)
    if name == "vit":
        image_shape = data_spec.image_shape
        grid = (image_shape[0] // m.patch_size, image_shape[1] // m.patch_size)
        encoder = zoo.models.get(
            name, grid=grid, patch_dim=m.patch_size**2 * image_shape[2],
            posemb=posemb, cls_token=m.cls_token,
            **dims)
    else:
        encoder = zoo.models.get(
            name, vocab_size=objective.vocab_size,
            max_len=objective.max_len(config.data.seq_len), posemb=posemb, **dims)
    return encoder


def dataset_spec(config: config_lib.Config, name: str | None = None, *,
                 objective_name: str | None = None, field: str = "data.name"):
    """The spec of ``name`` (default ``config.data.name``), checked against the objective's
    modality: image objectives need image data, text objectives text data."""
    name = name or config.data.name
    objective_name = objective_name or config.objective["name"]
    wanted = objectives.modality_of(objective_name)
    data_dir = config.data.data_dir
    try:
        if zoo.data.is_pair_dataset(name):
            modality, spec = "pairs", zoo.data.pair_dataset_spec(name, data_dir=data_dir)
        elif zoo.data.is_text_dataset(name, data_dir=data_dir):
            modality, spec = "text", zoo.data.text_dataset_spec(name, data_dir=data_dir)
        else:
            modality, spec = "image", zoo.data.dataset_spec(name, data_dir=data_dir)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{field}: {error}") from None
    if modality != wanted:
        kind = {"pairs": "paired"}.get(modality, modality)
        raise ValueError(f"{field}: {name!r} is {kind} data but objective "
                         f"{objective_name!r} needs {wanted} data; objectives for "
                         f"{kind} data: {objectives.names(modality)}")
    return spec


def tree_shardings(tree, mesh, rules):
    """NamedShardings for a pytree: Params by their logical axes, everything else replicated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding")
            spec = (logical_to_spec(axes, rules, x.get_value().shape, mesh, what=str(axes))
                    if axes else P())
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build(config: config_lib.Config, *, devices=None, data_spec=None) -> Experiment:
    """Validates the config against data and devices and prepares (but does not compile) a run.

    ``data_spec`` (a ``zoo.data.DatasetSpec``) replaces the dataset lookup, e.g. for benchmarks
    on synthetic images.
    """
    config = config_lib.validate(config)
    if config.objectives:
        from zoo.mixture import build_mixture
        objective, data_spec = build_mixture(config, data_spec)
        return _build_experiment(config, objective, data_spec, devices)
    objectives.modality_of(config.objective["name"])   # unknown names fail first
    if data_spec is None:
        data_spec = dataset_spec(config)
    objective = make_objective(config, data_spec)
    model_name(config, objective, data_spec)
    model_posemb(config, objective, data_spec)
    if data_spec.splits and config.data.split.split("[")[0] not in data_spec.splits:
        raise ValueError(f"data.split: unknown {config.data.split!r} for {config.data.name!r}; "
                         f"allowed: {tuple(data_spec.splits)}")
    if objective.modality == "image":
        if None in tuple(data_spec.image_shape):
            raise ValueError(f"data.name: {config.data.name!r} has variable-size images "
                             f"{tuple(data_spec.image_shape)}; zoo needs fixed-size images")
        objective.validate(image_shape=data_spec.image_shape)
    else:
        objective.validate(seq_len=config.data.seq_len)
    if objective.modality == "pairs" and data_spec.towers[0] == "image":
        height, width, _ = data_spec.image_shape
        if height % config.model.patch_size or width % config.model.patch_size:
            raise ValueError(f"model.patch_size: image size {height}x{width} is not divisible "
                             f"by patch size {config.model.patch_size}")
    return _build_experiment(config, objective, data_spec, devices)


def _build_experiment(config, objective, data_spec, devices) -> Experiment:
    """Mesh, optimizer, abstract state and shardings of a validated objective and data."""
    mesh = make_mesh(config.mesh, devices)
    parallel = data_parallel_size(mesh, config.rules)
    if config.data.batch_size % parallel:
        raise ValueError(f"data.batch_size: global batch {config.data.batch_size} is not "
                         f"divisible by the {parallel} data-parallel devices (data x fsdp); use "
                         f"a multiple of {parallel}")
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size: {config.data.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    accum = config.optim.grad_accum_steps
    if accum > 1:
        check_accumulation(objective, accum, config.data.batch_size, parallel)
    tx, schedule = make_optimizer(config.optim, config.steps)

    def init() -> TrainState:
        model = create_model(config, objective, data_spec, nnx.Rngs(params=config.seed))
        params = nnx.state(model, nnx.Param)
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(config.seed + 1),
                          nonfinite_steps=jnp.int32(0), first_nonfinite_step=jnp.int32(-1),
                          objective_state=objective.init_state(params),
                          spike_stats=spike_lib.init_stats(config.spike))

    with nnx.logical_axis_rules(config.rules):
        abstract = jax.eval_shape(init)
        shardings = tree_shardings(abstract, mesh, config.rules)
    abstract_model = nnx.eval_shape(lambda: create_model(
        config, objective, data_spec, nnx.Rngs(params=0)))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Experiment(config, objective, data_spec, mesh, graphdef, abstract_state, shardings,
                      tx, schedule, forward_flops(config, objective, abstract_model),
                      init_fn=init)


def forward_flops(config, objective, model) -> float | None:
    """The objective's model FLOPs per example (text objectives also need the row length)."""
    if objective.modality == "mixture":
        return None
    if objective.modality == "text":
        return objective.forward_flops(model, seq_len=config.data.seq_len)
    return objective.forward_flops(model)


def init_state(experiment: Experiment) -> TrainState:
    """Creates the train state directly in its sharded layout (no host copy of the model)."""
    with jax.set_mesh(experiment.mesh):
        return jax.jit(experiment.init_fn, out_shardings=experiment.state_shardings)()


def encoder_from(workdir: str, experiment: Experiment, state: TrainState) -> TrainState:
    """``state`` with its encoder parameters replaced by those of ``workdir``'s latest
    checkpoint (the run there may have had another objective and heads; its backbone must have
    the same parameter names and shapes). Heads and optimizer state are left as they are."""
    params = with_encoder_from(workdir, experiment, state.params, field="init_from")
    log.info("encoder initialised from %s", workdir)
    return state._replace(params=params)


def teacher_from(workdir: str, experiment: Experiment, state: TrainState) -> TrainState:
    """``state`` with the objective's frozen teacher (``objective_state["teacher"]``) holding
    the encoder of ``workdir``'s latest checkpoint (e.g. feature_mimic's teacher)."""
    teacher = with_encoder_from(workdir, experiment, state.objective_state["teacher"],
                                field="objective.teacher_workdir")
    log.info("teacher encoder loaded from %s", workdir)
    return state._replace(objective_state={**state.objective_state, "teacher": teacher})


def with_encoder_from(workdir: str, experiment: Experiment, params, *, field: str):
    """A copy of the parameter tree ``params`` (this experiment's structure, sharded like its
    params) whose ``encoder`` leaves come from ``workdir``'s latest checkpoint; errors name
    ``field``."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise ValueError(f"{field}: {workdir!r} has no config.json (not a zoo workdir)")
    source_config = config_lib.from_dict(json.loads(storage.read_text(path)))
    source = build(source_config, devices=list(experiment.mesh.devices.flat))
    source_state, _ = restore_or_init(source, workdir, purpose="initialise from")
    wanted = dict(leaves_by_path(params["encoder"]))
    found = dict(leaves_by_path(source_state.params["encoder"]))
    if wanted.keys() != found.keys():
        missing = sorted(wanted.keys() ^ found.keys())[0]
        raise ValueError(f"{field}: the encoder in {workdir!r} differs from this model's "
                         f"(parameter {missing} is in only one of them)")
    for name, leaf in wanted.items():
        if leaf.shape != found[name].shape:
            raise ValueError(f"{field}: encoder parameter {name} is {found[name].shape} in "
                             f"{workdir!r} but {leaf.shape} here; use the same model size, "
                             "patch size and image shape")
    prefix = jax.tree_util.keystr((jax.tree_util.DictKey("encoder"),))

    def take(path, leaf):
        name = jax.tree_util.keystr(path)
        return found[name[len(prefix):]] if name.startswith(prefix) else leaf

    params = jax.tree_util.tree_map_with_path(take, params)
    return jax.device_put(params, experiment.state_shardings.params)


def leaves_by_path(tree):
    return [(jax.tree_util.keystr(p), leaf)
            for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def restore_or_init(experiment: Experiment, workdir: str | None, *,
                    purpose: str = "evaluate") -> tuple[TrainState, int]:
    """(state, step) of ``workdir``'s latest checkpoint, read-only; a random init if None."""
    if workdir is None:
        return init_state(experiment), 0
    directory = storage.join(workdir, "checkpoints")
    step = None
    if storage.isdir(directory):
        checkpointer = Checkpointer(directory, create=False)
        step = checkpointer.latest_step()
        if step is not None:
            state, _ = checkpointer.restore(step, experiment.abstract_state)
        checkpointer.close()
    if step is None:
        raise ValueError(f"workdir: {workdir!r} has no checkpoint to {purpose}")
    return state, int(step)


# ---------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------

def objective_salt(name: str) -> int:
    """A stable per-objective rng salt (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def make_loss_fn(experiment: Experiment, *, prepared: bool = False, objective=None):
    """``loss_fn(params, objective_state, step, batch, rng) -> (loss, (metrics, outputs))``: the
    objective's forward pass on the (global) batch, to differentiate w.r.t. ``params``."""
    objective, graphdef = objective or experiment.objective, experiment.graphdef
    total_steps = experiment.config.steps

    def loss_fn(params, objective_state, step, batch, rng):
        model = nnx.merge(graphdef, params)
        inputs, targets = batch if prepared else objective.prepare(batch, rng)
        if objective.stateful:
            teacher = (nnx.merge(graphdef, objective_state["teacher"])
                       if "teacher" in objective_state else None)
            context = objectives.StepContext(
                state=objective_state, teacher=teacher, step=step, total_steps=total_steps,
                merge=lambda params: nnx.merge(graphdef, params))
            outputs = objective.apply(model, inputs, context)
        else:
            outputs = objective.apply(model, inputs)
        loss, metrics = objective.loss(outputs, targets)
        return loss, (metrics, jax.lax.stop_gradient(outputs))

    return loss_fn


def make_loss_and_grad(experiment: Experiment):
    """Jitted ``(state, batch) -> (loss, grads)`` at the state's step, on the experiment's mesh:
    what the train step differentiates (tests compare it across meshes)."""
    loss_fn, salt = make_loss_fn(experiment), objective_salt(experiment.objective.name)

    def loss_and_grad(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), salt)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.objective_state, state.step, batch, rng)
        return loss, grads

    return jax.jit(loss_and_grad, in_shardings=(experiment.state_shardings, None),
                   out_shardings=(None, experiment.state_shardings.params))


def check_accumulation(objective, accum: int, batch_size: int, parallel: int) -> None:
    """Gradient accumulation averages per-micro-batch gradients: exact only for losses that are
    means over independent examples, so objectives that couple examples are refused."""
    if objective.stateful or not objective.per_example_loss:   # mixtures are stateful
        raise ValueError(f"optim.grad_accum_steps: {objective.name!r} couples the examples of a "
                         "batch (in-batch negatives, batch statistics, a teacher or a mixture), "
                         "so micro-batches would change the loss; allowed: 1")
    micro = batch_size // accum
    if micro % parallel:
        raise ValueError(f"optim.grad_accum_steps: micro-batches of {micro} rows do not split "
                         f"over the {parallel} data-parallel devices; allowed: divisors of "
                         f"{batch_size // parallel} (rows per device)")


def _micro_batches(tree, accum: int):
    """[B, ...] leaves -> [accum, B/accum, ...], micro-batch j = rows j, j+accum, ... so every
    data-parallel shard contributes to every micro-batch (no device idles)."""
    def split(x):
        x = jnp.asarray(x)
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, tree)


def make_train_step(experiment: Experiment, *, prepared: bool = False, phase=None):
    """Returns ``step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``prepared=True`` makes a step that is fed ``objective.prepare``'s ``(inputs, targets)``
    instead of a raw batch (benchmarks use it to price the on-device corruption). ``phase``: a
    mixture's active component keys (``Mixture.phase``); the step runs only those.

    With ``optim.grad_accum_steps = k > 1`` the objective corrupts the WHOLE global batch with
    the step's rng (so the corruption is the one the plain path draws), then the forward and
    backward run over k micro-batches in a ``lax.scan`` and the mean gradient is applied once.
    With ``spike.enabled`` an update whose loss or gradient norm is a spike is skipped."""
    config = experiment.config
    objective, tx = experiment.objective, experiment.tx
    if phase is not None:
        objective = objective.for_phase(phase)
    schedule, salt = experiment.schedule, objective_salt(experiment.objective.name)
    total_steps = config.steps
    accum = config.optim.grad_accum_steps
    loss_fn = make_loss_fn(experiment, prepared=prepared or accum > 1, objective=objective)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_and_grads(state, batch, rng):
        if accum == 1:
            return grad_fn(state.params, state.objective_state, state.step, batch, rng)
        micro = _micro_batches(batch if prepared else objective.prepare(batch, rng), accum)

        def micro_step(micro_batch):
            (loss, (metrics, _)), grads = grad_fn(state.params, state.objective_state,
                                                  state.step, micro_batch, rng)
            return loss, metrics, grads

        def add(carry, micro_batch):
            return jax.tree.map(jnp.add, carry, micro_step(micro_batch)), None

        shapes = jax.eval_shape(micro_step, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        (loss, metrics, grads), _ = jax.lax.scan(add, zeros, micro)
        loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))
        return (loss, (metrics, None)), grads

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), salt)
        (loss, (metrics, outputs)), grads = loss_and_grads(state, batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        spike = (spike_lib.is_spike(config.spike, state.spike_stats, loss, grad_norm)
                 if config.spike.enabled else jnp.bool_(False))

        def apply_update(params, opt_state, objective_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
            params = objective.constrain_params(optax.apply_updates(params, updates))
            objective_state = objective.update_state(
                objective_state, params=params, outputs=outputs, step=state.step,
                total_steps=total_steps)
            return params, opt_state, objective_state

        def skip(params, opt_state, objective_state, grads):
            return params, opt_state, objective_state

        # A cond, not jnp.where(finite, new, old): the select keeps the old optimizer state
        # alive next to the new one, and XLA then copies every donated mu/nu buffer each step
        # (BERT-base: 874 MB of copies per step on CPU).
        params, opt_state, objective_state = jax.lax.cond(
            finite & ~spike, apply_update, skip, state.params, state.opt_state,
            state.objective_state, grads)
        bad = jnp.logical_not(finite).astype(jnp.int32)
        spike_stats = (spike_lib.update_stats(state.spike_stats, loss, grad_norm,
                                              applied=finite & ~spike, spike=spike)
                       if config.spike.enabled else state.spike_stats)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=state.rng,
            nonfinite_steps=state.nonfinite_steps + bad,
            first_nonfinite_step=jnp.where((bad > 0) & (state.first_nonfinite_step < 0),
                                           state.step, state.first_nonfinite_step),
            objective_state=objective_state,
            spike_stats=spike_stats)
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "skipped": jnp.maximum(bad, spike).astype(jnp.float32)}
        if config.spike.enabled:
            metrics["spike"] = spike.astype(jnp.float32)
            metrics["spike_steps"] = spike_stats["skipped"].astype(jnp.float32)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(experiment.state_shardings, None),
                   out_shardings=(experiment.state_shardings, None))


@functools.lru_cache(maxsize=64)
def _check_process_rows(sharding: NamedSharding, shape: tuple, rows: int) -> None:
    """Refuses a mesh that puts batch rows other than this process's own [p*rows, (p+1)*rows)
    (what its iterator read) on its devices. ``make_array_from_process_local_data`` would place
    the rows wherever the devices are: with ``fsdp`` before ``data`` across 2 processes the
    global batch becomes rows 0,1,8,9,2,3,... instead of 0..15, and training silently differs
    from a 1-process run of the same config."""
    first = jax.process_index() * rows
    for index in sharding.addressable_devices_indices_map(shape).values():
        start, stop, _ = index[0].indices(shape[0])
        if start < first or stop > first + rows:
            raise ValueError(
                f"mesh: {dict(sharding.mesh.shape)} gives a device of process "
                f"{jax.process_index()} batch rows {start}:{stop}, but this process reads rows "
                f"{first}:{first + rows}; order the mesh axes so that each process's devices "
                f"hold one contiguous block of the batch (e.g. 'data' before 'fsdp')")


def global_batch(experiment: Experiment, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global arrays sharded over the data-parallel axes."""
    out = {}
    for key, value in local.items():
        if isinstance(value, dict):   # a mixture's batches, one per dataset
            out[key] = global_batch(experiment, value)
            continue
        sharding = batch_sharding(experiment.mesh, value.ndim, experiment.config.rules)
        shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        _check_process_rows(sharding, shape, value.shape[0])
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


# ---------------------------------------------------------------------------------------------
# The loop: resume, log, checkpoint.
# ---------------------------------------------------------------------------------------------

class NonFiniteLossError(RuntimeError):
    pass


def completed_checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in a workdir (half-written ones are not listed; see
    ``zoo.checkpoint.complete_steps``)."""
    return complete_steps(storage.join(workdir, "checkpoints"))


def make_batches(experiment: Experiment, split: str | None = None, *, shuffle: bool = True):
    """This process's deterministic, resumable batch iterator for the experiment's data:
    images for image objectives, packed token rows for text objectives."""
    config = experiment.config
    if experiment.objective.modality == "mixture":
        from zoo.mixture import MixtureBatches
        return MixtureBatches({name: _batches_for(config, name, modality, split, shuffle,
                                                  experiment.tokenizer)
                               for name, modality in experiment.objective.data_modalities()})
    return _batches_for(config, config.data.name, experiment.objective.modality, split, shuffle,
                        experiment.tokenizer)


def attach_tokenizer(experiment: Experiment, workdir: str | None) -> Experiment:
    """Sets ``experiment.tokenizer`` to the run's: the byte tokenizer, or with
    ``data.tokenizer = "bpe:N"`` the BPE saved in ``workdir`` (trained and saved there first
    if the workdir has none yet; see ``zoo.text.subword``), whose token flags then go into
    ``experiment.objective``."""
    if experiment.config.data.tokenizer != "byte":
        experiment.tokenizer = subword.tokenizer_for(experiment.config.data, workdir)
        table = tuple(int(f) for f in experiment.tokenizer.token_flags())
        experiment.objective = with_token_flags(experiment.objective, table)
    return experiment


def with_token_flags(objective: objectives.Objective, table: tuple[int, ...]):
    """``objective`` (or each text component of a mixture) reading words and lines through the
    tokenizer's per-id flag ``table`` (whole-word masking, BART's sentence permutation)."""
    if isinstance(objective, objectives.TextObjective):
        return dataclasses.replace(objective, token_flags=table)
    components = getattr(objective, "components", None)
    if components:
        return dataclasses.replace(objective, components=tuple(
            dataclasses.replace(c, objective=with_token_flags(c.objective, table))
            for c in components))
    return objective


def _batches_for(config, name, modality, split, shuffle, tokenizer=None):
    data, split = config.data, split or config.data.split
    data = dataclasses.replace(data, name=name)
    common = dict(global_batch_size=data.batch_size, seed=data.seed, shuffle=shuffle,
                  process_index=jax.process_index(), process_count=jax.process_count())
    if modality == "text":
        source = zoo.data.get_text_source(data.name, split, data_dir=data.data_dir)
        tokenizer = tokenizer or subword.tokenizer_for(data)   # no workdir: kept in memory
        return zoo.data.PackedBatchIterator(source, seq_len=data.seq_len, tokenizer=tokenizer,
                                            **common)
    if modality == "pairs":
        source = zoo.data.get_pair_source(data.name, split, seq_len=data.seq_len,
                                          data_dir=data.data_dir)
        return zoo.data.BatchIterator(source, **common)
    source = zoo.data.get_source(data.name, split, data_dir=data.data_dir)
    return zoo.data.BatchIterator(source, **common)


def check_workdir(workdir: str, config: config_lib.Config) -> None:
    """Refuses a workdir whose checkpoints come from a different config (before any write).

    A ``config.json`` without checkpoints (a run that failed before its first checkpoint) is
    replaced by the new run's.
    """
    path = storage.join(workdir, "config.json")
    if (not storage.is_remote(workdir) and os.path.exists(workdir)
            and not os.access(workdir, os.W_OK)):
        raise ValueError(f"workdir: {workdir!r} is not writable")
    steps = completed_checkpoint_steps(workdir)
    if not steps:
        return
    if steps[-1] > config.steps:
        raise ValueError(f"steps: {config.steps} is below the latest checkpoint's step "
                         f"{steps[-1]} in {workdir!r}")
    if not storage.exists(path):
        raise ValueError(f"workdir: {workdir!r} has checkpoints but no config.json; "
                         "use a new --workdir")
    try:
        old = json.loads(storage.read_text(path))
    except json.JSONDecodeError:
        raise ValueError(f"workdir: {workdir!r} has an unreadable config.json") from None
    if old.get("steps") != config.steps:
        log.warning("steps changed from %s to %s: the learning-rate schedule is stretched to "
                    "the new total from the next step on", old.get("steps"), config.steps)
    # Fields added to Config after that run was written read as their defaults.
    old = _with_defaults(old, config_lib.to_dict(config_lib.Config()))
    diffs = config_lib.differences(old, config_lib.to_dict(config))
    if diffs:
        field = diffs[0]
        there, here = _lookup(old, field), _lookup(config_lib.to_dict(config), field)
        raise ValueError(f"workdir: {workdir!r} holds a run of a different config ({field} is "
                         f"{there!r} there, {here!r} here); use a new --workdir (allowed to "
                         f"differ: {', '.join(config_lib.RESUMABLE_FIELDS)})")


def _with_defaults(values: dict, defaults: dict) -> dict:
    out = dict(values)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, dict) and isinstance(out[key], dict) and key != "objective":
            out[key] = _with_defaults(out[key], default)
    return out


def _lookup(tree, dotted):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def peak_flops(config: config_lib.Config, mesh: jax.sharding.Mesh) -> float:
    """The MFU denominator: from the config, else a matmul measured on this machine in the
    compute dtype (a bf16 run on GPU/TPU against the bf16 peak, not the float32 one)."""
    if config.peak_flops:
        return float(config.peak_flops)
    device = jax.local_devices()[0]   # jax.devices()[0] is not addressable on process > 0
    per_device = measure_matmul_peak(dtype=config_lib.DTYPES[config.model.dtype], device=device)
    # Simulated CPU devices share the same cores, so the host's peak is one device's.
    return per_device if device.platform == "cpu" else per_device * mesh.size


def _write_json_atomically(path: str, value) -> None:
    storage.write_text_atomically(path, json.dumps(value, indent=2))


def train(config: config_lib.Config, workdir: str, *, stop_at: int | None = None,
          devices=None) -> dict[str, Any]:
    """Trains (or resumes) ``config`` in ``workdir``; returns a summary dict.

    Args:
      config: a validated ``zoo.config.Config``.
      workdir: holds ``config.json``, ``metrics.jsonl``, ``tb/`` and ``checkpoints/``; a local
        folder or a bucket URI (``gs://bucket/run``: what a pod's workers all see).
      stop_at: stop after this step as if preempted (a checkpoint is written there).

    SIGTERM (preemption) makes the run checkpoint at the next step boundary and return with
    ``summary["preempted"] = True`` (the CLI then exits 0); run it again to resume.

    Example (notebook)::

        cfg = zoo.config.load("experiments/mae_digits.py:tiny")
        summary = zoo.train(cfg, "/tmp/mae")
    """
    experiment = build(config, devices=devices)
    check_workdir(workdir, config)
    try:
        storage.makedirs(workdir)
    except OSError as error:
        raise ValueError(f"workdir: cannot create {workdir!r}: "
                         f"{error.strerror or error}") from None
    checkpointer = Checkpointer(storage.join(workdir, "checkpoints"), config.keep_checkpoints)
    attach_tokenizer(experiment, workdir)
    batches = make_batches(experiment)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state = checkpointer.restore(latest, experiment.abstract_state)
        batches.set_state(data_state)
        log.info("resumed from step %d in %s", latest, workdir)
    else:
        log.info("new run (no checkpoint yet) in %s", workdir)
        state = init_state(experiment)
        if config.init_from:
            state = encoder_from(config.init_from, experiment, state)
        if getattr(experiment.objective, "teacher_workdir", None):
            state = teacher_from(experiment.objective.teacher_workdir, experiment, state)
    if jax.process_index() == 0:   # the steps field may have grown; everything else matches
        _write_json_atomically(storage.join(workdir, "config.json"), config_lib.to_dict(config))
    start = int(state.step)
    step_fns = {}   # one compiled step per mixture phase (one in all for a single objective)

    def step_fn_at(step: int):
        phase = experiment.objective.phase(step) if config.objectives else None
        if phase not in step_fns:
            step_fns[phase] = make_train_step(experiment, phase=phase)
        return step_fns[phase]

    peak = peak_flops(config, experiment.mesh)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    progress = _progress(config, start)
    last_metrics: dict[str, float] = {}
    pending: list[dict] = []
    timer_start, timer_steps = None, 0
    preempted = False
    try:
        with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules), \
                PreemptionWatcher() as watcher:
            end = config.steps if stop_at is None else min(config.steps, stop_at)
            for step in range(start, end):
                state, metrics = step_fn_at(step)(state, global_batch(experiment, next(batches)))
                pending.append(metrics)
                done = step + 1
                if timer_start is None:       # the first step compiles: time from its end
                    jax.block_until_ready(metrics)
                    timer_start, timer_steps = time.perf_counter(), 0
                else:
                    timer_steps += 1
                # Every process agrees on the step to stop after (a SIGTERM to any of them).
                preempted = done < end and watcher.stop_requested(done)
                is_last = done == end or preempted
                if done % config.log_every == 0 or is_last:
                    last_metrics = _log(pending, state, done, timer_start, timer_steps,
                                        experiment.step_flops, peak, writer, progress, config)
                    pending = []
                    timer_start, timer_steps = time.perf_counter(), 0  # per-interval speed
                if done % config.checkpoint_every == 0 or is_last:
                    if config.nonfinite == "stop":   # never checkpoint past a bad step
                        _raise_if_nonfinite(int(state.first_nonfinite_step))
                    checkpointer.save(done, state, batches.get_state())
                    timer_start, timer_steps = time.perf_counter(), 0  # saving is not training
                if progress is not None:
                    progress.update(1)
                if preempted:
                    log.warning("preempted: checkpoint written at step %d in %s; run the same "
                                "command again to resume", done, workdir)
                    break
    finally:
        writer.close()
        checkpointer.close()
        if progress is not None:
            progress.close()
    if not last_metrics:   # nothing left to train: report the run's last logged metrics
        records = read_metrics(workdir)
        last_metrics = {k: v for k, v in records[-1].items() if k not in ("step", "time")} \
            if records else {}
    return {"workdir": workdir, "step": int(state.step), "preempted": preempted, **last_metrics}


def _log(pending, state, step, timer_start, timer_steps, step_flops, peak, writer, progress,
         config) -> dict[str, float]:
    """Fetches the metrics of the last interval (one transfer) and writes their means."""
    fetched, first_bad, bad_count = jax.device_get(
        (pending, state.first_nonfinite_step, state.nonfinite_steps))
    # Means over the applied updates only: one skipped NaN step must not hide the interval.
    applied = [m for m in fetched if not m["skipped"]] or fetched
    # A mixture's metrics change with its phase: average each over the steps that have it.
    names = dict.fromkeys(k for m in fetched for k in m)
    scalars = {k: float(np.mean([m[k] for m in applied if k in m] or
                                [m[k] for m in fetched if k in m])) for k in names}
    scalars["skipped"] = float(np.mean([m["skipped"] for m in fetched]))
    scalars["nonfinite_steps"] = float(bad_count)
    elapsed = time.perf_counter() - timer_start
    if timer_steps > 0 and elapsed > 0:
        scalars["steps_per_sec"] = timer_steps / elapsed
        if step_flops:
            scalars["mfu"] = scalars["steps_per_sec"] * step_flops / peak
    writer.write(step, scalars)
    if progress is not None:
        progress.set_postfix(loss=f"{scalars['loss']:.4f}",
                             steps_s=f"{scalars.get('steps_per_sec', 0):.2f}",
                             mfu=f"{100 * scalars['mfu']:.1f}%" if "mfu" in scalars else "-")
    if config.nonfinite == "stop":
        _raise_if_nonfinite(int(first_bad))
    return scalars


def _raise_if_nonfinite(first_bad: int) -> None:
    """``first_bad`` is the 0-based step index (-1: none); messages count steps from 1."""
    if first_bad >= 0:
        raise NonFiniteLossError(f"non-finite loss or gradient at step {first_bad + 1}; "
                                 "stopping (nonfinite='stop'); that update was not applied")


def _progress(config, start):
    if not config.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    name = "+".join(config.objectives) if config.objectives else config.objective["name"]
    return tqdm(total=config.steps, initial=start, desc=name,
                dynamic_ncols=True)


from zoo._callable_module import make_module_callable  # noqa: E402

make_module_callable(__name__, "train")   # zoo.train(...) after `import zoo.train`
