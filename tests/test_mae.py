"""Tests for the MAE objective against the published algorithm (He et al. 2021, models_mae.py).

Every expected value here is derived independently of the code under test: hand-built images,
hand-computed losses, or slow numpy re-implementations written from the paper's description.
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import objectives
import zoo.models
from objectives import patchify, unpatchify
from objectives.mae import MAE, MaeDecoder, mae_loss, masking_indices, random_masking

# A tiny configuration shared by the end-to-end tests: 8x8x3 images, 2x2 patches -> 4x4 grid.
IMAGE = (8, 8, 3)
PATCH = 2
GRID = (IMAGE[0] // PATCH, IMAGE[1] // PATCH)
L = GRID[0] * GRID[1]
PATCH_DIM = PATCH * PATCH * IMAGE[2]
BATCH = 2


def ref_sincos_2d(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE/MoCo-v3 2-D sin-cos table written element by element (float64).

    Channel layout per token at (row r, col c), with D4 = width // 4 and
    omega_i = 1 / 10000 ** (2 i / (width // 2)):
    [sin(c w_i) | cos(c w_i) | sin(r w_i) | cos(r w_i)], i in [0, D4).
    """
    d4 = width // 4
    out = np.zeros((grid_h * grid_w, width))
    for r in range(grid_h):
        for c in range(grid_w):
            t = r * grid_w + c
            for i in range(d4):
                omega = 1.0 / 10000 ** (2 * i / (width // 2))
                out[t, i] = np.sin(c * omega)
                out[t, d4 + i] = np.cos(c * omega)
                out[t, 2 * d4 + i] = np.sin(r * omega)
                out[t, 3 * d4 + i] = np.cos(r * omega)
    return out


# ---------------------------------------------------------------------------------------------
# patchify / unpatchify
# ---------------------------------------------------------------------------------------------

def _coded_image(b=2, h=4, w=6, c=3):
    """Pixel value encodes (batch, y, x, channel) as b*1000 + y*100 + x*10 + c."""
    bb, yy, xx, cc = np.meshgrid(np.arange(b), np.arange(h), np.arange(w), np.arange(c),
                                 indexing="ij")
    return (bb * 1000 + yy * 100 + xx * 10 + cc).astype(np.float32)


def test_patchify_exact_positions():
    images = _coded_image()                      # [2, 4, 6, 3], p=2 -> grid 2x3, 6 patches of 12
    patches = np.asarray(patchify(jnp.asarray(images), 2))
    assert patches.shape == (2, 6, 12)
    # Hand-picked elements: patch index = row-major over the grid, element = (r, s, c).
    assert patches[0, 0, 0] == 0           # patch (0,0), pixel (0,0), channel 0
    assert patches[0, 0, 1] == 1           # same pixel, channel 1
    assert patches[0, 0, 3] == 10          # pixel (0,1) channel 0: channel is fastest
    assert patches[0, 0, 6] == 100         # pixel (1,0) channel 0: then column, then row
    assert patches[0, 1, 0] == 20          # patch (0,1) starts at x=2
    assert patches[0, 3, 0] == 200         # patch (1,0) starts at y=2 (3 patches per row)
    assert patches[0, 3, 5] == 212         # patch (1,0), r=0, s=1, c=2 -> y=2, x=1
    assert patches[1, 5, 11] == 1000 + 300 + 50 + 2   # last patch, last element
    # Exhaustive check with explicit loops.
    p = 2
    for b in range(2):
        for i in range(2):
            for j in range(3):
                for r in range(p):
                    for s in range(p):
                        for c in range(3):
                            assert patches[b, i * 3 + j, (r * p + s) * 3 + c] == \
                                images[b, i * p + r, j * p + s, c]


def test_patchify_matches_reference_nchw_layout():
    """MAE's patchify on an NCHW tensor: reshape (N,C,h,p,w,q), einsum nchpwq->nhwpqc."""
    images = np.random.default_rng(0).standard_normal((2, 6, 4, 5)).astype(np.float32)
    p = 2
    nchw = images.transpose(0, 3, 1, 2)
    n, c, hh, ww = nchw.shape
    x = nchw.reshape(n, c, hh // p, p, ww // p, p)
    x = np.einsum("nchpwq->nhwpqc", x).reshape(n, (hh // p) * (ww // p), p * p * c)
    np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(images), p)), x)


def test_unpatchify_inverts_patchify():
    images = _coded_image(1, 6, 4, 2)
    patches = patchify(jnp.asarray(images), 2)
    np.testing.assert_array_equal(np.asarray(unpatchify(patches, 2, (3, 2))), images)
    rand = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 8)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(patchify(unpatchify(rand, 2, (3, 2)), 2)),
                                  np.asarray(rand))


