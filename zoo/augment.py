"""Image augmentations for joint-embedding objectives (SimCLR, BYOL, DINO), on device, in jit.

Every random op works on ONE float image ``[H, W, C]`` in [0, 1] (C = 1 or 3) with its own key;
the pipelines ``vmap`` over views and examples, so each example of each view gets its own crop,
flip, jitter factors and order. Shapes depend only on Python sizes; crop boxes, factors and
sigmas are traced. Probabilities are Python floats: 0 skips an op statically, 1 skips the coin.
Each op draws its randomness as ONE uniform vector and a pipeline draws one flat vector for
everything: each ``jax.random`` call site inlines a Threefry hash, and a dozen per view made
XLA's CPU compile several times slower.

References:
  * SimCLR: Chen et al. 2020, appendix A, and google-research/simclr ``data_util.py``
    (``color_jitter_rand``: four jitter ops in a random order, clipped after each).
  * torchvision ``RandomResizedCrop`` (crop sampling, 10 tries, centre-crop fallback) and
    ``ColorJitter`` (blend-based contrast and saturation).
  * BYOL: Grill et al. 2020, appendix B (asymmetric blur 1.0/0.1 and solarize 0.0/0.2).
  * DINO: Caron et al. 2021, ``DataAugmentationDINO`` in ``main_dino.py`` (multi-crop).

Deviations, on purpose: resampling is bilinear without antialiasing (torchvision >= 0.17
antialiases when shrinking; DINO uses bicubic); contrast and saturation blend with the grey
image as torchvision does (SimCLR's TF ops use per-channel means and HSV saturation); blur
pads by reflection as torchvision does (SimCLR's TF conv pads with zeros).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LUMA = (0.2989, 0.5870, 0.1140)          # ITU-R 601, as torchvision and tf.image
DINO_JITTER = (0.4, 0.4, 0.2, 0.1)       # (brightness, contrast, saturation, hue); BYOL's too
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")   # indices used by ``order``
CROP_TRIES = 10                          # torchvision's attempts before the fallback
CROP_DRAWS = 2 * CROP_TRIES + 2          # area and ratio per try, then top and left
JITTER_DRAWS = 9                         # coin, 4 sort keys for the order, 4 factors


def _coin(u, p, apply: Callable[[], jax.Array], image: jax.Array) -> jax.Array:
    """``apply()`` if ``u < p`` else ``image``; a Python p of 0 or 1 decides statically."""
    if isinstance(p, (int, float)) and p <= 0:
        return image
    if isinstance(p, (int, float)) and p >= 1:
        return apply()
    return jnp.where(u < p, apply(), image)


# ---------------------------------------------------------------------------------------------
# Random resized crop
# ---------------------------------------------------------------------------------------------

def _crop_box(u, height: int, width: int, scale, ratio):
    t = CROP_TRIES
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:t])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = jnp.exp(log_lo + (log_hi - log_lo) * u[t:2 * t])
    ws = jnp.round(jnp.sqrt(area * r)).astype(jnp.int32)     # round half to even, as Python's
    hs = jnp.round(jnp.sqrt(area / r)).astype(jnp.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    found, first = fits.any(), jnp.argmax(fits)              # argmax: the first try that fits
    # Fallback (static): the whole image cut to the nearest allowed ratio, centred.
    fw, fh = width, height
    if width / height < min(ratio):
        fh = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fw = int(round(height * max(ratio)))
    h = jnp.where(found, hs[first], fh)
    w = jnp.where(found, ws[first], fw)
    # Offsets uniform over the valid positions [0, height - h].
    top = jnp.minimum(jnp.floor(u[2 * t] * (height - h + 1)).astype(jnp.int32), height - h)
    left = jnp.minimum(jnp.floor(u[2 * t + 1] * (width - w + 1)).astype(jnp.int32), width - w)
    return (jnp.where(found, top, (height - fh) // 2), jnp.where(found, left, (width - fw) // 2),
            h, w)


def crop_box(rng, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
             ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[jax.Array, ...]:
    """Samples a crop box as torchvision's ``RandomResizedCrop.get_params``.

    Each try draws an area fraction uniform in ``scale`` and a log aspect ratio (w/h) uniform
    in ``log(ratio)``; ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``. The first of
    ``CROP_TRIES`` tries that fits is kept (all drawn at once, picked by argmax over the valid
    mask), with an offset uniform over valid positions. If none fits: the centred crop of the
    image's aspect ratio clamped into ``ratio``.

    Args:
      rng: a PRNG key.
      height, width: static image size.
      scale, ratio: ranges of the area fraction and of the aspect ratio w / h.

    Returns:
      ``(top, left, h, w)``, int32 scalars.
    """
    return _crop_box(jax.random.uniform(rng, (CROP_DRAWS,)), height, width, scale, ratio)


def _taps(start, length, size: int):
    """Bilinear source taps for ``size`` outputs over ``[start, start + length)``: half-pixel
    centres, clamped to the crop's edge pixels (what torch's interpolate does on the crop)."""
    pos = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (length.astype(jnp.float32) / size) - 0.5
    pos = jnp.clip(pos, 0.0, (length - 1).astype(jnp.float32))
    i0 = jnp.floor(pos).astype(jnp.int32)
    return start + i0, start + jnp.minimum(i0 + 1, length - 1), pos - i0


def resized_crop(image: jax.Array, box, out_size: Sequence[int]) -> jax.Array:
    """Crops ``box = (top, left, h, w)`` (traced ints) from ``image [H, W, C]`` and resizes it
    to ``out_size`` as ``jax.image.resize(crop, ..., "bilinear", antialias=False)`` would, with
    separable gathers, so the box may be traced."""
    top, left, h, w = (jnp.asarray(v, jnp.int32) for v in box)
    y0, y1, fy = _taps(top, h, out_size[0])
    rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
    x0, x1, fx = _taps(left, w, out_size[1])
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def random_resized_crop(rng, image: jax.Array, out_size: Sequence[int],
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
    """torchvision's ``RandomResizedCrop`` (bilinear, no antialias) of one float image
    ``[H, W, C]`` to the static ``out_size``: :func:`crop_box`, then :func:`resized_crop`."""
    return resized_crop(image, crop_box(rng, *image.shape[:2], scale, ratio), out_size)


def _flip(u, image):
    return _coin(u[0], 0.5, lambda: image[:, ::-1], image)


def random_flip(rng, image: jax.Array) -> jax.Array:
    """Horizontal flip of one image ``[H, W, C]`` with probability 0.5."""
    return _flip(jax.random.uniform(rng, (1,)), image)


# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------

def rgb_to_grayscale(image: jax.Array) -> jax.Array:
    """ITU-R 601 luma ``[..., 1]`` of an RGB image; a 1-channel image is returned as is."""
    if image.shape[-1] == 1:
        return image
    return (image * jnp.asarray(LUMA, image.dtype)).sum(-1, keepdims=True)


def _frac(x):
    return x - jnp.floor(x)          # x mod 1; compiles faster than jnp.mod's sign fix-ups


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle; 0 for greys)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    c = v - jnp.minimum(jnp.minimum(r, g), b)
    safe_c = jnp.where(c > 0, c, 1.0)                        # greys: finite, zeroed below
    h = jnp.where(v == r, (g - b) / safe_c,                  # hexcone sector of the max
                  jnp.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0))
    h = jnp.where(c > 0, _frac(h / 6.0), 0.0)
    s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
    return jnp.stack([h, s, v], -1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """HSV -> RGB, branch-free: channel n in (5, 3, 1) is ``v - v s clip(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6 h) mod 6``."""
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = 6.0 * _frac(jnp.asarray([5.0, 3.0, 1.0]) / 6.0 + h)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_brightness(image, factor):
    """Multiply by ``factor`` (torchvision; SimCLR v2)."""
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
    """Blend with the mean grey level of the whole image (torchvision)."""
    return jnp.clip(factor * image + (1 - factor) * rgb_to_grayscale(image).mean(), 0.0, 1.0)


def adjust_saturation(image, factor):
    """Blend with the grey image (torchvision); identity for 1-channel images."""
    return jnp.clip(factor * image + (1 - factor) * rgb_to_grayscale(image), 0.0, 1.0)


def adjust_hue(image, delta):
    """Rotate hue by ``delta`` (fraction of the circle); identity for 1-channel images."""
    if image.shape[-1] == 1:
        return image
    hsv = rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set(_frac(hsv[..., 0] + delta))
    return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def _jitter_params(u, brightness, contrast, saturation, hue):
    lo = jnp.asarray([max(0.0, 1 - brightness), max(0.0, 1 - contrast),
                      max(0.0, 1 - saturation), -hue], jnp.float32)
    hi = jnp.asarray([1 + brightness, 1 + contrast, 1 + saturation, hue], jnp.float32)
    # argsort of i.i.d. uniforms is a uniformly random permutation.
    return jnp.argsort(u[:4]).astype(jnp.int32), lo + (hi - lo) * u[4:8]


def sample_jitter_params(rng, brightness: float, contrast: float, saturation: float,
                         hue: float) -> tuple[jax.Array, jax.Array]:
    """One example's jitter: a random order of the four ops (``color_jitter_rand``) and their
    factors: brightness, contrast, saturation uniform in ``[max(0, 1 - x), 1 + x]``, hue shift
    uniform in ``[-hue, hue]``. Returns ``(order int32 [4], factors float32 [4])``, indices
    and factors in :data:`JITTER_OPS` order."""
    return _jitter_params(jax.random.uniform(rng, (8,)), brightness, contrast, saturation, hue)


def apply_jitter(image: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
    """Applies op ``order[i]`` (see :data:`JITTER_OPS`) with ``factors[order[i]]`` for
    i = 0..3, clipping to [0, 1] after each, as SimCLR's ``color_jitter_rand``."""
    f = factors
    # Brightness, contrast and saturation are all clip(a x + b grey(x) + c mean(grey(x))): one
    # blend with per-op coefficients, so a step computes the blend and the hue shift only
    # (under vmap, a 4-way switch computes all four branches); a loop compiles one step.
    coeffs = jnp.stack([jnp.stack([f[0], 0.0, 0.0]), jnp.stack([f[1], 0.0, 1.0 - f[1]]),
                        jnp.stack([f[2], 1.0 - f[2], 0.0]), jnp.asarray([1.0, 0.0, 0.0])])

    def step(i, x):
        a, b, c = coeffs[order[i]]
        grey = rgb_to_grayscale(x)
        blend = jnp.clip(a * x + b * grey + c * grey.mean(), 0.0, 1.0)
        return jnp.where(order[i] == 3, adjust_hue(x, f[3]), blend)
    return jax.lax.fori_loop(0, 4, step, image)


