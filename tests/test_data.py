"""Tests for zoo.data: bundled TFDS builders, tfds:NAME sources, BatchIterator.

Expected values come from the sources (scikit-learn's digits, the split rule
as documented, the iterator's contract), never from outputs of the code under
test. Everything is prepared into a per-module temporary data dir.
"""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import zoo.data as zd
from zoo.data.digits import digits_dataset_builder as digits_lib
from zoo.data.photos import photos_dataset_builder as photos_lib


@pytest.fixture(scope="module", autouse=True)
def zoo_data_dir(tmp_path_factory):
  """Points $ZOO_DATA_DIR at a fresh dir so tests never touch the user cache."""
  path = str(tmp_path_factory.mktemp("zoo_data"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("ZOO_DATA_DIR", path)
    yield path


def _rows(images, labels):
  """Sorted (label, pixel bytes) rows: an order-free multiset of examples."""
  return sorted((int(l), np.asarray(x, np.uint8).tobytes())
                for x, l in zip(images, labels))


def test_default_data_dir(monkeypatch, tmp_path, zoo_data_dir):
  assert zd.default_data_dir() == zoo_data_dir
  monkeypatch.delenv("ZOO_DATA_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert zd.default_data_dir() == os.path.join(
      str(tmp_path), "zoo", "tensorflow_datasets")


# ------------------------------------------------------------------- digits
def test_digits_spec_default_is_32x32(zoo_data_dir):
  spec = zd.dataset_spec("digits")
  assert spec.name == "digits/32x32"
  assert spec.image_shape == (32, 32, 1)
  assert spec.num_classes == 10
  assert spec.splits == {"train": 1437, "test": 360}
  assert sum(spec.splits.values()) == 1797
  assert os.path.isdir(os.path.join(zoo_data_dir, "digits", "32x32"))


def test_digits_8x8_is_sklearn_digits_with_fixed_stratified_split():
  from sklearn.datasets import load_digits

  raw = load_digits()
  # The documented rule, written out independently: stable sort by label,
  # every fifth example (starting with the first) goes to test.
  by_label = sorted(range(len(raw.target)), key=lambda i: (raw.target[i], i))
  test_ids = set(by_label[::5])
  expected_u8 = np.rint(raw.images * (255 / 16)).astype(np.uint8)[..., None]
  for split in ("train", "test"):
    ids = [i for i in range(len(raw.target)) if (i in test_ids) == (split == "test")]
    images, labels = zd.load_arrays("digits/8x8", split)
    assert images.dtype == np.uint8 and images.shape == (len(ids), 8, 8, 1)
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(10))
    assert _rows(images, labels) == _rows(expected_u8[ids], raw.target[ids])
    if split == "test":  # Stratified: every class holds ~20% of its examples.
      counts = np.bincount(labels, minlength=10)
      assert np.all(np.abs(counts - np.bincount(raw.target) / 5) <= 1)


def test_digits_split_reproducible_in_a_second_dir(tmp_path):
  for split in ("train", "test"):
    a = zd.load_arrays("digits/8x8", split)
    b = zd.load_arrays("digits/8x8", split, data_dir=str(tmp_path))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_digits_32x32_is_upsampled_8x8():
  small, small_labels = zd.load_arrays("digits/8x8", "test")
  big, big_labels = zd.load_arrays("digits/32x32", "test")
  assert big.shape == (360, 32, 32, 1) and big.dtype == np.uint8
  np.testing.assert_array_equal(small_labels, big_labels)  # Same keys, order.
  # Independent reference: scikit-image's bilinear resize of the 0..16 digit
  # (recovered exactly from the 8x8 bytes), rescaled to 0..255.
  from skimage.transform import resize

  counts = np.rint(small[..., 0] * (16 / 255))
  reference = np.stack([
      resize(c * (255 / 16), (32, 32), order=1, mode="edge",
             anti_aliasing=False) for c in counts])
  assert np.abs(big[..., 0] - reference).max() <= 1.0


def test_get_source_and_load_arrays_limit():
  src = zd.get_source("digits/8x8", "test")
  assert len(src) == 360
  example = src[5]
  assert isinstance(example["label"], int) and 0 <= example["label"] < 10
  assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 1)
  images, labels = zd.load_arrays("digits/8x8", "test", limit=7)
  assert images.shape == (7, 8, 8, 1) and labels.shape == (7,)
  np.testing.assert_array_equal(images[5], example["image"])
  assert labels[5] == example["label"]


