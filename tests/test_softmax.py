"""zoo.models.layers.softmax: jax.nn.softmax's values, with the output-only derivative."""
import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.layers import softmax


def _reference(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_values_sum_to_one_and_match_float64():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 7)) * 5
    y = softmax(x)
    np.testing.assert_allclose(y, _reference(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0, rtol=1e-6)


def test_masked_scores_get_zero_weight_and_fully_masked_rows_are_uniform():
    x = jnp.array([[1.0, jnp.finfo(jnp.float32).min, 2.0], [jnp.finfo(jnp.float32).min] * 3])
    y = np.asarray(softmax(x))
    assert y[0, 1] == 0.0
    np.testing.assert_allclose(y[1], [1 / 3] * 3, rtol=1e-6)


def test_reverse_and_forward_derivatives_match_jax_nn_softmax():
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(keys[0], (2, 5, 6)) * 3
    g = jax.random.normal(keys[1], x.shape)
    t = jax.random.normal(keys[2], x.shape)
    loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)) * g)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss(softmax))(x),
                               jax.grad(loss(lambda x: jax.nn.softmax(x, axis=-1)))(x),
                               rtol=1e-5, atol=1e-6)
    _, ours = jax.jvp(softmax, (x,), (t,))
    _, expected = jax.jvp(lambda x: jax.nn.softmax(x, axis=-1), (x,), (t,))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # The derivative of a softmax sums to zero over the normalised axis.
    np.testing.assert_allclose(np.asarray(ours).sum(-1), 0.0, atol=1e-6)