def _jitter(u, image, p, strengths):
    order, factors = _jitter_params(u[1:], *strengths)
    return _coin(u[0], p, lambda: apply_jitter(image, order, factors), image)


def _strengths(strength, brightness=None, contrast=None, saturation=None, hue=None):
    """SimCLR's ``(0.8 s, 0.8 s, 0.8 s, 0.2 s)``, each overridable."""
    return tuple(float(d * strength if x is None else x) for d, x in
                 zip((0.8, 0.8, 0.8, 0.2), (brightness, contrast, saturation, hue)))


def color_jitter(rng, image: jax.Array, strength: float = 1.0, p: float = 0.8, *,
                 brightness: float | None = None, contrast: float | None = None,
                 saturation: float | None = None, hue: float | None = None) -> jax.Array:
    """SimCLR's colour jitter of one image ``[H, W, C]`` in [0, 1], applied with probability p:
    the four ops in a random order per example (:func:`sample_jitter_params`).

    Strengths default to SimCLR's ``0.8 s, 0.8 s, 0.8 s, 0.2 s``; pass them explicitly for
    DINO and BYOL (:data:`DINO_JITTER`). Brightness is multiplicative (SimCLR v2, torchvision).
    """
    strengths = _strengths(strength, brightness, contrast, saturation, hue)
    return _jitter(jax.random.uniform(rng, (JITTER_DRAWS,)), image, p, strengths)


