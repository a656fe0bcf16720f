"""Every text objective through the shared trainer: the train step, mesh equivalence, rng use,
padding, sequence lengths, MLM's gathered projection, analytic FLOPs and bad input.

Compilations dominate (a text train step costs 5-15 s on two CPU cores, BART's corruption the
most), so per objective exactly two train steps are compiled, once on a 1-device mesh and once on
all 8 simulated devices, and shared by every test here through ``run_of`` (a module-level cache):
two steps on each mesh from the same initial state and batches (no recompilation on the second
step, mesh equivalence), extra steps of the compiled 1-device program (rng per step, padding),
``objective.prepare`` jitted once per objective (rng, padding, UL2 modes) and the 1-device step's
XLA cost analysis (FLOPs). Shape questions (``model_lengths``, the MLM logits) are answered with
``jax.eval_shape``, which traces without compiling.

Batches are numpy rows of random byte tokens (ids 7..262) with a few document-ending EOS ids, a
newline byte (BART's sentence boundary) and, in the last row, a PAD tail, built here instead of
read from the corpus: the data are not the point, and every row's content is known.
"""
from __future__ import annotations

import collections
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

import objectives
import zoo.config
import zoo.data
import zoo.train
from compile_log import CompileLog, NoCompilation
from zoo.flops import compiled_flops
from zoo.models import cpu_kernel
from zoo.text import BYTE_OFFSET, EOS, MODE_TOKENS, NUM_SENTINELS, PAD, VOCAB_SIZE, sentinel

ROOT = Path(__file__).resolve().parents[1]
NAMES = objectives.names("text")
SEQ2SEQ = ("span_corruption", "bart", "ul2")
ONE_DEVICE_MESH = (("data", 1), ("fsdp", 1), ("tensor", 1))
EIGHT_DEVICE_MESH = (("data", 4), ("fsdp", 2), ("tensor", 1))   # data parallel and FSDP
BATCH, SEQ_LEN = 8, 64
PAD_FROM = 40            # the last row of every batch is PAD from here on
NEWLINE = 10 + BYTE_OFFSET
# The tiny text config at width 128 (matmuls dominate the step, for the FLOPs check) without
# warmup (so the first step already moves the parameters: lr 0 would make a first-step parameter
# comparison vacuous) and at lr 1e-4. Why not 1e-3: Adam's first update is ~lr * g / (|g| + eps)
# per element, so an element whose gradient is float noise moves by up to ~lr, by an amount that
# depends on the reduction order, i.e. on the mesh. The attention key bias is such an element
# (its gradient is structurally zero: adding q.b to all of a query's scores leaves the softmax
# unchanged) and the key kernel nearly (sum_k x_k dk_k with sum_k dk_k = 0 cancels). At lr 1e-3
# they differed between the meshes by up to 4.4e-5 (key bias) and 2.1e-5 (key kernel), one
# cross-attention value weight of BART by 1.5e-5, everything else < 9e-6; at 1e-4 all shrink
# 10x, and a 1e-5 tolerance stays ~10% of one step's update, far below the ~lr a sharding bug
# (a lost gradient reduction) would cause.
OVERRIDES = ("model.width=128", "optim.warmup_steps=0", "optim.lr=1e-4", "steps=6",
             "progress=False", "peak_flops=1e12")
# Analytic FLOPs (matmuls only, 3x forward) over XLA's count of the whole train step (which adds
# elementwise work, softmaxes, the corruption and AdamW); see tests/test_train.py's band.
FLOPS_RATIO_BAND = (0.7, 1.3)


def text_config(name: str, *overrides: str, mesh=ONE_DEVICE_MESH) -> zoo.config.Config:
    config = zoo.config.load(f"{ROOT / 'experiments' / 'text_pycode.py'}:{name},tiny")
    return zoo.config.override(config, [*OVERRIDES, f"mesh={mesh!r}", *overrides])


