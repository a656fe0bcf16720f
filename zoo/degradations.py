"""Synthetic image degradations in pure JAX: batched, jit-able, random parameters per example.

Used by degradation-classification pretraining (DCPT, Hu et al., ICLR 2025, "Universal Image
Restoration Pre-training via Degradation Classification", and MaskDCPT): inside the jitted train
step every image of a batch gets a random degradation type, which is its classification label,
and is degraded on device.

Images are float32 in [0, 1], channel-last RGB: one image is ``[H, W, 3]``, a batch
``[B, H, W, 3]``. Every output is clipped to [0, 1]. Each degradation has an explicit-parameter
function on one image (parameters may be traced, shapes are static, so it jits and vmaps), and
:func:`sample_params` draws one example's parameters uniformly from :data:`PARAM_RANGES`:

=============  ============================================================================
name           model and parameter ranges (uniform)
=============  ============================================================================
noise          ``x + sigma * N(0, 1)``, one sigma for all channels; sigma in [0, 50/255]
blur           isotropic Gaussian, 19-tap separable kernel (3 sigma at the largest sigma),
               circular padding; sigma in [0.5, 3.0] px
motion_blur    normalised line kernel (13x13 static support), circular padding;
               length in [3, 11] px, angle in [0, pi) counter-clockwise from the +x axis
jpeg           YCbCr, 8x8 orthonormal DCT-II, IJG-scaled Annex K tables on the 0..255
               scale, round, back; no chroma subsampling; quality in [10, 50]
               (continuous: the IJG table formula takes non-integer qualities)
resample       down by ``factor`` (triangle filter of width ``factor``, area-like), then
               bilinear back up to the same size; factor in [2, 4] (non-integer allowed)
low_light      ``(scale * x) ** gamma``; scale in [0.2, 0.6], gamma in [1.0, 2.0]
haze           ``J t + A (1 - t)``, ``t = exp(-beta d)``, d a linear ramp normalised to
               [0, 1] in direction depth_angle; beta in [0.5, 2.0], airlight A in
               [0.7, 1.0] (grey), depth_angle in [0, 2 pi)
rain           ``x + intensity * streaks``: Bernoulli(density) seeds smeared by a peak-1
               line kernel (17x17 support), clipped to 1, same for all channels;
               density in [0.002, 0.01], length in [5, 15] px, angle in [-20, 20] degrees
               from vertical (radians in the table), intensity in [0.5, 1.0]
salt_pepper    a Bernoulli(amount) set of pixels (all channels together) set to 0 or 1 with
               probability 1/2 each; amount in [0.01, 0.1]
color_shift    ``gain * x + offset`` per channel; gain in [0.7, 1.3], offset in [-0.1, 0.1]
               (three independent draws each)
=============  ============================================================================

Randomness: :func:`degrade` splits its key into ``(params_rng, apply_rng)``; the parameters
come from one ``[NUM_UNIFORMS]`` uniform draw of ``params_rng`` and the random kinds (noise,
rain, salt_pepper) read one ``[H, W, 3]`` uniform field drawn from ``apply_rng``. Batches:
:func:`degrade_batch` applies ``kinds[labels[i]]`` to image i with the key
``example_keys(rng, B)[i]``, so image i equals ``degrade(kinds[labels[i]], images[i],
example_keys(rng, B)[i])``; :func:`random_degradations` draws the labels too.

Example::

    images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
    degraded, labels = jax.jit(random_degradations)(images, jax.random.key(1))
    # labels[i] in [0, 5) indexes ALL_IN_ONE; degraded[i] is images[i] with that degradation

Matrix products and convolutions run at ``Precision.HIGHEST``: accelerators otherwise round
float32 operands to bfloat16, which would break exact properties (blur keeps the mean, JPEG's
block coefficients are multiples of the table).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEGRADATIONS = ("noise", "blur", "motion_blur", "jpeg", "resample", "low_light", "haze", "rain",
                "salt_pepper", "color_shift")
ALL_IN_ONE = ("noise", "blur", "haze", "rain", "low_light")   # all-in-one restoration's five

PARAM_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "noise": {"sigma": (0.0, 50.0 / 255.0)},
    "blur": {"sigma": (0.5, 3.0)},
    "motion_blur": {"length": (3.0, 11.0), "angle": (0.0, math.pi)},
    "jpeg": {"quality": (10.0, 50.0)},
    "resample": {"factor": (2.0, 4.0)},
    "low_light": {"scale": (0.2, 0.6), "gamma": (1.0, 2.0)},
    "haze": {"beta": (0.5, 2.0), "airlight": (0.7, 1.0), "depth_angle": (0.0, 2 * math.pi)},
    "rain": {"density": (0.002, 0.01), "length": (5.0, 15.0),
             "angle": (-math.radians(20.0), math.radians(20.0)), "intensity": (0.5, 1.0)},
    "salt_pepper": {"amount": (0.01, 0.1)},
    "color_shift": {"gain": (0.7, 1.3), "offset": (-0.1, 0.1)},
}
# Parameters that are drawn per channel; every other parameter is a scalar.
PARAM_SHAPES: dict[tuple[str, str], tuple[int, ...]] = {
    ("color_shift", "gain"): (3,), ("color_shift", "offset"): (3,)}

_HIGHEST = jax.lax.Precision.HIGHEST


def _line_support(max_length: float) -> int:
    """Odd kernel size that holds every line of length <= max_length without truncation: a
    pixel has weight only if |along| < max_length / 2 + 0.5 and |perp| < 1 (see line_kernel)."""
    return 2 * math.ceil(max_length / 2 + 0.5) + 1


BLUR_TAPS = 2 * math.ceil(3 * PARAM_RANGES["blur"]["sigma"][1]) + 1            # 19
MOTION_KERNEL = _line_support(PARAM_RANGES["motion_blur"]["length"][1])        # 13
RAIN_KERNEL = _line_support(PARAM_RANGES["rain"]["length"][1])                 # 17


def check_kind(name: str) -> None:
    """Raises a one-line ValueError unless ``name`` is one of :data:`DEGRADATIONS`."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; choose from {', '.join(DEGRADATIONS)}")


