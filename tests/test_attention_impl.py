"""model.attention: every implementation computes the same attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import config as config_lib
from zoo.models import layers
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
def test_einsum_and_fused_match_a_numpy_reference(masked):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((5, 5), bool))[None, None] if masked else None
    want = reference_attention(q, k, v, mask)
    heads_major = [jnp.swapaxes(t, 1, 2) for t in (q, k, v)]
    einsum = jnp.swapaxes(layers.einsum_attention(*heads_major, mask), 1, 2)
    fused = layers.fused_attention(q, k, v, mask)
    np.testing.assert_allclose(einsum, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused, want, rtol=1e-5, atol=1e-5)


def test_auto_resolves_to_einsum_on_cpu_and_unknown_names_fail():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_attention("auto", jnp.bfloat16, False) == "einsum"
    assert layers.resolve_attention("fused", jnp.float32, True) == "fused"
    with pytest.raises(ValueError, match="model.attention: unknown 'flash'"):
        layers.resolve_attention("flash", jnp.float32, False)
    with pytest.raises(ValueError, match="model.attention: unknown 'flash'"):
        config_lib.validate(config_lib.Config(model=config_lib.ModelConfig(attention="flash")))


def test_self_and_cross_attention_modules_agree_across_implementations():
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    memory = jax.random.normal(jax.random.key(2), (2, 4, 16))
    causal = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    cross_mask = jnp.array([True, True, True, False])[None, None, None, :]
    attn = layers.Attention(16, 4, rngs=nnx.Rngs(0), implementation="einsum")
    cross = CrossAttention(16, 4, rngs=nnx.Rngs(0), implementation="einsum")
    outs = {}
    for how in ("einsum", "fused"):
        layers.set_attention(attn, how)
        layers.set_attention(cross, how)
        assert attn.attention_implementation == cross.attention_implementation == how
        outs[how] = (attn(x), attn(x, causal), cross(x, memory, cross_mask))
    for einsum, fused in zip(outs["einsum"], outs["fused"]):
        np.testing.assert_allclose(einsum, fused, rtol=1e-5, atol=1e-5)


def test_the_config_reaches_every_attention_layer_scanned_or_not():
    from zoo.models import get
    for scan in (False, True):
        vit = get("vit", size="test", grid=(2, 2), patch_dim=12, rngs=nnx.Rngs(0), scan=scan)
        layers.set_attention(vit, "fused")
        found = [m.attention_implementation for _, m in nnx.iter_graph(vit)
                 if isinstance(m, layers.Attention)]
        assert found and set(found) == {"fused"}


def test_odd_lengths_padded_for_cudnn_give_the_unpadded_result():
    """The padding fused_attention adds for cuDNN (odd lengths), run through XLA's kernel."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 7, 3, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 5, 3, 8)).astype(np.float32) for _ in range(2))
    out = layers._cudnn_attention(q, k, v, None, implementation="xla")
    assert out.shape == q.shape
    np.testing.assert_allclose(out, reference_attention(q, k, v, None), rtol=1e-5, atol=1e-5)