def token_rows(seed: int, *, batch: int = BATCH, seq_len: int = SEQ_LEN) -> np.ndarray:
    """int32 [batch, seq_len] random byte tokens with a few EOS and newlines; the last row is
    PAD from ``PAD_FROM`` on (trailing padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(BYTE_OFFSET, BYTE_OFFSET + 256, (batch, seq_len), dtype=np.int32)
    for row in tokens:
        row[rng.choice(seq_len, 2, replace=False)] = EOS
        row[rng.choice(seq_len, 3, replace=False)] = NEWLINE
    tokens[-1, PAD_FROM:] = PAD
    return tokens


def host_tree(tree):
    """A real numpy copy (a zero-copy view would keep a donated buffer alive)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def leaves_with_paths(tree):
    return [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


# ---------------------------------------------------------------------------------------------
# The shared runs: two steps on one device and on eight, from the same state and batches.
# ---------------------------------------------------------------------------------------------

_RUNS: dict[str, dict] = {}


def run_of(name: str) -> dict:
    """Two steps of ``name`` on the 1-device mesh ("one"); ``eight_of`` adds the 8-device run."""
    if name not in _RUNS:
        batches = [token_rows(1), token_rows(2)]
        config = text_config(name, mesh=ONE_DEVICE_MESH)
        experiment = zoo.train.build(config, devices=jax.devices()[:1])
        with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
            initial = host_tree(experiment.init_fn())   # eager: saves compiling the init
        _RUNS[name] = {"name": name, "initial": initial, "batches": batches,
                       "one": _two_steps(config, experiment, initial, batches)}
    return _RUNS[name]


_OBJECTIVES: dict[str, object] = {}


def objective_of(name: str):
    """The tiny config's objective, as the trainer builds it (nothing compiles)."""
    if name not in _OBJECTIVES:
        _OBJECTIVES[name] = zoo.train.build(text_config(name), devices=jax.devices()[:1]).objective
    return _OBJECTIVES[name]


# The train steps of the two heaviest corruptions (BART's noising, UL2's seven denoisers) compile
# for ~15 s each on two cores: the tests that run them are in CI's slow step; their corruption
# functions are tested without a train step here and in tests/test_bart.py, tests/test_ul2.py.
STEP_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in ("bart", "ul2") else n
               for n in NAMES]


def eight_of(name: str) -> dict:
    """The same two steps on all 8 devices (data=4 x fsdp=2), from the same initial state."""
    run = run_of(name)
    if "eight" not in run:
        config = text_config(name, mesh=EIGHT_DEVICE_MESH)
        experiment = zoo.train.build(config, devices=jax.devices())
        run["eight"] = _two_steps(config, experiment, run["initial"], run["batches"])
    return run["eight"]


def _two_steps(config, experiment, initial, batches) -> dict:
    # The very same initial state on every mesh, laid out for each.
    state = jax.device_put(initial, experiment.state_shardings)
    step = zoo.train.make_train_step(experiment)
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        first = zoo.train.global_batch(experiment, {"tokens": batches[0]})
        state, m1 = step(state, first)
        m1 = jax.device_get(m1)
        params1 = host_tree(state.params)
        with CompileLog() as compiles:
            state, m2 = step(state, zoo.train.global_batch(experiment, {"tokens": batches[1]}))
            m2 = jax.device_get(m2)
            jax.jit(lambda x: x * 3)(jnp.arange(3.0)).block_until_ready()  # positive control
        params2 = host_tree(state.params)
    return dict(config=config, experiment=experiment, step=step, batch=first,
                metrics=[m1, m2], params=[params1, params2], compiles=compiles,
                final_step=int(state.step))


def one_device_loss(run: dict, tokens: np.ndarray, *, step: int = 0) -> dict:
    """Metrics of the compiled 1-device train step on ``tokens`` from the initial parameters,
    as if at ``step`` (the step number only changes the rng and the learning rate)."""
    one = run["one"]
    experiment = one["experiment"]
    state = run["initial"]._replace(step=np.int32(step))
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(one["config"].rules):
        state = jax.device_put(state, experiment.state_shardings)
        _, metrics = one["step"](state, zoo.train.global_batch(experiment, {"tokens": tokens}))
        return jax.device_get(metrics)


