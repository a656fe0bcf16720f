"""Tests for zoo.data.text and the bundled `pycode` builder.

Expected values come from the sources (the interpreter's own stdlib files on
disk, the documented split rule, the packing contract rebuilt here from the
raw texts), never from outputs of the code under test.
"""

import json
import os
import sys
import sysconfig
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

import zoo.data as zd
from zoo.text import BYTE_OFFSET, EOS, PAD

PACKAGES = ("asyncio", "email", "encodings", "idlelib", "tkinter", "xml",
            "multiprocessing", "unittest", "importlib", "http", "logging",
            "urllib", "html", "re", "xmlrpc", "concurrent", "ctypes",
            "wsgiref", "json", "collections")
EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idle_test",
            "lib2to3"}
STDLIB = sysconfig.get_paths()["stdlib"]


def _ids(text):
  """Byte tokens of `text`, written out from the tokenizer's documented layout."""
  return [b + BYTE_OFFSET for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def pycode(data_dir):
  """{split: list of examples with "path"}, read straight from the data source."""
  out = {}
  for split in ("train", "test"):
    src = zd.get_text_source("pycode", split, data_dir)
    paths = zd.sources._builder("pycode", data_dir).as_data_source(split)
    out[split] = [dict(src[i], path=paths[i]["path"].decode())
                  for i in range(len(src))]
  return out


# ------------------------------------------------------------------- pycode
def test_pycode_spec_and_names(data_dir):
  spec = zd.text_dataset_spec("pycode", data_dir)
  assert spec.name == "pycode/py%d.%d" % sys.version_info[:2]
  assert spec.class_names == PACKAGES + ("other",)
  assert spec.num_classes == 21
  assert set(spec.splits) == {"train", "test"}
  assert 0.08 < spec.splits["test"] / sum(spec.splits.values()) < 0.2
  assert zd.is_text_dataset("pycode", data_dir)
  assert not zd.is_text_dataset("digits/8x8", data_dir)
  with pytest.raises(ValueError) as e:
    zd.text_dataset_spec("pycodez", data_dir)
  assert "pycode" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="text feature"):
    zd.text_dataset_spec("digits/8x8", data_dir)


def test_pycode_examples_are_the_stdlib_files(pycode):
  expected = set()
  for dirpath, dirnames, filenames in os.walk(STDLIB):
    rel = os.path.relpath(dirpath, STDLIB)
    if rel != "." and EXCLUDED & set(rel.split(os.sep)):
      continue
    for f in filenames:
      if f.endswith(".py"):
        expected.add(os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/"))
  train = {e["path"] for e in pycode["train"]}
  test = {e["path"] for e in pycode["test"]}
  assert not train & test
  assert 500 < len(train | test) <= len(expected)
  assert len(expected - (train | test)) <= 3  # Only non-UTF-8 files skipped.
  for split in ("train", "test"):
    for e in pycode[split]:
      parts = e["path"].split("/")
      assert not EXCLUDED & set(parts[:-1])
      with open(os.path.join(STDLIB, *parts), "rb") as f:
        assert e["text"] == f.read().decode("utf-8")
      top = parts[0] if len(parts) > 1 and parts[0] in PACKAGES else "other"
      assert e["label"] == (PACKAGES + ("other",)).index(top)
    assert set(e["label"] for e in pycode[split]) == set(range(21))
  json_files = [e for e in pycode["train"] + pycode["test"]
                if e["path"].startswith("json/")]
  assert len(json_files) >= 3 and all("def " in e["text"] for e in json_files)
  tok = zd.text.ByteTokenizer()
  assert tok.decode(tok.encode(json_files[0]["text"])) == json_files[0]["text"]


def test_pycode_split_is_the_documented_crc32_rule(pycode):
  examples = pycode["train"] + pycode["test"]
  test = {e["path"] for e in pycode["test"]}
  by_label = {}
  for e in examples:
    by_label.setdefault(e["label"], []).append(zlib.crc32(e["path"].encode()))
  for e in examples:
    h, hashes = zlib.crc32(e["path"].encode()), by_label[e["label"]]
    want = (h % 10 == 0 or h == min(hashes)) and h != max(hashes)
    assert (e["path"] in test) == want, e["path"]


# ---------------------------------------------------------- PackedBatchIterator
class _DocSource:
  """In-memory documents of varied lengths, incl. empty and non-ASCII ones."""

  def __init__(self, n=23):
    self.texts = [("é" if i % 5 == 0 else "ab") * (i * 7 % 31) + str(i)
                  if i % 7 else "" for i in range(n)]

  def __len__(self):
    return len(self.texts)

  def __getitem__(self, i):
    return {"text": self.texts[i], "label": i}


def _stream(it, steps):
  return np.concatenate([next(it)["tokens"] for _ in range(steps)]).reshape(-1)


def test_packing_without_shuffle_is_the_documents_joined_with_eos():
  src = _DocSource()
  it = zd.PackedBatchIterator(src, global_batch_size=3, seq_len=16, seed=0,
                              shuffle=False)
  batch = next(it)["tokens"]
  assert batch.shape == (3, 16) and batch.dtype == np.int32
  got = np.concatenate([batch.reshape(-1), _stream(it, 40)])
  want = []
  while len(want) < len(got):  # Epochs back to back, stored order.
    for t in src.texts:
      want += _ids(t) + [EOS]
  np.testing.assert_array_equal(got, want[:len(got)])
  assert len(got) > 2 * sum(len(_ids(t)) + 1 for t in src.texts)


def test_packing_with_shuffle_follows_a_permutation_per_epoch():
  src = _DocSource()
  n = len(src)
  it = zd.PackedBatchIterator(src, global_batch_size=4, seq_len=8, seed=3)
  got = _stream(it, 60)
  order = [it.document_index(p) for p in range(3 * n)]
  epochs = [order[e * n:(e + 1) * n] for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))
  assert epochs[0] != list(range(n)) and epochs[0] != epochs[1]
  want = sum((_ids(src.texts[i]) + [EOS] for i in order), [])
  assert len(want) > len(got)
  np.testing.assert_array_equal(got, want[:len(got)])
  other = zd.PackedBatchIterator(src, global_batch_size=4, seq_len=8, seed=4)
  assert not np.array_equal(_stream(other, 60), got)