# ---------------------------------------------------------------------------------------------
# Circular convolution
# ---------------------------------------------------------------------------------------------

def circular_conv(image: jax.Array, kernel: jax.Array) -> jax.Array:
    """Convolves every channel of ``image [H, W, C]`` with ``kernel [kh, kw]`` (odd sizes),
    wrapping around the borders.

    Circular (wrap) padding makes the filter a circulant operator: with a kernel that sums to 1
    every input pixel's mass lands somewhere in the output, so the image mean is preserved
    exactly. Zero padding would darken the borders, reflect padding would re-weight them. Our
    kernels are point-symmetric, so correlation (what XLA computes) equals convolution.
    """
    kh, kw = kernel.shape
    padded = jnp.pad(image, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode="wrap")
    # Channels go to the batch axis so one [kh, kw, 1, 1] kernel serves all of them.
    lhs = jnp.moveaxis(padded, -1, 0)[..., None]                      # [C, H', W', 1]
    out = jax.lax.conv_general_dilated(lhs, kernel[:, :, None, None].astype(lhs.dtype),
                                       (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=_HIGHEST)
    return jnp.moveaxis(out[..., 0], 0, -1)


def gaussian_kernel_1d(sigma, taps: int = BLUR_TAPS) -> jax.Array:
    """``taps`` samples of a Gaussian of std ``sigma`` at integer offsets, summing to 1."""
    x = jnp.arange(taps, dtype=jnp.float32) - taps // 2
    g = jnp.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def line_kernel(length, angle, size: int) -> jax.Array:
    """An anti-aliased line segment through the centre of a ``size x size`` grid, peak 1.

    ``angle`` is counter-clockwise from the +x axis as the image is displayed (rows grow
    downwards). A pixel at offset p gets ``max(0, 1 - |perp(p)|) * clip(length / 2 + 0.5 -
    |along(p)|, 0, 1)``: a one-pixel-wide tent across the line and a soft end, so an
    axis-aligned line of integer length L covers exactly L pixels and lengths vary smoothly.
    """
    offsets = jnp.arange(size, dtype=jnp.float32) - size // 2
    dy, dx = jnp.meshgrid(offsets, offsets, indexing="ij")
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    along = dx * cos - dy * sin          # minus: row offsets point down, angles turn up
    perp = dx * sin + dy * cos
    across = jnp.clip(1.0 - jnp.abs(perp), 0.0, 1.0)
    ends = jnp.clip(length / 2 + 0.5 - jnp.abs(along), 0.0, 1.0)
    return across * ends


# ---------------------------------------------------------------------------------------------
# Degradations on one image [H, W, 3], explicit parameters
# ---------------------------------------------------------------------------------------------

def uniform_field(rng: jax.Array, height: int, width: int) -> jax.Array:
    """The one random draw of the random degradations: ``[H, W, 3]`` uniform in [0, 1).

    noise turns all three channels into normals, rain reads channel 0, salt_pepper channels 0
    and 1. One draw site serves every kind, so :func:`degrade_batch` draws it once per example
    outside its switch. Drawn flat and reshaped: XLA compiles a rank-1 threefry draw several
    times faster than a rank-3 one (seconds per draw site on CPU).
    """
    return jax.random.uniform(rng, (height * width * 3,)).reshape(height, width, 3)


def normal_from_uniform(u: jax.Array) -> jax.Array:
    """Standard normals by the inverse CDF ``sqrt(2) erfinv(2u - 1)``, as jax.random.normal
    does; ``2u - 1`` is kept above -1 so ``u = 0`` gives a finite value."""
    v = jnp.maximum(2.0 * u - 1.0, np.nextafter(np.float32(-1.0), np.float32(0.0)))
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(v)


def _noise(image, field, sigma):
    return jnp.clip(image + sigma * normal_from_uniform(field), 0.0, 1.0)


def gaussian_noise(image: jax.Array, rng: jax.Array, sigma) -> jax.Array:
    """Additive white Gaussian noise of std ``sigma`` (same for all channels), clipped."""
    return _noise(image, uniform_field(rng, *image.shape[:2]), sigma)


def gaussian_blur(image: jax.Array, sigma) -> jax.Array:
    """Isotropic Gaussian blur with std ``sigma`` pixels: a separable, normalised,
    :data:`BLUR_TAPS`-tap kernel with circular padding (keeps the per-channel mean)."""
    g = gaussian_kernel_1d(sigma)
    out = circular_conv(image, g[:, None])
    out = circular_conv(out, g[None, :])
    return jnp.clip(out, 0.0, 1.0)


def motion_blur(image: jax.Array, length, angle) -> jax.Array:
    """Linear motion blur: the :func:`line_kernel` of ``length`` px at ``angle`` normalised to
    sum 1, on a static :data:`MOTION_KERNEL` square support, circular padding."""
    k = line_kernel(length, angle, MOTION_KERNEL)
    return jnp.clip(circular_conv(image, k / k.sum()), 0.0, 1.0)


# Annex K of ITU-T T.81 (the JPEG standard): the example luminance and chrominance tables.
JPEG_LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)
JPEG_CHROMA_TABLE = np.full((8, 8), 99, np.float32)
JPEG_CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                             [47, 66, 99, 99]]