def _grayscale(u, image, p):
    return _coin(u[0], p, lambda: jnp.broadcast_to(rgb_to_grayscale(image), image.shape), image)


def random_grayscale(rng, image: jax.Array, p: float = 0.2) -> jax.Array:
    """Replaces every channel by the luma with probability p (C = 1: unchanged)."""
    return _grayscale(jax.random.uniform(rng, (1,)), image, p)


# ---------------------------------------------------------------------------------------------
# Blur and solarize
# ---------------------------------------------------------------------------------------------

def blur_kernel_size(height: int, kernel_fraction: float = 0.1) -> int:
    """SimCLR's rule: ``int(fraction * height)``, made odd as ``2 (k // 2) + 1``, at least 3."""
    return 2 * max(1, int(kernel_fraction * height) // 2) + 1


def _reflect_taps(n: int, radius: int) -> np.ndarray:
    """Static ``[n, 2 radius + 1]`` source rows: ``i + d`` reflected into [0, n) without
    repeating the edge pixel (torch's and numpy's "reflect")."""
    idx = np.abs(np.arange(n)[:, None] + np.arange(-radius, radius + 1))
    return np.where(idx > n - 1, 2 * (n - 1) - idx, idx)


def blur(image: jax.Array, sigma, kernel_size: int) -> jax.Array:
    """Separable Gaussian blur of ``[H, W, C]``: static odd ``kernel_size``, traced ``sigma``,
    reflect padding (torchvision's ``GaussianBlur``). Taps are gathered with static indices and
    summed elementwise: exact in float32 (no bf16 matmul on accelerators), and it compiled
    3x faster than ``jnp.pad(mode="reflect")`` plus shifted slices at 224 px."""
    radius = kernel_size // 2
    kernel = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1, dtype=jnp.float32) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for axis in (0, 1):
        taps = jnp.take(image, _reflect_taps(image.shape[axis], radius), axis=axis)
        image = (taps * kernel.reshape((1,) * (axis + 1) + (-1,) + (1,) * (2 - axis))).sum(
            axis + 1)
    return image


