"""Tests for the synthetic image degradations (``zoo.degradations``), used by DCPT / MaskDCPT.

Expected values are defining properties of each degradation model (moments of the noise, mean
preservation and impulse responses of the blurs, the JPEG coefficients being multiples of the
standard tables, inverting the scattering model, formulas re-stated in numpy), statistics with
binomial bounds, or the documented per-example key derivation of the batched functions. The
JPEG tables are copied from the standard (ITU-T T.81 Annex K) and the block DCT comes from
scipy, not from the module. Shapes are fixed per jitted function; hypothesis varies parameters
and data only, so each function compiles once.
"""
from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings, strategies as st

from zoo import degradations as D

SETTINGS = settings(max_examples=10, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def key(seed):
    """A fresh key each call (the test session checks for key reuse)."""
    return jax.random.key(seed)


def rand_image(seed, shape=(16, 24, 3), lo=0.0, hi=1.0):
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------

def test_names_and_parameter_ranges_are_the_documented_ones():
    assert D.DEGRADATIONS == ("noise", "blur", "motion_blur", "jpeg", "resample", "low_light",
                              "haze", "rain", "salt_pepper", "color_shift")
    assert D.ALL_IN_ONE == ("noise", "blur", "haze", "rain", "low_light")
    assert tuple(D.PARAM_RANGES) == D.DEGRADATIONS
    spec = {("noise", "sigma"): (0, 50 / 255), ("blur", "sigma"): (0.5, 3.0),
            ("motion_blur", "length"): (3, 11), ("motion_blur", "angle"): (0, math.pi),
            ("jpeg", "quality"): (10, 50), ("resample", "factor"): (2, 4),
            ("low_light", "scale"): (0.2, 0.6), ("low_light", "gamma"): (1.0, 2.0),
            ("haze", "beta"): (0.5, 2.0), ("haze", "airlight"): (0.7, 1.0),
            ("rain", "density"): (0.002, 0.01), ("rain", "length"): (5, 15),
            ("rain", "angle"): (-math.pi / 9, math.pi / 9), ("rain", "intensity"): (0.5, 1.0),
            ("salt_pepper", "amount"): (0.01, 0.1), ("color_shift", "gain"): (0.7, 1.3),
            ("color_shift", "offset"): (-0.1, 0.1)}
    for (name, param), expected in spec.items():
        np.testing.assert_allclose(D.PARAM_RANGES[name][param], expected, rtol=1e-12,
                                   err_msg=f"{name}.{param}")
    # Every name documents its ranges in the module docstring's table.
    for name in D.DEGRADATIONS:
        assert f"\n{name} " in D.__doc__, name


# ---------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------

def test_noise_has_the_requested_std_in_every_channel():
    image = jnp.full((64, 64, 3), 0.5)
    sigma = 20 / 255
    diff = np.asarray(D.gaussian_noise(image, key(0), sigma)) - 0.5
    # 12288 samples: the std's relative standard error is ~0.6%; 0.5 is 6.4 sigma from a clip.
    assert abs(diff.std() / sigma - 1) < 0.03
    assert abs(diff.mean()) < 4 * sigma / math.sqrt(diff.size)
    for c in range(3):
        assert abs(diff[..., c].std() / sigma - 1) < 0.05
    # Independent across channels, not one draw copied three times.
    assert abs(np.corrcoef(diff[..., 0].ravel(), diff[..., 1].ravel())[0, 1]) < 0.1
    np.testing.assert_array_equal(D.gaussian_noise(image, key(1), 0.0), image)


# ---------------------------------------------------------------------------------------------
# blur and motion blur
# ---------------------------------------------------------------------------------------------

def total_variation(x):
    """Circular total variation per channel, summed."""
    return (np.abs(x - np.roll(x, 1, 0)).sum() + np.abs(x - np.roll(x, 1, 1)).sum())


_blur = jax.jit(D.gaussian_blur)
_motion = jax.jit(D.motion_blur)


@SETTINGS
@given(seed=seeds, sigma=st.floats(0.5, 3.0))
def test_blur_keeps_the_mean_and_lowers_total_variation(seed, sigma):
    image = rand_image(seed)
    out = np.asarray(_blur(image, sigma))
    np.testing.assert_allclose(out.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=2e-6)
    assert total_variation(out) < 0.8 * total_variation(image)


def impulse(size=32):
    image = np.zeros((size, size, 3), np.float32)
    image[size // 2, size // 2] = 1.0
    return image


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_impulse_response_is_a_normalised_separable_gaussian(sigma):
    out = np.asarray(D.gaussian_blur(impulse(), sigma))
    np.testing.assert_allclose(out[..., 1], out[..., 0], atol=0)
    k = out[..., 0].astype(np.float64)
    np.testing.assert_allclose(k.sum(), 1.0, atol=1e-5)
    c = 16
    # Symmetric about the impulse (both axes, and transposed: isotropic).
    part = k[c - 9:c + 10, c - 9:c + 10]
    np.testing.assert_allclose(part, part[::-1], atol=1e-7)
    np.testing.assert_allclose(part, part[:, ::-1], atol=1e-7)
    np.testing.assert_allclose(part, part.T, atol=1e-7)
    # Separable: the response is the outer product of its marginals.
    np.testing.assert_allclose(k, np.outer(k.sum(1), k.sum(0)), atol=1e-6)
    # A Gaussian of std sigma: each marginal's variance is sigma**2.
    offsets = np.arange(32) - c
    assert abs((k.sum(1) * offsets ** 2).sum() / sigma ** 2 - 1) < 0.02
    assert abs((k.sum(0) * offsets ** 2).sum() / sigma ** 2 - 1) < 0.02
    assert k.argmax() == c * 32 + c


@SETTINGS
@given(seed=seeds, length=st.floats(3.0, 11.0), angle=st.floats(0.0, math.pi))
def test_motion_blur_keeps_the_mean(seed, length, angle):
    image = rand_image(seed)
    out = np.asarray(_motion(image, length, angle))
    np.testing.assert_allclose(out.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=2e-6)
    assert total_variation(out) < total_variation(image)


@pytest.mark.parametrize("length, angle", [(7.0, 0.0), (5.0, math.pi / 2), (9.0, 0.6),
                                           (11.0, 2.3)])
def test_motion_blur_impulse_response_is_a_line_of_that_length(length, angle):
    k = np.asarray(_motion(impulse(), length, angle))[..., 0].astype(np.float64)
    np.testing.assert_allclose(k.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(k, np.roll(k[::-1, ::-1], (1, 1), (0, 1)), atol=1e-7)  # k(-p)
    rows, cols = np.nonzero(k > 1e-7)
    dy, dx = rows - 16.0, cols - 16.0
    # Angles are counter-clockwise as displayed; rows grow downwards.
    along = dx * math.cos(angle) - dy * math.sin(angle)
    perp = dx * math.sin(angle) + dy * math.cos(angle)
    assert np.abs(perp).max() < 1.0
    assert length / 2 - 1 <= np.abs(along).max() <= length / 2 + 0.5
    # Spread along the line like a uniform segment of that length (variance L^2/12).
    weights = k[rows, cols]
    var = (weights * along ** 2).sum()
    assert abs(var / (length ** 2 / 12) - 1) < 0.25
    if angle in (0.0, math.pi / 2):   # axis-aligned, odd integer length: L equal pixels
        assert len(rows) == int(length)
        np.testing.assert_allclose(weights, 1 / length, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# jpeg
# ---------------------------------------------------------------------------------------------

LUMA = np.array([[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
                 [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
                 [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
                 [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]])
CHROMA = np.array([[17, 18, 24, 47] + [99] * 4, [18, 21, 26, 66] + [99] * 4,
                   [24, 26, 56] + [99] * 5, [47, 66] + [99] * 6] + [[99] * 8] * 4)


def ijg_table(table, quality):
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.maximum(np.floor((table * scale + 50) / 100), 1)


def block_dct(plane):
    """[H, W] -> [H/8, W/8, 8, 8] orthonormal DCT-II of each 8x8 block (scipy)."""
    h, w = plane.shape
    blocks = plane.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
    return scipy.fft.dctn(blocks, type=2, norm="ortho", axes=(2, 3))


def jpeg_test_image(seed, shape=(16, 24, 3)):
    """Mid-range, photo-like values: a smooth random pattern plus faint texture, channels
    related but not equal, all in about [0.35, 0.65], far from a clip."""
    rng = np.random.default_rng(seed)
    h, w, _ = shape
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.uniform(size=2)
    plane = (0.5 + 0.12 * np.sin(2 * np.pi * (x / 11 + phase[0]))
             * np.cos(2 * np.pi * (y / 9 + phase[1])) + rng.uniform(-0.03, 0.03, (h, w)))
    return np.stack([plane, np.roll(plane, 3, 1), 0.9 * plane + 0.05], -1).astype(np.float32)


def test_dct_matrix_is_scipys_orthonormal_dct2():
    d = D.dct_matrix(8).astype(np.float64)
    np.testing.assert_allclose(d @ d.T, np.eye(8), atol=1e-6)
    np.testing.assert_allclose(d, scipy.fft.dct(np.eye(8), type=2, norm="ortho", axis=0),
                               atol=1e-6)


@pytest.mark.parametrize("quality", [50, 10, 27, 75])
def test_jpeg_tables_follow_the_ijg_scaling(quality):
    tables = np.asarray(D.jpeg_tables(quality))
    np.testing.assert_array_equal(tables[..., 0], ijg_table(LUMA, quality))
    np.testing.assert_array_equal(tables[..., 1], ijg_table(CHROMA, quality))
    np.testing.assert_array_equal(tables[..., 2], ijg_table(CHROMA, quality))
    if quality == 50:
        np.testing.assert_array_equal(tables[..., 0], LUMA)


_jpeg = jax.jit(D.jpeg)


@pytest.mark.parametrize("quality", [10, 30])
def test_jpeg_block_dct_of_the_output_is_a_multiple_of_the_table(quality):
    image = jpeg_test_image(0)
    out = np.asarray(_jpeg(image, quality), np.float64)
    assert 0.01 < out.min() and out.max() < 0.99      # no clipping: the property is exact
    rgb = out * 255
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2] - 128
    cb = -0.168736 * rgb[..., 0] - 0.331264 * rgb[..., 1] + 0.5 * rgb[..., 2]
    cr = 0.5 * rgb[..., 0] - 0.418688 * rgb[..., 1] - 0.081312 * rgb[..., 2]
    for plane, table in ((y, LUMA), (cb, CHROMA), (cr, CHROMA)):
        ratio = block_dct(plane) / ijg_table(table, quality)
        assert np.abs(ratio - np.round(ratio)).max() < 0.01
    # The input itself is not block-quantised (else the check above would be vacuous).
    ratio = block_dct(image[..., 0] * 255.0) / ijg_table(LUMA, quality)
    assert np.abs(ratio - np.round(ratio)).max() > 0.3


def test_jpeg_error_grows_as_quality_drops_and_vanishes_near_100():
    image = jpeg_test_image(1)
    errors = [np.abs(np.asarray(_jpeg(image, q)) - image).mean() for q in (10, 25, 50, 90)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 1.5 * errors[2]
    # Quality 100: every step is 1 on the 0..255 scale; rounding the coefficients moves pixels
    # by about a third of a level (chroma errors grow up to 1.8x going back to RGB).
    fine = np.abs(np.asarray(_jpeg(image, 100.0)) - image)
    assert fine.max() < 4 / 255 and fine.mean() < 0.6 / 255


def test_jpeg_rejects_shapes_that_are_not_multiples_of_8():
    with pytest.raises(ValueError, match="12x16"):
        D.jpeg(jnp.zeros((12, 16, 3)), 30.0)
    with pytest.raises(ValueError, match="16x20"):
        D.degrade_batch(jnp.zeros((2, 16, 20, 3)), jnp.zeros(2, jnp.int32), key(0),
                        kinds=("blur", "jpeg"))


# ---------------------------------------------------------------------------------------------
# resample
# ---------------------------------------------------------------------------------------------

_resample = jax.jit(D.resample)


@pytest.mark.parametrize("factor", [2.0, 2.5, 64 / 21, 3.3, 4.0])
def test_resample_keeps_constants_and_interior_linear_ramps(factor):
    const = np.full((32, 32, 3), 0.3, np.float32)
    np.testing.assert_allclose(_resample(const, factor), const, atol=1e-6)
    # Both filters are symmetric and bilinear reproduces lines, so a ramp survives away from
    # the borders (no half-pixel shift).
    ramp = np.broadcast_to(np.linspace(0.2, 0.8, 32, dtype=np.float32)[None, :, None],
                           (32, 32, 3)).copy()
    out = np.asarray(_resample(ramp, factor))
    margin = int(2 * factor) + 1
    np.testing.assert_allclose(out[:, margin:-margin], ramp[:, margin:-margin], atol=1e-3)


def test_resample_removes_high_frequencies():
    x = np.arange(32)
    smooth = 0.5 + 0.3 * np.sin(2 * np.pi * x / 16)
    checker = 0.5 + 0.3 * (-1.0) ** (x[:, None] + x[None, :])
    smooth = np.broadcast_to(smooth[None, :, None] * smooth[:, None, None], (32, 32, 3))
    checker = np.broadcast_to(checker[..., None], (32, 32, 3))
    err = {name: np.abs(np.asarray(_resample(img.astype(np.float32), 2.0)) - img)[4:-4, 4:-4]
           .mean() for name, img in (("smooth", smooth), ("checker", checker))}
    assert err["checker"] > 0.25 and err["checker"] > 10 * err["smooth"]
    image = rand_image(3, (32, 32, 3))
    e2, e4 = (np.abs(np.asarray(_resample(image, f)) - image).mean() for f in (2.0, 4.0))
    assert 0.05 < e2 < e4


# ---------------------------------------------------------------------------------------------
# low light, colour shift
# ---------------------------------------------------------------------------------------------

_low_light = jax.jit(D.low_light)
_color = jax.jit(D.color_shift)


@SETTINGS
@given(seed=seeds, scale=st.floats(0.2, 0.6), gamma=st.floats(1.0, 2.0))
def test_low_light_is_the_power_law_and_darkens(seed, scale, gamma):
    image = rand_image(seed)
    out = np.asarray(_low_light(image, scale, gamma))
    np.testing.assert_allclose(out, (scale * image.astype(np.float64)) ** gamma, rtol=1e-5,
                               atol=1e-7)
    assert (out <= image + 1e-7).all() and out.mean() <= image.mean()


@SETTINGS
@given(seed=seeds, gain=st.lists(st.floats(0.7, 1.3), min_size=3, max_size=3),
       offset=st.lists(st.floats(-0.1, 0.1), min_size=3, max_size=3))
def test_color_shift_is_a_per_channel_affine_map(seed, gain, offset):
    image = rand_image(seed)
    out = np.asarray(_color(image, np.float32(gain), np.float32(offset)))
    expected = np.clip(image * np.array(gain) + np.array(offset), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# haze
# ---------------------------------------------------------------------------------------------

@jax.jit
def _hazy(image, angle, beta, airlight):
    depth = D.ramp_depth(16, 24, angle)
    return depth, D.transmission(depth, beta), D.haze(image, depth, beta, airlight)


@SETTINGS
@given(seed=seeds, angle=st.floats(0, 2 * math.pi), beta=st.floats(0.5, 2.0),
       airlight=st.floats(0.7, 1.0))
def test_haze_inverts_to_the_clean_image_and_moves_towards_the_airlight(seed, angle, beta,
                                                                        airlight):
    clean = rand_image(seed)
    depth, t, hazy = (np.asarray(a, np.float64) for a in _hazy(clean, angle, beta, airlight))
    # The depth map is a ramp spanning exactly [0, 1]: zero second differences.
    assert abs(depth.min()) < 1e-6 and abs(depth.max() - 1) < 1e-6
    assert np.abs(np.diff(depth, 2, axis=0)).max() < 1e-5
    assert np.abs(np.diff(depth, 2, axis=1)).max() < 1e-5
    np.testing.assert_allclose(t, np.exp(-beta * depth), rtol=1e-5)
    assert (t > 0).all() and (t <= 1).all()
    recovered = (hazy - airlight * (1 - t[..., None])) / t[..., None]
    np.testing.assert_allclose(recovered, clean, atol=1e-4)
    assert (np.abs(hazy - airlight) <= np.abs(clean - airlight) + 1e-6).all()
    assert np.abs(hazy - airlight).mean() < np.abs(clean - airlight).mean()


def test_ramp_depth_direction_convention():
    right = np.asarray(D.ramp_depth(16, 24, 0.0))
    np.testing.assert_allclose(right, np.broadcast_to(np.linspace(0, 1, 24), (16, 24)),
                               atol=1e-6)
    up = np.asarray(D.ramp_depth(16, 24, math.pi / 2))   # counter-clockwise as displayed
    np.testing.assert_allclose(up, np.broadcast_to(np.linspace(1, 0, 16)[:, None], (16, 24)),
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------
# rain, salt and pepper
# ---------------------------------------------------------------------------------------------

_rain = jax.jit(D.rain)


def test_rain_only_brightens_grey_near_vertical_streaks_that_grow_with_density():
    image = rand_image(4, (64, 64, 3), 0.0, 0.5)
    outs = {d: np.asarray(_rain(image, key(5), d, 10.0, 0.0, 0.8)) for d in (0.002, 0.01)}
    changed = {}
    for density, out in outs.items():
        assert (out >= image).all()
        diff = out - image
        unclipped = (out < 1).all(-1)
        assert unclipped.mean() > 0.5
        for c in (1, 2):   # grey streaks: the same lift in every channel (until the clip)
            np.testing.assert_allclose(diff[..., c][unclipped], diff[..., 0][unclipped],
                                       atol=1e-6)
        changed[density] = diff[..., 0] > 1e-6
    # Same rng: the denser rain keeps every sparse streak and adds more.
    assert (changed[0.01] >= changed[0.002]).all()
    assert changed[0.01].mean() > 2 * changed[0.002].mean() > 0
    # Vertical streaks: strokes continue down a column, not along a row.
    s = changed[0.01].astype(np.float64)
    vertical = (s * np.roll(s, 1, 0)).mean()
    horizontal = (s * np.roll(s, 1, 1)).mean()
    assert vertical > 3 * horizontal
    # A streak of length 10 at intensity 0.8 lifts its pixels by up to 0.8.
    assert 0.75 < (outs[0.01] - image).max() <= 0.8 + 1e-6


def test_salt_pepper_hits_whole_pixels_with_zeros_and_ones_at_the_rate():
    image = rand_image(6, (64, 64, 3), 0.2, 0.8)
    amount = 0.05
    out = np.asarray(D.salt_pepper(jnp.asarray(image), key(7), amount))
    changed = (out != image).any(-1)
    n = changed.size
    bound = 5 * math.sqrt(amount * (1 - amount) / n)
    assert abs(changed.mean() - amount) < bound
    hit = out[changed]
    assert ((hit == 0).all(-1) | (hit == 1).all(-1)).all()
    ones = (hit == 1).all(-1).mean()
    assert abs(ones - 0.5) < 5 * math.sqrt(0.25 / len(hit))
    np.testing.assert_array_equal(out[~changed], image[~changed])


# ---------------------------------------------------------------------------------------------
# sample_params
# ---------------------------------------------------------------------------------------------

def _many_params(seed, n=1000):
    """n draws of every kind's parameters (eager vmap: every kind makes the same
    [NUM_UNIFORMS] draw, so its one compiled kernel serves them all)."""
    return {name: jax.vmap(lambda k, name=name: D.sample_params(name, k))(
        jax.random.split(key(seed + i), n)) for i, name in enumerate(D.DEGRADATIONS)}


def test_sample_params_fill_the_ranges():
    drawn = _many_params(8)
    for name in D.DEGRADATIONS:
        assert set(drawn[name]) == set(D.PARAM_RANGES[name]), name
        for param, (lo, hi) in D.PARAM_RANGES[name].items():
            values = np.asarray(drawn[name][param])
            shape = (3,) if name == "color_shift" else ()
            assert values.shape == (1000,) + shape, (name, param)
            assert lo <= values.min() and values.max() <= hi, (name, param)
            span = hi - lo
            assert values.min() < lo + 0.02 * span and values.max() > hi - 0.02 * span
            assert abs(values.mean() - (lo + hi) / 2) < 0.05 * span, (name, param)
        # Parameters are independent draws, not one number reused.
        flat = np.concatenate([np.asarray(v).reshape(1000, -1) for v in drawn[name].values()],
                              axis=1)
        if flat.shape[1] > 1:
            corr = np.corrcoef(flat.T) - np.eye(flat.shape[1])
            assert np.abs(corr).max() < 0.15, name


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

_batch = jax.jit(D.degrade_batch, static_argnames="kinds")
B = len(D.DEGRADATIONS)
LABELS = [(3 * i + 7) % B for i in range(B)]          # a permutation, not the identity


@jax.jit
def _one_by_one(images, keys):
    """``degrade(kinds[labels[i]], images[i], example_keys(rng, B)[i])`` for each i."""
    return jnp.stack([D.degrade(D.DEGRADATIONS[label], images[i], keys[i])
                      for i, label in enumerate(LABELS)])


def test_degrade_batch_applies_the_labelled_kind_to_each_image():
    images = rand_image(9, (B, 16, 16, 3))
    labels = jnp.asarray(LABELS, jnp.int32)
    out = np.asarray(_batch(images, labels, key(10), kinds=D.DEGRADATIONS))
    expected = np.asarray(_one_by_one(images, D.example_keys(key(10), B)))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert (np.abs(out - images).reshape(B, -1).max(1) > 1e-3).all()   # all degraded
    again = np.asarray(_batch(images, labels, key(10), kinds=D.DEGRADATIONS))
    np.testing.assert_array_equal(again, out)
    other = np.asarray(_batch(images, labels, key(11), kinds=D.DEGRADATIONS))
    assert (np.abs(other - out).reshape(B, -1).max(1) > 1e-4).all()   # every kind is random


_random = jax.jit(D.random_degradations, static_argnames="kinds")
CHEAP = ("low_light", "color_shift", "haze")


def test_random_degradations_draws_uniform_labels_and_applies_them():
    images = rand_image(12, (300, 8, 8, 3))
    out, labels = _random(images, key(13), kinds=CHEAP)
    labels = np.asarray(labels)
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < len(CHEAP)
    counts = np.bincount(labels, minlength=len(CHEAP))
    assert (np.abs(counts - 100) < 4 * math.sqrt(300 * (1 / 3) * (2 / 3))).all(), counts
    images_rng = jax.random.split(key(13))[1]
    expected = _batch(images, jnp.asarray(labels), images_rng, kinds=CHEAP)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.asarray(out).min() >= 0 and np.asarray(out).max() <= 1
    out2, labels2 = _random(images, key(13), kinds=CHEAP)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(labels2, labels)
    _, labels3 = _random(images, key(14), kinds=CHEAP)
    assert (np.asarray(labels3) != labels).any()
    assert inspect.signature(D.random_degradations).parameters["kinds"].default == D.ALL_IN_ONE
    assert inspect.signature(D.degrade_batch).parameters["kinds"].default == D.ALL_IN_ONE


@pytest.mark.parametrize("call", [
    lambda: D.degrade_batch(jnp.zeros((2, 8, 8, 3)), jnp.zeros(2, jnp.int32), key(0),
                            kinds=("blur", "fog")),
    lambda: D.random_degradations(jnp.zeros((2, 8, 8, 3)), key(0), kinds=("fog",)),
    lambda: D.degrade("fog", jnp.zeros((8, 8, 3)), key(0)),
    lambda: D.sample_params("fog", key(0)),
])
def test_unknown_kind_is_a_one_line_error_listing_the_names(call):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "'fog'" in message and "\n" not in message
    assert all(name in message for name in D.DEGRADATIONS)