# ---------------------------------------------------------------------------------------------
# 1. The train step.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STEP_PARAMS)
def test_train_step_runs_moves_parameters_and_does_not_recompile(data_dir, name):
    run = run_of(name)
    one = run["one"]
    for i, metrics in enumerate(one["metrics"]):
        assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0, (i, metrics)
        assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0, i
        assert metrics["skipped"] == 0, (i, metrics)
    # An untrained model over 363 ids: about log(363) = 5.89 nats per target token; the
    # position objective classifies among SEQ_LEN positions (its head's random logits add
    # spread, so a wider band).
    if name == "token_position":
        assert abs(one["metrics"][0]["loss"] - math.log(SEQ_LEN)) < 1.0, one["metrics"][0]
    else:
        assert abs(one["metrics"][0]["loss"] - math.log(VOCAB_SIZE)) < 0.5, one["metrics"][0]
    compiles = one["compiles"]
    assert compiles.count("<lambda>") == 1, "the compile log capture saw nothing"
    assert compiles.count("train_step") == 0, compiles.messages
    assert one["final_step"] == 2
    # Every step changes the parameters (no warmup here: the first step too).
    before = leaves_with_paths(run["initial"].params)
    for i, params in enumerate(run["one"]["params"]):
        after = leaves_with_paths(params)
        unmoved = [path for (path, a), (_, b) in zip(before, after) if np.array_equal(a, b)]
        assert not unmoved, f"step {i + 1} left {unmoved} unchanged"
        before = after


# ---------------------------------------------------------------------------------------------
# 2. One device and eight devices compute the same steps.
# ---------------------------------------------------------------------------------------------

# The fast suite compiles the 8-device step of one encoder objective and one decoder objective;
# the others (the encoder-decoder denoisers, prefix LM, MEAP, token positions) run in CI's slow
# step: each 8-device compile costs 10-40 s on two cores.
FAST_MESH = ("mlm", "clm")
MESH_PARAMS = [n if n in FAST_MESH else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


@pytest.mark.parametrize("name", MESH_PARAMS)
def test_one_and_eight_devices_give_the_same_steps(data_dir, name):
    one, eight = run_of(name)["one"], eight_of(name)
    assert eight["compiles"].count("train_step") == 0, eight["compiles"].messages
    assert eight["final_step"] == 2
    for i in range(2):
        np.testing.assert_allclose(eight["metrics"][i]["loss"], one["metrics"][i]["loss"],
                                   rtol=0, atol=1e-5, err_msg=f"{name}: loss of step {i + 1}")
        np.testing.assert_allclose(eight["metrics"][i]["grad_norm"],
                                   one["metrics"][i]["grad_norm"], rtol=1e-4,
                                   err_msg=f"{name}: grad norm of step {i + 1}")
        one_leaves = leaves_with_paths(one["params"][i])
        eight_leaves = leaves_with_paths(eight["params"][i])
        assert [p for p, _ in one_leaves] == [p for p, _ in eight_leaves]
        for (path, a), (_, b) in zip(one_leaves, eight_leaves):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5,
                                       err_msg=f"{name}: {path} after step {i + 1}")


# ---------------------------------------------------------------------------------------------
# 3. Randomness: same key, same corruption; another step, another corruption.
# ---------------------------------------------------------------------------------------------

_PREPARED: dict[str, dict] = {}
NUM_KEYS = 8


def padded_batch() -> np.ndarray:
    """Rows 0-5 full, row 6 PAD from PAD_FROM on, row 7 all PAD."""
    tokens = token_rows(3)
    tokens[-2] = tokens[-1]
    tokens[-1] = PAD
    return tokens


def prepared_of(name: str) -> dict:
    """``objective.prepare`` jitted once, applied to ``padded_batch`` with several keys."""
    if name not in _PREPARED:
        objective = objective_of(name)
        prepare = jax.jit(objective.prepare)
        tokens = padded_batch()
        base = jax.random.PRNGKey(0)
        keys = [jax.random.fold_in(base, step) for step in range(NUM_KEYS)]
        outputs = [jax.device_get(prepare({"tokens": jnp.asarray(tokens)}, k)) for k in keys]
        again = jax.device_get(prepare({"tokens": jnp.asarray(tokens)}, keys[0]))
        _PREPARED[name] = dict(objective=objective, tokens=tokens, outputs=outputs,
                               again=again)
    return _PREPARED[name]


def rows_that_differ(a, b) -> set[int]:
    rows = set()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        if x.ndim:
            rows |= {int(r) for r in np.nonzero((x != y).reshape(len(x), -1).any(-1))[0]}
    return rows


@pytest.mark.parametrize("name", NAMES)
def test_prepare_is_a_function_of_the_key(data_dir, name):
    p = prepared_of(name)
    first, again, second = p["outputs"][0], p["again"], p["outputs"][1]
    assert jax.tree.structure(first) == jax.tree.structure(again)
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(x, y, err_msg=f"{name}: same key, other output")
    differ = rows_that_differ(first, second)
    if name == "clm":   # plain next-token prediction draws nothing
        assert not differ, f"clm's targets depend on the key (rows {differ})"
    else:
        # Each row draws its own corruption: most of the 7 non-empty rows change with the key.
        assert len(differ - {BATCH - 1}) >= 4, f"{name}: only rows {differ} changed with the key"