def test_packing_resumes_exactly_and_checks_the_state():
  src = _DocSource()
  make = lambda **kw: zd.PackedBatchIterator(
      src, global_batch_size=4, seq_len=kw.pop("seq_len", 8),
      seed=kw.pop("seed", 1), **kw)
  it = make()
  for _ in range(25):  # Past the first epoch boundary.
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 25 and len(json.dumps(state)) < 300
  want = [next(it)["tokens"] for _ in range(5)]
  fresh = make(cache_tokens=1)  # A tiny cache must not change the data.
  fresh.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(fresh)["tokens"], w)
  for field, kw in [("seq_len", {"seq_len": 9}), ("seed", {"seed": 2}),
                    ("shuffle", {"shuffle": False})]:
    with pytest.raises(ValueError, match=field):
      make(**kw).set_state(state)
  with pytest.raises(ValueError, match="num_examples"):
    zd.PackedBatchIterator(_DocSource(24), global_batch_size=4, seq_len=8,
                           seed=1).set_state(state)


def test_process_shares_concatenate_to_the_global_batch(data_dir):
  src = zd.get_text_source("pycode", "test", data_dir)
  kw = dict(global_batch_size=4, seq_len=64, seed=5)
  whole = zd.PackedBatchIterator(src, **kw)
  parts = [zd.PackedBatchIterator(src, process_index=p, process_count=2, **kw)
           for p in range(2)]
  for _ in range(3):
    want = next(whole)["tokens"]
    got = [next(p)["tokens"] for p in parts]
    assert got[0].shape == (2, 64)
    np.testing.assert_array_equal(np.concatenate(got), want)
  # A 2-process state resumes a 1-process run.
  resumed = zd.PackedBatchIterator(src, **kw)
  resumed.set_state(parts[1].get_state())
  np.testing.assert_array_equal(next(resumed)["tokens"], next(whole)["tokens"])
  # The real corpus decodes to the documents in the iterator's order.
  first = zd.PackedBatchIterator(src, **kw)
  tokens = next(first)["tokens"].reshape(-1)
  doc = src[first.document_index(0)]["text"]
  np.testing.assert_array_equal(tokens[:len(_ids(doc)) + 1][:256],
                                (_ids(doc) + [EOS])[:256])


# ----------------------------------------------------------- load_text_chunks
def test_load_text_chunks_pads_drops_and_labels(data_dir):
  seq_len, limit = 512, 30
  tokens, labels = zd.load_text_chunks("pycode", "test", seq_len=seq_len,
                                       data_dir=data_dir, limit=limit)
  src = zd.get_text_source("pycode", "test", data_dir)
  rows, want_labels = [], []
  for i in range(limit):
    ids = _ids(src[i]["text"]) + [EOS]
    for start in range(0, len(ids), seq_len):
      chunk = ids[start:start + seq_len]
      if len(chunk) >= seq_len // 4:
        rows.append(chunk + [PAD] * (seq_len - len(chunk)))
        want_labels.append(src[i]["label"])
  assert tokens.dtype == np.int32 and labels.dtype == np.int32
  np.testing.assert_array_equal(tokens, rows)
  np.testing.assert_array_equal(labels, want_labels)
  assert (tokens == PAD).any() and len(set(labels.tolist())) > 1
  capped, capped_labels = zd.load_text_chunks(
      "pycode", "test", seq_len=seq_len, data_dir=data_dir, limit=limit,
      chunks_per_document=1)
  kept = [i for i in range(limit)
          if len(_ids(src[i]["text"])) + 1 >= seq_len // 4]
  assert len(capped) == len(kept) and len(kept) < limit  # Some are dropped.
  np.testing.assert_array_equal(capped_labels, [src[i]["label"] for i in kept])
  for row, i in zip(capped, kept):
    ids = (_ids(src[i]["text"]) + [EOS])[:seq_len]
    np.testing.assert_array_equal(row, ids + [PAD] * (seq_len - len(ids)))


# --------------------------------------------------------------- tfds:lm1b
def test_lm1b_through_mock_data_gives_packed_batches(data_dir):
  with tfds.testing.mock_data(num_examples=10):
    assert zd.is_text_dataset("tfds:lm1b", data_dir)
    spec = zd.text_dataset_spec("tfds:lm1b", data_dir)
    assert spec.num_classes is None and spec.class_names is None
    src = zd.get_text_source("tfds:lm1b", "train", data_dir)
    assert len(src) == 10
    texts = [src[i]["text"] for i in range(10)]
    assert all(isinstance(t, str) for t in texts) and src[0]["label"] == -1
    it = zd.PackedBatchIterator(src, global_batch_size=4, seq_len=32, seed=0,
                                shuffle=False)
    batches = [next(it)["tokens"] for _ in range(3)]
  for b in batches:
    assert b.shape == (4, 32) and b.dtype == np.int32
  want = sum((_ids(t) + [EOS] for t in texts * 50), [])
  np.testing.assert_array_equal(np.concatenate(batches).reshape(-1),
                                want[:3 * 4 * 32])
  assert "tensorflow" not in sys.modules
