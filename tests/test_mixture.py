"""Mixtures of objectives (objectives/mixture.py, zoo/mixture.py) and the trainer's phases.

Fast tests compile nothing but tiny eager ops: weight schedules, phases and per-example counts
on ``Component`` / ``Mixture`` directly; the mixture's ``prepare``/``apply``/``loss`` on a stub
objective whose loss is the mean of its rows (so every weighted sum is known by hand); the
one-line ValueErrors of ``zoo.train.build``; the shared trunk of a four-component mixture (MAE on
digits, span corruption, CLM and MLM on code) from its abstract parameters (``build`` runs
``eval_shape`` only) and an ``eval_shape`` of its train step.

Slow tests train for real (a train step costs 10-30 s to compile on two CPU cores), sharing runs
through module-scoped fixtures: a 4-step CLM -> MLM run on one device (phases, one compile per
phase, weights and a weight ramp in metrics.jsonl, and the same run stopped at the phase boundary
and resumed), and 2 steps of MAE on digits + span corruption on code on all 8 devices.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
import types
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.config
import zoo.mixture
import zoo.models
import zoo.train
from compile_log import CompileLog
from objectives.base import Objective, StepContext
from objectives.mixture import Component, Mixture, component_view
from zoo.metric_writer import read_metrics

TEXT = zoo.config.DataConfig(name="pycode", batch_size=8, seq_len=32)
IMAGES = zoo.config.DataConfig(name="digits", batch_size=8, seq_len=32)
MAE = {"kind": "mae", "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}
QKV = "['attn']['qkv']['kernel'].value"


def mixture_config(objectives, *, data=TEXT, **fields) -> zoo.config.Config:
    fields = {"steps": 4, "log_every": 1, "progress": False, "peak_flops": 1e12, **fields}
    return zoo.config.Config(objectives=objectives, data=data, **fields)


# ---------------------------------------------------------------------------------------------
# A stub objective: its input is the batch's "x" rows and its loss their mean.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Rows(Objective):
    name: ClassVar[str] = "rows"
    modality: ClassVar[str] = "text"

    def prepare(self, batch, rng):
        return batch["x"], batch["x"]

    def apply(self, model, inputs):
        return inputs

    def loss(self, outputs, targets):
        return jnp.mean(outputs), {"rows": jnp.float32(outputs.shape[0])}


class StubModel:
    """Whatever the mixture asks of the model (its backbone or heads of a key) is None."""

    def __getattr__(self, name):
        return collections.defaultdict(type(None))


def component(key, **fields) -> Component:
    return Component(key=key, objective=Rows(), **fields)


def run_mixture(mixture: Mixture, batch, *, step: int, seed: int = 0):
    """prepare -> apply -> loss of ``mixture`` on ``batch`` at ``step``; (inputs, loss, metrics)."""
    inputs, targets = mixture.prepare(batch, jax.random.key(seed))
    model = StubModel()
    context = StepContext(state=mixture.init_state(None), teacher=None, step=jnp.int32(step),
                          total_steps=10)
    outputs = mixture.apply(model, inputs, context)
    loss, metrics = mixture.loss(outputs, targets)
    return inputs, float(loss), {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Weights, phases, per-example counts (no model).
# ---------------------------------------------------------------------------------------------

def test_weight_without_ramp_is_constant():
    c = component("a", weight=2.5, start_step=3, end_step=6)
    assert [float(c.weight_at(s)) for s in (0, 3, 5, 100)] == [2.5] * 4


def test_weight_ramps_linearly_after_start_and_saturates():
    # weight 2, start 2, ramp 4: 0 before start, then 2 * (step - 2 + 1) / 4 up to 2.
    c = component("a", weight=2.0, start_step=2, ramp_steps=4)
    expected = {0: 0.0, 1: 0.0, 2: 0.5, 3: 1.0, 4: 1.5, 5: 2.0, 6: 2.0, 50: 2.0}
    got = {s: float(c.weight_at(s)) for s in expected}
    assert got == pytest.approx(expected, abs=1e-7)
    # Traced steps (inside the train step): the same values, one compilation for all steps.
    jitted = jax.jit(c.weight_at)
    assert {s: float(jitted(jnp.int32(s))) for s in expected} == pytest.approx(expected, abs=1e-7)
    assert jitted._cache_size() == 1   # noqa: SLF001


def test_active_windows_are_start_inclusive_end_exclusive():
    c = component("a", start_step=2, end_step=5)
    assert [c.active(s) for s in range(7)] == [False, False, True, True, True, False, False]
    assert all(component("b").active(s) for s in (0, 1, 10**6))   # no window: always


def test_phase_switches_exactly_at_start_and_end_steps():
    mixture = Mixture(components=(component("clm", end_step=2), component("mlm", start_step=2)))
    assert [mixture.phase(s) for s in range(4)] == [("clm",), ("clm",), ("mlm",), ("mlm",)]
    overlap = Mixture(components=(component("a"), component("b", start_step=1, end_step=3)))
    assert [overlap.phase(s) for s in range(4)] == [("a",), ("a", "b"), ("a", "b"), ("a",)]


def test_for_phase_runs_only_its_components():
    mixture = Mixture(components=(component("a"), component("b"), component("c")))
    assert mixture.keys == ("a", "b", "c")
    assert [c.key for c in mixture.running()] == ["a", "b", "c"]
    assert [c.key for c in mixture.for_phase(("c", "a")).running()] == ["a", "c"]


def test_unknown_mixing_is_refused():
    with pytest.raises(ValueError, match="mixing: unknown 'random'"):
        Mixture(components=(component("a"),), mixing="random")


def per_example(*weights) -> Mixture:
    keys = "abcdefgh"
    return Mixture(components=tuple(component(keys[i], weight=w) for i, w in enumerate(weights)),
                   mixing="per_example")


@pytest.mark.parametrize("weights, batch, expected", [
    ((3, 1), 8, {"a": 6, "b": 2}),
    ((1, 1, 1, 1), 8, {"a": 2, "b": 2, "c": 2, "d": 2}),
    ((5, 1, 1), 7, {"a": 5, "b": 1, "c": 1}),
    # exact 8/3 and 16/3: the closest integers summing to 8 are 3 and 5 (not 2 and 6).
    ((1, 2), 8, {"a": 3, "b": 5}),
])
def test_sample_counts_are_proportional(weights, batch, expected):
    assert per_example(*weights).sample_counts(batch) == expected


@pytest.mark.parametrize("weights, batch", [((1, 1, 1), 8), ((1, 2, 4), 10), ((0.3, 0.7), 5),
                                            ((1, 1, 1, 1, 1, 1, 1), 16)])
def test_sample_counts_round_each_share_and_fill_the_batch(weights, batch):
    counts = list(per_example(*weights).sample_counts(batch).values())
    assert sum(counts) == batch
    for count, weight in zip(counts, weights):
        exact = batch * weight / sum(weights)
        assert math.floor(exact) <= count <= math.ceil(exact), (counts, weights)
    if weights == (1, 1, 1):
        assert sorted(counts) == [2, 3, 3]


def test_sample_counts_are_over_the_running_components_only():
    mixture = per_example(3, 1)
    assert mixture.for_phase(("b",)).sample_counts(8) == {"b": 8}


# ---------------------------------------------------------------------------------------------
# prepare / apply / loss on the stub objective.
# ---------------------------------------------------------------------------------------------

SUM_BATCH = {"d1": {"x": np.arange(8, dtype=np.float32)},            # mean 3.5
             "d2": {"x": 100 + np.arange(4, dtype=np.float32)}}      # mean 101.5


def sum_mixture() -> Mixture:
    return Mixture(components=(component("a", weight=2.0, start_step=2, ramp_steps=4, data="d1"),
                               component("b", weight=1.0, data="d2")))


def test_weighted_sum_of_losses_with_namespaced_metrics():
    # Step 4: a's weight is 2 * (4 - 2 + 1) / 4 = 1.5; loss 1.5 * 3.5 + 1 * 101.5.
    inputs, loss, metrics = run_mixture(sum_mixture(), SUM_BATCH, step=4)
    assert inputs["a"].shape == (8,) and inputs["b"].shape == (4,)   # each reads its dataset
    expected = {"loss": 106.75, "a/loss": 3.5, "a/weight": 1.5, "a/rows": 8.0,
                "b/loss": 101.5, "b/weight": 1.0, "b/rows": 4.0}
    assert metrics == pytest.approx(expected)
    assert loss == pytest.approx(106.75)
    # Before a's start its weight is 0, and the loss is b's alone.
    _, loss, metrics = run_mixture(sum_mixture(), SUM_BATCH, step=1)
    assert metrics["a/weight"] == 0.0 and loss == pytest.approx(101.5)


def test_a_phase_runs_and_logs_only_its_components():
    inputs, loss, metrics = run_mixture(sum_mixture().for_phase(("b",)), SUM_BATCH, step=4)
    assert set(inputs) == {"b"}
    assert metrics == pytest.approx({"loss": 101.5, "b/loss": 101.5, "b/weight": 1.0,
                                     "b/rows": 4.0})


def test_per_example_mixing_splits_one_batch():
    mixture = dataclasses.replace(per_example(3, 1), components=tuple(
        dataclasses.replace(c, data="d") for c in per_example(3, 1).components))
    batch = {"d": {"x": np.arange(8, dtype=np.float32)}}
    splits = []
    for seed in range(4):
        inputs, loss, metrics = run_mixture(mixture, batch, step=0, seed=seed)
        a, b = np.asarray(inputs["a"]), np.asarray(inputs["b"])
        assert a.shape == (6,) and b.shape == (2,)
        # Every example goes to exactly one component.
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(8))
        # Count-weighted mean of the components' means = the mean of the whole batch (3.5),
        # whichever way it was split.
        assert metrics["a/weight"] == pytest.approx(0.75)
        assert metrics["b/weight"] == pytest.approx(0.25)
        assert loss == pytest.approx(3.5, abs=1e-6)
        splits.append(tuple(sorted(b.tolist())))
    # A fresh permutation every step: the split depends on the rng (and only on it).
    assert len(set(splits)) > 1, splits
    again, _, _ = run_mixture(mixture, batch, step=0, seed=0)
    assert tuple(sorted(np.asarray(again["b"]).tolist())) == splits[0]


# ---------------------------------------------------------------------------------------------
# Config validation: one-line ValueErrors before anything compiles.
# ---------------------------------------------------------------------------------------------

BAD = [
    ("missing kind", {"a": {"weight": 1.0}}, {}, r"^objectives\.a: needs a 'kind'"),
    ("unknown kind", {"a": {"kind": "nope"}}, {}, r"^objectives\.a\.kind: unknown 'nope'"),
    ("nested mixture", {"a": {"kind": "mixture"}}, {}, r"^objectives\.a\.kind: unknown"),
    ("negative weight", {"a": {"kind": "clm", "weight": -1.0}}, {},
     r"^objectives\.a\.weight: must be a number >= 0"),
    ("end == start", {"a": {"kind": "clm", "start_step": 2, "end_step": 2}}, {},
     r"^objectives\.a\.end_step: must be an int > start_step \(2\)"),
    ("end < start", {"a": {"kind": "clm"}, "b": {"kind": "mlm", "start_step": 3,
                                                 "end_step": 1}}, {},
     r"^objectives\.b\.end_step"),
    ("negative start", {"a": {"kind": "clm", "start_step": -1}}, {},
     r"^objectives\.a\.start_step"),
    ("negative ramp", {"a": {"kind": "clm", "ramp_steps": -2}}, {}, r"^objectives\.a\.ramp_steps"),
    ("uncovered tail", {"a": {"kind": "clm", "end_step": 2}}, {},
     r"^objectives: no objective is active at step 2"),
    ("uncovered gap", {"a": {"kind": "clm", "end_step": 1}, "b": {"kind": "mlm",
                                                                 "start_step": 2}}, {},
     r"^objectives: no objective is active at step 1"),
    ("uncovered start", {"a": {"kind": "clm", "start_step": 1}}, {},
     r"^objectives: no objective is active at step 0"),
    ("per-example on two datasets", {"mae": MAE, "mlm": {"kind": "mlm", "data": "pycode"}},
     {"mixing": "per_example", "data": IMAGES}, r"^mixing: 'per_example' splits ONE batch"),
    ("per-example with a ramp", {"mlm": {"kind": "mlm"}, "clm": {"kind": "clm",
                                                                 "ramp_steps": 2}},
     {"mixing": "per_example"}, r"^mixing: 'per_example' uses fixed proportions"),
    ("per-example empty share", {"mlm": {"kind": "mlm", "weight": 100.0},
                                 "clm": {"kind": "clm"}},
     {"mixing": "per_example"}, r"^objectives\.clm\.weight: gets 0 of the 8 examples"),
    ("objective and objectives", {"a": {"kind": "mlm"}}, {"objective": {"name": "clm"}},
     r"^objective: set either `objective` or `objectives`"),
    ("unknown dataset", {"a": {"kind": "mlm", "data": "no_such_data"}}, {},
     r"^objectives\.a\.data: .*no_such_data"),
    ("image objective on text", {"a": {"kind": "mae"}}, {},
     r"^objectives\.a\.data: 'pycode' is text data but objective 'mae' needs image data"),
    ("text objective on images", {"b": {"kind": "mlm"}}, {"data": IMAGES},
     r"^objectives\.b\.data: 'digits' is image data"),
    # The same checks when an earlier component already reads that dataset.
    ("image objective on text after text", {"clm": {"kind": "clm"}, "mae": MAE}, {},
     r"^objectives\.mae\.data: 'pycode' is text data but objective 'mae' needs image data"),
    ("text objective on images after images", {"mae": MAE, "b": {"kind": "mlm",
                                                                 "data": "digits"}},
     {"data": IMAGES}, r"^objectives\.b\.data: 'digits' is image data"),
    ("unknown hyperparameter", {"a": {"kind": "mlm", "bogus": 1}}, {},
     r"^objectives\.a: objective 'mlm': unknown hyperparameter 'bogus'"),
    ("slash in key", {"a/b": {"kind": "mlm"}}, {}, r"^objectives: key 'a/b'"),
]


@pytest.mark.parametrize("objectives, fields, message",
                         [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_bad_mixture_is_a_one_line_value_error(data_dir, objectives, fields, message):
    config = mixture_config(objectives, **fields)
    with CompileLog() as compiles, pytest.raises(ValueError, match=message) as error:
        zoo.train.build(config)
    assert "\n" not in str(error.value)
    assert not compiles.messages, "compiled before rejecting the config"


# ---------------------------------------------------------------------------------------------
# The shared trunk (abstract parameters only).
# ---------------------------------------------------------------------------------------------

FOUR = {"mae": MAE, "span": {"kind": "span_corruption", "data": "pycode"},
        "clm": {"kind": "clm", "data": "pycode"}, "mlm": {"kind": "mlm", "data": "pycode"}}


@pytest.fixture(scope="module")
def four(data_dir):
    """The 4-component mixture built (eval_shape only), its parameter paths and a model."""
    config = mixture_config(FOUR, data=IMAGES)
    experiment = zoo.train.build(config)
    paths = dict(zoo.train.leaves_by_path(experiment.abstract_state.params))
    model = nnx.eval_shape(lambda: zoo.train.create_model(
        config, experiment.objective, experiment.data_spec, nnx.Rngs(params=0)))
    return Built(config=config, experiment=experiment, paths=paths, model=model)


def backbones_of(four) -> dict:
    """Each component's backbone, as the component's objective sees it."""
    return {key: component_view(four.model, key).encoder for key in FOUR}


class Built(types.SimpleNamespace):
    def __repr__(self):   # short failure reports
        return "<the four-component mixture>"


def test_four_components_read_two_datasets(four):
    mixture = four.experiment.objective
    assert mixture.keys == ("mae", "span", "clm", "mlm")
    assert {c.key: c.data for c in mixture.components} == {
        "mae": "digits", "span": "pycode", "clm": "pycode", "mlm": "pycode"}
    assert set(mixture.data_modalities()) == {("digits", "image"), ("pycode", "text")}
    assert set(four.experiment.data_spec) == {"digits", "pycode"}


def test_one_set_of_trunk_blocks_for_all_components(four):
    depth = zoo.models.SIZES["test"].depth
    trunk = [p for p in four.paths if p.endswith(QKV) and "decoder" not in p]
    # Exactly `depth` self-attention blocks outside the MAE decoder head and the span
    # corruption decoder: image and text backbones all run the same blocks.
    assert len(trunk) == depth, trunk
    assert len({p.split("['blocks']")[0] for p in trunk}) == 1, trunk
    # The decoders are there (not mistaken for the trunk and dropped).
    assert any(p.startswith("['heads']['mae']['decoder']") and p.endswith(QKV)
               for p in four.paths)
    assert any("['decoder_blocks']" in p and p.endswith(QKV) for p in four.paths)
    # One final norm of the trunk (backbones' own `norm`, not blocks', heads' or decoders').
    finals = [p for p in four.paths if not p.startswith("['heads']")
              and p.endswith("['norm']['scale'].value") and "block" not in p]
    assert len(finals) == 1, finals


def test_backbones_share_the_trunk_modules(four):
    backbones = backbones_of(four)
    trunks = {k: zoo.mixture.trunk_of(backbones[k]) for k in ("mae", "span", "clm", "mlm")}
    for key, trunk in trunks.items():
        assert trunk.blocks is trunks["mae"].blocks, key
        assert trunk.norm is trunks["mae"].norm, key
    # Each modality keeps its own input embedding.
    assert backbones["mae"].patch_embed is not None
    assert not hasattr(backbones["mae"], "embedding")
    assert backbones["clm"].embedding is not None
    assert len([p for p in four.paths if p.endswith("['patch_embed']['kernel'].value")]) == 1


def test_clm_and_mlm_share_the_token_embedding(four):
    """zoo/mixture.py: a causal decoder and an encoder on the same data are "one model run with
    two masks"; CLM then MLM trains a single set of weights, the token table included."""
    backbones = backbones_of(four)
    assert backbones["clm"].causal and not backbones["mlm"].causal
    tables = [p for p in four.paths if p.endswith("['embedding']['table'].value")
              and "['span']" not in p]
    assert len(tables) == 1, tables
    assert backbones["clm"].embedding is backbones["mlm"].embedding


