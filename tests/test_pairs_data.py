"""Tests for zoo.data.pairs, the `pycode_pairs` builder and BatchIterator's key stacking.

Expected values come from hand-written inputs, the interpreter itself
(`inspect`, the stdlib files), the documented rules (crc32 split, token row
layout) and the "digits" dataset, never from outputs of the code under test.
"""

import ast
import inspect
import json
import re
import zlib

import numpy as np
import pytest

import zoo.data as zd
from zoo.data.pycode import pycode_dataset_builder as pycode_lib
from zoo.data.pycode_pairs import pycode_pairs_dataset_builder as pairs_lib
from zoo.text import BYTE_OFFSET, EOS, PAD, VOCAB_SIZE, ByteTokenizer

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
         "nine")

MODULE = '''\
"""Module docstring: not a function."""
import os


def top(a, b=1):
    """Add two numbers together.

    A second paragraph that is not kept.
    """
    # A comment, dropped by ast.unparse.
    return a + b


def no_docstring(x):
    return x


def short(x):
    """Return x."""
    return x


def only_doc():
    """This body is only a docstring."""


class Greeter:
    """A class docstring: classes are not examples."""

    def __init__(self, name):
        """Dunder methods are skipped, however long their docstring is."""

        def check(value):
            """Functions nested in a dunder are kept."""
            return value
        self.name = check(name)

    def greet(self, loud=False):
        """Say hello to
           the   caller,
        politely.
        """
        text = "hello " + self.name
        return text.upper() if loud else text

    class Inner:

        def deep(self):
            """A method of a nested class."""
            return 1


def outer():
    """Outer function with a nested helper."""

    def inner(y):
        """Inner helper doubles its input."""
        return 2 * y
    return inner(3)


async def fetch(session):
    """Fetch something from somewhere asynchronously."""
    await session.get()


if os.name == "nt":

    def windows_only():
        """Only defined on Windows systems."""
        return True
'''


def _decode(row):
  return ByteTokenizer().decode(row)


def _ids(text):
  """Byte tokens of `text`, written out from the tokenizer's documented layout."""
  return [b + BYTE_OFFSET for b in text.encode("utf-8")]


# ------------------------------------------------------------- extraction
def test_extract_pairs_on_a_handwritten_module():
  pairs = pairs_lib.extract_pairs(MODULE, "pkg/mod.py")
  by_name = {p.name: p for p in pairs}
  assert [p.name for p in pairs] == [
      "top", "only_doc", "Greeter.__init__.check", "Greeter.greet",
      "Greeter.Inner.deep", "outer", "outer.inner", "fetch", "windows_only"]
  assert by_name["top"].docstring == "Add two numbers together."
  assert by_name["top"].code == "def top(a, b=1):\n    return a + b"
  assert by_name["top"].lineno == 5 and by_name["top"].path == "pkg/mod.py"
  assert by_name["top"].key == "pkg/mod.py:top:5"
  assert by_name["only_doc"].code == "def only_doc():\n    pass"
  assert by_name["Greeter.greet"].docstring == (
      "Say hello to the caller, politely.")
  assert by_name["Greeter.greet"].code.startswith("def greet(self, loud=False):")
  assert by_name["fetch"].code == (
      "async def fetch(session):\n    await session.get()")
  # The enclosing function keeps its nested function (with its docstring).
  assert "def inner(y):" in by_name["outer"].code
  assert "Outer function" not in by_name["outer"].code
  for p in pairs:
    tree = ast.parse(p.code)
    (node,) = tree.body
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    assert ast.get_docstring(node) is None  # Its own docstring is gone...
    assert p.docstring not in p.code  # ...and nowhere else in the code.
    assert len(p.docstring.split()) >= 3 and "  " not in p.docstring
  assert pairs_lib.extract_pairs("def broken(:\n", "bad.py") == []


def test_split_rule_is_crc32_of_the_path():
  for path in ("json/__init__.py", "os.py", "asyncio/events.py", "a/b.py"):
    want = "test" if zlib.crc32(path.encode()) % 10 == 0 else "train"
    assert pairs_lib.split_of(path) == want


# ----------------------------------------------------------- prepared data
@pytest.fixture(scope="module")
def pycode_pairs(data_dir):
  """{split: list of stored records (str fields)}; prepares the dataset once."""
  zd.pair_dataset_spec("pycode_pairs", data_dir)  # Prepares it (~15 s) once.
  builder = zd.sources._builder("pycode_pairs", data_dir)
  out = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split)
    out[split] = [{k: v.decode() for k, v in r.items()}
                  for r in source.__getitems__(range(len(source)))]
  return out


