"""zoo.models.cpu_kernel: the BLAS batched matmul and the "blas" attention built on it."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import cpu_kernel, layers


def reference(a, b, transpose_a, transpose_b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.matmul(np.swapaxes(a, -1, -2) if transpose_a else a,
                     np.swapaxes(b, -1, -2) if transpose_b else b)


def operands(rng, batch, m, k, n, transpose_a, transpose_b):
    a = rng.standard_normal(batch + ((k, m) if transpose_a else (m, k))).astype(np.float32)
    b = rng.standard_normal(batch + ((n, k) if transpose_b else (k, n))).astype(np.float32)
    return jnp.asarray(a), jnp.asarray(b)


def test_the_kernel_builds_here():
    # The machines zoo runs its tests on have a C++ compiler and scipy's OpenBLAS; if this
    # fails, the reason says which is missing (attention then falls back to einsum).
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (2, 5)])
def test_batched_matmul_matches_float64_for_every_orientation(batch, transpose_a, transpose_b):
    rng = np.random.default_rng(len(batch) * 4 + 2 * transpose_a + transpose_b)
    a, b = operands(rng, batch, 7, 5, 3, transpose_a, transpose_b)
    got = jax.jit(cpu_kernel.batched_matmul, static_argnums=(2, 3))(a, b, transpose_a,
                                                                     transpose_b)
    assert got.shape == batch + (7, 3)
    np.testing.assert_allclose(got, reference(a, b, transpose_a, transpose_b), rtol=1e-5,
                               atol=1e-5)


def test_batched_matmul_runs_the_custom_call_and_the_fallback_agrees(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = operands(rng, (4, 3), 9, 6, 11, True, False)
    kernel = jax.jit(lambda a, b: cpu_kernel.batched_matmul(a, b, transpose_a=True))
    assert cpu_kernel.TARGET in kernel.lower(a, b).as_text()
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    fallback = jax.jit(lambda a, b: cpu_kernel.batched_matmul(a, b, transpose_a=True))
    assert cpu_kernel.TARGET not in fallback.lower(a, b).as_text()
    np.testing.assert_allclose(kernel(a, b), fallback(a, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fallback(a, b), reference(a, b, True, False), rtol=1e-5,
                               atol=1e-5)


def test_batched_matmul_under_vmap():
    rng = np.random.default_rng(1)
    a, b = operands(rng, (6, 2), 4, 3, 5, False, True)
    per_row = jax.vmap(lambda a, b: cpu_kernel.batched_matmul(a, b, transpose_b=True))(a, b)
    np.testing.assert_allclose(per_row, reference(a, b, False, True), rtol=1e-5, atol=1e-5)


def test_many_matrices_spread_over_threads_give_every_matrix_its_own_product():
    # 256 matrices: the kernel splits them into chunks across XLA's thread pool; each matrix
    # must still get exactly its own product (a wrong stride would mix neighbours).
    rng = np.random.default_rng(2)
    a, b = operands(rng, (16, 16), 13, 8, 13, False, True)
    got = np.asarray(cpu_kernel.batched_matmul(a, b, transpose_b=True))
    np.testing.assert_allclose(got, reference(a, b, False, True), rtol=1e-5, atol=1e-5)


def test_bad_operands_fail_with_one_line_errors():
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="same rank >= 2 and the same leading dimensions"):
        cpu_kernel.batched_matmul(x, jnp.ones((3, 4, 2)))
    with pytest.raises(ValueError, match="contracted sizes differ"):
        cpu_kernel.batched_matmul(x, jnp.ones((2, 3, 2)))
    with pytest.raises(ValueError, match="float32 only"):
        cpu_kernel.batched_matmul(x.astype(jnp.bfloat16), jnp.ones((2, 4, 2), jnp.bfloat16))


def test_unavailable_reasons_and_no_half_written_library(monkeypatch, tmp_path):
    load = cpu_kernel._load.__wrapped__  # the uncached builder
    monkeypatch.setenv("ZOO_CPU_KERNEL", "0")
    assert load() == "ZOO_CPU_KERNEL=0"
    monkeypatch.delenv("ZOO_CPU_KERNEL")
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
    assert load().startswith("no C++ compiler")
    monkeypatch.undo()
    # A compiler that fails: a clear reason, and nothing left in the cache directory.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    reason = load()
    assert reason is not None and "CalledProcessError" in reason, reason
    assert os.listdir(tmp_path / "zoo" / "kernels") == []


@pytest.mark.parametrize("mask_kind", [None, "causal", "random_with_an_empty_row"])
def test_blas_attention_values_and_gradients_match_einsum(mask_kind):
    rng = np.random.default_rng(3)
    shape = (3, 4, 9, 8)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape).astype(np.float32))
                      for _ in range(4))
    mask = None
    if mask_kind == "causal":
        mask = jnp.tril(jnp.ones((9, 9), bool))[None, None]
    elif mask_kind:
        mask = rng.random((3, 1, 9, 9)) > 0.4
        mask[0, 0, 2] = False  # a query that may attend to nothing: uniform weights, no grad
        mask = jnp.asarray(mask)

    def value_and_grads(attention):
        out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, mask), q, k, v)
        return (out, *pullback(d_out))

    want = jax.jit(lambda: value_and_grads(layers.einsum_attention))()
    got = jax.jit(lambda: value_and_grads(layers.blas_attention))()
    for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    if mask_kind == "random_with_an_empty_row":
        assert float(jnp.abs(got[1][0, :, 2]).max()) == 0.0


def test_an_empty_contraction_gives_zeros():
    a, b = jnp.ones((2, 3, 0)), jnp.ones((2, 0, 4))
    got = jax.jit(cpu_kernel.batched_matmul)(a, b)
    assert got.shape == (2, 3, 4) and float(jnp.abs(got).max()) == 0.0


def test_auto_warns_and_uses_einsum_when_the_kernel_cannot_build(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_load", lambda: "no C++ compiler (test)")
    monkeypatch.setattr(cpu_kernel, "available", cpu_kernel.available.__wrapped__)
    with pytest.warns(UserWarning, match=r"CPU kernels unavailable.*no C\+\+ compiler"):
        assert layers.resolve_attention("auto", jnp.float32, False) == "einsum"
    with pytest.raises(ValueError, match="'blas' cannot run here: no C\\+\\+ compiler"), \
            pytest.warns(UserWarning, match="CPU kernels unavailable"):
        layers.resolve_attention("blas", jnp.float32, False)


def _packed_case(rng, batch, length, heads, dim, mask_kind):
    qkv = jnp.asarray(rng.standard_normal((batch, length, 3, heads, dim)).astype(np.float32))
    d_out = jnp.asarray(rng.standard_normal((batch, length, heads, dim)).astype(np.float32))
    mask = None
    if mask_kind == "causal":      # rank 2: broadcasting adds the batch and head axes
        mask = jnp.tril(jnp.ones((length, length), bool))
    elif mask_kind == "padding":   # [B, 1, 1, S]
        mask = rng.random((batch, 1, 1, length)) > 0.3
        mask[:, 0, 0, 0] = True
        mask = jnp.asarray(mask)
    elif mask_kind == "per_head_with_an_empty_row":   # [B, H, L, S]
        mask = rng.random((batch, heads, length, length)) > 0.4
        mask[0, -1, 2] = False     # a query of the last head that may attend to nothing
        mask = jnp.asarray(mask)
    return qkv, d_out, mask


def _einsum_on_packed(qkv, mask):
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
    return jnp.transpose(layers.einsum_attention(q, k, v, mask), (0, 2, 1, 3))


# Lengths and head sizes that exercise every path of the kernel's tiled loop: rows in whole
# tiles of 8 and a remainder, columns 32 / 16 at a time and head sizes that are not a multiple
# of 16 (the plain loop), a length padded to a multiple of 16 for the scores.
@pytest.mark.parametrize("batch,length,heads,dim", [(2, 9, 3, 8), (3, 50, 2, 64),
                                                    (2, 37, 2, 48), (1, 197, 2, 32),
                                                    (2, 16, 1, 20)])
@pytest.mark.parametrize("mask_kind", [None, "causal", "padding",
                                       "per_head_with_an_empty_row"])
def test_packed_attention_values_and_gradients_match_einsum(batch, length, heads, dim,
                                                            mask_kind):
    rng = np.random.default_rng(length * dim)
    qkv, d_out, mask = _packed_case(rng, batch, length, heads, dim, mask_kind)

    def value_and_grad(attention):
        out, pullback = jax.vjp(lambda x: attention(x, mask), qkv)
        return out, pullback(d_out)[0]

    want_out, want_grad = jax.jit(lambda: value_and_grad(_einsum_on_packed))()
    got_out, got_grad = jax.jit(lambda: value_and_grad(layers.packed_blas_attention))()
    assert got_out.shape == (batch, length, heads, dim) and got_grad.shape == qkv.shape
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=5e-6)
    if mask_kind == "per_head_with_an_empty_row":   # uniform weights, but no gradient
        np.testing.assert_allclose(got_out[0, 2, -1], qkv[0, :, 2, -1].mean(0), rtol=1e-5,
                                   atol=1e-6)
        assert float(jnp.abs(got_grad[0, 2, 0, -1]).max()) == 0.0   # its query's gradient


@pytest.mark.parametrize("batch,length,heads,dim", [(2, 9, 3, 8), (1, 197, 2, 32),
                                                    (2, 37, 2, 48)])
@pytest.mark.parametrize("mask_kind", [None, "per_head_with_an_empty_row"])
def test_packed_attention_folds_the_projection_bias(batch, length, heads, dim, mask_kind):
    """``packed_blas_attention(qkv, mask, bias)`` must give the values and the gradients (for
    qkv AND the bias) of attention over ``qkv + bias``: the kernel drops the key bias (the
    softmax removes it) and adds the others' shares in its own passes."""
    rng = np.random.default_rng(length + dim)
    qkv, d_out, mask = _packed_case(rng, batch, length, heads, dim, mask_kind)
    bias = jnp.asarray(rng.standard_normal((3, heads, dim)).astype(np.float32))

    def value_and_grads(attention):
        out, pullback = jax.vjp(attention, qkv, bias)
        return out, *pullback(d_out)

    want = jax.jit(lambda: value_and_grads(lambda x, b: _einsum_on_packed(x + b, mask)))()
    got = jax.jit(lambda: value_and_grads(
        lambda x, b: layers.packed_blas_attention(x, mask, b)))()
    for name, g, w in zip(("out", "d_qkv", "d_bias"), got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.abs(w).max()),
                                   err_msg=name)
    # The bias matters: without it the values differ (the test can fail).
    unbiased = layers.packed_blas_attention(qkv, mask)
    assert float(jnp.abs(unbiased - got[0]).max()) > 0.1