def test_heads_are_under_their_component_key(four):
    heads = [p for p in four.paths if p.startswith("['heads']")]
    assert {p.split("]")[1] + "]" for p in heads} <= {f"['{k}']" for k in FOUR}
    assert any(p.startswith("['heads']['mae']") for p in heads)    # MAE decoder
    assert any(p.startswith("['heads']['mlm']") for p in heads)    # MLM transform + bias


def test_parameters_expose_the_first_backbone_as_encoder(four):
    """zoo/mixture.py: "Parameter paths: the first component's backbone is ``encoder``" (what
    ``init_from`` and ``objective.teacher_workdir`` read from a checkpoint's params)."""
    keys = sorted(four.experiment.abstract_state.params.keys())
    assert "encoder" in keys
    assert four.model.encoder is backbones_of(four)["mae"]


def test_four_components_trace_in_one_step_with_namespaced_metrics(four):
    """eval_shape of the whole train step (every component on the shared trunk; no compile)."""
    experiment = four.experiment
    batch = {"digits": {"image": jax.ShapeDtypeStruct((8, 32, 32, 1), jnp.uint8),
                        "label": jax.ShapeDtypeStruct((8,), jnp.int32)},
             "pycode": {"tokens": jax.ShapeDtypeStruct((8, 32), jnp.int32)}}
    step = zoo.train.make_train_step(experiment, phase=experiment.objective.phase(0))
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(four.config.rules):
        _, metrics = jax.eval_shape(step, experiment.abstract_state, batch)
    for key in FOUR:
        assert {f"{key}/loss", f"{key}/weight"} <= set(metrics), sorted(metrics)
    assert all(k in ("loss", "grad_norm", "lr", "skipped") or k.split("/")[0] in FOUR
               for k in metrics), sorted(metrics)