# ---------------------------------------------------------------------------------------------
# random masking
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,ratio", [(16, 0.75), (10, 0.75), (7, 0.5), (49, 0.75),
                                          (5, 0.3), (10, 0.7), (3, 0.4)])
def test_random_masking_matches_argsort_of_noise(length, ratio):
    batch, dim = 3, 2
    rng = jax.random.PRNGKey(length)     # raw key: recomputing the noise below reuses it
    # Channel 0 holds the patch position, so x_kept also reveals which positions were kept.
    x = np.random.default_rng(0).standard_normal((batch, length, dim)).astype(np.float32)
    x[..., 0] = np.arange(length)
    x_kept, mask, ids_restore = jax.jit(random_masking, static_argnums=2)(
        rng, jnp.asarray(x), ratio)

    len_keep = int(length * (1 - ratio))   # the reference's rounding (floor), not round()
    assert x_kept.shape == (batch, len_keep, dim)
    assert mask.shape == ids_restore.shape == (batch, length)

    noise = np.asarray(jax.random.uniform(rng, (batch, length)))
    order = np.argsort(noise, axis=1, kind="stable")
    x_kept, mask, ids_restore = map(np.asarray, (x_kept, mask, ids_restore))
    for b in range(batch):
        keep = order[b, :len_keep]
        # Kept in ascending-noise order (the order MAE's encoder sees them in).
        np.testing.assert_array_equal(x_kept[b, :, 0], keep)
        # Kept noise ascends and is below every removed patch's noise.
        kept_noise = noise[b, x_kept[b, :, 0].astype(int)]
        assert np.all(np.diff(kept_noise) >= 0)
        assert kept_noise.max() <= noise[b, mask[b] == 1].min()
        # ids_restore is the inverse permutation of argsort(noise).
        np.testing.assert_array_equal(ids_restore[b][order[b]], np.arange(length))
        np.testing.assert_array_equal(order[b][ids_restore[b]], np.arange(length))
        expected_mask = np.ones(length)
        expected_mask[keep] = 0
        np.testing.assert_array_equal(mask[b], expected_mask)
        assert mask[b].sum() == length - len_keep
        np.testing.assert_array_equal(x_kept[b], x[b, keep])
    assert mask.dtype == np.float32


def test_masking_rows_and_rngs():
    batch, length = 8, 16
    _, m0, _ = masking_indices(jax.random.PRNGKey(0), batch, length, 0.75)
    _, m0b, _ = masking_indices(jax.random.PRNGKey(0), batch, length, 0.75)
    _, m1, _ = masking_indices(jax.random.PRNGKey(1), batch, length, 0.75)
    m0, m0b, m1 = map(np.asarray, (m0, m0b, m1))
    assert len({row.tobytes() for row in m0}) > 1, "every example got the same mask"
    np.testing.assert_array_equal(m0, m0b)
    assert not np.array_equal(m0, m1)


