"""`pycode_pairs`: (code, docstring) pairs of the standard library's functions.

Paired data for contrastive (CLIP/SigLIP-style) two-tower training and for
code <-> text retrieval, offline: one example per Python function or method
that has a docstring.

Source: the same `.py` files as `pycode` (the running interpreter's standard
library, walked in sorted order, without site-packages and test code; files
that are not valid UTF-8 or do not parse are skipped). Every
`def`/`async def` anywhere in a file counts: module functions, methods
(named `Class.method`), nested functions (`outer.inner`; Python's
`__qualname__` would say `outer.<locals>.inner`) and functions under `if`,
`try`, ... blocks.

Features (all Text):
  `code`: the function re-printed by `ast.unparse` (decorators included,
    comments and original formatting lost) WITHOUT its own docstring; a body
    that was only a docstring becomes `pass`. Docstrings of nested functions
    stay in the enclosing function's code.
  `docstring`: the first paragraph (up to the first blank line) of the
    cleaned docstring (`ast.get_docstring`, i.e. `inspect.cleandoc`), with
    all whitespace runs collapsed to one space.
  `path`: the file, relative to the stdlib dir, with "/" separators.
  `name`: the qualified name, e.g. `JSONEncoder.encode`.
Example key: `path:name:lineno`.

Skipped: dunder methods (`__init__`, ...; functions nested in them are
kept), docstrings whose first paragraph has fewer than `MIN_WORDS` words, and
exact duplicates of an earlier (code, docstring) pair in walk order.

Split (a fixed rule, no RNG): a FILE goes to `test` if crc32 of its UTF-8
relative path % 10 == 0, else to `train` (the plain rule, without pycode's
per-class adjustments), so all functions of a file share a split and no
function is in both. Like `pycode`, the data depends on the interpreter, so
the one config is named after its version (`py3.11` on Python 3.11).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import sys
from typing import Iterator

import tensorflow_datasets as tfds

from zoo.data.pycode.pycode_dataset_builder import TEST_MODULUS
from zoo.data.pycode.pycode_dataset_builder import list_files
from zoo.data.pycode.pycode_dataset_builder import path_hash
from zoo.data.pycode.pycode_dataset_builder import read_text
from zoo.data.pycode.pycode_dataset_builder import stdlib_dir
from zoo.data.pycode.pycode_dataset_builder import version_name

MIN_WORDS = 3  # Shorter summaries ("Return x.") say too little to retrieve.
log = logging.getLogger(__name__)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclasses.dataclass(frozen=True)
class Pair:
  """One function: its code without docstring and its docstring summary."""

  path: str
  name: str
  lineno: int
  code: str
  docstring: str

  @property
  def key(self) -> str:
    return f"{self.path}:{self.name}:{self.lineno}"


def summary(docstring: str) -> str:
  """First paragraph of a cleaned docstring, whitespace collapsed."""
  lines = []
  for line in docstring.splitlines():
    if not line.strip():
      if lines:
        break
      continue  # Leading blank lines (rare after cleaning) are not a break.
    lines.append(line)
  return " ".join(" ".join(lines).split())


def _is_dunder(name: str) -> bool:
  return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """`ast.unparse` of `node` with its leading docstring statement removed."""
  body = node.body
  node.body = body[1:] or [ast.Pass()]
  try:
    return ast.unparse(node)
  finally:
    node.body = body  # Restored: the tree is walked again for nested defs.


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.AST]]:
  """(qualified name, node) of every function in `tree`, in source order.

  Iterative depth-first walk (the tree can be deeper than Python's recursion
  limit); a class or function adds its name to its descendants' prefix.
  """
  stack: list[tuple[str, ast.AST]] = [("", tree)]
  while stack:
    prefix, node = stack.pop()
    if isinstance(node, (*_FUNCTIONS, ast.ClassDef)):
      if isinstance(node, _FUNCTIONS):
        yield prefix + node.name, node
      prefix = prefix + node.name + "."
    stack.extend((prefix, child)
                 for child in reversed(list(ast.iter_child_nodes(node))))


def extract_pairs(source_text: str, path: str) -> list[Pair]:
  """The (code, docstring) pairs of one file, in source order.

  Pure (no I/O), so it can be tested on strings. Skips dunder methods and
  docstrings whose summary has fewer than `MIN_WORDS` words; does not
  deduplicate (the builder does, across files).

  Args:
    source_text: the file's Python source.
    path: its "/"-separated relative path (stored as is).

  Returns:
    The file's pairs; [] if it does not parse.
  """
  try:
    tree = ast.parse(source_text)
  except (SyntaxError, ValueError, RecursionError):
    log.info("pycode_pairs: skipping %s (does not parse)", path)
    return []
  pairs = []
  for name, node in _functions(tree):
    if _is_dunder(node.name):
      continue
    docstring = ast.get_docstring(node, clean=True)
    if docstring is None:
      continue
    text = summary(docstring)
    if len(text.split()) < MIN_WORDS:
      continue
    try:
      code = _without_docstring(node)
    except RecursionError:  # Absurdly deep expressions; none on 3.11.
      log.info("pycode_pairs: skipping %s:%s (too deep)", path, name)
      continue
    pairs.append(Pair(path=path, name=name, lineno=node.lineno, code=code,
                      docstring=text))
  return pairs


def split_of(relpath: str) -> str:
  """The fixed split rule of the module docstring."""
  return "test" if path_hash(relpath) % TEST_MODULUS == 0 else "train"


def collect_pairs(root: str) -> dict[str, list[Pair]]:
  """{split: pairs} of every file under `root`, deduplicated in walk order."""
  splits: dict[str, list[Pair]] = {"train": [], "test": []}
  seen: set[tuple[str, str]] = set()
  for path in list_files(root):
    text = read_text(root, path)
    if text is None:
      log.info("pycode_pairs: skipping %s (not UTF-8)", path)
      continue
    for pair in extract_pairs(text, path):
      if (pair.code, pair.docstring) in seen:
        continue
      seen.add((pair.code, pair.docstring))
      splits[split_of(path)].append(pair)
  return splits


class Builder(tfds.core.GeneratorBasedBuilder):
  """(code, docstring) pairs of the running interpreter's standard library."""

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
            "code": tfds.features.Text(),
            "docstring": tfds.features.Text(),
            "path": tfds.features.Text(),
            "name": tfds.features.Text(),
        }),
        supervised_keys=("code", "docstring"),
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The interpreter's own files: nothing to download.
    splits = collect_pairs(stdlib_dir())
    return {split: self._generate_examples(pairs)
            for split, pairs in splits.items()}

  def _generate_examples(self, pairs):
    for p in pairs:
      yield p.key, {"code": p.code, "docstring": p.docstring, "path": p.path,
                    "name": p.name}