def test_per_example_mixture_traces_with_real_objectives(data_dir):
    config = mixture_config({"mlm": {"kind": "mlm", "weight": 3}, "span": {
        "kind": "span_corruption"}}, mixing="per_example")
    experiment = zoo.train.build(config)
    assert experiment.objective.sample_counts(8) == {"mlm": 6, "span": 2}
    step = zoo.train.make_train_step(experiment, phase=experiment.objective.phase(0))
    batch = {"pycode": {"tokens": jax.ShapeDtypeStruct((8, 32), jnp.int32)}}
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        _, metrics = jax.eval_shape(step, experiment.abstract_state, batch)
    assert {"mlm/loss", "mlm/weight", "span/loss", "span/weight"} <= set(metrics)


# ---------------------------------------------------------------------------------------------
# The trainer's metric averaging over phases.
# ---------------------------------------------------------------------------------------------

def test_log_averages_each_metric_over_the_steps_that_have_it():
    written = {}
    writer = types.SimpleNamespace(write=lambda step, scalars: written.update(scalars, step=step))
    state = types.SimpleNamespace(first_nonfinite_step=np.int32(-1), nonfinite_steps=np.int32(0))
    pending = [{"loss": np.float32(1.0), "clm/loss": np.float32(2.0), "skipped": np.float32(0)},
               {"loss": np.float32(3.0), "clm/loss": np.float32(6.0), "skipped": np.float32(0)},
               {"loss": np.float32(5.0), "mlm/loss": np.float32(4.0), "skipped": np.float32(0)}]
    scalars = zoo.train._log(pending, state, 3, time.perf_counter(), 0, None, 1.0, writer,  # noqa: SLF001
                             None, zoo.config.Config())
    assert written["step"] == 3
    assert scalars["loss"] == pytest.approx(3.0)
    assert scalars["clm/loss"] == pytest.approx(4.0)     # over steps 1-2, not 8 / 3
    assert scalars["mlm/loss"] == pytest.approx(4.0)     # step 3 alone


