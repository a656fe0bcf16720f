"""cpu_kernel.amx_matmul: float32 products on Intel AMX's bfloat16 tiles, and the dense layers
that use it. Every test needs a CPU with AMX (Sapphire Rapids or later); elsewhere the module is
skipped (the dense layers then keep XLA's float32 dots, which the rest of the suite covers).
Where /proc/cpuinfo lists AMX, the kernel must be available: a build that lost it fails."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import cpu_kernel
from zoo.models import linear as linear_module



def _cpu_lists_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags)


pytestmark = pytest.mark.skipif(not _cpu_lists_amx(), reason="the CPU has no AMX tiles")


def test_a_cpu_with_amx_gets_the_amx_kernel():
    # Not a skip: where the CPU has AMX, a kernel built without it (or refused by Linux) is a
    # failure the suite must show.
    assert cpu_kernel.amx_available(), cpu_kernel.unavailable_reason()


def operands(seed, m, k, n, transpose_a, transpose_b, bias=False):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if transpose_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32) if bias else None
    return a, b, c


def float64_product(a, b, c, transpose_a, transpose_b):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    out = (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64)
    return out if c is None else out + c


def amx(a, b, c=None, *, transpose_a=False, transpose_b=False, passes=6):
    fn = jax.jit(lambda a, b, c: cpu_kernel.amx_matmul(
        a, b, c, transpose_a=transpose_a, transpose_b=transpose_b, passes=passes))
    return np.asarray(fn(a, b, c))


def relative_error(got, want):
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


# Shapes around the kernel's 16-row/column tiles, 32-row/column blocks, 32-wide chunks of K and
# 256-wide slices of K, and column groups that split B's slice (N > ~800 at 6 passes).
SHAPES = [(1, 1, 1), (5, 3, 2), (16, 32, 16), (33, 31, 17), (70, 300, 50), (130, 257, 96),
          (64, 520, 33), (40, 64, 1700)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (False, True), (True, False),
                                                     (True, True)])
def test_six_passes_are_as_accurate_as_a_float32_product(m, k, n, transpose_a, transpose_b):
    a, b, c = operands(m * 7 + k * 3 + n, m, k, n, transpose_a, transpose_b, bias=True)
    want = float64_product(a, b, c, transpose_a, transpose_b)
    got = amx(a, b, c, transpose_a=transpose_a, transpose_b=transpose_b)
    assert got.shape == (m, n)
    # A float32 product's own error on the same operands (XLA's dot, float32 accumulation).
    a32, b32 = (a.T if transpose_a else a), (b.T if transpose_b else b)
    xla = np.asarray(jax.jit(lambda a, b, c: a @ b + c)(a32, b32, c))
    bound = max(relative_error(xla, want), 2.0 ** -24)
    assert relative_error(got, want) <= 2 * bound


def test_integer_operands_come_out_exact():
    # Values of 8 significant bits are their own first bfloat16 piece, so every product and
    # (under 2^24) every sum is exact: any layout or ordering slip shows as an exact mismatch.
    rng = np.random.default_rng(0)
    for transpose_a, transpose_b in [(False, False), (False, True), (True, False)]:
        a = rng.integers(-100, 100, (300, 45) if transpose_a else (45, 300)).astype(np.float32)
        b = rng.integers(-100, 100, (37, 300) if transpose_b else (300, 37)).astype(np.float32)
        want = float64_product(a, b, None, transpose_a, transpose_b)
        for passes in cpu_kernel.AMX_PASSES:
            got = amx(a, b, transpose_a=transpose_a, transpose_b=transpose_b, passes=passes)
            np.testing.assert_array_equal(got, want, err_msg=f"{passes} passes")


def test_fewer_passes_are_the_documented_bfloat16_splits():
    a, b, _ = operands(1, 200, 300, 100, False, False)
    want = float64_product(a, b, None, False, False)
    errors = {p: relative_error(amx(a, b, passes=p), want) for p in cpu_kernel.AMX_PASSES}
    # 1 pass: one bfloat16 rounding per operand (~2^-9 relative per product); 3 passes drop the
    # a1 b1, a0 b2, a2 b0 terms (~2^-16); 6 passes only terms ~2^-24.
    assert 2.0 ** -14 < errors[1] < 2.0 ** -6
    assert 2.0 ** -22 < errors[3] < 2.0 ** -14
    assert errors[6] < 2.0 ** -20


def test_the_result_does_not_depend_on_the_call():
    a, b, c = operands(2, 300, 700, 900, True, False, bias=True)
    first = amx(a, b, c, transpose_a=True)
    np.testing.assert_array_equal(amx(a, b, c, transpose_a=True), first)


def test_empty_sums_give_the_bias_and_empty_sides_give_empty_results():
    c = np.arange(3, dtype=np.float32)
    got = amx(np.ones((4, 0), np.float32), np.ones((0, 3), np.float32), c)
    np.testing.assert_array_equal(got, np.broadcast_to(c, (4, 3)))
    assert amx(np.ones((0, 5), np.float32), np.ones((5, 3), np.float32)).shape == (0, 3)


def test_non_finite_inputs_give_non_finite_outputs():
    a = np.ones((4, 8), np.float32)
    a[1, 2] = np.inf
    got = amx(a, np.ones((8, 3), np.float32))
    assert not np.isfinite(got[1]).any() and np.isfinite(np.delete(got, 1, axis=0)).all()


def test_bad_operands_are_refused_before_running():
    with pytest.raises(ValueError, match="passes must be one of"):
        cpu_kernel.amx_matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), passes=2)
    with pytest.raises(ValueError, match="do not fit together"):
        cpu_kernel.amx_matmul(jnp.ones((2, 3)), jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="do not fit together"):
        cpu_kernel.amx_matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((5,)))
    with pytest.raises(ValueError, match="float32 matrices"):
        cpu_kernel.amx_matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4)))


def _dense_grads(x, w, b, g, precision=None):
    def loss(x, w, b):
        return jnp.sum(g * linear_module.linear(x, w, b, precision))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def test_dense_layers_run_on_amx_and_agree_with_xla(monkeypatch):
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    x = jax.random.normal(keys[0], (4, 97, 40))
    w = jax.random.normal(keys[1], (40, 70)) / 6
    b = jax.random.normal(keys[2], (70,))
    g = jax.random.normal(keys[3], (4, 97, 70))
    monkeypatch.setitem(linear_module.USE_AMX, "on", True)
    fn = _dense_grads(x, w, b, g)
    hlo = fn.lower(x, w, b).as_text()
    # forward, input gradient and weight gradient: three products on the tiles
    assert hlo.count(cpu_kernel.AMX_MATMUL_TARGET) >= 3
    ours = fn(x, w, b)
    monkeypatch.setitem(linear_module.USE_AMX, "on", False)
    xla_fn = _dense_grads(x, w, b, g)
    assert cpu_kernel.AMX_MATMUL_TARGET not in xla_fn.lower(x, w, b).as_text()
    xla = xla_fn(x, w, b)
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5)
    for name, a, e in zip(("x", "kernel", "bias"), ours[1], xla[1]):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4, err_msg=name)


def test_precision_high_asks_for_three_passes(monkeypatch):
    monkeypatch.setitem(linear_module.USE_AMX, "on", True)
    x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
    for precision, passes in [(None, 6), (jax.lax.Precision.HIGHEST, 6),
                              (jax.lax.Precision.HIGH, 3)]:
        hlo = jax.jit(lambda x, w: linear_module.linear(x, w, None, precision)).lower(
            x, w).as_text()
        assert cpu_kernel.AMX_MATMUL_TARGET in hlo
        assert f"passes = {passes}" in hlo, (precision, hlo[-2000:])


def test_mae_training_on_amx_follows_xla_float32(monkeypatch):
    """Three AdamW steps of a small MAE (micro ViT, 64x64 images) from the same state: the
    losses on AMX tiles and on XLA's float32 dots agree to float32 rounding, step by step."""
    from flax import nnx

    from zoo import bench
    from zoo.train import make_train_step

    losses = {}
    for amx in (True, False):
        monkeypatch.setitem(linear_module.USE_AMX, "on", amx)
        config, experiment, state, _, batches = bench.mae_bench_setup(
            image_size=64, devices=jax.devices()[:1], size="micro", batch_size=8,
            decoder_width=64, decoder_depth=2, decoder_heads=4)
        with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
            step = make_train_step(experiment)   # traced now, with this USE_AMX
            hlo = step.lower(state, batches[0]).as_text()
            assert (cpu_kernel.AMX_MATMUL_TARGET in hlo) == amx
            losses[amx] = []
            for i in range(3):
                state, metrics = step(state, batches[i % 2])
                losses[amx].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-5)
    assert losses[True][0] != losses[True][2]   # the steps did update the model