def test_masking_with_typed_key_and_jit():
    """Typed keys work under jax_debug_key_reuse; jit with a static ratio compiles once."""
    key = jax.random.key(3)
    x = jnp.arange(2 * 10 * 4, dtype=jnp.float32).reshape(2, 10, 4)
    fn = jax.jit(random_masking, static_argnums=2)
    x_kept, mask, ids_restore = fn(jax.random.clone(key), x, 0.75)
    ids_keep, mask2, ids_restore2 = masking_indices(jax.random.clone(key), 2, 10, 0.75)
    assert x_kept.shape == (2, 2, 4) and ids_keep.shape == (2, 2)
    noise = np.asarray(jax.random.uniform(key, (2, 10)))
    keep = np.argsort(noise, axis=1)[:, :2]
    np.testing.assert_array_equal(np.asarray(ids_keep), keep)
    np.testing.assert_array_equal(np.asarray(x_kept), np.asarray(x)[np.arange(2)[:, None], keep])
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(mask2))
    np.testing.assert_array_equal(np.asarray(ids_restore), np.asarray(ids_restore2))
    np.testing.assert_array_equal(np.asarray(mask).sum(1), [8, 8])
    compiled = fn._cache_size()   # noqa: SLF001 (shared with other jits of random_masking)
    fn(jax.random.key(4), x, 0.75)
    assert fn._cache_size() == compiled, "a new key recompiled"   # noqa: SLF001


# ---------------------------------------------------------------------------------------------
# mae_loss
# ---------------------------------------------------------------------------------------------

def test_mae_loss_hand_computed_global_normalisation():
    # target patches of constant value v -> per-patch squared error v^2 against pred = 0.
    values = np.array([[1.0, 5.0, 7.0, 9.0],
                       [2.0, 3.0, 4.0, 11.0]])
    patches = jnp.asarray(np.repeat(values[..., None], 2, axis=-1), jnp.float32)
    mask = jnp.asarray([[1, 0, 0, 0], [1, 1, 1, 0]], jnp.float32)
    pred = jnp.zeros_like(patches)
    loss = float(mae_loss(pred, patches, mask, norm_pix_loss=False))
    # Removed: row 0 -> {1}, row 1 -> {4, 9, 16}; whole-batch mean over 4 removed patches.
    assert loss == pytest.approx((1 + 4 + 9 + 16) / 4)
    per_example_then_mean = (1 / 1 + (4 + 9 + 16) / 3) / 2
    assert abs(loss - per_example_then_mean) > 1


def test_mae_loss_mean_over_pixels_and_visible_ignored():
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((3, 5, 6)).astype(np.float32)
    pred = rng.standard_normal((3, 5, 6)).astype(np.float32)
    mask = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 0]], np.float32)
    expected = sum(((pred[b, l] - patches[b, l]) ** 2).mean()
                   for b in range(3) for l in range(5) if mask[b, l]) / mask.sum()
    loss = float(mae_loss(jnp.asarray(pred), jnp.asarray(patches), jnp.asarray(mask), False))
    assert loss == pytest.approx(expected, rel=1e-5)
    # Changing pred at visible positions changes nothing; at a removed one it does.
    pred_vis = pred.copy()
    pred_vis[mask == 0] += 100.0
    loss_vis = float(mae_loss(jnp.asarray(pred_vis), jnp.asarray(patches),
                              jnp.asarray(mask), False))
    assert loss_vis == pytest.approx(loss, rel=1e-6)
    pred_rm = pred.copy()
    pred_rm[0, 0] += 1.0
    assert float(mae_loss(jnp.asarray(pred_rm), jnp.asarray(patches), jnp.asarray(mask),
                          False)) != pytest.approx(loss, rel=1e-3)
    grad = jax.grad(mae_loss)(jnp.asarray(pred), jnp.asarray(patches), jnp.asarray(mask), False)
    assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_norm_pix_loss_unbiased_variance():
    # One removed patch [1, 2, 3, 4]: mean 2.5, sum of squared deviations 5.
    # Unbiased var = 5/3 (torch.var default); biased would be 5/4.
    patches = jnp.asarray([[[1.0, 2.0, 3.0, 4.0]]])
    mask = jnp.ones((1, 1))
    pred = jnp.zeros_like(patches)
    loss = float(mae_loss(pred, patches, mask, norm_pix_loss=True))
    expected_unbiased = 5.0 / 4 / (5.0 / 3 + 1e-6)      # = mean((x - m)^2) / (var + eps)
    expected_biased = 5.0 / 4 / (5.0 / 4 + 1e-6)
    assert loss == pytest.approx(expected_unbiased, rel=1e-5)
    assert abs(loss - expected_biased) > 0.2