# ---------------------------------------------------------------------------------------------
# Real runs (slow).
# ---------------------------------------------------------------------------------------------

# CLM at weight 0.5 for steps 0-1, then MLM ramped over 2 steps: 0.5 at step 2, 1 at step 3
# (metrics.jsonl counts steps from 1: clm at 1-2, mlm at 3-4).
PHASED = mixture_config({"clm": {"kind": "clm", "weight": 0.5, "end_step": 2},
                         "mlm": {"kind": "mlm", "start_step": 2, "ramp_steps": 2}})


@pytest.fixture(scope="module")
def phased(tmp_path_factory, data_dir):
    """An uninterrupted 4-step CLM -> MLM run (compilations logged) and the same run stopped at
    the phase boundary and resumed, on one device."""
    one = jax.devices()[:1]
    root = tmp_path_factory.mktemp("phased")
    with CompileLog() as compiles:
        summary = zoo.train.train(PHASED, str(root / "full"), devices=one)
    stopped = zoo.train.train(PHASED, str(root / "resumed"), stop_at=2, devices=one)
    stopped_records = read_metrics(str(root / "resumed"))
    resumed = zoo.train.train(PHASED, str(root / "resumed"), devices=one)
    return types.SimpleNamespace(
        summary=summary, compiles=compiles, records=read_metrics(str(root / "full")),
        stopped=stopped, stopped_records=stopped_records, resumed=resumed,
        resumed_records=read_metrics(str(root / "resumed")),
        checkpoints=zoo.train.completed_checkpoint_steps(str(root / "resumed")))


