"""`digits`: scikit-learn's 1,797 labelled 8x8 handwritten digits as a TFDS dataset.

Source: `sklearn.datasets.load_digits` (the UCI "optdigits" test set, bundled
with scikit-learn, so no download). Pixel values 0..16 are rescaled to 0..255.

Split (a fixed rule, no RNG, so it can never drift): sort the examples by
label with a stable sort (ties keep scikit-learn's order) and send every fifth
one, starting with the first, to `test`. That is stratified by construction and
gives 360 test / 1,437 train examples (35-37 test examples per class).

Configs: `8x8` (native), `16x16` and `32x32` (bilinear upsampling at prepare
time; `32x32` is the default).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from zoo.data import imaging

NUM_CLASSES = 10
MAX_VALUE = 16.0  # load_digits pixels are counts 0..16 of a 4x4 block.


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  """One output resolution."""

  size: int = 32


def load_raw() -> tuple[np.ndarray, np.ndarray]:
  """Returns scikit-learn's digits as (float images [N, 8, 8], int labels [N])."""
  from sklearn import datasets  # Imported lazily: only needed to prepare.

  digits = datasets.load_digits()
  return np.asarray(digits.images, np.float64), np.asarray(digits.target, np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """The fixed, stratified split rule described in the module docstring."""
  by_label = np.argsort(labels, kind="stable")
  is_test = np.zeros(len(labels), bool)
  is_test[by_label[::5]] = True
  return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def to_uint8(image: np.ndarray, size: int) -> np.ndarray:
  """Scales one 0..16 float 8x8 digit to a uint8 (size, size, 1) image."""
  if size != image.shape[0]:
    image = imaging.resize_float(image, size)
  scaled = np.rint(np.asarray(image, np.float64) * (255.0 / MAX_VALUE))
  return np.clip(scaled, 0, 255).astype(np.uint8)[..., None]


class Builder(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits at 8x8, 16x16 or 32x32."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      DigitsConfig(name=f"{s}x{s}", size=s, description=f"{s}x{s} grayscale")
      for s in (8, 16, 32)
  ]
  DEFAULT_CONFIG_NAME = "32x32"

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 1)),
            "label": tfds.features.ClassLabel(
                names=[str(i) for i in range(NUM_CLASSES)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Bundled with scikit-learn: nothing to download.
    images, labels = load_raw()
    return {
        split: self._generate_examples(images, labels, indices)
        for split, indices in split_indices(labels).items()
    }

  def _generate_examples(self, images, labels, indices):
    size = self.builder_config.size
    for i in indices:
      # Key = index in scikit-learn's order, so a stored example can be traced
      # back to its source row.
      yield int(i), {
          "image": imaging.encode_png(to_uint8(images[i], size)),
          "label": int(labels[i]),
      }