def test_norm_pix_loss_eps_inside_sqrt():
    # Tiny variance so eps matters: deviations +-5e-4, unbiased var = 1e-6/3.
    vals = np.array([0.0, 1e-3, 0.0, 1e-3])
    var = vals.var(ddof=1)
    patches = jnp.asarray(vals[None, None], jnp.float32)
    loss = float(mae_loss(jnp.zeros_like(patches), patches, jnp.ones((1, 1)), True))
    inside = ((vals - vals.mean()) ** 2).mean() / (var + 1e-6)           # 0.1875
    outside = ((vals - vals.mean()) ** 2).mean() / (np.sqrt(var) + 1e-6) ** 2
    assert inside == pytest.approx(0.1875)
    assert loss == pytest.approx(inside, rel=1e-3)
    assert abs(loss - outside) > 0.1
    # A constant patch normalises to 0 (finite) thanks to eps: pred = 1 gives loss 1.
    const = jnp.full((1, 1, 4), 0.3)
    assert float(mae_loss(jnp.ones_like(const), const, jnp.ones((1, 1)), True)) == \
        pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# End to end on a tiny ViT
# ---------------------------------------------------------------------------------------------

def _objective(**kw):
    # Decoder width 32 (mlp 128) shares its parameter shapes with the encoder below, so eager
    # initialisation compiles fewer distinct ops.
    return objectives.get("mae", **{"patch_size": PATCH, "decoder_width": 32,
                                    "decoder_depth": 1, "decoder_heads": 2, **kw})


def _tiny_model(obj, seed: int):
    """A one-block ViT encoder with ``obj``'s heads."""
    rngs = nnx.Rngs(seed)
    encoder = zoo.models.get("vit", size="test", depth=1, mlp_dim=128, grid=GRID,
                             patch_dim=PATCH_DIM, rngs=rngs)
    # Without a mesh, sharded parameters need eager sharding off (see test_make_heads_no_mesh,
    # which checks that make_heads handles this itself, as zoo.models.get does).
    with nnx.use_eager_sharding(False):
        heads = obj.make_heads(encoder, rngs=rngs)
    return zoo.models.PretrainModel(encoder, heads)


@pytest.fixture(scope="module")
def setup():
    obj = _objective(mask_ratio=0.75)
    obj.validate(image_shape=IMAGE)
    model = _tiny_model(obj, 0)
    images = np.random.default_rng(0).integers(0, 256, (BATCH, *IMAGE), dtype=np.uint8)
    return obj, model, {"image": jnp.asarray(images)}


def test_make_heads_no_mesh():
    """Like ``zoo.models.get``, building the heads must not need a mesh (notebooks, tests)."""
    # make_heads reads only these encoder attributes; a stand-in keeps the test cheap.
    encoder = types.SimpleNamespace(width=32, grid=GRID, patch_dim=PATCH_DIM, has_cls=True)
    obj = objectives.get("mae", patch_size=PATCH, decoder_width=32, decoder_depth=0,
                         decoder_heads=2)
    heads = obj.make_heads(encoder, rngs=nnx.Rngs(1))
    assert heads.mask_token.get_metadata()["out_sharding"] == (None, None, "embed")