@pytest.mark.parametrize("name", STEP_PARAMS)
def test_the_train_step_draws_a_new_corruption_each_step(data_dir, name):
    """Same parameters, same batch: the loss depends on the step number through the rng only
    (clm draws nothing, so its loss must not change)."""
    run = run_of(name)
    tokens = run["batches"][0]
    at_0, at_0_again, at_1 = (one_device_loss(run, tokens, step=s) for s in (0, 0, 1))
    assert at_0["loss"] == at_0_again["loss"], (at_0, at_0_again)
    # The first step of the shared run saw the same state and batch.
    assert at_0["loss"] == run["one"]["metrics"][0]["loss"]
    if name == "clm":
        assert at_1["loss"] == at_0["loss"], (at_0, at_1)
    else:
        assert at_1["loss"] != at_0["loss"], f"{name}: steps 0 and 1 saw the same corruption"


# ---------------------------------------------------------------------------------------------
# 4. UL2's mode tokens; padding.
# ---------------------------------------------------------------------------------------------

def is_sentinel(ids):
    return np.asarray(ids) >= VOCAB_SIZE - NUM_SENTINELS


def test_ul2_inputs_start_with_the_mode_token_of_their_denoiser(data_dir):
    p = prepared_of("ul2")
    n = (p["tokens"] != PAD).sum(axis=1)
    modes = collections.Counter()
    for (encoder_inputs, _), targets in p["outputs"]:
        assert set(encoder_inputs[:, 0].tolist()) <= set(MODE_TOKENS.values()), encoder_inputs
        for row in range(BATCH):
            mode, inputs, target = encoder_inputs[row, 0], encoder_inputs[row, 1:], targets[row]
            modes[int(mode)] += 1
            if n[row] < 2:
                continue
            if mode == MODE_TOKENS["S"]:   # prefix LM: no sentinels at all
                assert not is_sentinel(inputs).any() and not is_sentinel(target).any(), \
                    (row, inputs, target)
            else:   # span corruption: the first noise span becomes the first sentinel
                assert sentinel(0) in inputs.tolist(), (row, mode, inputs)
                assert target[0] == sentinel(0), (row, mode, target)
    # 64 rows drawn from R 0.4, X 0.4, S 0.2: all three paradigms appear.
    assert set(modes) == set(MODE_TOKENS.values()), modes


def target_labels_and_weights(name: str, targets):
    if name == "token_position":   # the labels are the positions; targets are the weights
        weights = np.asarray(targets)
        return np.broadcast_to(np.arange(weights.shape[1]), weights.shape), weights
    if name in SEQ2SEQ:
        return np.asarray(targets), np.asarray(targets != PAD, np.float32)
    labels, weights = targets
    return np.asarray(labels), np.asarray(weights)


@pytest.mark.parametrize("name", NAMES)
def test_padding_gives_no_targets(data_dir, name):
    """Row 6 is PAD from PAD_FROM on, row 7 is all PAD: no target comes from padding."""
    p = prepared_of(name)
    tokens = p["tokens"]
    n = PAD_FROM
    for key_index, (inputs, targets) in enumerate(p["outputs"]):
        labels, weights = target_labels_and_weights(name, targets)
        where = f"{name}, key {key_index}"
        if name == "token_position":   # every real token is a target; PAD is neither a
            np.testing.assert_array_equal(weights, tokens != PAD, err_msg=where)  # target
            assert not np.asarray(inputs["context"])[tokens == PAD].any(), where  # nor context
            continue
        assert not (labels[weights > 0] == PAD).any(), f"{where}: a PAD label has weight"
        if name == "bart":   # the decoder reconstructs the row itself, padding and all
            np.testing.assert_array_equal(labels, tokens, err_msg=where)
            assert weights[-1].sum() == 0 and weights[-2].sum() == n, where
        elif name in ("span_corruption", "ul2"):
            encoder_inputs = np.asarray(inputs[0])
            for row in range(BATCH):
                # The row's tokens are split between inputs and targets (plus one EOS that ends
                # each); sentinels and the mode token are not content.
                content = lambda x: collections.Counter(
                    int(t) for t in x
                    if t != PAD and not is_sentinel(t) and t not in MODE_TOKENS.values())
                split = content(encoder_inputs[row]) + content(labels[row])
                want = content(tokens[row]) + collections.Counter({EOS: 2})
                assert split == want, f"{where}, row {row}: {split - want} / {want - split}"
            # An all-PAD row keeps only the EOS that ends every target sequence.
            assert labels[-1].tolist() == [EOS] + [PAD] * (labels.shape[1] - 1), labels[-1]
        elif name == "mlm":
            positions = np.asarray(inputs[1])
            assert weights[-1].sum() == 0, f"{where}: the all-PAD row predicts something"
            assert (positions[-2][weights[-2] > 0] < n).all(), (where, positions[-2])
            assert weights[-2].sum() >= 1, where
        else:   # clm, prefix_lm, meap: label i is token i + 1
            assert weights[-1].sum() == 0, f"{where}: the all-PAD row has targets"
            assert (weights[-2][n - 1:] == 0).all(), f"{where}: targets in the PAD tail"
            if name != "prefix_lm":
                assert weights[-2].sum() == n - 1 and weights[:-2].sum() == 6 * (SEQ_LEN - 1)


