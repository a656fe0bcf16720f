"""Paired datasets for two-tower (CLIP/SigLIP-style) training and retrieval.

Each example is two views of one item, one per tower:
  "pycode_pairs" (= "pycode_pairs/py3.11" on Python 3.11): the standard
    library's functions, {"code": the function without its docstring,
    "text": its docstring's first paragraph}, held out by file (see
    `zoo.data.pycode_pairs`); ~5,300 train / ~730 test pairs on 3.11.
  "digits_captions": the "digits" images (32x32x1) with a caption made from
    the label by a template picked by the example's index, e.g. "a
    handwritten seven" or "the digit 7"; {"image", "text", "label"}. Captions
    repeat (8 templates x 10 digits), so retrieval should count any item equal
    to the true one as correct: see `same_item`.

Text (both towers of pycode_pairs, captions) is tokenized with
`zoo.text.ByteTokenizer` into fixed-length rows: at most `seq_len - 1` tokens,
then EOS, then PAD up to `seq_len` (`encode_padded`). Reading needs no
TensorFlow; bundled data is prepared on first use into the data dir (see
`zoo.data.sources`).

Example:
  spec = zoo.data.pair_dataset_spec("pycode_pairs")   # towers ("code", "text")
  it = zoo.data.BatchIterator(
      zoo.data.get_pair_source("pycode_pairs", "train", seq_len=256),
      global_batch_size=64, seed=0)
  batch = next(it)            # {"code": int32 [64, 256], "text": int32 [64, 256]}
  test = zoo.data.load_pairs("digits_captions", "test", seq_len=32)
  correct = zoo.data.same_item(test["text"])          # bool [360, 360]
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Sequence

import numpy as np

from zoo.data import sources
from zoo.data import text as text_lib
from zoo.data.iterator import stack_examples
from zoo.data.pycode_pairs import pycode_pairs_dataset_builder
from zoo.text import EOS, PAD, VOCAB_SIZE, ByteTokenizer

PAIR_DATASETS = ("pycode_pairs", "digits_captions")
_TOWERS = {"pycode_pairs": ("code", "text"),
           "digits_captions": ("image", "text")}
_DIGITS = "digits"  # The 32x32 default config.
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                "eight", "nine")
# {word} is the number word, {numeral} the digit. No template may contain
# another number word (e.g. "weight" contains "eight"): tests check that.
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {numeral}",
    "a photo of the number {word}",
    "a scanned {numeral}",
    "the number {word} written by hand",
    "a small grayscale picture of the digit {word}",
    "digit {numeral}, handwritten",
    "a blurry {numeral} drawn with a pen",
)
_TOKENIZER = ByteTokenizer()
_read_records = text_lib._read_records  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class PairDatasetSpec:
  """Static facts about a paired dataset, known before reading any example."""

  name: str
  towers: tuple[str, str]  # Batch keys of the two towers' inputs.
  image_shape: tuple[int, int, int] | None  # (H, W, C); None without images.
  vocab_size: int  # Of the byte tokenizer that encodes the text towers.
  splits: dict[str, int]  # split name -> number of examples


def _base(name: str) -> str:
  """"pycode_pairs" or "digits_captions", raising a listing ValueError."""
  base, _, config = str(name).partition("/")
  configs = [c.name for c in pycode_pairs_dataset_builder.Builder.BUILDER_CONFIGS]
  if base in PAIR_DATASETS and (not config or (base == "pycode_pairs"
                                               and config in configs)):
    return base
  raise ValueError(f"Unknown pair dataset {name!r}; known: "
                   + ", ".join([*PAIR_DATASETS,
                                *(f"pycode_pairs/{c}" for c in configs)]) + ".")


def is_pair_dataset(name: str) -> bool:
  """True for the names of `PAIR_DATASETS` (and "pycode_pairs/<config>")."""
  try:
    _base(name)
  except ValueError:
    return False
  return True


def _stored_name(name: str) -> str:
  """The bundled dataset that holds the examples of pair dataset `name`."""
  return _DIGITS if _base(name) == "digits_captions" else name


def pair_dataset_spec(name: str, data_dir: str | None = None) -> PairDatasetSpec:
  """Towers, image shape, vocabulary and split sizes (prepares bundled data)."""
  base = _base(name)
  data_dir = data_dir or sources.default_data_dir()
  builder = sources._builder(_stored_name(name), data_dir)  # pylint: disable=protected-access
  image_shape = None
  if base == "digits_captions":
    image_shape = sources.dataset_spec(_DIGITS, data_dir=data_dir).image_shape
  else:
    name = f"{builder.name}/{builder.builder_config.name}"  # Canonical.
  splits = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
  return PairDatasetSpec(name=name, towers=_TOWERS[base],
                         image_shape=image_shape, vocab_size=VOCAB_SIZE,
                         splits=splits)


def encode_padded(text: str, seq_len: int) -> np.ndarray:
  """Byte tokens of `text`, cut to `seq_len - 1`, then EOS, then PAD: int32 [seq_len]."""
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  ids = _TOKENIZER.encode(text)[:seq_len - 1]
  row = np.full(seq_len, PAD, np.int32)
  row[:len(ids)] = ids
  row[len(ids)] = EOS
  return row


def digit_caption(label: int, index: int) -> str:
  """The caption of digit `label` at example `index` (template by crc32, no RNG)."""
  template = CAPTION_TEMPLATES[
      zlib.crc32(f"digits_captions/{int(index)}".encode()) % len(CAPTION_TEMPLATES)]
  return template.format(word=NUMBER_WORDS[int(label)], numeral=int(label))


def _as_str(value: Any) -> str:
  """A Text feature read from array_record (bytes) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  return str(value)