def test_attention_module_folds_its_qkv_bias_on_cpu(monkeypatch):
    """The blas path gives the einsum path's values and gradients with a non-zero qkv bias,
    and its compiled step has no pass adding the bias to the projection."""
    from flax import nnx

    from zoo.models import linear
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 10, 32)).astype(np.float32))
    bias = jnp.asarray(rng.standard_normal(96).astype(np.float32))
    results = {}
    for implementation in ("blas", "einsum"):
        attention = layers.Attention(32, 2, rngs=nnx.Rngs(0), implementation=implementation)
        attention.qkv.bias[...] = bias
        graphdef, params = nnx.split(attention)
        loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))  # noqa: E731
        results[implementation] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    (value, (grads, d_x)), (want_value, (want_grads, want_d_x)) = results["blas"], results["einsum"]
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(d_x, want_d_x, rtol=1e-4, atol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(grads["qkv"]["bias"][...]).max()) > 0.01
    # No add over the projection's [2, 10, 96] output (or its [2, 10, 3, 2, 16] view) is left,
    # whether the products run on AMX tiles (which add the output projection's bias themselves)
    # or on XLA's dots (which leave that [2, 10, 32] add: the check sees adds).
    attention = layers.Attention(32, 2, rngs=nnx.Rngs(0), implementation="blas")
    for amx in (True, False):
        monkeypatch.setitem(linear.USE_AMX, "on", amx)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: attention(x).sum()))(x))
        assert re.search(r"f32\[2,10,(96|3,2,16)\] = add ", jaxpr) is None
    assert re.search(r"f32\[2,10,32\] = add ", jaxpr) is not None


