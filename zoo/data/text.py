"""Text datasets: random-access sources, packed token batches, eval chunks.

A dataset is *text* when its `text_key` feature (default "text") is a
`tfds.features.Text`: the bundled "pycode" (the Python standard library,
labelled by package), and "tfds:NAME" datasets such as "tfds:lm1b" or
"tfds:c4" prepared as array_record in the data dir (never downloaded here).
Reading needs no TensorFlow. Tokens come from `zoo.text.ByteTokenizer` unless
another tokenizer (anything with `encode(str) -> int array`) is passed.

Example:
  spec = zoo.data.text_dataset_spec("pycode")      # 21 classes
  it = zoo.data.PackedBatchIterator(zoo.data.get_text_source("pycode", "train"),
                                    global_batch_size=8, seq_len=256, seed=0)
  batch = next(it)                                 # {"tokens": int32 [8, 256]}
  tokens, labels = zoo.data.load_text_chunks("pycode", "test", seq_len=256)
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from typing import Any, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from zoo.data import sources
from zoo.text import EOS, PAD, ByteTokenizer

# Shared with the image path in sources.py: name lookup and lazy preparation,
# "tfds:NAME" access without downloads, split checks.
_builder = sources._builder  # pylint: disable=protected-access
_check_split = sources._check_split  # pylint: disable=protected-access
_tfds_data_source = sources._tfds_data_source  # pylint: disable=protected-access

_STATE_KEYS = ("seed", "shuffle", "global_batch_size", "seq_len",
               "num_examples")
_CURSOR_KEYS = ("step", "document", "offset")


@dataclasses.dataclass(frozen=True)
class TextDatasetSpec:
  """Static facts about a text dataset, known before reading any example."""

  name: str
  num_classes: int | None  # None without a ClassLabel `label_key` feature.
  class_names: tuple[str, ...] | None
  splits: dict[str, int]  # split name -> number of examples (empty if unknown)


def _text_builder(name: str, data_dir: str | None, text_key: str,
                  prepare: bool = True):
  """(data dir, builder, features), raising unless `text_key` is Text."""
  data_dir = data_dir or sources.default_data_dir()
  builder = _builder(name, data_dir, prepare)
  features = builder.info.features
  if not isinstance(features[text_key] if text_key in features else None,
                    tfds.features.Text):
    raise ValueError(f"Dataset {name!r} has no text feature {text_key!r}; "
                     f"features: {', '.join(features)} (set text_key).")
  return data_dir, builder, features


def is_text_dataset(name: str, data_dir: str | None = None,
                    text_key: str = "text") -> bool:
  """True if `name`'s `text_key` feature is Text. Prepares nothing.

  Raises:
    ValueError: for an unknown bundled name (the message lists known names).
  """
  data_dir = data_dir or sources.default_data_dir()
  features = _builder(name, data_dir, prepare=False).info.features
  return text_key in features and isinstance(features[text_key],
                                             tfds.features.Text)


def text_dataset_spec(name: str, data_dir: str | None = None,
                      text_key: str = "text",
                      label_key: str | None = "label") -> TextDatasetSpec:
  """Classes and split sizes of text dataset `name` (prepares bundled data).

  `num_classes`/`class_names` are None where `label_key` is None, absent or
  not a ClassLabel; `splits` is empty where TFDS cannot know the sizes (a
  "tfds:NAME" dataset under `tfds.testing.mock_data`).
  """
  data_dir, builder, features = _text_builder(name, data_dir, text_key)
  if name.startswith(sources.TFDS_PREFIX):
    if not builder.is_prepared():
      _tfds_data_source(name, None, data_dir, builder)  # Raises if missing.
  else:
    name = f"{builder.name}/{builder.builder_config.name}"  # Canonical.
  num_classes = class_names = None
  if (label_key and label_key in features
      and isinstance(features[label_key], tfds.features.ClassLabel)):
    num_classes = features[label_key].num_classes
    class_names = tuple(features[label_key].names)
  splits = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
  return TextDatasetSpec(name=name, num_classes=num_classes,
                         class_names=class_names, splits=splits)


def _read_records(data_source, indices: list[int]) -> list[Any]:
  """Reads records, in one array_record call where the source allows it."""
  getitems = getattr(data_source, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(indices))
    except TypeError:  # tfds.testing.mock_data's `__getitems__` (tfds 4.9.10).
      pass
  return [data_source[i] for i in indices]


class TextSource:
  """Random access to {"text": str, "label": int} examples.

  Wraps a TFDS data source: Text features come back as bytes from
  array_record and are decoded as UTF-8 (invalid bytes replaced); labels are
  Python ints, -1 without `label_key`.
  """

  def __init__(self, data_source: Sequence[Any], text_key: str = "text",
               label_key: str | None = "label"):
    self._data_source = data_source
    self._text_key = text_key
    self._label_key = label_key

  def __len__(self) -> int:
    return len(self._data_source)

  def _convert(self, example: dict[str, Any]) -> dict[str, Any]:
    text = example[self._text_key]
    if isinstance(text, np.ndarray):
      text = text.item()
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    label = int(example[self._label_key]) if self._label_key else -1
    return {"text": str(text), "label": label}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return self._convert(self._data_source[index % len(self)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    records = _read_records(self._data_source, [int(i) for i in indices])
    return [self._convert(r) for r in records]

  def __repr__(self) -> str:
    return f"TextSource({self._data_source!r})"


def get_text_source(name: str, split: str, data_dir: str | None = None,
                    text_key: str = "text",
                    label_key: str | None = "label") -> TextSource:
  """A random-access source: `len(src)`, `src[i]` -> {"text", "label"}.

  A `label_key` the dataset lacks (e.g. "label" of lm1b) gives label -1.
  """
  data_dir, builder, features = _text_builder(name, data_dir, text_key)
  _check_split(name, split, builder)
  if name.startswith(sources.TFDS_PREFIX):
    data_source = _tfds_data_source(name, split, data_dir, builder)
  else:
    data_source = builder.as_data_source(split=split)
  if label_key and label_key not in features:
    label_key = None
  return TextSource(data_source, text_key, label_key)


def _grain_seed(seed: int) -> int:
  """User seed -> grain seed (crc32, not the salted `hash()`; see iterator.py)."""
  return zlib.crc32(f"zoo.data.PackedBatchIterator/{int(seed)}".encode())


def _encode(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32).reshape(-1)


class PackedBatchIterator:
  """Deterministic, resumable packed token batches (concatenate and chunk).

  The document stream is epoch 0, epoch 1, ... back to back, each epoch a
  permutation of the source that depends only on (seed, epoch) (grain's
  stateless index shuffle, so no epoch is ever materialised). Each document
  is tokenized and followed by one EOS; the concatenation is one endless
  token stream cut into rows of exactly `seq_len` tokens (documents run
  across row, batch and epoch boundaries; nothing is padded or dropped).
  Global batch k is rows [k*B, (k+1)*B); process p of P returns rows
  [p*B/P, (p+1)*B/P) of it, so the global batch is the same for any process
  count and the state can be restored on a different number of hosts.

  Cost: where a process's rows start depends on the lengths of all documents
  before them, so every process reads and tokenizes the whole stream (P
  times the reading work of one host). That is cheap for byte tokens and the
  corpora used here; for a large pod run, pre-tokenize the data instead.
  Tokenized documents are kept in an LRU cache of at most `cache_tokens`
  tokens, read `read_ahead` documents at a time.

  Example:
    it = PackedBatchIterator(get_text_source("pycode", "train"),
                             global_batch_size=16, seq_len=512, seed=0,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)        # {"tokens": int32 [16 / process_count, 512]}
    state = it.get_state()  # {"step": 1, "document": ..., "offset": ..., ...}

  Args:
    source: random access, `len(source)` and `source[i]` -> {"text", ...}
      (e.g. `get_text_source(...)`); `__getitems__`, if present, is used.
    global_batch_size: rows per global batch, over all processes.
    seq_len: tokens per row.
    seed: shuffle seed (any int).
    shuffle: if False, every epoch is the stored order.
    process_index: this process, in [0, process_count).
    process_count: number of processes that split each global batch.
    tokenizer: `encode(str) -> int array` (default `ByteTokenizer()`); its
      `eos_id` (default `zoo.text.EOS`) ends each document.
    cache_tokens: LRU cache size in tokens (4 bytes each).
    read_ahead: documents read per source call on a cache miss.
  """

  def __init__(self, source, *, global_batch_size: int, seq_len: int,
               seed: int, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1, tokenizer=None,
               cache_tokens: int = 1 << 24, read_ahead: int = 64):
    if global_batch_size <= 0 or seq_len <= 0:
      raise ValueError(f"global_batch_size and seq_len must be positive, got "
                       f"{global_batch_size} and {seq_len}")
    if process_count <= 0 or not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got "
                       f"{process_index} and {process_count}")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible "
                       f"by process_count={process_count}")
    self._source = source
    self._num_examples = len(source)
    if self._num_examples == 0:
      raise ValueError("cannot iterate over an empty source")
    self._global_batch_size = int(global_batch_size)
    self._seq_len = int(seq_len)
    self._local_batch_size = self._global_batch_size // process_count
    self._row_offset = process_index * self._local_batch_size
    self._seed = int(seed)
    self._shuffle = bool(shuffle)
    self._tokenizer = tokenizer or ByteTokenizer()
    self._eos = int(getattr(self._tokenizer, "eos_id", EOS))
    self._cache: collections.OrderedDict[int, np.ndarray] = (
        collections.OrderedDict())
    self._cache_tokens = int(cache_tokens)
    self._cached = 0  # Tokens in the cache.
    self._read_ahead = max(1, int(read_ahead))
    # The cursor: next global batch, and the stream position of the next
    # token as (document position in the stream, offset into its tokens).
    self._step = self._document = self._offset = 0
    order = grain.MapDataset.range(self._num_examples)
    if self._shuffle:
      order = order.shuffle(seed=_grain_seed(self._seed))
    self._order = order.repeat()  # Infinite: epochs back to back.

  @property
  def step(self) -> int:
    """Index of the next global batch."""
    return self._step

  @property
  def local_batch_size(self) -> int:
    return self._local_batch_size

  def document_index(self, position: int) -> int:
    """Source index of the document at `position` of the document stream."""
    return int(self._order[int(position)])

  def document_tokens(self, position: int) -> np.ndarray:
    """Tokens (ending in EOS) of the document at `position` of the stream."""
    index = self.document_index(position)
    tokens = self._cache.get(index)
    if tokens is not None:
      self._cache.move_to_end(index)
      return tokens
    wanted = {self.document_index(p): None
              for p in range(position, position + self._read_ahead)}
    missing = [i for i in wanted if i not in self._cache]
    for i, example in zip(missing, _read_records(self._source, missing)):
      wanted[i] = np.append(_encode(self._tokenizer, example["text"]),
                            np.int32(self._eos))
      self._cache[i] = wanted[i]
      self._cached += len(wanted[i])
    while self._cached > self._cache_tokens and len(self._cache) > 1:
      self._cached -= len(self._cache.popitem(last=False)[1])
    return wanted[index]

  def _consume(self, document: int, offset: int, count: int,
               out: np.ndarray | None) -> tuple[int, int]:
    """Advances the cursor by `count` tokens, copying them into `out`."""
    done = 0
    while done < count:
      tokens = self.document_tokens(document)
      take = min(len(tokens) - offset, count - done)
      if out is not None:
        out[done:done + take] = tokens[offset:offset + take]
      done += take
      offset += take
      if offset == len(tokens):
        document, offset = document + 1, 0
    return document, offset

  def __iter__(self) -> "PackedBatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    s = self._seq_len
    before = self._row_offset * s
    mine = self._local_batch_size * s
    after = self._global_batch_size * s - before - mine
    out = np.empty(mine, np.int32)
    cursor = self._consume(self._document, self._offset, before, None)
    cursor = self._consume(*cursor, mine, out)
    cursor = self._consume(*cursor, after, None)
    # Only after a successful read, so a retry is exact.
    self._document, self._offset = cursor
    self._step += 1
    return {"tokens": out.reshape(self._local_batch_size, s)}

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serialisable dict; independent of the process layout."""
    return {"step": self._step, "document": self._document,
            "offset": self._offset, "seed": self._seed,
            "shuffle": self._shuffle,
            "global_batch_size": self._global_batch_size,
            "seq_len": self._seq_len, "num_examples": self._num_examples}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from `get_state`, maybe of another process).

    Raises:
      ValueError: if the state was made with another seed, shuffle flag,
        global batch size, sequence length or dataset size (the message names
        the field), or lacks the cursor.
    """
    mine = self.get_state()
    mismatched = [f"{k}: state {state[k]!r} != iterator {mine[k]!r}"
                  for k in _STATE_KEYS if k in state and state[k] != mine[k]]
    if mismatched:
      raise ValueError("iterator state does not match: " + "; ".join(mismatched))
    missing = [k for k in _CURSOR_KEYS if k not in state]
    if missing:
      raise ValueError(f"iterator state lacks {', '.join(missing)}")
    step, document, offset = (int(state[k]) for k in _CURSOR_KEYS)
    if min(step, document, offset) < 0:
      raise ValueError(f"step, document and offset must be >= 0, got {state}")
    self._step, self._document, self._offset = step, document, offset


def load_text_chunks(
    name: str, split: str, *, seq_len: int, data_dir: str | None = None,
    limit: int | None = None, text_key: str = "text",
    label_key: str | None = "label", tokenizer=None,
    chunks_per_document: int | None = None,
    min_chunk_tokens: int | None = None,
    read_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-length chunks of each document, for evaluation and probing.

  The first `limit` documents (all by default), in stored order, are each
  tokenized, followed by one EOS (as in `PackedBatchIterator`), and cut into
  consecutive non-overlapping chunks of `seq_len` tokens; each chunk carries
  its document's label (-1 without labels). The last chunk of a document is
  padded with PAD, or dropped if it holds fewer than `min_chunk_tokens`
  tokens (default `seq_len // 4`, at least 1), so a very short document may
  give no chunk. `chunks_per_document` keeps only each document's first
  chunks. Deterministic.

  Returns:
    tokens int32 [N, seq_len] and labels int32 [N].
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  min_tokens = min(seq_len, max(1, seq_len // 4 if min_chunk_tokens is None
                                else int(min_chunk_tokens)))
  tokenizer = tokenizer or ByteTokenizer()
  eos = np.int32(getattr(tokenizer, "eos_id", EOS))
  pad = int(getattr(tokenizer, "pad_id", PAD))
  source = get_text_source(name, split, data_dir=data_dir, text_key=text_key,
                           label_key=label_key)
  n = len(source) if limit is None else min(int(limit), len(source))
  rows, labels = [], []
  for start in range(0, n, read_size):
    for example in source.__getitems__(range(start, min(n, start + read_size))):
      tokens = np.append(_encode(tokenizer, example["text"]), eos)
      count = -(-len(tokens) // seq_len)
      if len(tokens) - (count - 1) * seq_len < min_tokens:
        count -= 1  # The last partial chunk is too short.
      if chunks_per_document is not None:
        count = min(count, int(chunks_per_document))
      if count <= 0:
        continue
      padded = np.full(count * seq_len, pad, np.int32)
      kept = tokens[:count * seq_len]
      padded[:len(kept)] = kept
      rows.append(padded.reshape(count, seq_len))
      labels += [example["label"]] * count
  if not rows:
    return np.zeros((0, seq_len), np.int32), np.zeros((0,), np.int32)
  return np.concatenate(rows), np.asarray(labels, np.int32)
