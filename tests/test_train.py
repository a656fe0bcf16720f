"""End-to-end tests of the shared train step and the training loop (tiny MAE on digits).

Each compilation of the train step costs 10-25 s on two CPU cores, so:

* runs are shared between assertions through module-scoped fixtures: ``two_steps`` (two steps on
  a 1-device mesh and on a (data=4, fsdp=2) mesh: mesh equivalence, sharding, donation, no
  recompilation, FLOPs), ``resume`` (uninterrupted vs. preempted-and-resumed runs: exact resume,
  checkpoint pruning, data-iterator state) and ``skip_run``/``stop_run`` (a NaN loss);
* every run uses one config (``CONFIG``) and a session-wide persistent compilation cache, so a
  program compiled once (e.g. the (4, 2) step of ``two_steps``) is reused by the ``train()`` calls
  that run the identical program (the three ``resume`` runs).
"""
from __future__ import annotations

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import objectives.mae
import zoo.config
import zoo.data
import zoo.data.iterator
import zoo.train
from zoo.checkpoint import Checkpointer, NonFiniteParamsError
from zoo.flops import compiled_flops
from zoo.metric_writer import read_metrics
from compile_log import CompileLog

ONE_DEVICE_MESH = (("data", 1), ("fsdp", 1), ("tensor", 1))
FSDP_MESH = (("data", 4), ("fsdp", 2), ("tensor", 1))   # all 8 simulated devices
# One config for every run here (and in test_bad_input.py), so identical programs hit the
# compilation cache. Warmup starts at lr 0, so parameters first move on the second step.
CONFIG = ("steps=6", "log_every=1", "checkpoint_every=3", "keep_checkpoints=1",
          "progress=False", "peak_flops=1e12")

# Analytic FLOPs (matmuls only, 3x forward) over XLA's count (which also counts elementwise ops,
# softmax, LayerNorm, GELU and the AdamW update): measured 0.864 for the tiny MAE (0.926 for the
# "micro" ViT). A factor-2 slip in the analytic count (multiply-add counted once, backward as
# 1x forward, the encoder run over all tokens, the decoder forgotten) lands outside this band.
FLOPS_RATIO_BAND = (0.8, 1.2)


def tiny_config(*overrides: str) -> zoo.config.Config:
    """The tiny MAE config plus ``CONFIG``, without progress bars or the matmul-peak run."""
    config = zoo.config.load("experiments/mae_digits.py:tiny")
    return zoo.config.override(config, [*CONFIG, *overrides])


