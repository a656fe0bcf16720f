"""Options for large runs give the plain path's numbers: rematerialisation, gradient
accumulation, loss-spike skipping. (FSDP: tests/test_train.py runs the same steps on one device
and on a data=4 x fsdp=2 mesh.)"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.config
import zoo.spike
import zoo.train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAE = os.path.join(ROOT, "experiments/mae_digits.py:tiny")
T5 = os.path.join(ROOT, "experiments/text_pycode.py:span_corruption,tiny")


def _loss_and_grads(config_path, *settings):
    config = zoo.config.load(config_path, ["progress=False", *settings])
    experiment = zoo.train.build(config)
    state = zoo.train.init_state(experiment)
    batch = zoo.train.global_batch(experiment, next(zoo.train.make_batches(experiment)))
    with jax.set_mesh(experiment.mesh):
        loss, grads = zoo.train.make_loss_and_grad(experiment)(state, batch)
    return float(loss), jax.device_get(grads)


@pytest.mark.slow
@pytest.mark.parametrize("config_path", [MAE, T5], ids=["vit", "encdec"])
def test_remat_policies_give_the_same_loss_and_gradients(data_dir, config_path):
    plain_loss, plain_grads = _loss_and_grads(config_path)
    for policy in ("full", "dots"):
        loss, grads = _loss_and_grads(config_path, f"model.remat={policy!r}")
        assert loss == pytest.approx(plain_loss, rel=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     grads, plain_grads)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="model.remat: unknown 'some'"):
        zoo.config.load(MAE, ["model.remat='some'"])


def _three_steps(*settings, batches=None):
    config = zoo.config.load(MAE, ["progress=False", "steps=3",
                                   "mesh=(('data', 2), ('fsdp', 1), ('tensor', 1))", *settings])
    experiment = zoo.train.build(config)
    state = zoo.train.init_state(experiment)
    step = zoo.train.make_train_step(experiment)
    source = zoo.train.make_batches(experiment)
    metrics = []
    with jax.set_mesh(experiment.mesh):
        for i in range(3):
            local = batches[i] if batches else next(source)
            state, m = step(state, zoo.train.global_batch(experiment, local))
            metrics.append(jax.device_get(m))
    return metrics, jax.device_get(state.params)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_plain_step(data_dir):
    """Same corruption (drawn once for the global batch), mean of the micro-batch losses and
    gradients = the plain step's: losses and gradient norms agree to float error, and after
    three AdamW updates so do the parameters (2 devices; 16 rows in 2 or 4 micro-batches)."""
    plain, plain_params = _three_steps()
    for accum in (2, 4):
        accumulated, params = _three_steps(f"optim.grad_accum_steps={accum}")
        for a, b in zip(accumulated, plain):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params,
                     plain_params)


def test_gradient_accumulation_refuses_what_it_would_change(data_dir):
    with pytest.raises(ValueError, match="optim.grad_accum_steps: 'simclr' couples"):
        zoo.train.build(zoo.config.load(MAE, ["objective={'name': 'simclr'}",
                                              "optim.grad_accum_steps=2"]))
    with pytest.raises(ValueError, match="optim.grad_accum_steps: 3 does not divide"):
        zoo.config.load(MAE, ["optim.grad_accum_steps=3"])
    # 16 rows / 4 = micro-batches of 4 rows cannot split over 8 data-parallel devices.
    with pytest.raises(ValueError, match="micro-batches of 4 rows do not split over the 8 "
                                         r".*allowed: divisors of 2"):
        zoo.train.build(zoo.config.load(MAE, ["optim.grad_accum_steps=4",
                                              "mesh=(('data', 8),)"]))


def test_spike_statistics_ring_buffer_and_threshold():
    config = zoo.config.SpikeConfig(enabled=True, window=3, threshold=2.0)
    stats = zoo.spike.init_stats(config)
    yes = jnp.bool_(True)
    for loss in (1.0, 1.2, 0.8):
        # Not a spike before the window is full, however large.
        assert not bool(zoo.spike.is_spike(config, stats, jnp.float32(100.0), jnp.float32(1.0)))
        stats = zoo.spike.update_stats(stats, jnp.float32(loss), jnp.float32(1.0), applied=yes,
                                       spike=jnp.bool_(False))
    mean, std = 1.0, np.std([1.0, 1.2, 0.8])
    bar = mean + 2.0 * std
    assert not bool(zoo.spike.is_spike(config, stats, jnp.float32(bar - 1e-3), jnp.float32(1.0)))
    assert bool(zoo.spike.is_spike(config, stats, jnp.float32(bar + 1e-3), jnp.float32(1.0)))
    # The gradient norm alone can be the spike (its window is constant 1.0: std 0).
    assert bool(zoo.spike.is_spike(config, stats, jnp.float32(1.0), jnp.float32(1.5)))
    # A skipped spike is counted and leaves the window alone; an applied step replaces the
    # OLDEST value (ring buffer).
    skipped = zoo.spike.update_stats(stats, jnp.float32(50.0), jnp.float32(1.0),
                                     applied=jnp.bool_(False), spike=yes)
    np.testing.assert_array_equal(skipped["values"], stats["values"])
    assert int(skipped["skipped"]) == 1
    newer = zoo.spike.update_stats(stats, jnp.float32(2.0), jnp.float32(1.0), applied=yes,
                                   spike=jnp.bool_(False))
    np.testing.assert_allclose(np.asarray(newer["values"])[:, 0], [2.0, 1.2, 0.8])


@pytest.mark.slow
def test_a_loss_spike_is_skipped_and_counted(data_dir):
    """Steps 1-2 fill a 2-step window; step 3 gets an all-white batch (its MAE loss and gradient
    norm are far above the window): with skipping on, that update is not applied and is
    counted."""
    config = zoo.config.load(MAE, ["progress=False", "steps=3"])
    source = zoo.train.make_batches(zoo.train.build(config))
    batches = [next(source), next(source), dict(next(source))]
    batches[2]["image"] = np.full_like(batches[2]["image"], 255)
    settings = ["spike.enabled=True", "spike.window=2", "spike.threshold=6.0"]
    with_skip, params = _three_steps(*settings, batches=batches)
    assert [m["spike"] for m in with_skip] == [0.0, 0.0, 1.0]
    assert with_skip[2]["skipped"] == 1.0 and with_skip[2]["spike_steps"] == 1.0
    plain, plain_params = _three_steps(batches=batches)
    assert plain[2]["skipped"] == 0.0 and "spike" not in plain[2]
    window = [m["loss"] for m in plain[:2]]        # the white batch really is a spike
    assert plain[2]["loss"] > np.mean(window) + 6.0 * np.std(window)
    # The spike's update was not applied: the parameters are the plain run's after 2 steps.
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params, plain_params)))
    two_step_params = _params_after(batches[:2], settings)
    jax.tree.map(np.testing.assert_array_equal, params, two_step_params)


def _params_after(batches, settings):
    config = zoo.config.load(MAE, ["progress=False", "steps=3",
                                   "mesh=(('data', 2), ('fsdp', 1), ('tensor', 1))", *settings])
    experiment = zoo.train.build(config)
    state = zoo.train.init_state(experiment)
    step = zoo.train.make_train_step(experiment)
    with jax.set_mesh(experiment.mesh):
        for b in batches:
            state, _ = step(state, zoo.train.global_batch(experiment, b))
    return jax.device_get(state.params)


def _scanned_layout(pure):
    """A plain model's pure-dict params -> the scan_layers layout: the backbone's (not the
    heads') ``blocks`` / ``decoder_blocks`` lists become {"layers": leaves stacked on axis 0}."""
    return {**pure, "encoder": _stack_block_lists(pure["encoder"])}


def _stack_block_lists(tree):
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key in ("blocks", "decoder_blocks") and isinstance(value, dict) and 0 in value:
            layers = [value[i] for i in range(len(value))]
            out[key] = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
        else:
            out[key] = _stack_block_lists(value)
    return out


def _scan_matches_plain(config_path, *settings):
    from flax import nnx
    plain_cfg = zoo.config.load(config_path, ["progress=False", *settings])
    scan_cfg = zoo.config.load(config_path, ["progress=False", "model.scan_layers=True",
                                             *settings])
    results = []
    for config in (plain_cfg, scan_cfg):
        experiment = zoo.train.build(config)
        results.append((experiment, zoo.train.init_state(experiment)))
    (plain_exp, plain_state), (scan_exp, scan_state) = results
    plain_pure = nnx.to_pure_dict(jax.device_get(plain_state.params))
    scan_params = jax.device_get(scan_state.params)
    nnx.replace_by_pure_dict(scan_params, _scanned_layout(plain_pure))
    scan_state = scan_state._replace(params=jax.device_put(
        scan_params, scan_exp.state_shardings.params))
    batch = zoo.train.global_batch(plain_exp, next(zoo.train.make_batches(plain_exp)))
    with jax.set_mesh(plain_exp.mesh):
        plain_loss, plain_grads = zoo.train.make_loss_and_grad(plain_exp)(plain_state, batch)
    with jax.set_mesh(scan_exp.mesh):
        scan_loss, scan_grads = zoo.train.make_loss_and_grad(scan_exp)(scan_state, batch)
    assert float(scan_loss) == pytest.approx(float(plain_loss), rel=1e-6)
    expected = _scanned_layout(nnx.to_pure_dict(jax.device_get(plain_grads)))
    got = nnx.to_pure_dict(jax.device_get(scan_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got, expected)
    # The stacked leaves really carry a leading layer axis (not a silent fallback to a list).
    blocks = got["encoder"]["encoder"]["blocks"] if "encoder" in got["encoder"] else \
        got["encoder"]["blocks"]
    assert set(blocks) == {"layers"}


@pytest.mark.slow
def test_scan_over_layers_gives_the_plain_loss_and_gradients_vit(data_dir):
    _scan_matches_plain(MAE)


@pytest.mark.slow
def test_scan_over_layers_gives_the_plain_loss_and_gradients_encdec_with_remat(data_dir):
    _scan_matches_plain(T5, "model.remat='full'")


@pytest.mark.parametrize("config_path", [MAE, T5], ids=["vit", "encdec"])
def test_attention_implementations_give_the_same_loss_and_gradients(data_dir, config_path):
    """model.attention="fused" (jax.nn.dot_product_attention; XLA's kernel on CPU) against the
    einsum path through the whole step: the encdec case covers masked self- and
    cross-attention. The setting reaches every attention layer, heads' too."""
    results = {}
    for how in ("einsum", "fused"):
        config = zoo.config.load(config_path, ["progress=False", f"model.attention={how!r}"])
        experiment = zoo.train.build(config)
        state = zoo.train.init_state(experiment)
        model = nnx.merge(experiment.graphdef, state.params)
        found = [module.attention_implementation for _, module in nnx.iter_graph(model)
                 if hasattr(module, "attention_implementation")]
        assert len(found) >= 2 and set(found) == {how}, found
        batch = zoo.train.global_batch(experiment, next(zoo.train.make_batches(experiment)))
        with jax.set_mesh(experiment.mesh):
            loss, grads = zoo.train.make_loss_and_grad(experiment)(state, batch)
        results[how] = float(loss), jax.device_get(grads)
    (einsum_loss, einsum_grads), (fused_loss, fused_grads) = results["einsum"], results["fused"]
    assert fused_loss == pytest.approx(einsum_loss, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
                 fused_grads, einsum_grads)
