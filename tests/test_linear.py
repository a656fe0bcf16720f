"""zoo.models.linear: the hand-written backward pass gives autodiff's gradients of x @ w + b."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.models import layers
from zoo.models.backward import backward_mode
from zoo.models.linear import Dense, linear


def _reference(x, w, b):
    y = jnp.einsum("...i,io->...o", x, w, precision="highest")
    return y if b is None else y + b


def _operands(shape, features, with_bias, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(len(shape) * 7 + features), 4)
    x = jax.random.normal(keys[0], shape, dtype)
    w = jax.random.normal(keys[1], (shape[-1], features), dtype)
    b = jax.random.normal(keys[2], (features,), dtype) if with_bias else None
    cotangent = jax.random.normal(keys[3], shape[:-1] + (features,), dtype)
    return x, w, b, cotangent


@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 3), (2, 3, 4, 6), (6,)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_match_autodiff(shape, with_bias):
    x, w, b, g = _operands(shape, 5, with_bias)
    np.testing.assert_allclose(linear(x, w, b, "highest"), _reference(x, w, b), rtol=1e-6,
                               atol=1e-6)
    args = (x, w) if b is None else (x, w, b)
    ours = jax.grad(lambda *a: jnp.sum(g * linear(*a, precision="highest")),
                    argnums=tuple(range(len(args))))(*args)
    expected = jax.grad(lambda *a: jnp.sum(g * _reference(*a, *([None] * (3 - len(a))))),
                        argnums=tuple(range(len(args))))(*args)
    for name, a, e in zip(("x", "kernel", "bias"), ours, expected):
        assert a.shape == e.shape, name
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=name)


def test_gradients_under_jit_remat_and_vmap():
    x, w, b, g = _operands((4, 3, 6), 8, True)
    loss = lambda f: lambda x, w, b: jnp.sum(jnp.tanh(f(x, w, b)) * g)  # noqa: E731
    ours = jax.jit(jax.grad(jax.checkpoint(loss(linear)), argnums=(0, 1, 2)))(x, w, b)
    expected = jax.grad(loss(_reference), argnums=(0, 1, 2))(x, w, b)
    for a, e in zip(ours, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
    # Per-example weight gradients (vmap over grad) must not mix examples.
    per_example = jax.vmap(jax.grad(lambda x, w: jnp.sum(linear(x, w) ** 2), argnums=1),
                           in_axes=(0, None))(x, w)
    for i in range(x.shape[0]):
        np.testing.assert_allclose(per_example[i], 2 * x[i].T @ (x[i] @ w), rtol=1e-4, atol=1e-4)


def test_bfloat16_gradients_keep_dtypes_and_accumulate_bias_in_float32():
    x, w, b, g = _operands((64, 32), 16, True, jnp.bfloat16)
    d_x, d_w, d_b = jax.grad(lambda x, w, b: jnp.sum(linear(x, w, b) * g), argnums=(0, 1, 2))(
        x, w, b)
    assert (d_x.dtype, d_w.dtype, d_b.dtype) == (jnp.bfloat16,) * 3
    exact_bias_grad = np.asarray(g, np.float64).sum(0)
    np.testing.assert_allclose(np.asarray(d_b, np.float64), exact_bias_grad, rtol=1e-2)


def test_dense_module_matches_nnx_linear_and_keeps_its_parameters():
    rngs = nnx.Rngs(0)
    ours = layers.dense(6, 4, ("embed", "mlp"), rngs=rngs)
    assert isinstance(ours, Dense) and isinstance(ours, nnx.Linear)
    plain = nnx.Linear(6, 4, rngs=nnx.Rngs(1))
    plain.kernel[...] = ours.kernel[...]
    plain.bias[...] = jax.random.normal(jax.random.PRNGKey(3), (4,))
    ours.bias[...] = plain.bias[...]
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 6))
    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-6, atol=1e-6)
    grads = [nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m) for m in (ours, plain)]
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(getattr(grads[0], name)[...], getattr(grads[1], name)[...],
                                   rtol=1e-5, atol=1e-5, err_msg=name)


def test_forward_mode_needs_the_autodiff_backward():
    x, w, b, _ = _operands((2, 5, 3), 4, True)
    dx = jnp.ones_like(x)
    with pytest.raises(TypeError, match="forward-mode|jvp"):
        jax.jvp(lambda x: linear(x, w, b), (x,), (dx,))
    with backward_mode("autodiff"):
        _, tangent = jax.jvp(lambda x: linear(x, w, b), (x,), (dx,))
    np.testing.assert_allclose(tangent, dx @ w, rtol=1e-5)


def test_bad_mode_and_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"backward_mode: unknown mode 'fast'.*allowed"):
        with backward_mode("fast"):
            pass
    with pytest.raises(ValueError, match=r"linear: input \(2, 3\), kernel \(4, 5\)"):
        linear(jnp.ones((2, 3)), jnp.ones((4, 5)))