# JFIF's full-range BT.601 transform on the 0..255 scale: ycc = RGB_TO_YCBCR @ rgb + offset.
RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                         [-0.168736, -0.331264, 0.5],
                         [0.5, -0.418688, -0.081312]], np.float64)
YCBCR_OFFSET = np.array([0.0, 128.0, 128.0], np.float32)
# The exact inverse (JFIF's published 1.402 / 0.344136 / ... are this matrix rounded), so that a
# fine quantiser gives back the input.
YCBCR_TO_RGB = np.linalg.inv(RGB_TO_YCBCR).astype(np.float32)
RGB_TO_YCBCR = RGB_TO_YCBCR.astype(np.float32)


def dct_matrix(n: int = 8) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``C[u, i] = c(u) cos((2i + 1) u pi / 2n)``, ``c(0) =
    sqrt(1/n)``, else ``sqrt(2/n)``; ``C @ x`` transforms, ``C.T @ X`` inverts."""
    u, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    c = np.where(u == 0, np.sqrt(1.0 / n), np.sqrt(2.0 / n))
    return (c * np.cos((2 * i + 1) * u * np.pi / (2 * n))).astype(np.float32)


def jpeg_tables(quality) -> jax.Array:
    """The ``[8, 8, 3]`` quantisation steps (Y, Cb, Cr) at ``quality`` (traced allowed).

    IJG's ``jpeg_quality_scaling``: ``scale = 5000 / q`` below 50, else ``200 - 2 q`` (q clipped
    to [1, 100]); entries ``floor((T * scale + 50) / 100)`` clipped to at least 1. No baseline
    cap at 255 is applied. A non-integer quality goes through the same formula.
    """
    q = jnp.clip(jnp.asarray(quality, jnp.float32), 1.0, 100.0)
    scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    tables = jnp.stack([JPEG_LUMA_TABLE, JPEG_CHROMA_TABLE, JPEG_CHROMA_TABLE], axis=-1)
    return jnp.maximum(jnp.floor((tables * scale + 50.0) / 100.0), 1.0)


def check_jpeg_shape(height: int, width: int) -> None:
    """JPEG works on whole 8x8 blocks: raises a ValueError naming the shape otherwise."""
    if height % 8 or width % 8:
        raise ValueError(f"jpeg: image size {height}x{width} is not a multiple of 8 in both "
                         "dimensions (JPEG quantises whole 8x8 blocks)")


def jpeg(image: jax.Array, quality) -> jax.Array:
    """JPEG-like compression at ``quality``: YCbCr, per-8x8-block DCT, quantise, back.

    On the 0..255 scale, level-shifted by 128 as in baseline JPEG. Chroma is not subsampled
    (every channel keeps full resolution; the loss comes from quantisation alone) and the
    decoded pixels are not rounded to 8 bits, so the output's luma block DCT is exactly a
    multiple of the table up to float error and clipping.
    """
    height, width, _ = image.shape
    check_jpeg_shape(height, width)
    d = jnp.asarray(dct_matrix(8))
    ycc = jnp.einsum("hwc,yc->hwy", image * 255.0, RGB_TO_YCBCR, precision=_HIGHEST)
    ycc = ycc + YCBCR_OFFSET - 128.0
    blocks = ycc.reshape(height // 8, 8, width // 8, 8, 3)           # [bh, i, bw, j, c]
    coef = jnp.einsum("ui,vj,aibjc->aubvc", d, d, blocks, precision=_HIGHEST)
    step = jpeg_tables(quality)[None, :, None, :, :]                  # [1, u, 1, v, c]
    coef = jnp.round(coef / step) * step
    blocks = jnp.einsum("ui,vj,aubvc->aibjc", d, d, coef, precision=_HIGHEST)
    ycc = blocks.reshape(height, width, 3) + 128.0 - YCBCR_OFFSET
    rgb = jnp.einsum("hwy,cy->hwc", ycc, YCBCR_TO_RGB, precision=_HIGHEST)
    return jnp.clip(rgb / 255.0, 0.0, 1.0)


def resample(image: jax.Array, factor) -> jax.Array:
    """Down-sample by ``factor`` (traced, non-integer allowed) and back up to ``[H, W, 3]``.

    Shapes must be static while the factor is random, so the small image lives in the top-left
    ``~H/factor x W/factor`` corner of an ``H x W`` buffer: ``jax.image.scale_and_translate``
    with scale ``1/factor`` (linear kernel, antialiased: a triangle filter ``factor`` pixels
    wide, area-like), then with scale ``factor`` (bilinear, no antialiasing needed). The buffer
    past the small image is empty; it is filled by repeating the last valid row and column so
    the up-sampling does not blend in zeros at the bottom and right edges (a constant image
    stays constant). The valid extent is read off a channel of ones resampled alongside, so it
    agrees with scale_and_translate's own bounds test.
    """
    height, width, channels = image.shape
    factor = jnp.asarray(factor, jnp.float32)
    with_ones = jnp.concatenate([image, jnp.ones((height, width, 1), image.dtype)], axis=-1)
    down = jnp.stack([1.0 / factor, 1.0 / factor])
    small = jax.image.scale_and_translate(with_ones, with_ones.shape, (0, 1), down,
                                          jnp.zeros(2), "linear", antialias=True)
    valid = small[..., channels] > 0.5
    rows = jnp.minimum(jnp.arange(height), jnp.maximum(valid[:, 0].sum(), 1) - 1)
    cols = jnp.minimum(jnp.arange(width), jnp.maximum(valid[0, :].sum(), 1) - 1)
    small = small[rows][:, cols, :channels]
    up = jnp.stack([factor, factor])
    out = jax.image.scale_and_translate(small, image.shape, (0, 1), up, jnp.zeros(2), "linear",
                                        antialias=False)
    return jnp.clip(out, 0.0, 1.0)


def low_light(image: jax.Array, scale, gamma) -> jax.Array:
    """Low light: ``(scale * x) ** gamma`` with scale < 1 and gamma >= 1, darker everywhere and
    with less contrast (for x in [0, 1], ``(s x)^g <= s x <= x``)."""
    return jnp.clip(jnp.maximum(scale * image, 0.0) ** gamma, 0.0, 1.0)


def ramp_depth(height: int, width: int, angle) -> jax.Array:
    """A synthetic depth map ``[H, W]``: a linear ramp increasing in direction ``angle``
    (counter-clockwise from +x as displayed), normalised to span exactly [0, 1]."""
    y = jnp.linspace(0.0, 1.0, height)[:, None]
    x = jnp.linspace(0.0, 1.0, width)[None, :]
    d = x * jnp.cos(angle) - y * jnp.sin(angle)
    # Over the unit square the ramp spans |cos| + |sin| >= 1, so the division is safe.
    return (d - d.min()) / (d.max() - d.min())


def transmission(depth: jax.Array, beta) -> jax.Array:
    """Koschmieder's medium transmission ``t = exp(-beta d)``, in (0, 1] for d >= 0."""
    return jnp.exp(-beta * depth)