def test_interrupted_preparation_is_never_read_as_complete(tmp_path, monkeypatch):
  calls = []
  real = digits_lib.to_uint8

  def failing(*args):
    calls.append(1)
    if len(calls) > 100:
      raise KeyboardInterrupt("simulated kill")
    return real(*args)

  monkeypatch.setattr(digits_lib, "to_uint8", failing)
  with pytest.raises(KeyboardInterrupt):
    zd.dataset_spec("digits/16x16", data_dir=str(tmp_path))
  final = tmp_path / "digits" / "16x16" / "1.0.0"
  assert not (final / "dataset_info.json").exists()
  monkeypatch.setattr(digits_lib, "to_uint8", real)
  spec = zd.dataset_spec("digits/16x16", data_dir=str(tmp_path))
  assert spec.splits == {"train": 1437, "test": 360}
  assert spec.image_shape == (16, 16, 1)


# ------------------------------------------------------------------- photos
def test_photos_test_photos_are_held_out():
  spec = zd.dataset_spec("photos/32x32")
  assert spec.image_shape == (32, 32, 3)
  assert spec.num_classes == len(photos_lib.PHOTO_NAMES)
  names = {}
  for split in ("train", "test"):
    images, labels = zd.load_arrays("photos/32x32", split)
    assert images.shape == (spec.splits[split], 32, 32, 3)
    assert images.std() > 10  # Real pictures, not blank crops.
    names[split] = {photos_lib.PHOTO_NAMES[i]: c
                    for i, c in enumerate(np.bincount(labels)) if c}
  assert not set(names["train"]) & set(names["test"])
  assert set(names["test"]) == {"rocket", "chelsea"}
  assert set(names["test"].values()) == {128}
  assert set(names["train"].values()) == {256} and len(names["train"]) >= 10


def test_photo_crop_boxes_are_fixed_squares_inside_the_photo():
  for name, (h, w) in [("a", (300, 451)), ("b", (1411, 1411))]:
    boxes = [photos_lib.crop_box(name, i, h, w) for i in range(200)]
    assert boxes == [photos_lib.crop_box(name, i, h, w) for i in range(200)]
    assert len(set(boxes)) > 0.9 * len(boxes)  # Big crops can coincide.
    for left, top, right, bottom in boxes:
      assert right - left == bottom - top >= int(0.3 * min(h, w))
      assert 0 <= left and right <= w and 0 <= top and bottom <= h


# --------------------------------------------------------------- tfds:NAME
def test_tfds_name_through_mock_data_without_tensorflow():
  with tfds.testing.mock_data(num_examples=12):
    spec = zd.dataset_spec("tfds:mnist")
    assert spec.image_shape == (28, 28, 1) and spec.num_classes == 10
    src = zd.get_source("tfds:mnist", "train")
    assert len(src) == 12
    assert src[3]["image"].dtype == np.uint8
    it = zd.BatchIterator(src, global_batch_size=8, seed=0)
    batches = [next(it) for _ in range(3)]  # Crosses an epoch boundary.
  for b in batches:
    assert b["image"].shape == (8, 28, 28, 1) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["label"].shape == (8,)
    assert np.all((b["label"] >= 0) & (b["label"] < 10))
  assert "tensorflow" not in sys.modules


def test_tfds_name_reads_prepared_array_record_files():
  ours = zd.get_source("digits/8x8", "test")
  via_tfds = zd.get_source("tfds:digits/8x8", "test")  # Prepared above.
  assert len(via_tfds) == len(ours) == 360
  for i in (0, 17, 359):
    np.testing.assert_array_equal(via_tfds[i]["image"], ours[i]["image"])
    assert via_tfds[i]["label"] == ours[i]["label"]
  spec = zd.dataset_spec("tfds:digits/8x8")
  assert spec.name == "tfds:digits/8x8" and spec.splits["test"] == 360
  with pytest.raises(ValueError, match="features: image, label"):
    zd.dataset_spec("tfds:digits/8x8", image_key="pixels")


