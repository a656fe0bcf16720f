"""zoo.models.layer_norm: torch.nn.LayerNorm's values, and autodiff's gradients of them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.models import layers
from zoo.models.backward import backward_mode
from zoo.models.layer_norm import LayerNorm, apply_layer_norm, apply_layer_norm_and_input


def _reference(x, scale, bias, eps):
    """Float64 numpy LayerNorm: biased variance over the last axis (torch's definition)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale, np.float64) + np.asarray(
        bias, np.float64)


def _operands(shape, seed=0, offset=0.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(keys[0], shape) * 3 + offset
    scale = 1 + 0.5 * jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    cotangent = jax.random.normal(keys[3], shape)
    return x, scale, bias, cotangent


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 16), (16,)])
def test_values_match_float64_layer_norm(shape):
    x, scale, bias, _ = _operands(shape)
    np.testing.assert_allclose(apply_layer_norm(x, scale, bias, 1e-6),
                               _reference(x, scale, bias, 1e-6), rtol=1e-5, atol=1e-5)


def test_large_offset_uses_two_pass_variance():
    # Noise of std 0.03 on an offset of 3000: E[x^2] - E[x]^2 in float32 is off by ~70 here
    # (flax's use_fast_variance); the two-pass variance stays within float32 rounding of x - mean.
    x = 3000.0 + 0.03 * jax.random.normal(jax.random.PRNGKey(7), (4, 64))
    ones, zeros = jnp.ones(64), jnp.zeros(64)
    ours = np.asarray(apply_layer_norm(x, ones, zeros, 1e-6))
    error = np.abs(ours - _reference(x, ones, zeros, 1e-6))
    assert error.max() < 0.02, error.max()


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 16)])
def test_gradients_match_autodiff(shape):
    x, scale, bias, g = _operands(shape, seed=1)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a, 1e-6)) * g)  # noqa: E731
    ours = jax.grad(loss(apply_layer_norm), argnums=(0, 1, 2))(x, scale, bias)
    with backward_mode("autodiff"):
        expected = jax.grad(loss(apply_layer_norm), argnums=(0, 1, 2))(x, scale, bias)
    for name, a, e in zip(("x", "scale", "bias"), ours, expected):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5, err_msg=name)


def test_gradient_wrt_input_against_finite_differences():
    x, scale, bias, g = _operands((3, 8), seed=2)
    x64 = np.asarray(x, np.float64)
    grad = np.asarray(jax.grad(lambda x: jnp.sum(apply_layer_norm(x, scale, bias, 1e-6) * g))(x))
    eps = 1e-5
    for i, j in [(0, 0), (1, 5), (2, 7)]:
        up, down = x64.copy(), x64.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (np.sum(_reference(up, scale, bias, 1e-6) * np.asarray(g, np.float64))
                   - np.sum(_reference(down, scale, bias, 1e-6) * np.asarray(g, np.float64))) / (
                       2 * eps)
        np.testing.assert_allclose(grad[i, j], numeric, rtol=1e-3, atol=1e-4)


def test_bfloat16_input_keeps_dtype_with_float32_statistics():
    x, scale, bias, g = _operands((8, 32), seed=3)
    xb = x.astype(jnp.bfloat16)
    y = apply_layer_norm(xb, scale.astype(jnp.bfloat16), bias.astype(jnp.bfloat16), 1e-6)
    assert y.dtype == jnp.bfloat16
    d_x = jax.grad(lambda x: jnp.sum(apply_layer_norm(x, scale, bias, 1e-6) * g))(xb)
    assert d_x.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               _reference(np.asarray(xb, np.float32), np.asarray(
                                   scale.astype(jnp.bfloat16), np.float32), np.asarray(
                                   bias.astype(jnp.bfloat16), np.float32), 1e-6),
                               rtol=3e-2, atol=3e-2)


def test_module_matches_flax_layer_norm_and_falls_back_for_masks():
    ours = layers.layer_norm(16, rngs=nnx.Rngs(0))
    assert isinstance(ours, LayerNorm) and isinstance(ours, nnx.LayerNorm)
    ours.scale[...] = 1 + jax.random.normal(jax.random.PRNGKey(4), (16,))
    ours.bias[...] = jax.random.normal(jax.random.PRNGKey(5), (16,))
    flax_ln = nnx.LayerNorm(16, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0))
    flax_ln.scale[...], flax_ln.bias[...] = ours.scale[...], ours.bias[...]
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 5, 16))
    np.testing.assert_allclose(ours(x), flax_ln(x), rtol=1e-5, atol=1e-5)
    grads = [nnx.grad(lambda m: jnp.sum(jnp.cos(m(x))))(m) for m in (ours, flax_ln)]
    for name in ("scale", "bias"):
        np.testing.assert_allclose(getattr(grads[0], name)[...], getattr(grads[1], name)[...],
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    mask = jnp.arange(16) < 12
    np.testing.assert_allclose(ours(x, mask=mask), flax_ln(x, mask=mask), rtol=1e-5, atol=1e-5)


def test_shape_mismatch_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"apply_layer_norm: input \(2, 8\) needs scale"):
        apply_layer_norm(jnp.ones((2, 8)), jnp.ones(4), jnp.zeros(8))


