"""`photos`: random square crops of the real photos bundled with scikit-image.

A small natural-image dataset available offline, for pretraining smoke runs
where 8x8 digits are too easy. Whole photos are held out for `test`, so test
crops never overlap a training crop.

Crops: for crop i of photo P, an area fraction a ~ U[0.1, 1] of the photo's
largest square fixes the side; the top-left corner is uniform over the valid
positions. The three uniforms come from a hash of ("photos", P, i, field)
(`imaging.stable_uniform`), not from a seeded RNG, so the crop boxes are fixed
forever and do not depend on the config: `32x32` holds exactly the crops of
`64x64` at lower resolution. Grayscale photos are repeated to 3 channels.

`label` is the photo index (ClassLabel over `PHOTO_NAMES`), usable as a label.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from zoo.data import imaging

# Order fixes the label ids: never reorder, only append (with a new version).
TRAIN_PHOTOS = (
    "astronaut", "camera", "coffee", "retina", "hubble_deep_field",
    "immunohistochemistry", "moon", "brick", "grass", "gravel", "coins",
    "clock",
)
# Note: skimage.data.cat() is the same picture as chelsea(); never add it to
# the train list, it would leak the test photo.
TEST_PHOTOS = ("rocket", "chelsea")
PHOTO_NAMES = TRAIN_PHOTOS + TEST_PHOTOS
CROPS_PER_PHOTO = {"train": 256, "test": 128}
MIN_AREA_FRACTION = 0.1


@dataclasses.dataclass(eq=False)
class PhotosConfig(tfds.core.BuilderConfig):
  """One output resolution."""

  size: int = 64


def load_photo(name: str) -> np.ndarray:
  """Loads a bundled scikit-image photo as uint8 (H, W, 3)."""
  from skimage import data  # Imported lazily: only needed to prepare.

  image = np.asarray(getattr(data, name)())
  if image.dtype != np.uint8:
    raise ValueError(f"skimage.data.{name} is {image.dtype}, expected uint8")
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


def crop_box(name: str, index: int, height: int,
             width: int) -> tuple[int, int, int, int]:
  """The fixed (left, top, right, bottom) box of crop `index` of photo `name`."""
  u = [imaging.stable_uniform(f"photos/{name}/{index}/{field}")
       for field in ("area", "left", "top")]
  area = MIN_AREA_FRACTION + (1.0 - MIN_AREA_FRACTION) * u[0]
  side = max(1, int(round(min(height, width) * np.sqrt(area))))
  left = int(u[1] * (width - side + 1))
  top = int(u[2] * (height - side + 1))
  return left, top, left + side, top + side


class Builder(tfds.core.GeneratorBasedBuilder):
  """Crops of scikit-image photos at 32x32 or 64x64."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      PhotosConfig(name=f"{s}x{s}", size=s, description=f"{s}x{s} RGB crops")
      for s in (32, 64)
  ]
  DEFAULT_CONFIG_NAME = "64x64"

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.ClassLabel(names=list(PHOTO_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Bundled with scikit-image: nothing to download.
    return {
        "train": self._generate_examples(TRAIN_PHOTOS, CROPS_PER_PHOTO["train"]),
        "test": self._generate_examples(TEST_PHOTOS, CROPS_PER_PHOTO["test"]),
    }

  def _generate_examples(self, names, crops_per_photo):
    size = self.builder_config.size
    for name in names:
      photo = load_photo(name)
      height, width = photo.shape[:2]
      pil_photo = Image.fromarray(photo)
      for i in range(crops_per_photo):
        box = crop_box(name, i, height, width)
        crop = imaging.crop_resize(pil_photo, box, size)
        yield f"{name}/{i:04d}", {
            "image": imaging.encode_png(crop),
            "label": PHOTO_NAMES.index(name),
        }