def test_end_to_end_jit_loss_and_grads(setup):
    obj, model, batch = setup
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch, rng):
        m = nnx.merge(graphdef, params, rest)
        inputs, targets = obj.prepare(batch, rng)
        out = obj.apply(m, inputs)
        loss, metrics = obj.loss(out, targets)
        return loss, (out, targets, metrics)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (out, targets, metrics)), grads = step(params, batch, jax.random.PRNGKey(0))
    assert out.shape == (BATCH, L - 4, PATCH_DIM)   # predictions of the 12 removed patches
    assert loss.shape == () and np.isfinite(float(loss))
    assert float(metrics["loss"]) == float(loss)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert np.abs(np.asarray(grads["heads"]["mask_token"][...])).sum() > 0
    assert np.abs(np.asarray(grads["encoder"]["patch_embed"]["kernel"][...])).sum() > 0
    # Targets: the image in [-1, 1], patchified; 4 of 16 patches kept per example.
    img = np.asarray(batch["image"], np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(targets["patches"]),
                               np.asarray(patchify(jnp.asarray(img), PATCH)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(targets["mask"]).sum(1), [L - 4] * BATCH)
    # ids_removed lists exactly the patches the mask removes, each once.
    removed, msk = np.asarray(targets["ids_removed"]), np.asarray(targets["mask"])
    for b in range(BATCH):
        assert sorted(removed[b]) == list(np.flatnonzero(msk[b]))
    # The loss is the pixel MSE over removed patches, recomputed in numpy: prediction j of
    # example b is patch removed[b, j].
    o, p = np.asarray(out, np.float64), np.asarray(targets["patches"], np.float64)
    expected = np.mean([((o[b, j] - p[b, removed[b, j]]) ** 2).mean()
                        for b in range(BATCH) for j in range(L - 4)])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # A second rng reuses the compiled step.
    compiled = step._cache_size()   # noqa: SLF001
    step(params, batch, jax.random.PRNGKey(1))
    assert step._cache_size() == compiled, "a new rng recompiled"   # noqa: SLF001


def _reference_loss(obj, model, inputs, targets):
    """The reference's forward, written out: embed EVERY patch and add positions, gather the
    kept tokens, encode, decode every patch, and average the per-patch error over the mask."""
    tokens = model.encoder.embed(inputs["patches"])
    kept = jnp.take_along_axis(tokens, inputs["ids_keep"][..., None], axis=1)
    pred = model.heads(model.encoder.encode(kept), inputs["ids_restore"])
    return mae_loss(pred, targets["patches"], targets["mask"], obj.norm_pix_loss), pred


@pytest.mark.parametrize("decoder_depth,norm_pix", [(1, False), (2, True)])
def test_fast_path_matches_reference_loss_and_gradients(decoder_depth, norm_pix):
    """apply embeds only the kept patches and runs the decoder's last block and head on the
    removed patches only: loss and EVERY gradient must equal the reference's full forward."""
    obj = _objective(decoder_depth=decoder_depth, norm_pix_loss=norm_pix)
    model = _tiny_model(obj, 3)
    images = np.random.default_rng(1).integers(0, 256, (3, *IMAGE), dtype=np.uint8)
    inputs, targets = obj.prepare({"image": jnp.asarray(images)}, jax.random.PRNGKey(7))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fast(params):
        return obj.loss(obj.apply(nnx.merge(graphdef, params, rest), inputs), targets)[0]

    def reference(params):
        return _reference_loss(obj, nnx.merge(graphdef, params, rest), inputs, targets)[0]

    (loss, grads), (ref_loss, ref_grads) = (jax.jit(jax.value_and_grad(f))(params)
                                            for f in (fast, reference))
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat) > 10
    for g, r in zip(flat, ref_flat):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4,
                                   atol=1e-5 * np.abs(np.asarray(r)).max() + 1e-7)
    # The visible patches' predictions never reach the loss, so they get no gradient anyway.
    full = obj.reconstruct(nnx.merge(graphdef, params, rest), inputs)
    fast_pred = obj.apply(nnx.merge(graphdef, params, rest), inputs)
    removed = np.asarray(inputs["ids_removed"])
    np.testing.assert_allclose(np.asarray(fast_pred),
                               np.take_along_axis(np.asarray(full), removed[..., None], 1),
                               rtol=1e-4, atol=1e-5)
    # Negative control: predictions of the KEPT patches in the removed slots change the loss.
    wrong = np.take_along_axis(np.asarray(full), np.asarray(inputs["ids_keep"])[..., None], 1)
    wrong = np.concatenate([wrong] * 3, axis=1)
    assert abs(float(obj.loss(jnp.asarray(wrong), targets)[0]) - float(loss)) > 1e-3


