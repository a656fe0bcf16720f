"""Small image helpers shared by the bundled dataset builders.

Everything here runs at *prepare* time only (once per data dir), never in the
training loop.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
  """Encodes a uint8 (H, W, C) image with C in {1, 3} as PNG bytes.

  Why: `tfds.features.Image` encodes numpy arrays with `tf.image.encode_png`,
  i.e. TensorFlow. Handing it ready-made PNG bytes (lossless) keeps preparation
  TensorFlow-free; reading decodes with PIL.
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buffer = io.BytesIO()
  # Tiny images: fast compression costs little space (PNG stays lossless).
  pil.save(buffer, format="png", compress_level=1)
  return buffer.getvalue()


def resize_float(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a 2-D float image to (size, size), float32 out.

  PIL's float ("F") mode avoids rounding to uint8 before the intensity
  rescale, so the upsampled digits are rounded exactly once.
  """
  pil = Image.fromarray(np.asarray(image, np.float32), mode="F")
  return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))


def crop_resize(image: Image.Image, box: tuple[int, int, int, int],
                size: int) -> np.ndarray:
  """Crops `box` = (left, top, right, bottom) of a PIL image to uint8 size^2.

  Takes a PIL image (convert each photo once: `Image.fromarray` of a big
  photo per crop costs more than the resize).

  PIL widens its bicubic kernel by the reduction factor when shrinking, so
  this is an antialiased downscale (no moire from big crops), and `box`
  avoids copying the crop first. `reducing_gap=3` first shrinks by an integer
  factor with a box filter (PIL's docs: indistinguishable from the exact
  filter at 3), which makes big crops ~5x faster to prepare.
  """
  out = image.resize((size, size), Image.Resampling.BICUBIC, box=box,
                   reducing_gap=3.0)
  return np.asarray(out, np.uint8)


def stable_uniform(key: str) -> float:
  """A uniform float in [0, 1) that depends only on the string `key`.

  Why not numpy's RNG: the bundled datasets must come out identical on every
  machine and every future library version; a cryptographic hash of a fixed
  string is a rule that never changes.
  """
  digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64