def haze(image: jax.Array, depth: jax.Array, beta, airlight) -> jax.Array:
    """Atmospheric scattering model ``I = J t + A (1 - t)``, ``t = exp(-beta * depth)``, with a
    grey airlight ``A`` (same for all channels) and ``depth [H, W]``. ``I`` is a convex
    combination of ``J`` and ``A``, so it stays in [0, 1] and moves towards A."""
    t = transmission(depth, beta)[..., None]
    return jnp.clip(image * t + airlight * (1.0 - t), 0.0, 1.0)


def _streaks(seed_draw, density, length, angle):
    seeds = (seed_draw < density).astype(jnp.float32)
    kernel = line_kernel(length, jnp.pi / 2 + angle, RAIN_KERNEL)
    return jnp.clip(circular_conv(seeds[..., None], kernel)[..., 0], 0.0, 1.0)


def rain_streaks(rng: jax.Array, height: int, width: int, density, length, angle) -> jax.Array:
    """A ``[H, W]`` streak map in [0, 1]: Bernoulli(density) seed pixels, each smeared along a
    :func:`line_kernel` (peak 1) of ``length`` px at ``angle`` radians from vertical
    (circular padding), overlaps clipped to 1. A pixel is a seed when channel 0 of
    :func:`uniform_field` is below the density, so with a fixed rng a higher density only
    adds seeds."""
    return _streaks(uniform_field(rng, height, width)[..., 0], density, length, angle)