@pytest.mark.parametrize("shape", [(300, 40), (2, 197, 256), (1, 1, 7)])
def test_cpu_kernel_path_matches_the_xla_path(shape, monkeypatch):
    # On a one-device float32 CPU run the forward and backward go through zoo's CPU kernel;
    # the same formulas through XLA's ops must give the same values and gradients.
    from zoo.models import cpu_kernel
    from zoo.models import layer_norm as module
    x, scale, bias, g = _operands(shape, seed=3, offset=2.0)
    loss = lambda x, s, b: jnp.sum(apply_layer_norm(x, s, b, 1e-6) * g)  # noqa: E731
    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    hlo = run.lower(x, scale, bias).as_text()
    assert cpu_kernel.LAYER_NORM_TARGETS["forward"] in hlo
    assert cpu_kernel.LAYER_NORM_TARGETS["backward"] in hlo
    value, grads = run(x, scale, bias)
    monkeypatch.setattr(module, "_kernel_takes", lambda x, scale: False)
    xla = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    assert cpu_kernel.LAYER_NORM_TARGETS["forward"] not in xla.lower(x, scale, bias).as_text()
    want_value, want_grads = xla(x, scale, bias)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-3)
    for name, a, e in zip(("x", "scale", "bias"), grads, want_grads):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=2e-5, err_msg=name)


def test_sharded_meshes_keep_the_xla_path():
    from zoo.models import cpu_kernel
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    x, scale, bias, _ = _operands((8, 16))
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda x: apply_layer_norm(x, scale, bias)).lower(x).as_text()
    assert len(jax.devices()) > 1 and cpu_kernel.LAYER_NORM_TARGETS["forward"] not in hlo


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("shape", [(2, 197, 256), (5, 8)])
def test_layer_norm_and_input_gradients_add_both_uses(shape, kernel, monkeypatch):
    """``(y, x) = apply_layer_norm_and_input(x)`` as in a pre-norm block (``x + branch(y)``):
    the values are LayerNorm's and x itself, and x's gradient is the sum of both uses', as
    autodiff of the plain formula gives it (the CPU kernel adds the residual path in its pass;
    the XLA path adds it after)."""
    from zoo.models import cpu_kernel
    from zoo.models import layer_norm as module
    if not kernel:
        monkeypatch.setattr(module, "_kernel_takes", lambda x, scale: False)
    x, scale, bias, g = _operands(shape, seed=4, offset=1.0)
    w = jnp.cos(g)   # a second, different cotangent for the residual path

    def block(f):
        def loss(x, s, b):
            y, passed = f(x, s, b, 1e-6)
            return jnp.sum(jnp.sin(y) * g) + jnp.sum(passed * passed * w)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    y, passed = apply_layer_norm_and_input(x, scale, bias, 1e-6)
    np.testing.assert_allclose(y, _reference(x, scale, bias, 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(passed, x)
    hlo = block(apply_layer_norm_and_input).lower(x, scale, bias).as_text()
    assert (cpu_kernel.LAYER_NORM_TARGETS["backward"] in hlo) == kernel
    value, grads = block(apply_layer_norm_and_input)(x, scale, bias)
    with backward_mode("autodiff"):
        want_value, want_grads = block(
            lambda x, s, b, eps: (apply_layer_norm(x, s, b, eps), x))(x, scale, bias)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for name, a, e in zip(("x", "scale", "bias"), grads, want_grads):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=2e-5, err_msg=name)
    # Without the residual path's share, x's gradient is visibly different (the test can fail).
    alone = jax.grad(lambda x: jnp.sum(jnp.sin(apply_layer_norm(x, scale, bias, 1e-6)) * g))(x)
    assert np.abs(np.asarray(alone) - np.asarray(grads[0])).max() > 0.1


def test_module_with_input_matches_call():
    norm = LayerNorm(16, epsilon=1e-6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16))
    y, passed = norm.with_input(x)
    np.testing.assert_allclose(y, norm(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(passed, x)