def test_position_embeddings_added_before_gather(setup):
    obj, model, batch = setup
    inputs, _ = obj.prepare(batch, jax.random.PRNGKey(5))
    # apply only touches model.encoder and model.heads: an identity head returns the latent.
    spy = types.SimpleNamespace(encoder=model.encoder,
                                heads=lambda latent, ids_restore, rows=None: latent)
    latent = np.asarray(jax.jit(lambda i: obj.apply(spy, i))(inputs))
    assert latent.shape == (BATCH, 1 + 4, model.encoder.width)

    enc = model.encoder
    patches = np.asarray(inputs["patches"], np.float64)
    ids_keep = np.asarray(inputs["ids_keep"])
    kernel = np.asarray(enc.patch_embed.kernel[...], np.float64)
    bias = np.asarray(enc.patch_embed.bias[...], np.float64)
    pos = ref_sincos_2d(enc.width, *GRID)
    rows = np.arange(BATCH)[:, None]
    # Each kept token carries the position embedding of its ORIGINAL patch position.
    right = patches[rows, ids_keep] @ kernel + bias + pos[ids_keep]
    # Negative control: positions 0..k-1 (added after the gather) give a different latent.
    wrong = patches[rows, ids_keep] @ kernel + bias + pos[: ids_keep.shape[1]]
    manual, control = map(np.asarray, jax.jit(jax.vmap(enc.encode))(
        jnp.asarray(np.stack([right, wrong]), jnp.float32)))
    np.testing.assert_allclose(latent, manual, atol=1e-5)
    assert np.abs(control - latent).max() > 1e-2


class _Identity(nnx.Module):
    def __call__(self, x, mask=None):
        return x


@pytest.mark.parametrize("has_cls", [True, False])
def test_decoder_unshuffles_to_original_positions(has_cls):
    width, batch, keep = 32, 3, 5
    with nnx.use_eager_sharding(False):
        dec = MaeDecoder(encoder_width=width, width=width, depth=0, num_heads=2, grid=GRID,
                         patch_dim=width, has_cls=has_cls, rngs=nnx.Rngs(0))
    # Strip the decoder to its token bookkeeping: identity embed, no blocks, identity pred.
    dec.embed.kernel[...] = jnp.eye(width)
    dec.embed.bias[...] = jnp.zeros(width)
    dec.decoder = _Identity()
    dec.pred = _Identity()
    dec.mask_token[...] = jnp.full((1, 1, width), 1000.0)

    ids_keep, mask, ids_restore = masking_indices(jax.random.PRNGKey(2), batch, L, 1 - keep / L)
    ids_keep, mask = np.asarray(ids_keep), np.asarray(mask)
    assert ids_keep.shape == (batch, keep)
    tokens = np.random.default_rng(0).standard_normal((batch, keep, width)).astype(np.float32)
    latent = tokens
    if has_cls:
        latent = np.concatenate([np.full((batch, 1, width), -7.0, np.float32), tokens], 1)
    out = np.asarray(dec(jnp.asarray(latent), ids_restore))
    assert out.shape == (batch, L, width)           # cls (if any) removed

    pos = ref_sincos_2d(width, *GRID)              # fixed decoder position embeddings
    expected = np.broadcast_to(1000.0 + pos, (batch, L, width)).copy()
    for b in range(batch):
        for j in range(keep):
            expected[b, ids_keep[b, j]] = tokens[b, j] + pos[ids_keep[b, j]]
    np.testing.assert_allclose(out, expected, atol=1e-4)
    # Mask tokens sit exactly on the removed positions.
    np.testing.assert_array_equal(np.isclose(out[..., 0], 1000.0 + pos[None, :, 0], atol=1e-3),
                                  mask.astype(bool))


