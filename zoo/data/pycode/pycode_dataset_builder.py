"""`pycode`: the Python standard library's own `.py` files, one example per file.

A small, real, offline text corpus (~660 files, ~12 MB on CPython 3.11) for
language-model pretraining smoke runs and for probing: every file is labelled
with its top-level package.

Source: the `.py` files under `sysconfig.get_paths()["stdlib"]` of the
interpreter that prepares the dataset, walked in sorted order, without
`site-packages`/`dist-packages` and without test code (any directory component
named `test`, `tests`, `idle_test` or `lib2to3`). Files that are not valid
UTF-8 are skipped. The data therefore depends on the interpreter: the one
config is named after its version (`py3.11` on Python 3.11), so a data dir
shared by several interpreters keeps one copy per version. Patch releases of
one minor version can differ by a few files; rebuild if that matters.

Features: `text` (the file's source), `path` (relative to the stdlib dir,
with "/" separators; also the example key) and `label`, a ClassLabel over
`CLASS_NAMES`: the 20 packages of `PACKAGES` plus `other` (top-level modules
and every other package, e.g. `distutils`, `turtledemo`).

Split (a fixed rule, no RNG, so it can never drift): let h = crc32 of the
UTF-8 relative path. Within each class, a file goes to `test` if h % 10 == 0
or if it has the smallest h of its class, unless it has the largest h of its
class (which always stays in `train`). So ~10% of the files are held out BY
FILE, and every class with at least two files (all 21 on 3.11) has at least
one test file and one train file.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import zlib

import tensorflow_datasets as tfds

# Order fixes the label ids: never reorder, only append (with a new version).
PACKAGES = (
    "asyncio", "email", "encodings", "idlelib", "tkinter", "xml",
    "multiprocessing", "unittest", "importlib", "http", "logging", "urllib",
    "html", "re", "xmlrpc", "concurrent", "ctypes", "wsgiref", "json",
    "collections",
)
OTHER = "other"
CLASS_NAMES = PACKAGES + (OTHER,)
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3"})
TEST_MODULUS = 10  # h % 10 == 0 -> test: ~10% of the files.
log = logging.getLogger(__name__)


def version_name(version_info=None) -> str:
  """Config name of an interpreter version, e.g. "py3.11"."""
  major, minor = (version_info or sys.version_info)[:2]
  return f"py{major}.{minor}"


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def label_of(relpath: str) -> int:
  """Class id of a "/"-separated path relative to the stdlib dir."""
  parts = relpath.split("/")
  top = parts[0] if len(parts) > 1 else OTHER  # Top-level modules -> other.
  return CLASS_NAMES.index(top) if top in PACKAGES else CLASS_NAMES.index(OTHER)


def list_files(root: str) -> list[str]:
  """Sorted "/"-separated relative paths of the corpus's `.py` files."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
    rel = os.path.relpath(dirpath, root)
    prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
    paths += [prefix + f for f in filenames if f.endswith(".py")]
  return sorted(paths)


def path_hash(relpath: str) -> int:
  return zlib.crc32(relpath.encode("utf-8"))


def split_paths(relpaths: list[str]) -> dict[str, list[str]]:
  """The fixed split rule of the module docstring; keeps the input order."""
  by_class: dict[int, list[int]] = {}
  for path in relpaths:
    by_class.setdefault(label_of(path), []).append(path_hash(path))
  is_test = {}
  for path in relpaths:
    hashes = by_class[label_of(path)]
    h = path_hash(path)
    is_test[path] = ((h % TEST_MODULUS == 0 or h == min(hashes))
                     and h != max(hashes))
  return {"train": [p for p in relpaths if not is_test[p]],
          "test": [p for p in relpaths if is_test[p]]}


def read_text(root: str, relpath: str) -> str | None:
  """The file's text, or None if it is not valid UTF-8."""
  with open(os.path.join(root, *relpath.split("/")), "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


class Builder(tfds.core.GeneratorBasedBuilder):
  """The running interpreter's standard library, labelled by package."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name=version_name(),
          description=f"Python {sys.version.split()[0]} standard library")
  ]
  DEFAULT_CONFIG_NAME = version_name()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            "path": tfds.features.Text(),
        }),
        supervised_keys=("text", "label"),
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The interpreter's own files: nothing to download.
    root = stdlib_dir()
    texts = {}
    for path in list_files(root):
      text = read_text(root, path)
      if text is None:
        log.info("pycode: skipping %s (not UTF-8)", path)
      else:
        texts[path] = text
    splits = split_paths(list(texts))
    for split, paths in splits.items():
      missing = set(range(len(CLASS_NAMES))) - {label_of(p) for p in paths}
      if missing:
        log.warning("pycode: no %s files for classes %s on this interpreter",
                    split, [CLASS_NAMES[i] for i in sorted(missing)])
    return {split: self._generate_examples(texts, paths)
            for split, paths in splits.items()}

  def _generate_examples(self, texts, paths):
    for path in paths:
      yield path, {"text": texts[path], "label": label_of(path), "path": path}