def test_packed_attention_weights_are_the_softmax_and_sum_to_one():
    rng = np.random.default_rng(5)
    qkv, _, _ = _packed_case(rng, 2, 33, 2, 16, None)
    _, weights = jax.jit(lambda x: cpu_kernel.packed_attention_forward(x, None, 0.25))(qkv)
    q, k, _ = np.transpose(np.asarray(qkv, np.float64), (2, 0, 3, 1, 4))
    scores = 0.25 * q @ np.swapaxes(k, -1, -2)
    want = np.exp(scores - scores.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_packed_attention_under_vmap_and_in_the_model():
    rng = np.random.default_rng(6)
    qkv, _, _ = _packed_case(rng, 4, 10, 2, 16, None)
    per_item = jax.vmap(lambda x: layers.packed_blas_attention(x[None], None)[0])(qkv)
    np.testing.assert_allclose(per_item, _einsum_on_packed(qkv, None), rtol=1e-5, atol=2e-6)
    attention = layers.Attention(32, 2, rngs=__import__("flax").nnx.Rngs(0),
                                 implementation="blas")
    x = jnp.asarray(rng.standard_normal((2, 10, 32)).astype(np.float32))
    hlo = jax.jit(jax.grad(lambda x: attention(x).sum())).lower(x).as_text()
    assert cpu_kernel.ATTENTION_TARGETS["forward"] in hlo
    assert cpu_kernel.ATTENTION_TARGETS["backward"] in hlo
    assert "transpose" not in hlo   # q, k and v are read from the projection in place


def test_packed_attention_rejects_bad_operands():
    qkv = jnp.ones((2, 5, 3, 2, 4))
    with pytest.raises(ValueError, match=r"mask \(3, 1, 1, 5\) does not broadcast"):
        cpu_kernel.packed_attention_forward(qkv, jnp.ones((3, 1, 1, 5), bool), 0.5)
    with pytest.raises(ValueError, match=r"qkv must be float32 \[B, L, 3, H, D\]"):
        cpu_kernel.packed_attention_forward(jnp.ones((2, 5, 2, 2, 4)), None, 0.5)
    with pytest.raises(ValueError, match=r"needs weights \[B, H, L, L\] and d_out"):
        cpu_kernel.packed_attention_backward(qkv, jnp.ones((1, 1, 2, 2)), jnp.ones((2, 5, 2, 4)),
                                             None, 0.5)
    with pytest.raises(ValueError, match=r"the bias must be float32 \(3, 2, 4\)"):
        cpu_kernel.packed_attention_forward(qkv, None, 0.5, bias=jnp.ones((3, 8)))


def test_a_compiler_refusing_march_native_gets_the_portable_build(monkeypatch, tmp_path):
    # Some compilers (e.g. on ARM) refuse -march=native: the same source then builds for the
    # baseline instruction set instead of leaving the kernels off.
    real_run = cpu_kernel.subprocess.run
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        if "-march=native" in command:
            raise cpu_kernel.subprocess.CalledProcessError(1, command, stderr=b"no native")
        return real_run(command, **kwargs)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel.subprocess, "run", run)
    library = cpu_kernel._build(cpu_kernel._compiler())
    builds = [c for c in commands if "-shared" in c]
    assert len(builds) == 1 and "-march=native" not in builds[0]
    assert library.exists() and library.parent == tmp_path / "zoo" / "kernels"



