"""Tests for the ViT backbone, its position embeddings and parameter metadata.

Expected values come from independent formulas written here (MAE's util/pos_embed.py convention,
described in words), not from the code under test.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import objectives
import zoo.models
from zoo.config import DTYPES, ModelConfig
from zoo.models.posemb import sincos_2d

GRID = (2, 3)
PATCH_DIM = 12
L = GRID[0] * GRID[1]


def ref_sincos_2d(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Token t = r * grid_w + c gets [sin(c w_i), cos(c w_i), sin(r w_i), cos(r w_i)]_i with
    w_i = 1 / 10000 ** (2 i / (width / 2)), i < width / 4: the first half of the channels
    encodes the COLUMN, the second half the ROW (MAE's meshgrid puts w first)."""
    d_half = width // 2
    out = np.zeros((grid_h * grid_w, width))
    for r in range(grid_h):
        for c in range(grid_w):
            for i in range(d_half // 2):
                omega = 1.0 / 10000 ** (2 * i / d_half)
                out[r * grid_w + c, i] = np.sin(c * omega)
                out[r * grid_w + c, d_half // 2 + i] = np.cos(c * omega)
                out[r * grid_w + c, d_half + i] = np.sin(r * omega)
                out[r * grid_w + c, d_half + d_half // 2 + i] = np.cos(r * omega)
    return out


def _vit(**kw):
    kw = {"size": "test", "grid": GRID, "patch_dim": PATCH_DIM, "rngs": nnx.Rngs(0), **kw}
    return zoo.models.get("vit", **kw)


def _forward(model, x):
    """One compiled forward pass (cheaper on CPU than dispatching every op eagerly)."""
    return jax.jit(lambda x: model(x))(x)


def _patches(batch=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, L, PATCH_DIM)),
                       jnp.float32)


# ---------------------------------------------------------------------------------------------
# sin-cos position embeddings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,grid_h,grid_w", [(16, 3, 5), (32, 4, 4), (8, 5, 2), (64, 1, 7)])
def test_sincos_2d_matches_independent_formula(width, grid_h, grid_w):
    table = sincos_2d(width, grid_h, grid_w)
    assert table.shape == (grid_h * grid_w, width)
    np.testing.assert_allclose(table, ref_sincos_2d(width, grid_h, grid_w), atol=1e-6)


def test_sincos_2d_hand_values():
    width, gh, gw = 8, 2, 3          # halves of 4 channels: [sin, sin, cos, cos] per axis
    t = np.asarray(sincos_2d(width, gh, gw), np.float64)
    np.testing.assert_allclose(t[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    # Token 1 = (row 0, col 1): first half sees column 1, second half row 0.
    # omegas for half-width 4: 1/10000**(0/4)=1, 1/10000**(2/4)=0.01.
    np.testing.assert_allclose(t[1], [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01),
                                      0, 0, 1, 1], atol=1e-6)
    # Token 3 = (row 1, col 0).
    np.testing.assert_allclose(t[3], [0, 0, 1, 1, np.sin(1), np.sin(0.01), np.cos(1),
                                      np.cos(0.01)], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# ViT position embedding kinds and cls token
# ---------------------------------------------------------------------------------------------

def test_vit_sincos_embed_is_linear_plus_table():
    vit = _vit(posemb="sincos2d")
    x = _patches()
    kernel = np.asarray(vit.patch_embed.kernel[...], np.float64)
    bias = np.asarray(vit.patch_embed.bias[...], np.float64)
    expected = np.asarray(x, np.float64) @ kernel + bias + ref_sincos_2d(vit.width, *GRID)
    np.testing.assert_allclose(np.asarray(vit.embed(x)), expected, atol=1e-5)
    # sincos is fixed: not a parameter.
    assert "posemb" not in nnx.state(vit, nnx.Param)


def test_vit_learned_posemb_is_a_param_and_is_added():
    vit = _vit(posemb="learn")
    table = vit.posemb
    assert isinstance(table, nnx.Param) and table.shape == (L, vit.width)
    vit.posemb[...] = jnp.full((L, vit.width), 3.0)
    x = _patches()
    kernel = np.asarray(vit.patch_embed.kernel[...], np.float64)
    bias = np.asarray(vit.patch_embed.bias[...], np.float64)
    expected = np.asarray(x, np.float64) @ kernel + bias + 3.0
    np.testing.assert_allclose(np.asarray(vit.embed(x)), expected, atol=1e-5)


def test_posemb_none_is_permutation_equivariant_sincos_is_not():
    perm = np.array([4, 0, 5, 2, 1, 3])
    x = _patches()
    both = jnp.concatenate([x, x[:, perm]])        # one forward call for both orders
    none = _vit(posemb="none")
    assert none.position_embeddings() is None
    out, out_perm = np.split(np.asarray(_forward(none, both)), 2)
    np.testing.assert_allclose(out_perm[:, 1:], out[:, 1:][:, perm], atol=1e-5)
    np.testing.assert_allclose(out_perm[:, 0], out[:, 0], atol=1e-5)   # cls is order-free
    sincos = _vit(posemb="sincos2d")
    out, out_perm = np.split(np.asarray(_forward(sincos, both)), 2)
    assert np.abs(out_perm[:, 1:] - out[:, 1:][:, perm]).max() > 1e-2


@pytest.mark.parametrize("cls_token,length", [(True, L + 1), (False, L)])
def test_cls_token_changes_sequence_length(cls_token, length):
    vit = _vit(cls_token=cls_token)
    tokens, features = jax.jit(lambda x: (vit(x), vit.features(x)))(_patches())
    assert tokens.shape == (2, length, vit.width)
    assert features.shape == (2, vit.width)
    assert ("cls" in nnx.state(vit, nnx.Param)) == cls_token


def test_size_and_overrides():
    vit = _vit(size="test", depth=1, mlp_dim=128)
    size = zoo.models.SIZES["test"]
    assert (vit.width, vit.depth, vit.mlp_dim) == (size.width, 1, 128)
    assert vit.patch_embed.kernel.shape == (PATCH_DIM, size.width)
    assert len(vit.encoder.blocks) == 1
    assert vit.encoder.blocks[0].mlp.fc1.kernel.shape == (size.width, 128)
    # MAE/timm blocks use LayerNorm(eps=1e-6), not flax's default 1e-5.
    assert vit.encoder.norm.epsilon == 1e-6 and vit.encoder.blocks[0].norm1.epsilon == 1e-6


@pytest.mark.parametrize("kwargs,bad,allowed", [
    ({"posemb": "rope"}, "rope", ("sincos2d", "learn", "none")),
    ({"size": "XXL"}, "XXL", ("test", "micro", "Ti", "S", "B", "L")),
])
def test_unknown_options_list_allowed(kwargs, bad, allowed):
    with pytest.raises(ValueError) as err:
        _vit(**kwargs)
    msg = str(err.value)
    assert bad in msg
    for name in allowed:
        assert repr(name) in msg


def test_unknown_model_name_lists_allowed():
    with pytest.raises(ValueError, match="'vit'") as err:
        zoo.models.get("resnet", grid=GRID, patch_dim=PATCH_DIM, rngs=nnx.Rngs(0))
    assert "resnet" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Logical axis metadata and dtypes
# ---------------------------------------------------------------------------------------------

def _params(module):
    return list(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def _check_axes(module):
    params = _params(module)
    assert params
    for path, param in params:
        axes = param.get_metadata().get("out_sharding")
        assert isinstance(axes, tuple), (path, axes)
        assert len(axes) == param.ndim, (path, axes, param.shape)
        assert all(a is None or isinstance(a, str) for a in axes), (path, axes)
    return {"/".join(map(str, path)): param.get_metadata()["out_sharding"]
            for path, param in params}


def test_vit_params_carry_logical_axes():
    axes = _check_axes(_vit(posemb="learn", cls_token=True))
    assert axes["posemb"][-1] == "embed" and axes["cls"][-1] == "embed"
    assert axes["patch_embed/kernel"] == ("patch", "embed")
    block = "encoder/blocks/0/"
    for name in ("attn/qkv/kernel", "attn/proj/kernel"):
        assert set(axes[block + name]) == {"embed", "heads"}, name
    assert axes[block + "mlp/fc1/kernel"] == ("embed", "mlp")
    assert axes[block + "mlp/fc2/kernel"] == ("mlp", "embed")
    assert axes[block + "norm1/scale"] == ("embed",)


def test_mae_decoder_params_carry_logical_axes():
    vit = _vit()
    with nnx.use_eager_sharding(False):   # the heads' mesh-free build is tested in test_mae
        heads = objectives.get("mae", patch_size=2, decoder_width=32, decoder_depth=1,
                               decoder_heads=2).make_heads(vit, rngs=nnx.Rngs(1))
    axes = _check_axes(heads)
    assert axes["mask_token"][-1] == "embed"
    for name, kernel_axes in axes.items():
        if name.endswith("mlp/fc1/kernel") or name.endswith("mlp/fc2/kernel"):
            assert set(kernel_axes) == {"embed", "mlp"}, name
        if name.endswith("qkv/kernel") or name.endswith("proj/kernel"):
            assert set(kernel_axes) == {"embed", "heads"}, name
    assert "embed" in axes["pred/kernel"]


def test_bfloat16_compute_keeps_float32_params():
    dtype = DTYPES[ModelConfig(dtype="bfloat16").dtype]
    assert dtype == jnp.bfloat16
    vit = _vit(dtype=dtype)
    with nnx.use_eager_sharding(False):
        heads = objectives.get("mae", patch_size=2, decoder_width=32, decoder_depth=1,
                               decoder_heads=2).make_heads(vit, rngs=nnx.Rngs(1), dtype=dtype)
    for module in (vit, heads):
        for path, param in _params(module):
            assert param.dtype == jnp.float32, path
    ids_restore = jnp.tile(jnp.arange(L), (2, 1))

    def run(x):
        latent = vit(x)
        # cls + 2 kept tokens through the decoder.
        return vit.embed(x), latent, heads(latent[:, :3], ids_restore), vit.features(x)
    embedded, latent, out, features = jax.jit(run)(_patches())
    assert embedded.dtype == jnp.bfloat16
    assert latent.dtype == jnp.bfloat16
    assert out.dtype == jnp.bfloat16 and out.shape == (2, L, PATCH_DIM)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert features.dtype == jnp.float32


def test_attention_matches_jax_reference_attention():
    # Our heads-major attention must equal jax.nn.dot_product_attention on the same q, k, v.
    from zoo.models.layers import Attention
    width, heads = 32, 4
    attn = Attention(width, heads, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (2, 7, width))
    qkv = attn.qkv(x).reshape(2, 7, 3, heads, width // heads)
    causal = jnp.tril(jnp.ones((7, 7), bool))
    for mask in (None, causal):
        expected = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                                mask=mask)
        expected = attn.proj(expected.reshape(2, 7, width))
        np.testing.assert_allclose(attn(x, mask), expected, atol=1e-5, rtol=1e-5)
    # The causal mask changes the first token's output (it may only see itself).
    assert not np.allclose(attn(x, causal)[:, 0], attn(x)[:, 0])


def test_gelu_is_exact_erf_gelu_in_value_and_gradient():
    """zoo's GELU against float64 x * Phi(x) and its derivative Phi(x) + x * phi(x) (scipy),
    including large |x| where the tanh approximation is off by ~5e-4."""
    from scipy.special import erf

    from zoo.models.layers import gelu
    x = np.concatenate([np.linspace(-8, 8, 4001), [-30.0, -10.0, 0.0, 10.0, 30.0]])
    cdf = 0.5 * (1 + erf(x / np.sqrt(2)))
    pdf = np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi)
    xs = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(np.asarray(gelu(xs)), x * cdf, atol=2e-6, rtol=1e-6)
    grad = jax.vmap(jax.grad(gelu))(xs)
    np.testing.assert_allclose(np.asarray(grad), cdf + x * pdf, atol=2e-6, rtol=1e-5)
    tanh = np.asarray(jax.nn.gelu(xs, approximate=True))
    assert np.max(np.abs(tanh - x * cdf)) > 1e-4  # the test tells exact from the tanh form


@pytest.mark.parametrize("depth,scan", [(2, False), (2, True), (0, False)])
def test_transformer_stack_rows_are_the_gathered_full_output(depth, scan):
    """``rows=`` (the last block's projection and MLP on some tokens only) must give exactly
    those tokens' rows of the full output, scanned or not, and with no blocks at all."""
    from zoo.models.layers import TransformerStack
    stack = TransformerStack(16, depth, 2, 32, rngs=nnx.Rngs(0), scan=scan)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 16))
    rows = jnp.array([[6, 0, 3], [1, 1, 5], [2, 4, 0]])
    full = np.asarray(stack(x))
    picked = np.asarray(stack(x, rows=rows))
    assert picked.shape == (3, 3, 16)
    np.testing.assert_allclose(picked, np.take_along_axis(full, np.asarray(rows)[..., None], 1),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows and return_layers"):
        stack(x, rows=rows, return_layers=True)