def test_forward_flops_hand_count(setup):
    obj, model, _ = setup
    # Encoder: width 32, depth 1, mlp 128. Decoder: width 32, depth 1, mlp 4 * 32.
    def dense(t, i, o):
        return 2 * t * i * o

    def block(t, w, m):
        return dense(t, w, 3 * w) + dense(t, w, w) + dense(t, w, m) + dense(t, m, w) + 4 * t * t * w

    kept = int(L * 0.25) + 1     # kept patches + cls: all the encoder blocks see
    removed = L - 4
    # The decoder's last (here: only) block: qkv and attention over all patches + cls, the
    # output projection and MLP over the removed patches only.
    last = (dense(L + 1, 32, 96) + 4 * (L + 1) * (L + 1) * 32 + dense(removed, 32, 32)
            + dense(removed, 32, 128) + dense(removed, 128, 32))
    expected = (dense(4, PATCH_DIM, 32)            # patch embedding runs on the kept patches
                + 1 * block(kept, 32, 128)
                + dense(kept, 32, 32)              # decoder_embed on encoder outputs
                + last
                + dense(removed, 32, PATCH_DIM))   # decoder_pred on the removed patches
    assert expected == 511232                      # the same sum done by hand
    assert obj.forward_flops(model) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Lookup and validation
# ---------------------------------------------------------------------------------------------

def test_get_unknown_name_lists_known():
    with pytest.raises(ValueError, match="mae"):
        objectives.get("nonexistent_objective")


def test_get_unknown_hparam_names_it_and_lists_allowed():
    with pytest.raises(ValueError) as err:
        objectives.get("mae", mask_ration=0.5)
    msg = str(err.value)
    assert "mask_ration" in msg
    for allowed in ("mask_ratio", "norm_pix_loss", "decoder_width", "patch_size"):
        assert allowed in msg


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, 1.5, -0.1])
def test_invalid_mask_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        objectives.get("mae", mask_ratio=ratio)


def test_validate_keeps_at_least_one_patch():
    # 16 patches at ratio 0.99 keeps int(0.16) = 0 patches.
    with pytest.raises(ValueError, match="mask_ratio"):
        _objective(mask_ratio=0.99).validate(image_shape=IMAGE)


def test_validate_patch_size_divides_image():
    with pytest.raises(ValueError, match="(?i)patch.size"):
        objectives.get("mae", patch_size=4).validate(image_shape=(30, 30, 1))
    objectives.get("mae", patch_size=5).validate(image_shape=(30, 30, 1))


def test_defaults_match_reference():
    obj = objectives.get("mae")
    assert isinstance(obj, MAE) and "mae" in objectives.names("image")
    assert (obj.mask_ratio, obj.norm_pix_loss) == (0.75, False)
    assert (obj.decoder_width, obj.decoder_depth, obj.decoder_heads) == (512, 8, 16)
    assert hash(obj) == hash(objectives.get("mae"))    # hashable: safe to close over in jit


def test_decoder_width_must_suit_sincos_positions():
    with pytest.raises(ValueError, match=r"^objective\.decoder_width: 34 must be a multiple of 4"):
        objectives.get("mae", decoder_width=34, decoder_heads=2)
