"""zoo.augment: properties of each op against numpy / colorsys / torchvision-style references,
and the SimCLR / DINO pipelines under jit. Images are tiny so every program compiles fast."""
import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import augment as A

LUMA = np.array([0.2989, 0.5870, 0.1140])


def key(seed):
    return jax.random.key(seed)


def keys(rng, n):
    """Split INSIDE the jitted test functions: an eager split compiles a program per n."""
    return jax.random.split(rng, n)


def per_key(fn, rng, n):
    """``fn`` once per key of ``split(rng, n)``. lax.map, not vmap: a Threefry draw vmapped
    over keys compiled 4x slower on CPU."""
    return jax.lax.map(fn, keys(rng, n))


def rand_image(seed, shape=(16, 16, 3)):
    return np.random.RandomState(seed).uniform(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------- crop

def np_torchvision_box(rs, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, sizes only, in numpy."""
    for _ in range(10):
        area = height * width * rs.uniform(*scale)
        r = math.exp(rs.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if 0 < w <= width and 0 < h <= height:
            return h, w
    return None


def test_full_crop_reproduces_image():
    image = rand_image(0)
    fn = jax.jit(lambda k1, k2, x: (
        A.crop_box(k1, 16, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
        A.random_resized_crop(k2, x, (16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0))))
    box, out = fn(key(1), key(2), image)
    assert [int(v) for v in box] == [0, 0, 16, 16]
    np.testing.assert_allclose(out, image, atol=1e-6)


def test_resized_crop_is_half_pixel_bilinear():
    # Hand case: [0, 1] upsampled to 4 with half-pixel centres and edge clamping.
    crop = jax.jit(A.resized_crop, static_argnums=2)
    line = np.array([[[0.0], [1.0]]], np.float32)                  # [1, 2, 1]
    out = crop(line, np.array([0, 0, 1, 2]), (1, 4))
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    # Against jax.image.resize of the cropped image: up, down and mixed; the box is traced.
    image = rand_image(3, (12, 10, 3))
    boxes = [(2, 1, 7, 6), (0, 3, 12, 5), (4, 4, 3, 3), (1, 0, 11, 10)]
    want = jax.jit(lambda x: [jax.image.resize(x[t:t + h, l:l + w], (16, 5, 3), "bilinear",
                                               antialias=False) for t, l, h, w in boxes])(image)
    for box, expected in zip(boxes, want):
        np.testing.assert_allclose(crop(image, np.array(box), (16, 5)), expected, atol=1e-5)


def test_crop_box_distribution_matches_torchvision():
    height, width, scale, ratio, n = 24, 32, (0.08, 1.0), (3 / 4, 4 / 3), 3000
    top, left, h, w = (np.asarray(v) for v in jax.jit(lambda k: per_key(
        lambda k: A.crop_box(k, height, width, scale, ratio), k, n))(key(0)))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # Rounding-consistent bounds: some area in scale and ratio in range round to (w, h).
    area = height * width
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * area).all()
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area).all()
    assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all() and ((w + 0.5) / (h - 0.5) >= ratio[0]).all()
    rs = np.random.RandomState(0)
    ref = np.array([np_torchvision_box(rs, height, width, scale, ratio) for _ in range(n)])
    assert abs((h * w).mean() / area - (ref[:, 0] * ref[:, 1]).mean() / area) < 0.03
    assert abs(np.log(w / h).mean() - np.log(ref[:, 1] / ref[:, 0]).mean()) < 0.03
    # Offsets uniform over the valid positions.
    room = height - h
    pos = top[room > 0] / room[room > 0]
    assert abs(pos.mean() - 0.5) < 0.05 and pos.min() == 0 and pos.max() == 1
    assert len(set(zip(top, left, h, w))) > n // 4                 # examples differ


def test_crop_box_fallback_is_centre_crop_with_clamped_ratio():
    # Area >= half the image at ratio >= 10 never fits 32x32: w >= sqrt(512 * 10) > 32.
    tall, wide = jax.jit(lambda k1, k2: (
        per_key(lambda k: A.crop_box(k, 32, 32, (0.5, 1.0), (10.0, 20.0)), k1, 20),
        per_key(lambda k: A.crop_box(k, 32, 32, (0.5, 1.0), (0.05, 0.1)), k2, 20)))(
        key(1), key(2))
    # Width 32 cut to ratio 10: h = round(3.2) = 3, centred: top = (32 - 3) // 2 = 14.
    assert all((np.asarray(v) == want).all() for v, want in zip(tall, (14, 0, 3, 32)))
    assert all((np.asarray(v) == want).all() for v, want in zip(wide, (0, 14, 32, 3)))


# ----------------------------------------------------------------------------- flip, grey

def test_flip_reverses_or_keeps_each_example():
    images = np.stack([rand_image(i, (4, 6, 3)) for i in range(16)])
    out = np.asarray(jax.jit(lambda k, x: jax.lax.map(lambda a: A.random_flip(*a),
                                                      (keys(k, 16), x)))(key(3), images))
    flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images)]
    kept = [np.array_equal(o, x) for o, x in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_grayscale_uses_luma_weights():
    pixel = np.array([[[1.0, 0.5, 0.25]]], np.float32)
    image, grey = rand_image(5, (4, 4, 3)), rand_image(7, (4, 4, 1))
    def fn(rng):
        k = keys(rng, 4)
        return (A.random_grayscale(k[0], pixel, p=1.0), A.random_grayscale(k[1], image, p=0.0),
                A.random_grayscale(k[2], grey, p=1.0),
                per_key(lambda k: A.random_grayscale(k, image, p=0.2), k[3], 400))
    out, same, same_grey, many = jax.jit(fn)(key(4))
    np.testing.assert_allclose(out[0, 0], [0.2989 + 0.2935 + 0.0285] * 3, atol=1e-6)
    np.testing.assert_array_equal(same, image)
    np.testing.assert_array_equal(same_grey, grey)
    out = np.asarray(many)
    is_grey = (out[..., 0] == out[..., 1]).all(axis=(1, 2))
    assert 0.13 < is_grey.mean() < 0.27


# ----------------------------------------------------------------------------- colour

def test_hsv_matches_colorsys_and_round_trips():
    pixels = rand_image(10, (64, 3))
    pixels = np.concatenate([pixels, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]]).astype(np.float32)
    hsv, back = jax.jit(lambda x: (A.rgb_to_hsv(x), A.hsv_to_rgb(A.rgb_to_hsv(x))))(pixels)
    want = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    np.testing.assert_allclose(hsv, want, atol=1e-5)
    np.testing.assert_allclose(hsv[-2:], [[0, 1, 1], [0, 0, 0.5]])     # red, grey
    np.testing.assert_allclose(back, pixels, atol=1e-5)


def np_jitter_op(image, op, factor):
    """torchvision's colour ops in numpy (colorsys for the hue), each clipped to [0, 1]."""
    grey = (image @ LUMA)[..., None]
    if op == 0:
        out = factor * image
    elif op == 1:
        out = factor * image + (1 - factor) * grey.mean()
    elif op == 2:
        out = factor * image + (1 - factor) * grey
    else:
        out = np.reshape([colorsys.hsv_to_rgb((h + factor) % 1, s, v) for h, s, v in
                          (colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3))], image.shape)
    return np.clip(out, 0, 1)


def test_adjust_ops_match_numpy():
    image = rand_image(12, (6, 5, 3))
    image[0, 0] = [1.0, 0.0, 0.0]
    brightness, contrast, saturation, hue, cyan = jax.jit(lambda x: (
        A.adjust_brightness(x, 1.4), A.adjust_contrast(x, 0.6), A.adjust_saturation(x, 1.7),
        A.adjust_hue(x, 0.3), A.adjust_hue(x, 0.5)))(image)
    for op, (out, factor) in enumerate([(brightness, 1.4), (contrast, 0.6), (saturation, 1.7),
                                        (hue, 0.3)]):
        np.testing.assert_allclose(out, np_jitter_op(image, op, factor), atol=1e-5)
    np.testing.assert_allclose(cyan[0, 0], [0, 1, 1], atol=1e-6)       # red -> cyan


def test_apply_jitter_composes_the_ops_in_order():
    image = rand_image(26, (5, 4, 3))
    factors = np.array([1.3, 0.6, 1.7, -0.15], np.float32)
    jitter = jax.jit(A.apply_jitter)
    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2)]:
        want = image
        for op in order:
            want = np_jitter_op(want, op, factors[op])
        np.testing.assert_allclose(jitter(image, np.array(order), factors), want, atol=2e-5)