def test_pycode_pairs_split_by_file_and_content(pycode_pairs):
  train = {r["path"] for r in pycode_pairs["train"]}
  test = {r["path"] for r in pycode_pairs["test"]}
  assert not train & test
  assert all(zlib.crc32(p.encode()) % 10 == 0 for p in test)
  assert all(zlib.crc32(p.encode()) % 10 != 0 for p in train)
  assert len(pycode_pairs["train"]) > 3000 and len(pycode_pairs["test"]) > 300
  assert (train | test) <= set(pycode_lib.list_files(pycode_lib.stdlib_dir()))
  records = pycode_pairs["train"] + pycode_pairs["test"]
  assert len({(r["code"], r["docstring"]) for r in records}) == len(records)
  for r in records:
    last = r["name"].split(".")[-1]
    assert not (last.startswith("__") and last.endswith("__")), r["name"]
    assert len(r["docstring"].split()) >= 3
  # One function checked against the interpreter's own docstring.
  (dumps,) = [r for r in records
              if r["path"] == "json/__init__.py" and r["name"] == "dumps"]
  want = inspect.cleandoc(json.dumps.__doc__).split("\n\n")[0]
  assert dumps["docstring"] == " ".join(want.split())
  assert dumps["code"].startswith("def dumps(obj, *, skipkeys=False")
  assert "Serialize" not in dumps["code"]


def test_pair_specs_and_errors(data_dir, pycode_pairs):
  spec = zd.pair_dataset_spec("pycode_pairs", data_dir)
  assert spec.towers == ("code", "text") and spec.image_shape is None
  assert spec.vocab_size == VOCAB_SIZE
  assert spec.splits == {s: len(r) for s, r in pycode_pairs.items()}
  assert re.fullmatch(r"pycode_pairs/py\d+\.\d+", spec.name)
  spec = zd.pair_dataset_spec("digits_captions", data_dir)
  assert spec.towers == ("image", "text") and spec.image_shape == (32, 32, 1)
  assert spec.splits == {"train": 1437, "test": 360}
  assert zd.PAIR_DATASETS == ("pycode_pairs", "digits_captions")
  assert zd.is_pair_dataset("digits_captions") and zd.is_pair_dataset("pycode_pairs")
  assert not zd.is_pair_dataset("digits") and not zd.is_pair_dataset("pycode")
  for call in (lambda: zd.pair_dataset_spec("pycode", data_dir),
               lambda: zd.get_pair_source("imagenet", "train", seq_len=8)):
    with pytest.raises(ValueError) as e:
      call()
    message = str(e.value)
    assert "pycode_pairs" in message and "digits_captions" in message
    assert "\n" not in message
  for name in zd.PAIR_DATASETS:
    with pytest.raises(ValueError, match="train.*test") as e:
      zd.get_pair_source(name, "validation", seq_len=8, data_dir=data_dir)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------ token rows
def test_encode_padded_layout():
  np.testing.assert_array_equal(zd.encode_padded("ab", 5),
                                _ids("ab") + [EOS, PAD, PAD])
  np.testing.assert_array_equal(zd.encode_padded("abcdef", 4), _ids("abc") + [EOS])
  np.testing.assert_array_equal(zd.encode_padded("abc", 4), _ids("abc") + [EOS])
  np.testing.assert_array_equal(zd.encode_padded("", 1), [EOS])
  assert zd.encode_padded("é", 3).dtype == np.int32


def test_pycode_pair_rows_are_the_stored_texts(data_dir, pycode_pairs):
  seq_len = 48
  source = zd.get_pair_source("pycode_pairs", "test", seq_len=seq_len,
                              data_dir=data_dir)
  assert len(source) == len(pycode_pairs["test"])
  examples = source.__getitems__(range(20))
  for example, record in zip(examples, pycode_pairs["test"][:20]):
    assert set(example) == {"code", "text"}
    for key, text in (("code", record["code"]), ("text", record["docstring"])):
      row = example[key]
      assert row.shape == (seq_len,) and row.dtype == np.int32
      kept = _ids(text)[:seq_len - 1]
      want = kept + [EOS] + [PAD] * (seq_len - 1 - len(kept))
      assert row.tolist() == want
  # Both cases were covered: truncated rows and padded rows.
  assert any(len(r["code"]) >= seq_len for r in pycode_pairs["test"][:20])
  assert any(len(r["docstring"]) < seq_len - 1 for r in pycode_pairs["test"][:20])
  np.testing.assert_array_equal(source[3]["code"], examples[3]["code"])
  loaded = zd.load_pairs("pycode_pairs", "test", seq_len=seq_len,
                         data_dir=data_dir, limit=20)
  np.testing.assert_array_equal(loaded["code"],
                                np.stack([e["code"] for e in examples]))
  np.testing.assert_array_equal(loaded["text"],
                                np.stack([e["text"] for e in examples]))
  empty = zd.load_pairs("pycode_pairs", "test", seq_len=seq_len,
                        data_dir=data_dir, limit=0)
  assert {k: v.shape for k, v in empty.items()} == {"code": (0, seq_len),
                                                    "text": (0, seq_len)}