def components_in(record) -> set[str]:
    return {k.split("/")[0] for k in record if "/" in k}


@pytest.mark.slow
def test_phases_switch_at_the_configured_steps(phased):
    assert [r["step"] for r in phased.records] == [1, 2, 3, 4]
    assert [components_in(r) for r in phased.records] == [{"clm"}, {"clm"}, {"mlm"}, {"mlm"}]
    for r in phased.records:
        key = components_in(r).pop()
        assert {f"{key}/loss", f"{key}/weight", f"{key}/accuracy"} <= set(r)
        assert np.isfinite(r["loss"]) and np.isfinite(r[f"{key}/loss"])
    assert phased.summary["step"] == 4


@pytest.mark.slow
def test_one_compilation_per_phase(phased):
    assert phased.compiles.count("train_step") == 2, phased.compiles.messages


@pytest.mark.slow
def test_weights_and_ramp_show_in_the_logged_metrics(phased):
    weights = [r.get("clm/weight", r.get("mlm/weight")) for r in phased.records]
    assert weights == pytest.approx([0.5, 0.5, 0.5, 1.0])
    for r in phased.records:   # the loss is the weighted component loss
        key = components_in(r).pop()
        assert r["loss"] == pytest.approx(r[f"{key}/weight"] * r[f"{key}/loss"], rel=1e-6)