def _rain(image, field, density, length, angle, intensity):
    streaks = _streaks(field[..., 0], density, length, angle)
    return jnp.clip(image + intensity * streaks[..., None], 0.0, 1.0)


def rain(image: jax.Array, rng: jax.Array, density, length, angle, intensity) -> jax.Array:
    """Adds ``intensity *`` :func:`rain_streaks` to every channel (rain is bright and grey),
    then clips; the output is never darker than the input."""
    return _rain(image, uniform_field(rng, *image.shape[:2]), density, length, angle,
                 intensity)


def _salt_pepper(image, field, amount):
    hit = field[..., :1] < amount
    value = (field[..., 1:2] < 0.5).astype(image.dtype)
    return jnp.where(hit, value, image)


def salt_pepper(image: jax.Array, rng: jax.Array, amount) -> jax.Array:
    """Impulse noise: each pixel, with probability ``amount``, has all its channels set to 0
    or to 1 (probability 1/2 each); channels 0 and 1 of :func:`uniform_field` decide."""
    return _salt_pepper(image, uniform_field(rng, *image.shape[:2]), amount)


def color_shift(image: jax.Array, gain, offset) -> jax.Array:
    """Per-channel affine colour cast ``gain * x + offset`` (gain, offset: ``[3]``), clipped."""
    return jnp.clip(image * gain + offset, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Random parameters and dispatch
# ---------------------------------------------------------------------------------------------

def _size(name: str, param: str) -> int:
    return math.prod(PARAM_SHAPES.get((name, param), ()))


# The length of the uniform vector every kind draws its parameters from (color_shift: 6).
NUM_UNIFORMS = max(sum(_size(n, p) for p in PARAM_RANGES[n]) for n in DEGRADATIONS)
RANDOM_KINDS = ("noise", "rain", "salt_pepper")     # the kinds that read uniform_field


def params_from_uniform(name: str, u: jax.Array) -> dict[str, jax.Array]:
    """Maps ``u [NUM_UNIFORMS]`` in [0, 1) onto ``name``'s :data:`PARAM_RANGES`, in the table's
    order: ``lo + (hi - lo) * u`` (unused entries are ignored)."""
    check_kind(name)
    params, start = {}, 0
    for param, (lo, hi) in PARAM_RANGES[name].items():
        shape = PARAM_SHAPES.get((name, param), ())
        size = _size(name, param)
        params[param] = lo + (hi - lo) * u[start:start + size].reshape(shape)
        start += size
    return params


def sample_params(name: str, rng: jax.Array) -> dict[str, jax.Array]:
    """One example's parameters for degradation ``name``, each uniform in its
    :data:`PARAM_RANGES` interval: one ``[NUM_UNIFORMS]`` uniform draw, mapped by
    :func:`params_from_uniform` (the same draw for every kind, so a batch draws it once).

    >>> sample_params("low_light", jax.random.key(0))   # {'scale': ..., 'gamma': ...}
    """
    check_kind(name)
    return params_from_uniform(name, jax.random.uniform(rng, (NUM_UNIFORMS,)))


def _apply(name, image, params, field):
    """Degradation ``name`` with explicit ``params``; ``field`` is :func:`uniform_field`'s
    draw for the random kinds and is ignored by the others."""
    p = params
    if name == "noise":
        return _noise(image, field, p["sigma"])
    if name == "blur":
        return gaussian_blur(image, p["sigma"])
    if name == "motion_blur":
        return motion_blur(image, p["length"], p["angle"])
    if name == "jpeg":
        return jpeg(image, p["quality"])
    if name == "resample":
        return resample(image, p["factor"])
    if name == "low_light":
        return low_light(image, p["scale"], p["gamma"])
    if name == "haze":
        depth = ramp_depth(image.shape[0], image.shape[1], p["depth_angle"])
        return haze(image, depth, p["beta"], p["airlight"])
    if name == "rain":
        return _rain(image, field, p["density"], p["length"], p["angle"], p["intensity"])
    if name == "salt_pepper":
        return _salt_pepper(image, field, p["amount"])
    return color_shift(image, p["gain"], p["offset"])


def apply(name: str, image: jax.Array, rng: jax.Array, params: dict) -> jax.Array:
    """Applies degradation ``name`` with explicit ``params`` (as from :func:`sample_params`);
    ``rng`` feeds the random kinds (:data:`RANDOM_KINDS`) and is not used by the others."""
    check_kind(name)
    image = jnp.asarray(image, jnp.float32)
    field = uniform_field(rng, *image.shape[:2]) if name in RANDOM_KINDS else None
    return _apply(name, image, params, field)


def degrade(name: str, image: jax.Array, rng: jax.Array) -> jax.Array:
    """Degrades one image ``[H, W, 3]`` with random parameters: ``rng`` splits into
    ``(params_rng, apply_rng)`` for :func:`sample_params` and :func:`apply`.

    >>> degrade("blur", jnp.full((16, 16, 3), 0.5), jax.random.key(0))   # 0.5 (up to rounding)
    """
    check_kind(name)
    params_rng, apply_rng = jax.random.split(rng)
    return apply(name, image, apply_rng, sample_params(name, params_rng))


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple; a one-line ValueError if empty or holding an unknown name."""
    if isinstance(kinds, str):
        raise ValueError(f"kinds: expected a sequence of names, got the string {kinds!r}")
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds: empty; choose from {', '.join(DEGRADATIONS)}")
    for name in kinds:
        check_kind(name)
    return kinds


def example_keys(rng: jax.Array, batch: int) -> jax.Array:
    """The per-example keys of :func:`degrade_batch`: ``jax.random.split(rng, batch)``."""
    return jax.random.split(rng, batch)


def degrade_batch(images: jax.Array, labels: jax.Array, rng: jax.Array,
                  kinds: Sequence[str] = ALL_IN_ONE) -> jax.Array:
    """Applies ``kinds[labels[i]]`` to image i with key ``example_keys(rng, B)[i]``, exactly as
    ``degrade(kinds[labels[i]], images[i], example_keys(rng, B)[i])`` would.

    ``vmap`` of ``jax.lax.switch``: with a batched index, switch evaluates every branch on
    every image and selects, so the cost is the sum over ``kinds``, fine for the small images
    of pretraining crops. The random draws (parameters, :func:`uniform_field`) are the same
    for every kind, so they are made once per example before the switch and the branches are
    deterministic: fewer draws to compile, and no key is fed to several branches (which JAX's
    key-reuse checker reports). Labels out of range are clamped by switch (traced values
    cannot be checked).

    Args:
      images: ``[B, H, W, 3]`` in [0, 1].
      labels: ``[B]`` integers in ``[0, len(kinds))``.
      rng: a JAX key.
      kinds: degradation names, checked in Python before tracing.
    """
    kinds = check_kinds(kinds)
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected [B, H, W, 3], got shape {tuple(images.shape)}")
    batch, height, width, _ = images.shape
    if "jpeg" in kinds:
        check_jpeg_shape(height, width)
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (batch,):
        raise ValueError(f"labels: expected shape ({batch},), got {tuple(labels.shape)}")
    needs_field = any(name in RANDOM_KINDS for name in kinds)
    branches = [lambda image, p, f, name=name: _apply(name, image, params_from_uniform(name, p),
                                                      f)
                for name in kinds]

    def one(image, label, key):
        # The same derivation as degrade: split, then sample_params' draw and apply's field.
        params_rng, apply_rng = jax.random.split(key)
        u = jax.random.uniform(params_rng, (NUM_UNIFORMS,))
        field = uniform_field(apply_rng, height, width) if needs_field else None
        return jax.lax.switch(label, branches, image, u, field)

    return jax.vmap(one)(images, labels, example_keys(rng, batch))


def random_degradations(images: jax.Array, rng: jax.Array,
                        kinds: Sequence[str] = ALL_IN_ONE) -> tuple[jax.Array, jax.Array]:
    """Degrades each image with a uniformly drawn kind: returns ``(degraded, labels)``.

    ``rng`` splits into ``(labels_rng, images_rng)``; labels are ``int32`` uniform in
    ``[0, len(kinds))`` from ``labels_rng`` and ``degraded = degrade_batch(images, labels,
    images_rng, kinds)``.
    """
    kinds = check_kinds(kinds)
    labels_rng, images_rng = jax.random.split(rng)
    labels = jax.random.randint(labels_rng, (jnp.shape(images)[0],), 0, len(kinds), jnp.int32)
    return degrade_batch(images, labels, images_rng, kinds), labels