def test_a_source_that_fails_with_accepted_flags_is_an_error_not_a_portable_build(
        monkeypatch, tmp_path):
    # A portable build would silently drop the AVX-512 and AMX code (the MAE step ran ~25x
    # slower when an edit broke the native build): the compile error must surface instead.
    real_run = cpu_kernel.subprocess.run
    builds = []

    def run(command, **kwargs):
        if "-shared" in command:
            builds.append(command)
            raise cpu_kernel.subprocess.CalledProcessError(1, command, stderr=b"error: oops")
        return real_run(command, **kwargs)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel.subprocess, "run", run)
    with pytest.raises(cpu_kernel.subprocess.CalledProcessError):
        cpu_kernel._build(cpu_kernel._compiler())
    assert len(builds) == 1 and "-march=native" in builds[0]

# K (rows) around the kernel's 384-row blocks, M around its 12-row tiles, N around its 32-column
# panels (a partial last panel), threads splitting N (M <= N) or M (M > N), plus empty sums and
# a layer with no inputs.
@pytest.mark.parametrize("rows,inputs,outputs", [
    (5, 3, 2), (1, 1, 1), (384, 12, 32), (385, 13, 33), (770, 25, 17), (1000, 11, 100),
    (400, 24, 96), (3152, 40, 70), (800, 100, 40), (401, 61, 7), (0, 4, 5), (7, 0, 3)])