# -------------------------------------------------------- digits captions
def test_digits_captions_name_the_label(data_dir):
  pairs = zd.load_pairs("digits_captions", "test", seq_len=64, data_dir=data_dir)
  images, labels = zd.load_arrays("digits", "test", data_dir=data_dir)
  np.testing.assert_array_equal(pairs["image"], images)
  np.testing.assert_array_equal(pairs["label"], labels)
  assert pairs["image"].dtype == np.uint8 and pairs["label"].dtype == np.int32
  assert pairs["text"].shape == (360, 64) and pairs["text"].dtype == np.int32
  captions = [_decode(row) for row in pairs["text"]]
  for caption, row, label in zip(captions, pairs["text"], labels):
    length = len(caption.encode())
    assert row[length] == EOS and not row[length + 1:].any()
    numbers = {w for w in re.findall(r"[a-z]+|\d", caption)
               if w in WORDS or w.isdigit()}
    assert numbers in ({WORDS[label]}, {str(label)}), caption
  assert len({c.replace(WORDS[l], "#").replace(str(l), "#")
              for c, l in zip(captions, labels)}) >= 5  # Several templates.
  source = zd.get_pair_source("digits_captions", "test", seq_len=64,
                              data_dir=data_dir)
  np.testing.assert_array_equal(source[7]["text"], pairs["text"][7])
  np.testing.assert_array_equal(source[-1]["text"], pairs["text"][-1])
  again = zd.load_pairs("digits_captions", "test", seq_len=64, data_dir=data_dir)
  np.testing.assert_array_equal(again["text"], pairs["text"])  # Deterministic.


# ------------------------------------------------------------ same_item
def test_same_item_hand_case():
  rows = np.array([[1, 2], [3, 4], [1, 2], [1, 3]])
  want = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(zd.same_item(rows), want)
  images = np.zeros((3, 2, 2, 1), np.uint8)
  images[1, 0, 0, 0] = 9
  np.testing.assert_array_equal(
      zd.same_item(images), [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
  np.testing.assert_array_equal(zd.same_item(np.array([5, 6, 5])),
                                [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
  assert zd.same_item(np.zeros((0, 4), np.int32)).shape == (0, 0)


# ------------------------------------------------------- BatchIterator keys
class _MixedSource:
  """Example i: uint8 image, Python-int label, int32 tokens, float32 weight, bool flag."""

  def __len__(self):
    return 12

  def __getitem__(self, i):
    return {"image": np.full((2, 2, 1), i, np.uint8), "label": i,
            "tokens": np.arange(3, dtype=np.int32) + i,
            "weight": np.float32(i / 2), "flag": i % 2 == 0}


def test_batch_iterator_stacks_every_key_and_keeps_dtypes(data_dir):
  it = zd.BatchIterator(_MixedSource(), global_batch_size=4, seed=0,
                        shuffle=False)
  batch = next(it)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "image": ((4, 2, 2, 1), np.uint8), "label": ((4,), np.int32),
      "tokens": ((4, 3), np.int32), "weight": ((4,), np.float32),
      "flag": ((4,), np.bool_)}
  np.testing.assert_array_equal(batch["label"], [0, 1, 2, 3])
  np.testing.assert_array_equal(batch["tokens"][:, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(batch["flag"], [True, False, True, False])
  source = zd.get_pair_source("digits_captions", "train", seq_len=16,
                              data_dir=data_dir)
  batch = next(zd.BatchIterator(source, global_batch_size=8, seed=1))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "image": ((8, 32, 32, 1), np.uint8), "text": ((8, 16), np.int32),
      "label": ((8,), np.int32)}