def test_clm_loss_is_a_mean_over_the_batch_target_tokens(data_dir):
    """PAD carries no targets and the loss is normalised over the batch's target tokens:
    [r0, r1, r2, r7, PAD x 4] has the loss of [r0, r1, r2, r7] twice, and half its target
    tokens (r7 is PAD from PAD_FROM on)."""
    run = run_of("clm")
    rows = run["batches"][0][[0, 1, 2, BATCH - 1]]
    half_pad = np.concatenate([rows, np.zeros_like(rows)])
    doubled = np.concatenate([rows, rows])
    a, b = one_device_loss(run, half_pad), one_device_loss(run, doubled)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], rtol=1e-6)
    # Label i is token i + 1: 63 per full row, PAD_FROM - 1 for the padded one.
    want = 3 * (SEQ_LEN - 1) + PAD_FROM - 1
    assert a["tokens"] == want and b["tokens"] == 2 * want, (a["tokens"], b["tokens"], want)


# ---------------------------------------------------------------------------------------------
# 5. model_lengths vs. what prepare produces; the position table fits.
# ---------------------------------------------------------------------------------------------

def produced_lengths(name: str, inputs, targets) -> dict[str, int]:
    if name in SEQ2SEQ:
        encoder_inputs, decoder_inputs = inputs
        assert decoder_inputs.shape == targets.shape
        return {"encoder": encoder_inputs.shape[1], "decoder": decoder_inputs.shape[1]}
    if name in ("mlm", "prefix_lm"):
        return {"encoder": inputs[0].shape[1]}
    if name == "token_position":
        return {"encoder": inputs["tokens"].shape[1]}
    return {"encoder": inputs.shape[1]}


@pytest.mark.parametrize("name", NAMES)
def test_model_lengths_match_prepare_and_the_model_runs(data_dir, name):
    objective = objective_of(name)
    for seq_len in (8, 33, SEQ_LEN, 200):
        batch = {"tokens": jax.ShapeDtypeStruct((2, seq_len), jnp.int32)}
        inputs, targets = jax.eval_shape(objective.prepare, batch, jax.random.PRNGKey(0))
        assert objective.model_lengths(seq_len) == produced_lengths(name, inputs, targets), \
            (name, seq_len)
    # A longer row than the tiny config's: build sizes the position table, and the whole
    # forward pass and loss trace (no compilation) without running past it.
    config = text_config(name, "data.seq_len=200")
    experiment = zoo.train.build(config, devices=jax.devices()[:1])
    params = leaves_with_paths(experiment.abstract_state.params)
    posemb = [leaf for path, leaf in params if "posemb" in path]
    longest = max(experiment.objective.model_lengths(200).values())
    if name == "token_position":   # no position table; the head classifies 200 positions
        assert not posemb
        head = [leaf for path, leaf in params if "heads" in path and "kernel" in path]
        assert head[0].shape[-1] >= longest, head[0].shape
    else:
        assert posemb and posemb[0].shape[0] >= longest

    def forward(params, batch, rng):
        model = nnx.merge(experiment.graphdef, params)
        inputs, targets = experiment.objective.prepare(batch, rng)
        return experiment.objective.loss(experiment.objective.apply(model, inputs), targets)

    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        loss, _ = jax.eval_shape(forward, experiment.abstract_state.params,
                                 {"tokens": jax.ShapeDtypeStruct((BATCH, 200), jnp.int32)},
                                 jax.random.PRNGKey(0))
    assert loss.shape == ()