def test_dense_weight_gradient_matches_float64(rows, inputs, outputs):
    rng = np.random.default_rng(rows + 7 * inputs + 11 * outputs)
    x = rng.standard_normal((rows, inputs)).astype(np.float32)
    g = rng.standard_normal((rows, outputs)).astype(np.float32)
    d_kernel, d_bias = jax.jit(cpu_kernel.dense_weight_gradient)(x, g)
    assert d_kernel.shape == (inputs, outputs) and d_bias.shape == (outputs,)
    scale = np.sqrt(max(rows, 1))  # float32 sums of `rows` unit products round at ~1e-7 each
    np.testing.assert_allclose(d_kernel, x.astype(np.float64).T @ g.astype(np.float64),
                               rtol=0, atol=2e-6 * scale * 8)
    np.testing.assert_allclose(d_bias, g.astype(np.float64).sum(0), rtol=0,
                               atol=2e-6 * scale * 8)


def test_dense_layers_take_the_weight_gradient_kernel_and_agree_with_xla(monkeypatch):
    from zoo.models import linear as linear_module
    # Where the CPU has AMX the dense layers' products run there instead (test_amx_matmul.py).
    monkeypatch.setitem(linear_module.USE_AMX, "on", False)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(keys[0], (4, 97, 40))
    w = jax.random.normal(keys[1], (40, 70)) / 6
    b = jax.random.normal(keys[2], (70,))
    g = jax.random.normal(keys[3], (4, 97, 70))

    def grads(x, w, b):
        return jax.grad(lambda *a: jnp.sum(g * linear_module.linear(*a)), argnums=(0, 1, 2))(
            x, w, b)

    hlo = jax.jit(grads).lower(x, w, b).as_text()
    assert cpu_kernel.DENSE_GRADIENT_TARGET in hlo
    # Weights past KERNEL_MAX_WEIGHTS stay on XLA's product (the kernel lost on BERT's).
    big = jax.ShapeDtypeStruct((1024, linear_module.KERNEL_MAX_WEIGHTS // 1024 + 1), jnp.float32)
    assert not linear_module._kernel_takes(x, g, big)
    assert linear_module._kernel_takes(x, g, w)
    ours = jax.jit(grads)(x, w, b)
    monkeypatch.setattr(linear_module, "_kernel_takes", lambda *args: False)
    retraced = jax.jit(lambda *args: grads(*args))  # a new function: jit's cache keeps traces
    assert cpu_kernel.DENSE_GRADIENT_TARGET not in retraced.lower(x, w, b).as_text()
    xla = retraced(x, w, b)
    for name, a, e in zip(("x", "kernel", "bias"), ours, xla):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4, err_msg=name)


def test_dense_weight_gradient_rejects_bad_operands():
    with pytest.raises(ValueError, match="dense_weight_gradient: float32 x"):
        cpu_kernel.dense_weight_gradient(jnp.ones((4, 3)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="dense_weight_gradient: float32 x"):
        cpu_kernel.dense_weight_gradient(jnp.ones((4, 3), jnp.bfloat16), jnp.ones((4, 2)))