def test_jitter_order_matters_under_clipping():
    # Grey pixels 0.2 and 0.9; brightness 1.5, contrast 0.5, saturation 1, no hue shift.
    image = np.array([[[0.2] * 3, [0.9] * 3]], np.float32)
    factors = np.array([1.5, 0.5, 1.0, 0.0], np.float32)
    m = LUMA.sum()                                   # the luma of a grey pixel x is m x
    b_first = np.clip([0.3, 1.0], 0, 1)              # 1.35 clipped before the contrast
    b_first = 0.5 * b_first + 0.5 * m * b_first.mean()
    c_first = 0.5 * np.array([0.2, 0.9]) + 0.5 * m * 0.55
    c_first = np.clip(1.5 * c_first, 0, 1)
    jitter = jax.jit(A.apply_jitter)
    out_b = jitter(image, np.array([0, 1, 2, 3]), factors)
    out_c = jitter(image, np.array([3, 1, 2, 0]), factors)
    np.testing.assert_allclose(out_b[0, :, 0], b_first, atol=1e-5)
    np.testing.assert_allclose(out_c[0, :, 0], c_first, atol=1e-5)
    assert abs(float(out_b[0, 1, 0]) - float(out_c[0, 1, 0])) > 0.1


def test_jitter_params_random_order_and_ranges():
    order, factors = jax.jit(lambda k: per_key(
        lambda k: A.sample_jitter_params(k, 0.8, 0.8, 0.8, 0.2), k, 600))(key(13))
    order, factors = np.asarray(order), np.asarray(factors)
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    assert len({tuple(o) for o in order}) == 24                      # every order occurs
    assert all(0.18 < (order[:, 0] == i).mean() < 0.32 for i in range(4))
    lo, hi = np.array([0.2, 0.2, 0.2, -0.2]), np.array([1.8, 1.8, 1.8, 0.2])
    assert (factors >= lo).all() and (factors <= hi).all()
    assert (factors.min(0) < lo + 0.05).all() and (factors.max(0) > hi - 0.05).all()


