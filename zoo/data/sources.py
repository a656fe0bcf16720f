"""Dataset names -> random-access sources over TFDS array_record files.

Two kinds of names:
  * bundled datasets ("digits", "digits/8x8", "photos/32x32", ...; the text
    dataset "pycode", read through `zoo.data.text`; the paired dataset
    "pycode_pairs", read through `zoo.data.pairs`): our TFDS builders,
    prepared lazily into the data dir on first use;
  * "tfds:NAME" (e.g. "tfds:mnist", "tfds:cifar10"): any TFDS dataset already
    prepared as array_record in the data dir. Nothing is ever downloaded.

Both are read with `tfds` data sources (array_record), which need no
TensorFlow. Data dir: `data_dir` argument, else `$ZOO_DATA_DIR`, else
`<$XDG_CACHE_HOME or ~/.cache>/zoo/tensorflow_datasets`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from zoo.data.digits import digits_dataset_builder
from zoo.data.photos import photos_dataset_builder
from zoo.data.pycode import pycode_dataset_builder
from zoo.data.pycode_pairs import pycode_pairs_dataset_builder

KNOWN_DATASETS = ("digits", "photos", "pycode")  # plus "tfds:NAME"
TFDS_PREFIX = "tfds:"
_BUILDERS = {
    "digits": digits_dataset_builder.Builder,
    "photos": photos_dataset_builder.Builder,
    "pycode": pycode_dataset_builder.Builder,  # Text: see zoo.data.text.
    # (code, docstring) pairs: see zoo.data.pairs.
    "pycode_pairs": pycode_pairs_dataset_builder.Builder,
}
_FILE_FORMAT = "array_record"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset, known before reading any example."""

  name: str
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int | None
  splits: dict[str, int]  # split name -> number of examples


def default_data_dir() -> str:
  """`$ZOO_DATA_DIR`, else `<user cache dir>/zoo/tensorflow_datasets`."""
  if os.environ.get("ZOO_DATA_DIR"):
    return os.environ["ZOO_DATA_DIR"]
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "zoo", "tensorflow_datasets")


def _known_names() -> str:
  names = []
  for base, cls in _BUILDERS.items():
    names += [base] + [f"{base}/{c.name}" for c in cls.BUILDER_CONFIGS]
  return ", ".join(names) + f", or '{TFDS_PREFIX}NAME' for a TFDS dataset"


def _bundled_builder(name: str, data_dir: str,
                     prepare: bool = True) -> tfds.core.DatasetBuilder:
  """Our builder for `name`, prepared (once, atomically) into `data_dir`."""
  base, _, config = name.partition("/")
  cls = _BUILDERS.get(base)
  if cls is None:
    raise ValueError(f"Unknown dataset {name!r}; known: {_known_names()}.")
  configs = [c.name for c in cls.BUILDER_CONFIGS]
  config = config or cls.DEFAULT_CONFIG_NAME
  if config not in configs:
    raise ValueError(f"Unknown config {config!r} of dataset {base!r}; "
                     f"configs: {', '.join(configs)}.")
  builder = cls(config=config, data_dir=data_dir, file_format=_FILE_FORMAT)
  if not prepare or builder.is_prepared():
    return builder
  log.info("Preparing %s/%s in %s (first use only).", base, config, data_dir)
  try:
    # TFDS writes everything into `incomplete.XXXXXX_<version>/` and renames it
    # at the end, so an interrupted preparation never looks complete.
    builder.download_and_prepare(
        file_format=_FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP),
    )
  except OSError:
    # Several processes sharing a data dir race to the final rename; the
    # losers' renames fail, but the winner's copy is complete.
    builder = cls(config=config, data_dir=data_dir, file_format=_FILE_FORMAT)
    if not builder.is_prepared():
      raise
  return builder


def _tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a "tfds:NAME" dataset (no preparation)."""
  tfds_name = name[len(TFDS_PREFIX):]
  if not tfds_name:
    raise ValueError(f"Empty TFDS name in {name!r}; use e.g. 'tfds:mnist'.")
  try:
    return tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(_not_prepared(tfds_name, data_dir)) from e


def _not_prepared(tfds_name: str, data_dir: str) -> str:
  return (f"TFDS dataset {tfds_name!r} is not prepared (as {_FILE_FORMAT}) in "
          f"data dir {data_dir}; prepare it there first, e.g. `tfds build "
          f"{tfds_name} --file_format={_FILE_FORMAT} --data_dir={data_dir}`.")


def _builder(name: str, data_dir: str,
             prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The builder of any name; bundled ones are prepared unless `prepare=False`."""
  if name.startswith(TFDS_PREFIX):
    return _tfds_builder(name, data_dir)
  return _bundled_builder(name, data_dir, prepare)


def _tfds_data_source(name: str, split: str | None, data_dir: str,
                      builder: tfds.core.DatasetBuilder):
  """`tfds.data_source` of a "tfds:NAME" dataset, never downloading."""
  tfds_name = name[len(TFDS_PREFIX):]
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                            download=False)
  except (ValueError, NotImplementedError, FileNotFoundError) as e:
    # Without prepared files TFDS fails with confusing messages (e.g. "file
    # format is not set"); say what is actually wrong. We test by failure
    # rather than `is_prepared()` first because `tfds.testing.mock_data`
    # serves data for datasets that are not prepared.
    if builder.is_prepared():
      raise
    raise FileNotFoundError(_not_prepared(tfds_name, data_dir)) from e


