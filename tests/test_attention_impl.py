"""model.attention: every implementation computes the same attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import config as config_lib
from zoo.models import layers
from zoo.models.backward import backward_mode
from zoo.models.text import CrossAttention


def reference_attention(q, k, v, mask):
    """Plain numpy softmax attention over [B, L, H, D] / [B, S, H, D] in float64."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(np.asarray(mask), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", weights, v)


@pytest.mark.parametrize("masked", [False, True])
def test_einsum_blas_and_fused_match_a_numpy_reference(masked):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((5, 5), bool))[None, None] if masked else None
    want = reference_attention(q, k, v, mask)
    heads_major = [jnp.swapaxes(t, 1, 2) for t in (q, k, v)]
    einsum = jnp.swapaxes(layers.einsum_attention(*heads_major, mask), 1, 2)
    blas = jnp.swapaxes(layers.blas_attention(*heads_major, mask), 1, 2)
    fused = layers.fused_attention(q, k, v, mask)
    np.testing.assert_allclose(einsum, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blas, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused, want, rtol=1e-5, atol=1e-5)


def test_auto_resolves_to_blas_or_einsum_on_cpu_and_unknown_names_fail():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_attention("auto", jnp.float32, False) == "blas"
    assert layers.resolve_attention("auto", jnp.float32, True) == "blas"
    assert layers.resolve_attention("auto", jnp.bfloat16, False) == "einsum"
    assert layers.resolve_attention("fused", jnp.float32, True) == "fused"
    with backward_mode("autodiff"):  # forward-mode AD needs the plain einsum
        assert layers.resolve_attention("auto", jnp.float32, False) == "einsum"
    with jax.set_mesh(jax.make_mesh((8,), ("data",))):  # a custom call has no sharding rule
        assert layers.resolve_attention("auto", jnp.float32, False) == "einsum"
        with pytest.raises(ValueError, match="'blas' cannot run here: the mesh has 8 devices"):
            layers.resolve_attention("blas", jnp.float32, False)
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert layers.resolve_attention("auto", jnp.float32, False) == "blas"
    with pytest.raises(ValueError, match="'blas' cannot run here: compute dtype is bfloat16"):
        layers.resolve_attention("blas", jnp.bfloat16, False)
    with pytest.raises(ValueError, match="model.attention: unknown 'flash'"):
        layers.resolve_attention("flash", jnp.float32, False)
    with pytest.raises(ValueError, match="model.attention: unknown 'flash'"):
        config_lib.validate(config_lib.Config(model=config_lib.ModelConfig(attention="flash")))
    with pytest.raises(ValueError, match="model.attention: unknown 'flash'"):
        layers.set_attention(layers.Attention(8, 2, rngs=nnx.Rngs(0)), "flash")
    # The config, the layers and the bench CLI offer the same names.
    assert config_lib.ATTENTIONS == layers.ATTENTION_IMPLEMENTATIONS
    from zoo.cli import make_parser
    assert make_parser().parse_args(["bench", "mae", "--attention", "blas"]).attention == "blas"


def test_self_and_cross_attention_modules_agree_across_implementations():
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    memory = jax.random.normal(jax.random.key(2), (2, 4, 16))
    causal = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    cross_mask = jnp.array([True, True, True, False])[None, None, None, :]
    attn = layers.Attention(16, 4, rngs=nnx.Rngs(0), implementation="einsum")
    cross = CrossAttention(16, 4, rngs=nnx.Rngs(0), implementation="einsum")
    outs = {}
    for how in ("einsum", "blas", "fused"):
        layers.set_attention(attn, how)
        layers.set_attention(cross, how)
        assert attn.attention_implementation == cross.attention_implementation == how
        outs[how] = (attn(x), attn(x, causal), cross(x, memory, cross_mask))
    for how in ("blas", "fused"):
        for einsum, other in zip(outs["einsum"], outs[how]):
            np.testing.assert_allclose(einsum, other, rtol=1e-5, atol=1e-5)


def test_the_config_reaches_every_attention_layer_scanned_or_not():
    from zoo.models import get
    for scan in (False, True):
        vit = get("vit", size="test", grid=(2, 2), patch_dim=12, rngs=nnx.Rngs(0), scan=scan)
        layers.set_attention(vit, "fused")
        found = [m.attention_implementation for _, m in nnx.iter_graph(vit)
                 if isinstance(m, layers.Attention)]
        assert found and set(found) == {"fused"}


def test_odd_lengths_padded_for_cudnn_give_the_unpadded_result_and_gradients():
    """The padding fused_attention adds for cuDNN (odd lengths), run through XLA's kernel: the
    padded key is masked out and the padded query row dropped, in the values and in the
    gradients of q, k and v."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32) for _ in range(2))
    cotangent = jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32)
    out = layers._padded_attention(q, k, v, implementation="xla")
    assert out.shape == q.shape
    np.testing.assert_allclose(out, reference_attention(q, k, v, None), rtol=1e-5, atol=1e-5)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent)
    padded = jax.grad(loss(lambda *a: layers._padded_attention(*a, implementation="xla")),
                      argnums=(0, 1, 2))(q, k, v)
    plain = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(padded, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cudnn_gets_only_unmasked_16_bit_attention_with_a_small_head():
    def arrays(head=64, dtype=jnp.bfloat16, key_head=None):
        return (jnp.zeros((2, 9, 4, head), dtype), jnp.zeros((2, 9, 4, key_head or head), dtype))
    assert layers.cudnn_takes(*arrays(), None)
    assert layers.cudnn_takes(*arrays(dtype=jnp.float16), None)
    assert not layers.cudnn_takes(*arrays(), jnp.ones((1, 1, 9, 9), bool))   # masked
    assert not layers.cudnn_takes(*arrays(dtype=jnp.float32), None)
    assert not layers.cudnn_takes(*arrays(head=60), None)
    assert not layers.cudnn_takes(*arrays(head=256), None)
    assert not layers.cudnn_takes(*arrays(key_head=32), None)