def test_color_jitter_gate_and_factors():
    image = rand_image(14, (6, 6, 3)) * 0.5 + 0.1                 # in [0.1, 0.6]: no clipping
    # Zero contrast, saturation and hue strengths make those ops identities: what is left is
    # the gate and one brightness factor per example.
    off, bright = jax.jit(lambda k1, k2: (
        A.color_jitter(k1, image, p=0.0),
        per_key(lambda k: A.color_jitter(k, image, p=0.5, brightness=0.5, contrast=0.0,
                                         saturation=0.0, hue=0.0), k2, 200)))(key(15), key(16))
    np.testing.assert_array_equal(off, image)
    ratio = np.asarray(bright) / image
    per_example = ratio.reshape(200, -1)
    np.testing.assert_allclose(per_example, per_example[:, :1].repeat(108, 1), atol=1e-4)
    factor = per_example[:, 0]
    assert (factor > 0.5 - 1e-4).all() and (factor < 1.5 + 1e-4).all()
    assert 0.35 < (np.abs(factor - 1) < 1e-6).mean() < 0.65            # gate p = 0.5


# ----------------------------------------------------------------------------- blur, solarize

def np_blur(image, sigma, size):
    r = size // 2
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(image, pad, mode="reflect")             # torch's reflect: edge not repeated
        image = sum(k[i] * np.take(p, np.arange(i, i + image.shape[axis]), axis=axis)
                    for i in range(size))
    return image