@pytest.mark.slow
def test_resume_across_the_phase_boundary_matches_the_uninterrupted_run(phased):
    assert phased.stopped["step"] == 2 and phased.resumed["step"] == 4
    assert [components_in(r) for r in phased.stopped_records] == [{"clm"}, {"clm"}]
    assert 2 in phased.checkpoints and 4 in phased.checkpoints
    assert [r["step"] for r in phased.resumed_records] == [1, 2, 3, 4]
    for full, resumed in zip(phased.records, phased.resumed_records):
        timing = {"time", "steps_per_sec", "mfu"}   # the resumed run's first step compiles
        assert set(full) - timing == set(resumed) - timing
        for key in ("loss", "clm/loss", "mlm/loss", "clm/weight", "mlm/weight", "grad_norm"):
            if key in full:
                assert resumed[key] == pytest.approx(full[key], rel=0, abs=1e-6), (
                    full["step"], key)
    assert phased.resumed["loss"] == pytest.approx(phased.summary["loss"], rel=0, abs=1e-6)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory, data_dir):
    """2 steps of MAE on digits + span corruption on code, on all 8 simulated devices."""
    config = mixture_config({"mae": MAE, "span": {"kind": "span_corruption", "data": "pycode"}},
                            data=IMAGES, steps=2)
    workdir = str(tmp_path_factory.mktemp("multimodal"))
    summary = zoo.train.train(config, workdir)
    return summary, read_metrics(workdir)


@pytest.mark.slow
def test_two_modalities_train_together(multimodal):
    summary, records = multimodal
    assert summary["step"] == 2 and [r["step"] for r in records] == [1, 2]
    for r in records:
        assert components_in(r) == {"mae", "span"}
        assert np.isfinite(r["mae/loss"]) and np.isfinite(r["span/loss"])
        assert r["mae/loss"] > 0 and r["span/loss"] > 0
        assert r["mae/weight"] == 1.0 and r["span/weight"] == 1.0
        assert r["loss"] == pytest.approx(r["mae/loss"] + r["span/loss"], rel=1e-6)
        assert r["skipped"] == 0.0