@pytest.mark.parametrize("name", ["tfds:mnist", "tfds:no_such_dataset_zz"])
def test_tfds_name_not_prepared_is_a_clear_error(name, zoo_data_dir):
  with pytest.raises(FileNotFoundError) as e:
    zd.get_source(name, "train")
  message = str(e.value)
  assert name[5:] in message and zoo_data_dir in message and "\n" not in message


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("call", [zd.dataset_spec,
                                  lambda n: zd.get_source(n, "train")])
def test_unknown_dataset_lists_known_names(call):
  with pytest.raises(ValueError) as e:
    call("imagenet")
  message = str(e.value)
  assert "digits" in message and "photos" in message and "tfds:NAME" in message
  assert "\n" not in message


def test_unknown_config_and_split_are_listed():
  with pytest.raises(ValueError, match="8x8.*16x16.*32x32"):
    zd.dataset_spec("digits/7x7")
  with pytest.raises(ValueError, match="train.*test"):
    zd.get_source("digits/8x8", "validation")


# ----------------------------------------------------------- BatchIterator
class _IndexSource:
  """Example i has label i and an image filled with i % 256."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((2, 2, 1), i % 256, np.uint8), "label": i}


def _labels(it, steps):
  return np.concatenate([next(it)["label"] for _ in range(steps)])


def test_iterator_epochs_are_distinct_permutations_without_ragged_batches():
  it = zd.BatchIterator(_IndexSource(10), global_batch_size=4, seed=3)
  stream = _labels(it, 10)  # 40 examples = 4 epochs, batches cross epochs.
  epochs = stream.reshape(4, 10)
  for epoch in epochs:
    assert sorted(epoch.tolist()) == list(range(10))
  assert len({tuple(e) for e in epochs}) == 4
  ordered = zd.BatchIterator(_IndexSource(10), global_batch_size=4, seed=3,
                             shuffle=False)
  assert _labels(ordered, 5).tolist() == list(range(10)) * 2


def test_iterator_is_deterministic_in_seed():
  make = lambda s: zd.BatchIterator(_IndexSource(50), global_batch_size=8, seed=s)
  np.testing.assert_array_equal(_labels(make(1), 12), _labels(make(1), 12))
  assert not np.array_equal(_labels(make(1), 12), _labels(make(2), 12))
  # Seeds are hashed: seed 1's second epoch is not seed 2's first epoch.
  assert not np.array_equal(_labels(make(1), 13)[50:100], _labels(make(2), 7)[:50])


def test_iterator_resumes_exactly_from_json_state():
  src = zd.get_source("digits/8x8", "train")
  it = zd.BatchIterator(src, global_batch_size=64, seed=7)
  for _ in range(30):  # Past the first epoch boundary (1437 examples).
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 30
  expected = [next(it) for _ in range(3)]
  fresh = zd.BatchIterator(src, global_batch_size=64, seed=7)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  other = zd.BatchIterator(src, global_batch_size=64, seed=8)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_process_shares_concatenate_to_the_global_batch():
  src = _IndexSource(37)
  whole = zd.BatchIterator(src, global_batch_size=12, seed=5)
  parts = [zd.BatchIterator(src, global_batch_size=12, seed=5,
                            process_index=p, process_count=2) for p in range(2)]
  for _ in range(8):
    want = next(whole)
    got = [next(p) for p in parts]
    assert got[0]["label"].shape == (6,)
    np.testing.assert_array_equal(
        np.concatenate([g["label"] for g in got]), want["label"])
    np.testing.assert_array_equal(
        np.concatenate([g["image"] for g in got]), want["image"])
  # State is layout-free: a 2-process state resumes a 1-process run.
  resumed = zd.BatchIterator(src, global_batch_size=12, seed=5)
  resumed.set_state(parts[0].get_state())
  np.testing.assert_array_equal(next(resumed)["label"], next(whole)["label"])


def test_process_shares_read_only_their_rows():
  src, read = _IndexSource(100), []
  src.__getitems__ = lambda ids: [src[i] for i in read.extend(ids) or ids]
  it = zd.BatchIterator(src, global_batch_size=8, seed=0, process_index=1,
                        process_count=4)
  labels = next(it)["label"]
  assert len(read) == 2 and sorted(read) == sorted(labels.tolist())
  with pytest.raises(ValueError, match="global_batch_size"):
    zd.BatchIterator(src, global_batch_size=6, seed=0, process_count=4)