def test_blur_kernel_size_rule():
    assert [A.blur_kernel_size(h) for h in (8, 16, 32, 50, 100, 224)] == [3, 3, 3, 5, 11, 23]


def test_blur_matches_numpy_and_keeps_constants():
    small = rand_image(18, (9, 7, 3))
    const = np.full((32, 32, 3), 0.3, np.float32)
    image = rand_image(20, (32, 32, 3))
    def fn(rng):
        k = keys(rng, 3)
        return (A.blur(small, 1.3, 5), A.gaussian_blur(k[0], const, p=1.0),
                A.gaussian_blur(k[1], image, p=0.0), A.gaussian_blur(k[2], image, 1.0, (1.5, 2.0)))
    blurred, flat, off, on = jax.jit(fn)(key(19))
    np.testing.assert_allclose(blurred, np_blur(small, 1.3, 5), atol=1e-5)
    np.testing.assert_allclose(flat, const, atol=1e-6)
    np.testing.assert_array_equal(off, image)
    assert abs(float(on.mean()) - image.mean()) < 0.01 and float(on.std()) < 0.8 * image.std()


def test_solarize_inverts_above_threshold():
    image = np.array([[[0.1, 0.5, 0.7]]], np.float32)
    on, off = jax.jit(lambda k1, k2: (A.solarize(k1, image, p=1.0),
                                      A.solarize(k2, image, p=0.0)))(key(23), key(24))
    np.testing.assert_allclose(on[0, 0], [0.1, 0.5, 0.3], atol=1e-7)
    np.testing.assert_array_equal(off, image)


# ----------------------------------------------------------------------------- pipelines

@pytest.fixture(scope="module")
def batch():
    one = np.random.RandomState(25).randint(0, 256, (1, 16, 16, 3)).astype(np.uint8)
    return jnp.asarray(np.repeat(one, 4, axis=0))        # identical examples: any difference
                                                          # between outputs comes from the rng


def check_range(x, shape):
    assert x.shape == shape and x.dtype == jnp.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def differ(a, b):
    return float(jnp.abs(a - b).mean()) > 1e-3


def test_simclr_views(batch):
    fn = jax.jit(lambda k, x: A.simclr_views(k, x, out_size=(12, 8)))
    v1, v2 = fn(key(26), batch)
    for v in (v1, v2):
        check_range(v, (4, 12, 8, 3))
    assert differ(v1, v2)
    assert all(differ(v1[0], v1[i]) for i in range(1, 4))
    fn(key(27), batch)
    assert fn._cache_size() == 1                            # no recompile on a new key
    # Other settings only need to trace: default size, BYOL's recipe, 1-channel images.
    shape = jax.eval_shape(lambda k: A.simclr_views(
        k, batch, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2), jitter=A.DINO_JITTER),
        key(28))
    assert shape[0].shape == (4, 16, 16, 3)
    shape = jax.eval_shape(A.simclr_views, key(29), batch[..., :1])
    assert shape[1].shape == (4, 16, 16, 1)


def test_multi_crop(batch):
    globals_, locals_ = jax.jit(lambda k, x: A.multi_crop(k, x, num_local=2))(
        key(30), batch)
    check_range(globals_, (2, 4, 16, 16, 3))
    check_range(locals_, (2, 4, 8, 8, 3))
    assert differ(globals_[0], globals_[1]) and differ(locals_[0], locals_[1])
    assert all(differ(globals_[0, 0], globals_[0, i]) for i in range(1, 4))
    g, l = jax.eval_shape(lambda k: A.multi_crop(k, batch, num_local=0), key(31))
    assert g.shape == (2, 4, 16, 16, 3) and l.shape == (0, 4, 8, 8, 3)
    g, l = jax.eval_shape(lambda k: A.multi_crop(k, batch[:, :15], local_size=(6, 6)),
                          key(32))
    assert g.shape == (2, 4, 15, 16, 3) and l.shape == (6, 4, 6, 6, 3)


def test_rejects_bad_channels(batch):
    with pytest.raises(ValueError, match="C in"):
        A.simclr_views(key(33), jnp.zeros((2, 8, 8, 2), jnp.uint8))