def dataset_spec(name: str, *, data_dir: str | None = None,
                 image_key: str = "image",
                 label_key: str | None = "label") -> DatasetSpec:
  """Shape, class count and split sizes of `name` (prepares bundled data).

  `splits` is empty where TFDS cannot know the sizes (a "tfds:NAME" dataset
  under `tfds.testing.mock_data`).
  """
  data_dir = data_dir or default_data_dir()
  builder = _builder(name, data_dir)
  if name.startswith(TFDS_PREFIX):
    if not builder.is_prepared():
      _tfds_data_source(name, None, data_dir, builder)  # Raises if missing.
  else:
    name = f"{builder.name}/{builder.builder_config.name}"  # Canonical.
  features = builder.info.features
  for key in (image_key, label_key):
    if key and key not in features:
      hint = ("; a text dataset: use zoo.data.text_dataset_spec"
              if "text" in features
              and isinstance(features["text"], tfds.features.Text) else "")
      raise ValueError(f"Dataset {name!r} has no feature {key!r}; features: "
                       f"{', '.join(features)} (set image_key/label_key{hint}).")
  shape = tuple(features[image_key].shape)
  if len(shape) == 2:  # Some TFDS image features omit the channel axis.
    shape += (1,)
  num_classes = None
  if label_key and isinstance(features[label_key], tfds.features.ClassLabel):
    num_classes = features[label_key].num_classes
  splits = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
  return DatasetSpec(name=name, image_shape=shape, num_classes=num_classes,
                     splits=splits)


def _check_split(name: str, split: str, builder) -> None:
  """Raises a listing ValueError for an unknown split (slices are allowed)."""
  known = list(builder.info.splits)
  if not known:  # Splits unknown before preparation (e.g. under mock_data).
    return
  for part in split.split("+"):
    if part.split("[")[0].strip() not in known:
      raise ValueError(f"Unknown split {split!r} of dataset {name!r}; "
                       f"splits: {', '.join(known)}.")


class ImageSource:
  """Random access to {"image": uint8 (H, W, C), "label": int} examples.

  Wraps a TFDS data source: renames the feature keys, adds the channel axis
  to 2-D images and turns labels into Python ints (-1 without `label_key`).
  `__getitems__` reads a batch of records in one array_record call.
  """

  def __init__(self, data_source: Sequence[Any], image_key: str = "image",
               label_key: str | None = "label"):
    self._data_source = data_source
    self._image_key = image_key
    self._label_key = label_key

  def __len__(self) -> int:
    return len(self._data_source)

  def _convert(self, example: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(example[self._image_key])
    if image.dtype != np.uint8:
      raise TypeError(f"feature {self._image_key!r} is {image.dtype}, "
                      "expected uint8 images")
    if image.ndim == 2:
      image = image[..., None]
    label = int(example[self._label_key]) if self._label_key else -1
    return {"image": image, "label": label}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return self._convert(self._data_source[index % len(self)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    records = None
    getitems = getattr(self._data_source, "__getitems__", None)
    if getitems is not None:
      try:
        records = getitems(indices)  # One array_record call for the batch.
      except TypeError:
        # tfds.testing.mock_data installs a `__getitems__` that cannot be
        # called (tfds 4.9.10); per-item reads give the same records.
        records = None
    if records is None:
      records = [self._data_source[i] for i in indices]
    return [self._convert(r) for r in records]

  def __repr__(self) -> str:
    return f"ImageSource({self._data_source!r})"


def get_source(name: str, split: str, *, data_dir: str | None = None,
               image_key: str = "image",
               label_key: str | None = "label") -> ImageSource:
  """A random-access source: `len(src)`, `src[i]` -> {"image", "label"}."""
  data_dir = data_dir or default_data_dir()
  builder = _builder(name, data_dir)
  _check_split(name, split, builder)
  if name.startswith(TFDS_PREFIX):
    data_source = _tfds_data_source(name, split, data_dir, builder)
  else:
    data_source = builder.as_data_source(split=split)
  return ImageSource(data_source, image_key, label_key)


def load_arrays(name: str, split: str, *, data_dir: str | None = None,
                limit: int | None = None, image_key: str = "image",
                label_key: str | None = "label",
                chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """All (or the first `limit`) examples in stored order, for linear probes.

  Returns:
    images uint8 [N, H, W, C] and labels int32 [N].
  """
  source = get_source(name, split, data_dir=data_dir, image_key=image_key,
                      label_key=label_key)
  n = len(source) if limit is None else min(int(limit), len(source))
  images, labels = [], []
  for start in range(0, n, chunk):
    for example in source.__getitems__(range(start, min(n, start + chunk))):
      images.append(example["image"])
      labels.append(example["label"])
  if not images:
    shape = dataset_spec(name, data_dir=data_dir, image_key=image_key).image_shape
    return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
  return np.stack(images), np.asarray(labels, np.int32)
