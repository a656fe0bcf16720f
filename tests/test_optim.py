"""The optimizer from the config: zoo's gradient clipping against optax's, AdamW's updates, the
learning-rate schedule and the weight-decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo.config import OptimConfig
from zoo.optim import clip_by_global_norm, decay_mask, make_optimizer, make_schedule


def _tree(scale):
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(scale * rng.standard_normal((5, 3)), jnp.float32),
            "b": jnp.asarray(scale * rng.standard_normal((3,)), jnp.float32)}


@pytest.mark.parametrize("scale", [0.01, 10.0])   # global norm below / above the limit
@pytest.mark.parametrize("give_norm", [False, True])
def test_clip_matches_optax(scale, give_norm):
    grads = _tree(scale)
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    extra = {"grad_norm": optax.tree.norm(grads)} if give_norm else {}
    got, state = ours.update(grads, ours.init(grads), **extra)
    want, want_state = theirs.update(grads, theirs.init(grads))
    for key in grads:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=0)
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    norm = float(optax.tree.norm(got))
    assert norm == pytest.approx(min(1.0, float(optax.tree.norm(grads))), rel=1e-6)


def test_clip_uses_the_norm_it_is_given():
    grads = _tree(0.01)   # true norm far below 1: a given norm of 4 must scale by 1/4
    ours = clip_by_global_norm(1.0)
    got, _ = ours.update(grads, ours.init(grads), grad_norm=jnp.float32(4.0))
    np.testing.assert_allclose(got["w"], grads["w"] / 4, rtol=1e-6)


def test_adamw_with_clipping_matches_optax_over_steps():
    config = OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.05, clip_norm=1.0)
    tx, schedule = make_optimizer(config, total_steps=10)
    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=config.b1, b2=config.b2,
                                        weight_decay=0.05, mask=decay_mask))
    params = ref_params = _tree(1.0)
    state, ref_state = tx.init(params), reference.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)   # checkpoints match
    for step in range(5):
        grads = _tree(3.0 * (step + 1))
        updates, state = tx.update(grads, state, params, grad_norm=optax.tree.norm(grads))
        params = optax.apply_updates(params, updates)
        ref_updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    for key in params:
        np.testing.assert_allclose(params[key], ref_params[key], rtol=1e-5, atol=1e-7)
    assert not np.allclose(params["w"], _tree(1.0)["w"])   # the steps did move the parameters


def test_schedule_warms_up_linearly_then_decays_to_the_end_fraction():
    config = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", end_lr_fraction=0.1)
    schedule = make_schedule(config, total_steps=14)
    assert float(schedule(0)) == 0.0
    assert float(schedule(2)) == pytest.approx(0.5)
    assert float(schedule(4)) == pytest.approx(1.0)
    assert float(schedule(9)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)   # cosine midpoint
    assert float(schedule(14)) == pytest.approx(0.1, rel=1e-5)


def test_weight_decay_applies_to_matrices_only():
    config = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=None,
                         schedule="constant")
    tx, _ = make_optimizer(config, total_steps=10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], np.zeros(2))