def host_tree(tree):
    """A numpy copy. A real copy: a zero-copy numpy view of a CPU buffer would keep that buffer
    alive and silently stop the train step from donating it."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def leaves_with_paths(tree):
    return [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


# ---------------------------------------------------------------------------------------------
# Two steps on two meshes.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_steps(data_dir):
    """Two train steps from the same init and batches on a 1-device and a (4, 2) mesh."""
    source = zoo.data.get_source("digits", "train")
    runs = {}
    for name, mesh, devices in (("one", ONE_DEVICE_MESH, jax.devices()[:1]),
                                ("fsdp", FSDP_MESH, jax.devices())):
        config = tiny_config(f"mesh={mesh!r}")
        batches = zoo.data.BatchIterator(source, global_batch_size=config.data.batch_size,
                                         seed=config.data.seed)
        experiment = zoo.train.build(config, devices=devices)
        state = zoo.train.init_state(experiment)
        init_params = host_tree(state.params)
        step = zoo.train.make_train_step(experiment)
        metrics, donated_deleted = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
                first_batch = zoo.train.global_batch(experiment, next(batches))
                donated = state
                state, m = step(state, first_batch)
                metrics.append(jax.device_get(m))
                donated_deleted += [leaf.is_deleted() for leaf in jax.tree.leaves(donated)]
                # The second step: new batch, new step number, state from the first step.
                with CompileLog() as compiles:
                    donated = state
                    state, m = step(state, zoo.train.global_batch(experiment, next(batches)))
                    metrics.append(jax.device_get(m))
                    # Positive control: the capture does see a compilation.
                    jax.jit(lambda x: x * 3)(jnp.arange(3.0)).block_until_ready()
                donated_deleted += [leaf.is_deleted() for leaf in jax.tree.leaves(donated)]
        runs[name] = dict(
            config=config, experiment=experiment, step=step, state=state,
            batch=first_batch, init_params=init_params, params=host_tree(state.params),
            specs={path: leaf.sharding.spec for path, leaf in leaves_with_paths(state.params)},
            metrics=metrics, compiles=compiles, donated_deleted=donated_deleted,
            cache_size=step._cache_size() if hasattr(step, "_cache_size") else None,
            warnings=[str(w.message) for w in caught])
    return runs


def test_one_and_eight_devices_give_the_same_steps(two_steps):
    one, fsdp = two_steps["one"], two_steps["fsdp"]
    # Same initial parameters (created sharded on the (4, 2) mesh, whole on one device).
    for (path, a), (_, b) in zip(leaves_with_paths(one["init_params"]),
                                 leaves_with_paths(fsdp["init_params"])):
        np.testing.assert_array_equal(a, b, err_msg=path)
    for i in range(2):
        assert np.isfinite(one["metrics"][i]["loss"])
        np.testing.assert_allclose(fsdp["metrics"][i]["loss"], one["metrics"][i]["loss"],
                                   rtol=0, atol=1e-5, err_msg=f"loss of step {i + 1}")
        np.testing.assert_allclose(fsdp["metrics"][i]["grad_norm"],
                                   one["metrics"][i]["grad_norm"], rtol=1e-5)
    one_leaves, fsdp_leaves = leaves_with_paths(one["params"]), leaves_with_paths(fsdp["params"])
    assert [p for p, _ in one_leaves] == [p for p, _ in fsdp_leaves]
    lr = one["config"].optim.lr
    for (path, a), (_, b) in zip(one_leaves, fsdp_leaves):
        if path.endswith("['attn']['qkv']['bias'].value"):
            # The key bias's gradient is exactly zero in exact arithmetic (it adds the same
            # q.b to every score of a row, which softmax ignores), so it is rounding noise, and
            # Adam turns noise of either sign into steps of about +-lr: the one-device run's CPU
            # kernel and the mesh's einsum round differently. Only bound those.
            width = a.shape[0] // 3
            keys = slice(width, 2 * width)
            np.testing.assert_allclose(b[keys], a[keys], rtol=0, atol=4 * lr, err_msg=path)
            a, b = np.delete(a, np.r_[keys]), np.delete(b, np.r_[keys])
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=path)
    # The steps really moved the parameters (else the comparison would prove little).
    moved = [not np.allclose(a, b, rtol=0, atol=1e-4) for (_, a), (_, b)
             in zip(leaves_with_paths(one["init_params"]), one_leaves)]
    assert sum(moved) > len(moved) // 2, f"{sum(moved)} of {len(moved)} parameters moved"


def test_parameters_are_sharded_over_fsdp(two_steps):
    specs = two_steps["fsdp"]["specs"]
    fsdp_sharded = [path for path, spec in specs.items()
                    if any(axis == "fsdp" or (isinstance(axis, tuple) and "fsdp" in axis)
                           for axis in spec)]
    assert fsdp_sharded, specs
    # e.g. the patch embedding kernel [patch_dim, width] splits its embed dim over fsdp.
    kernel = [p for p in specs if "patch_embed" in p and "kernel" in p]
    assert kernel and specs[kernel[0]] == jax.sharding.PartitionSpec(None, "fsdp"), specs


def test_state_is_donated(two_steps):
    for name, run in two_steps.items():
        assert all(run["donated_deleted"]), f"{name}: donated state buffers are still alive"
        assert not [w for w in run["warnings"] if "donat" in w], run["warnings"]


def test_second_step_does_not_recompile(two_steps):
    for name, run in two_steps.items():
        compiles = run["compiles"]
        assert compiles.count("<lambda>") == 1, "the compile log capture saw nothing"
        assert compiles.count("train_step") == 0, (name, compiles.messages)
        if run["cache_size"] is not None:
            assert run["cache_size"] == 1, name
        assert int(run["state"].step) == 2


def test_one_device_cpu_attention_runs_the_blas_kernel_and_sharded_runs_do_not(two_steps):
    from zoo.models.cpu_kernel import ATTENTION_TARGETS
    target = ATTENTION_TARGETS["forward"]
    for name, expected in (("one", True), ("fsdp", False)):
        run = two_steps[name]
        with jax.set_mesh(run["experiment"].mesh), nnx.logical_axis_rules(run["config"].rules):
            text = run["step"].lower(run["experiment"].abstract_state, run["batch"]).as_text()
        assert (target in text) == expected, name


def test_analytic_flops_match_xla(two_steps):
    # XLA's cost analysis does not look inside custom calls, so the step is compiled with zoo's
    # CPU kernels (attention, LayerNorm, dense gradients) off: XLA then counts every FLOP.
    from zoo.models import cpu_kernel
    run = two_steps["one"]
    experiment = run["experiment"]
    step = zoo.train.make_train_step(experiment)
    with (jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(run["config"].rules),
          cpu_kernel.disabled()):
        compiled = step.lower(experiment.abstract_state, run["batch"]).compile()
    assert 'custom_call_target="zoo_' not in compiled.as_text()
    xla = compiled_flops(compiled)
    if xla is None:
        pytest.skip("this backend reports no FLOPs in cost_analysis()")
    ratio = experiment.step_flops / xla
    low, high = FLOPS_RATIO_BAND
    assert low <= ratio <= high, (f"analytic {experiment.step_flops:.4g} vs XLA {xla:.4g} "
                                  f"FLOPs per step: ratio {ratio:.3f}")


# ---------------------------------------------------------------------------------------------
# Preemption and exact resume.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resume(data_dir, tmp_path_factory):
    """Run A: 6 steps uninterrupted. Run B: stopped after step 3, then resumed to step 6."""
    # The (4, 2) mesh: sharded checkpoints are written and restored, and the step is the one
    # ``two_steps`` compiled (the compilation cache serves it).
    config = tiny_config(f"mesh={FSDP_MESH!r}")
    devices = jax.devices()
    dir_a = str(tmp_path_factory.mktemp("run_a"))
    dir_b = str(tmp_path_factory.mktemp("run_b"))
    reads: dict[str, list[int]] = {}   # run -> the iterator step of every batch read
    compiles: dict[str, int] = {}
    original_next = zoo.data.iterator.BatchIterator.__next__

    def run(name, workdir, **kwargs):
        reads[name] = []

        def recording_next(self):
            reads[name].append(self.step)
            return original_next(self)

        with pytest.MonkeyPatch.context() as mp, CompileLog() as log:
            mp.setattr(zoo.data.iterator.BatchIterator, "__next__", recording_next)
            summary = zoo.train.train(config, workdir, devices=devices, **kwargs)
        compiles[name] = log.count("train_step")
        return summary

    summaries = {"a": run("a", dir_a)}
    summaries["b1"] = run("b1", dir_b, stop_at=3)
    experiment = zoo.train.build(config, devices=devices)

    def restore(workdir, step):
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
        try:
            state, data_state = checkpointer.restore(step, experiment.abstract_state)
            laid_out = all(leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
                           for leaf, want in zip(jax.tree.leaves(state),
                                                 jax.tree.leaves(experiment.abstract_state)))
            assert laid_out, f"checkpoint {step} of {workdir} restored with other shardings"
            return host_tree(state), data_state, checkpointer.manager.all_steps()
        finally:
            checkpointer.close()

    preempted = restore(dir_b, 3)
    summaries["b2"] = run("b2", dir_b)
    return dict(config=config, dir_a=dir_a, dir_b=dir_b, reads=reads, compiles=compiles,
                summaries=summaries, preempted=preempted,
                final_a=restore(dir_a, 6), final_b=restore(dir_b, 6))


def test_resume_gives_exactly_the_uninterrupted_run(resume):
    metrics_a, metrics_b = read_metrics(resume["dir_a"]), read_metrics(resume["dir_b"])
    assert [m["step"] for m in metrics_a] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in metrics_b] == [1, 2, 3, 4, 5, 6]
    losses_a = {m["step"]: m["loss"] for m in metrics_a}
    losses_b = {m["step"]: m["loss"] for m in metrics_b}
    assert all(np.isfinite(v) for v in losses_a.values())
    for step in (4, 5, 6):
        assert losses_b[step] == losses_a[step], (step, losses_a, losses_b)
    assert losses_b == losses_a
    state_a, data_a, _ = resume["final_a"]
    state_b, data_b, _ = resume["final_b"]
    assert int(state_a.step) == int(state_b.step) == 6
    for (path, a), (_, b) in zip(leaves_with_paths(state_a), leaves_with_paths(state_b)):
        np.testing.assert_array_equal(b, a, err_msg=path)   # params, opt state, rng, counters
    assert data_a == data_b
    assert resume["summaries"]["b1"]["step"] == 3
    assert resume["summaries"]["a"]["step"] == resume["summaries"]["b2"]["step"] == 6


def test_checkpoints_are_pruned_to_keep_checkpoints(resume):
    keep = resume["config"].keep_checkpoints
    for key in ("preempted", "final_a", "final_b"):
        steps = resume[key][2]
        assert 1 <= len(steps) <= keep, (key, steps)
    assert list(resume["final_a"][2]) == [6]
    assert list(resume["preempted"][2]) == [3]
    for workdir in (resume["dir_a"], resume["dir_b"]):
        entries = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
        assert entries == ["6"], entries   # no leftover temporary or pruned step directories


def test_data_iterator_state_is_checkpointed(resume):
    state, data_state, _ = resume["preempted"]
    assert int(state.step) == 3
    assert data_state["step"] == 3
    assert data_state["seed"] == resume["config"].data.seed
    assert data_state["global_batch_size"] == resume["config"].data.batch_size
    assert resume["final_b"][1]["step"] == 6
    # The batches read: the resumed run continues at global batch 3, it does not start over.
    assert resume["reads"]["a"] == [0, 1, 2, 3, 4, 5]
    assert resume["reads"]["b1"] == [0, 1, 2]
    assert resume["reads"]["b2"] == [3, 4, 5]


def test_each_run_compiles_its_step_once(resume):
    # Also after a restore: restored arrays must match the step's dtypes/shardings exactly.
    assert resume["compiles"] == {"a": 1, "b1": 1, "b2": 1}


# ---------------------------------------------------------------------------------------------
# Non-finite losses.
# ---------------------------------------------------------------------------------------------

POISONED_BATCH = 3   # 0-based global batch: the update logged as step 4 (lr > 0 by then)
BAD_STEP = POISONED_BATCH + 1   # as metrics.jsonl and checkpoints number it


def _run_with_a_nan_batch(tmp_path_factory, nonfinite: str, *overrides: str):
    """Trains 6 steps where global batch ``POISONED_BATCH`` is all white and makes the MAE loss
    (and so every gradient) NaN; returns the config, workdir and the error raised, if any."""
    config = tiny_config("checkpoint_every=1", "keep_checkpoints=6", f"nonfinite={nonfinite!r}",
                         f"mesh={ONE_DEVICE_MESH!r}", *overrides)
    workdir = str(tmp_path_factory.mktemp(f"nonfinite_{nonfinite}"))
    original_next = zoo.data.iterator.BatchIterator.__next__
    original_loss = objectives.mae.mae_loss

    def poisoned_next(self):
        index = self.step
        batch = original_next(self)
        if index == POISONED_BATCH:
            batch = {**batch, "image": np.full_like(batch["image"], 255)}
        return batch

    def nan_loss(pred, patches, mask, norm_pix_loss):
        loss = original_loss(pred, patches, mask, norm_pix_loss)
        white = jnp.all(patches > 0.99)     # uint8 255 -> 1.0 (a real digit has black pixels)
        return loss * jnp.where(white, jnp.nan, 1.0)

    error = summary = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zoo.data.iterator.BatchIterator, "__next__", poisoned_next)
        mp.setattr(objectives.mae, "mae_loss", nan_loss)
        try:
            summary = zoo.train.train(config, workdir, devices=jax.devices()[:1])
        except zoo.train.NonFiniteLossError as e:
            error = e
    return dict(config=config, workdir=workdir, error=error, summary=summary,
                metrics={m["step"]: m for m in read_metrics(workdir)},
                states=_restore_all(config, workdir, jax.devices()[:1]))


def _restore_all(config, workdir, devices):
    experiment = zoo.train.build(config, devices=devices)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return {step: host_tree(checkpointer.restore(step, experiment.abstract_state)[0])
                for step in checkpointer.manager.all_steps()}
    finally:
        checkpointer.close()


def _all_finite(tree) -> bool:
    return all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(leaf).dtype, np.floating))


@pytest.fixture(scope="module")
def skip_run(data_dir, tmp_path_factory):
    return _run_with_a_nan_batch(tmp_path_factory, "skip")


@pytest.fixture(scope="module")
def stop_run(data_dir, tmp_path_factory):
    return _run_with_a_nan_batch(tmp_path_factory, "stop")


def test_nonfinite_skip_leaves_the_update_out_and_counts_it(skip_run):
    steps = list(range(1, 7))
    assert skip_run["error"] is None and skip_run["summary"]["step"] == 6
    metrics = skip_run["metrics"]
    assert sorted(metrics) == steps
    assert np.isnan(metrics[BAD_STEP]["loss"])
    assert all(np.isfinite(metrics[s]["loss"]) for s in steps if s != BAD_STEP)
    assert [metrics[s]["skipped"] for s in steps] == [float(s == BAD_STEP) for s in steps]
    assert [metrics[s]["nonfinite_steps"] for s in steps] == [float(s >= BAD_STEP)
                                                               for s in steps]
    states = skip_run["states"]
    assert sorted(states) == steps
    assert all(_all_finite(s.params) and _all_finite(s.opt_state) for s in states.values())
    before, after = states[BAD_STEP - 1], states[BAD_STEP]
    for (path, a), (_, b) in zip(leaves_with_paths((before.params, before.opt_state)),
                                 leaves_with_paths((after.params, after.opt_state))):
        np.testing.assert_array_equal(b, a, err_msg=f"the skipped step changed {path}")
    # Updates happen before and after the skipped step.
    for s in (BAD_STEP - 1, BAD_STEP + 1):
        pairs = zip(jax.tree.leaves(states[s - 1].params), jax.tree.leaves(states[s].params))
        assert not all(np.array_equal(a, b) for a, b in pairs), s
    assert int(states[6].nonfinite_steps) == 1
    assert int(states[6].first_nonfinite_step) == POISONED_BATCH   # 0-based state.step


def test_nonfinite_stop_writes_no_checkpoint_from_the_bad_step_on(stop_run):
    assert isinstance(stop_run["error"], zoo.train.NonFiniteLossError)
    assert np.isnan(stop_run["metrics"][BAD_STEP]["loss"])
    assert BAD_STEP + 1 not in stop_run["metrics"]
    states = stop_run["states"]
    assert sorted(states) == list(range(1, BAD_STEP))   # only checkpoints before the bad step
    assert all(_all_finite(s.params) for s in states.values())


def test_nonfinite_stop_message_names_the_step(stop_run):
    message = str(stop_run["error"])
    assert "\n" not in message
    # The step as metrics.jsonl, checkpoints and the progress bar number it: the 1-based step
    # whose record holds the NaN loss.
    steps_named = [int(s) for s in re.findall(r"step (\d+)", message)]
    assert steps_named == [BAD_STEP], (
        f"message names step(s) {steps_named}, but metrics.jsonl logs the NaN loss at step "
        f"{BAD_STEP}: {message!r}")


def test_sparse_logging_stop_still_checkpoints_nothing_past_the_bad_step(data_dir,
                                                                         tmp_path_factory):
    # Logs at steps 3 and 6, checkpoints at 5: the bad step 4 must stop the run before step 5's
    # checkpoint although no log step comes in between.
    run = _run_with_a_nan_batch(tmp_path_factory, "stop", "log_every=3", "checkpoint_every=5")
    assert isinstance(run["error"], zoo.train.NonFiniteLossError)
    assert f"step {BAD_STEP};" in str(run["error"])
    assert sorted(run["states"]) == []
    # ... and with skip, the interval holding the skipped step logs the applied steps' mean.
    run = _run_with_a_nan_batch(tmp_path_factory, "skip", "log_every=3", "checkpoint_every=5")
    record = run["metrics"][6]
    assert np.isfinite(record["loss"]) and record["skipped"] == pytest.approx(1 / 3)
    # Re-running a finished run trains nothing and reports the last logged metrics.
    summary = zoo.train.train(run["config"], run["workdir"], devices=jax.devices()[:1])
    assert summary["step"] == 6 and summary["loss"] == record["loss"]


def test_checkpointer_refuses_nonfinite_params(tmp_path):
    def state_with(params):
        return zoo.train.TrainState(step=jnp.int32(1), params=params, opt_state=(),
                                    rng=jax.random.PRNGKey(0), nonfinite_steps=jnp.int32(0),
                                    first_nonfinite_step=jnp.int32(-1))

    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(str(directory), keep=3)
    try:
        checkpointer.save(1, state_with({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}), {"step": 1})
        before = sorted(os.listdir(directory))
        assert before == ["1"]
        for step, bad in ((2, jnp.nan), (3, jnp.inf)):
            params = {"w": jnp.ones((2, 3)).at[1, 2].set(bad), "b": jnp.zeros(3)}
            with pytest.raises(NonFiniteParamsError, match=f"step {step}"):
                checkpointer.save(step, state_with(params), {"step": step})
            assert sorted(os.listdir(directory)) == before
        assert checkpointer.latest_step() == 1
    finally:
        checkpointer.close()


def test_bfloat16_compute_keeps_float32_params(two_steps):
    # Same init and first batch as the float32 1-device run, computed in bfloat16.
    one = two_steps["one"]
    config = tiny_config(f"mesh={ONE_DEVICE_MESH!r}", "model.dtype='bfloat16'")
    experiment = zoo.train.build(config, devices=jax.devices()[:1])
    state = zoo.train.init_state(experiment)
    step = zoo.train.make_train_step(experiment)
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        state, metrics = step(state, one["batch"])
    loss = float(metrics["loss"])
    assert np.isfinite(loss)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    f32_loss = float(one["metrics"][0]["loss"])
    assert abs(loss - f32_loss) < 0.05 * abs(f32_loss), (loss, f32_loss)
    assert loss != f32_loss   # it really computed in bfloat16