# ---------------------------------------------------------------------------------------------
# 6. MLM computes the output projection at the selected positions only.
# ---------------------------------------------------------------------------------------------

def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    shapes += _dot_output_shapes(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    shapes += _dot_output_shapes(sub)
    return shapes


def test_mlm_projects_only_the_selected_positions(data_dir):
    run = run_of("mlm")
    experiment, config = run["one"]["experiment"], run["one"]["config"]
    objective = experiment.objective
    num = objective.num_predictions(SEQ_LEN)
    assert num == math.ceil(SEQ_LEN * 0.15) < SEQ_LEN

    def apply(params, batch, rng):
        model = nnx.merge(experiment.graphdef, params)
        inputs, _ = objective.prepare(batch, rng)
        return objective.apply(model, inputs)

    args = (experiment.abstract_state.params,
            {"tokens": jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.int32)},
            jax.random.PRNGKey(0))
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        logits = jax.eval_shape(apply, *args)
        jaxpr = jax.make_jaxpr(apply)(*args)
    assert logits.shape == (BATCH, num, VOCAB_SIZE), logits.shape
    vocab_products = [s for s in _dot_output_shapes(jaxpr.jaxpr) if s[-1] == VOCAB_SIZE]
    assert vocab_products == [(BATCH, num, VOCAB_SIZE)], vocab_products


# ---------------------------------------------------------------------------------------------
# 7. Analytic FLOPs vs. XLA's count.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlm", "span_corruption", "clm"])
def test_analytic_flops_match_xla(data_dir, name):
    run = run_of(name)
    one = run["one"]
    experiment = one["experiment"]
    # A fresh trace with zoo's CPU kernels off: XLA's cost analysis cannot see inside them.
    with (jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(one["config"].rules),
          cpu_kernel.disabled()):
        step = zoo.train.make_train_step(experiment)
        compiled = step.lower(experiment.abstract_state, one["batch"]).compile()
    xla = compiled_flops(compiled)
    if xla is None:
        pytest.skip("this backend reports no FLOPs in cost_analysis()")
    ratio = experiment.step_flops / xla
    low, high = FLOPS_RATIO_BAND
    assert low <= ratio <= high, (f"{name}: analytic {experiment.step_flops:.4g} vs XLA "
                                  f"{xla:.4g} FLOPs per step: ratio {ratio:.3f}")


# ---------------------------------------------------------------------------------------------
# 8. Bad input: one-line ValueErrors naming the field, before anything compiles.
# ---------------------------------------------------------------------------------------------

def assert_build_rejects(config, *names: str) -> str:
    with NoCompilation(), pytest.raises(ValueError) as error:
        zoo.train.build(config, devices=jax.devices()[:1])
    message = str(error.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not named in {message!r}"
    return message


def test_text_objective_on_image_data(data_dir):
    zoo.data.dataset_spec("digits")   # prepared outside the no-compilation check
    message = assert_build_rejects(text_config("mlm", "data.name='digits'"),
                                   "data.name", "digits", "mlm")
    assert "text" in message and "image" in message, message


def test_image_objective_on_text_data(data_dir):
    message = assert_build_rejects(text_config("mae"), "data.name", "pycode", "mae")
    assert "text" in message and "image" in message, message


def test_unknown_text_hyperparameter(data_dir):
    message = assert_build_rejects(text_config("span_corruption", "objective.noise_densty=0.3"),
                                   "objective", "noise_densty")
    assert "noise_density" in message   # lists the allowed ones


def test_mlm_rate_above_one(data_dir):
    assert_build_rejects(text_config("mlm", "objective.rate=1.5"), "objective.rate", "1.5")


def test_vit_backbone_for_clm(data_dir):
    assert_build_rejects(text_config("clm", "model.name='vit'"), "model.name", "vit", "clm")


def test_ul2_rows_too_long_for_the_sentinels(data_dir):
    message = assert_build_rejects(text_config("ul2", "data.seq_len=2048"),
                                   "ul2", "data.seq_len", "2048")
    assert "sentinel" in message, message


@pytest.mark.parametrize("name", NAMES)
def test_seq_len_2(data_dir, name):
    assert_build_rejects(text_config(name, "data.seq_len=2"), "data.seq_len", "2")
