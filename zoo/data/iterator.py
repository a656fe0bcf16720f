"""`BatchIterator`: deterministic, resumable, process-sharded batches.

The example stream is epoch 0, epoch 1, ... back to back, each epoch a
permutation of the source that depends only on (seed, epoch). Global batch k
is stream positions [k*B, (k+1)*B): batches cross epoch boundaries, so every
batch is full (static shapes, no recompiles) and none is ever dropped.
Process p of P reads only rows [p*B/P, (p+1)*B/P) of each global batch, so the
global batch is the same for any process count, and the iterator state (just
the step) can be restored on a different number of hosts. Batches stack every
key of the examples (see `stack_examples`), so paired sources work too.
"""

from __future__ import annotations

import zlib
from typing import Any

import grain
import numpy as np

_STATE_KEYS = ("seed", "shuffle", "global_batch_size", "num_examples")


def _grain_seed(seed: int) -> int:
  """Maps any int seed to grain's [0, 2**32) seed space.

  Why hash: grain's shuffle seeds epoch e with (seed + e), so seeds 0 and 1
  would share all but one epoch; hashing spreads user seeds apart. crc32, not
  `hash()`, because `hash()` is salted per process.
  """
  return zlib.crc32(f"zoo.data.BatchIterator/{int(seed)}".encode())


def stack_examples(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks every key of `examples` along a new leading batch axis.

  Arrays keep their dtype (uint8 images stay uint8, int32 tokens stay int32);
  64-bit integers, including Python ints such as labels, become int32.
  """
  batch = {}
  for key in examples[0]:
    values = np.stack([np.asarray(e[key]) for e in examples])
    if values.dtype.kind in "iu" and values.dtype.itemsize > 4:
      values = values.astype(np.int32)
    batch[key] = values
  return batch


class BatchIterator:
  """Deterministic, resumable iterator of this process's share of each global batch.

  Example:
    it = BatchIterator(get_source("digits", "train"), global_batch_size=128,
                       seed=0, process_index=jax.process_index(),
                       process_count=jax.process_count())
    batch = next(it)   # {"image": uint8 [64, 32, 32, 1], "label": int32 [64]}
    # A paired source (`zoo.data.get_pair_source`) gives its own keys, e.g.
    # {"code": int32 [64, seq_len], "text": int32 [64, seq_len]}.
    state = it.get_state()  # goes into the checkpoint, e.g. {"step": 1, ...}

  Args:
    source: random access, `len(source)` and `source[i]` -> a dict of arrays
      or numbers with the same keys for every example (e.g. {"image",
      "label"}); a `__getitems__(indices)` method, if present, reads a batch
      at once. Every key is stacked as in `stack_examples`.
    global_batch_size: examples per global batch, over all processes.
    seed: shuffle seed (any int).
    shuffle: if False, every epoch is the stored order.
    process_index: this process, in [0, process_count).
    process_count: number of processes that split each global batch.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int,
               shuffle: bool = True, process_index: int = 0,
               process_count: int = 1):
    if global_batch_size <= 0:
      raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
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
    self._local_batch_size = self._global_batch_size // process_count
    self._offset = process_index * self._local_batch_size
    self._seed = int(seed)
    self._shuffle = bool(shuffle)
    self._step = 0
    # Position in the stream -> record index. grain's shuffle is a stateless
    # index permutation reseeded per epoch (epoch = position // len), so a
    # lookup costs the same at step 0 and step 10**6, and no state but the
    # step is needed to resume.
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

  def global_indices(self, step: int) -> np.ndarray:
    """Record indices of global batch `step` (all processes), int64 [B]."""
    start = step * self._global_batch_size
    return np.asarray(
        [self._order[i] for i in range(start, start + self._global_batch_size)],
        np.int64)

  def _local_indices(self, step: int) -> list[int]:
    start = step * self._global_batch_size + self._offset
    return [int(self._order[i])
            for i in range(start, start + self._local_batch_size)]

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    indices = self._local_indices(self._step)
    getitems = getattr(self._source, "__getitems__", None)
    examples = (getitems(indices) if getitems else
                [self._source[i] for i in indices])
    self._step += 1  # Only after a successful read, so a retry is exact.
    return stack_examples(examples)

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serialisable dict; independent of the process layout."""
    return {"step": self._step, "seed": self._seed, "shuffle": self._shuffle,
            "global_batch_size": self._global_batch_size,
            "num_examples": self._num_examples}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from `get_state`, maybe of another process).

    Raises:
      ValueError: if the state was made with another seed, shuffle flag, global
        batch size or dataset size, where resuming would silently change data.
    """
    mine = self.get_state()
    mismatched = [f"{k}: state {state[k]!r} != iterator {mine[k]!r}"
                  for k in _STATE_KEYS if k in state and state[k] != mine[k]]
    if mismatched:
      raise ValueError("iterator state does not match: " + "; ".join(mismatched))
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    self._step = step
