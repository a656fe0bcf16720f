"""Datasets for pretraining: TFDS array_record sources and batches.

Image names:
  "digits" (= "digits/32x32"), "digits/8x8", "digits/16x16": scikit-learn's
    8x8 digits, 1,437 train / 360 test, grayscale, 10 classes.
  "photos" (= "photos/64x64"), "photos/32x32": crops of scikit-image's bundled
    photos, whole photos held out for test, RGB, label = photo index.
Text names (features "text", "label"; see `zoo.data.text`):
  "pycode" (= "pycode/py3.11" on Python 3.11): the running interpreter's
    standard-library `.py` files without tests, ~660 files / ~12 MB on 3.11,
    label = top-level package (20 packages + "other"), held out by file.
Paired names (two towers for CLIP/SigLIP-style training and retrieval; see
`zoo.data.pairs`):
  "pycode_pairs" (= "pycode_pairs/py3.11"): the standard library's functions
    as {"code": source without docstring, "text": docstring summary}, ~6,000
    pairs on 3.11, held out by file.
  "digits_captions": the "digits" images with template captions from their
    labels ("a handwritten seven", "the digit 7", ...): {"image", "text",
    "label"}.
Images and text:
  "tfds:NAME": any TFDS dataset already prepared as array_record in the data
    dir (e.g. "tfds:mnist", "tfds:cifar10", or text such as "tfds:lm1b");
    never downloaded here.

Bundled datasets are prepared on first use into the data dir: `data_dir`,
else `$ZOO_DATA_DIR`, else `<$XDG_CACHE_HOME or ~/.cache>/zoo/tensorflow_datasets`.
Reading needs no TensorFlow.

Example (images):
  spec = zoo.data.dataset_spec("digits")          # image_shape (32, 32, 1)
  it = zoo.data.BatchIterator(zoo.data.get_source("digits", "train"),
                              global_batch_size=64, seed=0)
  batch = next(it)                                # {"image", "label"}

Example (text):
  spec = zoo.data.text_dataset_spec("pycode")     # num_classes 21
  it = zoo.data.PackedBatchIterator(zoo.data.get_text_source("pycode", "train"),
                                    global_batch_size=8, seq_len=256, seed=0)
  batch = next(it)                                # {"tokens": int32 [8, 256]}
  tokens, labels = zoo.data.load_text_chunks("pycode", "test", seq_len=256)

Example (pairs):
  spec = zoo.data.pair_dataset_spec("pycode_pairs")  # towers ("code", "text")
  it = zoo.data.BatchIterator(
      zoo.data.get_pair_source("pycode_pairs", "train", seq_len=256),
      global_batch_size=64, seed=0)
  batch = next(it)            # {"code": int32 [64, 256], "text": int32 [64, 256]}
  test = zoo.data.load_pairs("digits_captions", "test", seq_len=32)
  correct = zoo.data.same_item(test["text"])      # bool [N, N]: equal captions
"""

from zoo.data.iterator import BatchIterator
from zoo.data.iterator import stack_examples
from zoo.data.pairs import PAIR_DATASETS
from zoo.data.pairs import PairDatasetSpec
from zoo.data.pairs import digit_caption
from zoo.data.pairs import encode_padded
from zoo.data.pairs import get_pair_source
from zoo.data.pairs import is_pair_dataset
from zoo.data.pairs import load_pairs
from zoo.data.pairs import pair_dataset_spec
from zoo.data.pairs import same_item
from zoo.data.sources import DatasetSpec
from zoo.data.sources import KNOWN_DATASETS
from zoo.data.sources import dataset_spec
from zoo.data.sources import default_data_dir
from zoo.data.sources import get_source
from zoo.data.sources import load_arrays
from zoo.data.text import PackedBatchIterator
from zoo.data.text import TextDatasetSpec
from zoo.data.text import TextSource
from zoo.data.text import get_text_source
from zoo.data.text import is_text_dataset
from zoo.data.text import load_text_chunks
from zoo.data.text import text_dataset_spec

__all__ = [
    "KNOWN_DATASETS",
    "PAIR_DATASETS",
    "BatchIterator",
    "DatasetSpec",
    "PackedBatchIterator",
    "PairDatasetSpec",
    "TextDatasetSpec",
    "TextSource",
    "dataset_spec",
    "default_data_dir",
    "digit_caption",
    "encode_padded",
    "get_pair_source",
    "get_source",
    "get_text_source",
    "is_pair_dataset",
    "is_text_dataset",
    "load_arrays",
    "load_pairs",
    "load_text_chunks",
    "pair_dataset_spec",
    "same_item",
    "stack_examples",
    "text_dataset_spec",
]