class CaptionedDigitsSource:
  """Random access to {"image": uint8 [H, W, 1], "text": int32 [seq_len],
  "label": int32} examples: "digits" images captioned by `digit_caption`."""

  def __init__(self, images: sources.ImageSource, seq_len: int):
    self._images = images
    self._seq_len = int(seq_len)

  def __len__(self) -> int:
    return len(self._images)

  def _convert(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
    label = int(example["label"])
    return {"image": example["image"],
            "text": encode_padded(digit_caption(label, index), self._seq_len),
            "label": np.int32(label)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._images[index]  # Raises IndexError when out of range.
    return self._convert(int(index) % len(self), example)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    examples = self._images.__getitems__(indices)
    return [self._convert(i, e) for i, e in zip(indices, examples)]

  def __repr__(self) -> str:
    return f"CaptionedDigitsSource({self._images!r}, seq_len={self._seq_len})"


class CodeDocstringSource:
  """Random access to {"code": int32 [seq_len], "text": int32 [seq_len]}
  examples: a function without its docstring, and the docstring."""

  def __init__(self, data_source: Sequence[Any], seq_len: int):
    self._data_source = data_source
    self._seq_len = int(seq_len)

  def __len__(self) -> int:
    return len(self._data_source)

  def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
    return {"code": encode_padded(_as_str(record["code"]), self._seq_len),
            "text": encode_padded(_as_str(record["docstring"]), self._seq_len)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return self._convert(self._data_source[index % len(self)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    records = _read_records(self._data_source, [int(i) for i in indices])
    return [self._convert(r) for r in records]

  def __repr__(self) -> str:
    return f"CodeDocstringSource({self._data_source!r}, seq_len={self._seq_len})"


def get_pair_source(name: str, split: str, *, seq_len: int,
                    data_dir: str | None = None):
  """A random-access source of pairs: `len(src)`, `src[i]`, `src.__getitems__`.

  Returns:
    digits_captions: a `CaptionedDigitsSource` ({"image", "text", "label"});
    pycode_pairs: a `CodeDocstringSource` ({"code", "text"}).

  Raises:
    ValueError: for an unknown name or split (the message lists the known
      ones) or a non-positive `seq_len`.
  """
  base = _base(name)
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  data_dir = data_dir or sources.default_data_dir()
  builder = sources._builder(_stored_name(name), data_dir)  # pylint: disable=protected-access
  sources._check_split(name, split, builder)  # pylint: disable=protected-access
  if base == "digits_captions":
    return CaptionedDigitsSource(
        sources.get_source(_DIGITS, split, data_dir=data_dir), seq_len)
  return CodeDocstringSource(builder.as_data_source(split=split), seq_len)


def load_pairs(name: str, split: str, *, seq_len: int,
               data_dir: str | None = None, limit: int | None = None,
               chunk: int = 1024) -> dict[str, np.ndarray]:
  """All (or the first `limit`) pairs in stored order, for retrieval evaluation.

  Returns:
    The source's keys stacked: e.g. {"code": int32 [N, seq_len], "text":
    int32 [N, seq_len]}, or {"image": uint8 [N, 32, 32, 1], "text": int32
    [N, seq_len], "label": int32 [N]}.
  """
  source = get_pair_source(name, split, seq_len=seq_len, data_dir=data_dir)
  n = len(source) if limit is None else max(0, min(int(limit), len(source)))
  examples = []
  for start in range(0, n, chunk):
    examples += source.__getitems__(range(start, min(n, start + chunk)))
  if examples:
    return stack_examples(examples)
  empty = {"text": np.zeros((0, seq_len), np.int32)}
  if _base(name) == "digits_captions":
    shape = pair_dataset_spec(name, data_dir).image_shape
    return {"image": np.zeros((0, *shape), np.uint8), **empty,
            "label": np.zeros((0,), np.int32)}
  return {"code": np.zeros((0, seq_len), np.int32), **empty}


def same_item(a: np.ndarray) -> np.ndarray:
  """bool [N, N]: True where rows `a[i]` and `a[j]` are identical.

  For retrieval with repeated items (digits captions repeat): a retrieved
  item counts as correct when it equals the true one. Works on token rows,
  images or labels (anything with a leading axis of N).
  """
  a = np.asarray(a)
  if a.ndim == 0:
    raise ValueError("same_item needs an array with a leading axis of items")
  n = a.shape[0]
  rows = a.reshape(n, -1) if a.size else np.zeros((n, 0), a.dtype)
  if rows.shape[1] == 0:  # Nothing to compare: all rows are equal.
    return np.ones((n, n), bool)
  _, ids = np.unique(rows, axis=0, return_inverse=True)
  ids = ids.reshape(-1)
  return ids[:, None] == ids[None, :]