def _blur(u, image, p, sigma=(0.1, 2.0), kernel_fraction=0.1):
    s = sigma[0] + (sigma[1] - sigma[0]) * u[1]
    size = blur_kernel_size(image.shape[0], kernel_fraction)
    return _coin(u[0], p, lambda: blur(image, s, size), image)


def gaussian_blur(rng, image: jax.Array, p: float, sigma: Sequence[float] = (0.1, 2.0),
                  kernel_fraction: float = 0.1) -> jax.Array:
    """With probability p, blurs with sigma uniform in ``sigma`` and a kernel of
    :func:`blur_kernel_size` of the image height."""
    return _blur(jax.random.uniform(rng, (2,)), image, p, sigma, kernel_fraction)


def _solarize(u, image, p, threshold=0.5):
    return _coin(u[0], p, lambda: jnp.where(image < threshold, image, 1.0 - image), image)


def solarize(rng, image: jax.Array, p: float, threshold: float = 0.5) -> jax.Array:
    """With probability p, inverts pixels at or above ``threshold`` (x -> 1 - x), as BYOL."""
    return _solarize(jax.random.uniform(rng, (1,)), image, p, threshold)


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

_SPLITS = np.cumsum([CROP_DRAWS, 1, JITTER_DRAWS, 1, 2, 1])   # crop, flip, ..., solarize


