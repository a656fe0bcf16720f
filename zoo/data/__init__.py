"""Image datasets for pretraining: TFDS array_record sources and batches.

Names:
  "digits" (= "digits/32x32"), "digits/8x8", "digits/16x16": scikit-learn's
    8x8 digits, 1,437 train / 360 test, grayscale, 10 classes.
  "photos" (= "photos/64x64"), "photos/32x32": crops of scikit-image's bundled
    photos, whole photos held out for test, RGB, label = photo index.
  "tfds:NAME": any TFDS dataset already prepared as array_record in the data
    dir (e.g. "tfds:mnist", "tfds:cifar10"); never downloaded here.

Bundled datasets are prepared on first use into the data dir: `data_dir`,
else `$ZOO_DATA_DIR`, else `<$XDG_CACHE_HOME or ~/.cache>/zoo/tensorflow_datasets`.
Reading needs no TensorFlow.

Example:
  spec = zoo.data.dataset_spec("digits")          # image_shape (32, 32, 1)
  it = zoo.data.BatchIterator(zoo.data.get_source("digits", "train"),
                              global_batch_size=64, seed=0)
  batch = next(it)                                # {"image", "label"}
"""

from zoo.data.iterator import BatchIterator
from zoo.data.sources import DatasetSpec
from zoo.data.sources import KNOWN_DATASETS
from zoo.data.sources import dataset_spec
from zoo.data.sources import default_data_dir
from zoo.data.sources import get_source
from zoo.data.sources import load_arrays

__all__ = [
    "KNOWN_DATASETS",
    "BatchIterator",
    "DatasetSpec",
    "dataset_spec",
    "default_data_dir",
    "get_source",
    "load_arrays",
]