def _to_unit(images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [B, H, W, C] with C in (1, 3), got {images.shape}")
    return images.astype(jnp.float32) / 255.0


def _views(rng, images, num_views, *, out_size, scale, jitter, blur_p, solarize_p):
    """``num_views`` views of a [0, 1] batch: crop, flip, jitter (0.8), grey (0.2), blur
    (``blur_p[v]``), solarize (``solarize_p[v]``); float32 ``[V, B, h, w, C]`` in [-1, 1]."""
    n = int(_SPLITS[-1])
    # One row of uniforms per (view, example). Drawn flat: a 3-d draw compiled 3x slower on
    # CPU (partitionable Threefry's per-axis counters).
    u = jax.random.uniform(rng, (num_views * images.shape[0] * n,))
    u = u.reshape(num_views, images.shape[0], n)

    def prob(ps, v):         # static when all views agree, else traced: one program for all
        return float(ps[0]) if len(set(ps)) == 1 else jnp.asarray(ps, jnp.float32)[v]

    def one(u, image, v):
        u = jnp.split(u, _SPLITS[:-1])
        box = _crop_box(u[0], *image.shape[:2], scale, (3 / 4, 4 / 3))
        x = _flip(u[1], resized_crop(image, box, out_size))
        x = _grayscale(u[3], _jitter(u[2], x, 0.8, jitter), 0.2)
        x = _solarize(u[5], _blur(u[4], x, prob(blur_p, v)), prob(solarize_p, v))
        return x * 2.0 - 1.0

    per_batch = jax.vmap(one, in_axes=(0, 0, None))
    return jax.vmap(per_batch, in_axes=(0, None, 0))(u, images, jnp.arange(num_views))


def simclr_views(rng, images_uint8: jax.Array, *, out_size: Sequence[int] | None = None,
                 scale: Sequence[float] = (0.08, 1.0), strength: float = 1.0,
                 blur_p: Sequence[float] = (0.5, 0.5), solarize_p: Sequence[float] = (0.0, 0.0),
                 jitter: Sequence[float] | None = None) -> tuple[jax.Array, jax.Array]:
    """Two independently augmented views per image (SimCLR appendix A; BYOL).

    Per view: random resized crop -> flip -> colour jitter (p 0.8) -> grayscale (p 0.2) ->
    Gaussian blur (p ``blur_p[v]``) -> solarize (p ``solarize_p[v]``). SimCLR: the defaults
    (its CIFAR recipe drops the blur: ``blur_p=(0, 0)``). BYOL: ``blur_p=(1.0, 0.1)``,
    ``solarize_p=(0.0, 0.2)``, ``jitter=DINO_JITTER``.

    Args:
      rng: a PRNG key.
      images_uint8: ``[B, H, W, C]`` uint8, C in (1, 3).
      out_size: static output ``(h, w)``; default the input size.
      scale: crop area range; strength: SimCLR's colour-jitter strength s.
      blur_p, solarize_p: per-view probabilities.
      jitter: explicit ``(brightness, contrast, saturation, hue)``, overriding ``strength``.

    Returns:
      ``(view1, view2)``, float32 ``[B, h, w, C]`` in [-1, 1].
    """
    images = _to_unit(images_uint8)
    views = _views(rng, images, 2, out_size=tuple(out_size or images.shape[1:3]), scale=scale,
                   jitter=_strengths(strength, *(jitter or (None,) * 4)),
                   blur_p=tuple(blur_p), solarize_p=tuple(solarize_p))
    return views[0], views[1]


def multi_crop(rng, images_uint8: jax.Array, *, num_local: int = 6,
               global_size: Sequence[int] | None = None,
               local_size: Sequence[int] | None = None,
               global_scale: Sequence[float] = (0.4, 1.0),
               local_scale: Sequence[float] = (0.05, 0.4),
               jitter: Sequence[float] = DINO_JITTER) -> tuple[jax.Array, jax.Array]:
    """DINO's multi-crop (``DataAugmentationDINO``): two global and ``num_local`` local views.

    All views: flip, colour jitter (p 0.8, ``jitter`` = (brightness, contrast, saturation,
    hue), the reference's :data:`DINO_JITTER` by default), grayscale (p 0.2). Global
    view 1: blur p 1.0; global view 2: blur p 0.1 and solarize p 0.2; local views: blur p 0.5.

    Args:
      rng: a PRNG key.
      images_uint8: ``[B, H, W, C]`` uint8, C in (1, 3).
      num_local: number of local crops (0 allowed).
      global_size: static ``(h, w)``; default the input size (DINO: 224).
      local_size: static ``(h, w)``; default half the input size rounded down to even,
        ``2 * max(1, H // 4)`` (DINO: 96 for 224, a smaller fraction).
      global_scale, local_scale: crop area ranges (DINO's defaults).

    Returns:
      ``(globals [2, B, gh, gw, C], locals [num_local, B, lh, lw, C])``, float32 in [-1, 1].
    """
    images = _to_unit(images_uint8)
    b, h, w, c = images.shape
    global_size = tuple(global_size or (h, w))
    local_size = tuple(local_size or (2 * max(1, h // 4), 2 * max(1, w // 4)))
    k_global, k_local = jax.random.split(rng)
    globals_ = _views(k_global, images, 2, out_size=global_size, scale=global_scale,
                      jitter=jitter, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    if num_local == 0:                                       # static: no local program
        return globals_, jnp.zeros((0, b, *local_size, c), jnp.float32)
    locals_ = _views(k_local, images, num_local, out_size=local_size, scale=local_scale,
                     jitter=jitter, blur_p=(0.5,) * num_local,
                     solarize_p=(0.0,) * num_local)
    return globals_, locals_
