"""An optional subword tokenizer: byte-level BPE trained offline on the run's own corpus.

``data.tokenizer = "bpe:N"`` trains a byte-level BPE of ``N`` pieces (HF ``tokenizers``, the
optional ``subword`` extra) on the training split of ``data.name`` at the start of a run, saves
it as ``<workdir>/tokenizer.json`` and reuses that file on every resume, probe and evaluation of
the workdir. It keeps the byte tokenizer's id layout, so every objective works unchanged::

    0 pad   1 eos   2 bos   3 mask   4 [R]   5 [X]   6 [S]
    7 .. 7+N-1          the N pieces (piece p -> p + 7)
    7+N .. 7+N+99       100 sentinels, counting DOWN from the last id as in T5

Byte-level means every string encodes (no unknown token): the 256 byte symbols are pieces and
the merges are learned on top. Training is deterministic: the same corpus and ``N`` give the
same tokenizer. Whole-word masking and BART's sentence permutation find words and lines through
``token_flags()`` (does a piece start or end with whitespace, does it hold a newline), which
``zoo.train.attach_tokenizer`` hands to the objective.

Example::

    tok = train_bpe(["def f(x):\\n    return x\\n"] * 100, num_pieces=300)
    tok.decode(tok.encode("def f(x): return x")) == "def f(x): return x"
"""
from __future__ import annotations

import json
import logging
from typing import Iterable

import numpy as np

from zoo import storage
from zoo.text.tokenizer import (BOS, BYTE_OFFSET, EOS, MASK, NUM_SENTINELS, PAD, decode_ids,
                                text_flags)

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TRAIN_CHARS = 8_000_000   # the corpus prefix the BPE merges are learned from
MIN_PIECES = 256          # the byte alphabet


def parse(spec: str) -> tuple[str, int | None]:
    """``data.tokenizer`` -> ``("byte", None)`` or ``("bpe", num_pieces)``."""
    kind, _, size = str(spec).partition(":")
    if kind == "byte" and not size:
        return "byte", None
    if kind == "bpe" and size.isdigit() and int(size) >= MIN_PIECES:
        return "bpe", int(size)
    raise ValueError(f"data.tokenizer: unknown {spec!r}; allowed: 'byte' or 'bpe:N' with N >= "
                     f"{MIN_PIECES} pieces (e.g. 'bpe:4096')")


def vocab_size(spec: str) -> int:
    """The model vocabulary a ``data.tokenizer`` needs (specials + pieces + sentinels)."""
    kind, pieces = parse(spec)
    return BYTE_OFFSET + (256 if kind == "byte" else pieces) + NUM_SENTINELS


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ValueError("data.tokenizer: 'bpe' needs the `tokenizers` package; "
                         "pip install -e '.[subword]' (or use 'byte')") from None
    return tokenizers


class SubwordTokenizer:
    """A trained byte-level BPE in zoo's id layout (see the module docstring)."""

    pad_id, eos_id, bos_id, mask_id = PAD, EOS, BOS, MASK
    num_sentinels = NUM_SENTINELS

    def __init__(self, tokenizer_json: str, num_pieces: int):
        tokenizers = _require_tokenizers()
        self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        self._json = tokenizer_json
        learned = self._tok.get_vocab_size()
        if learned > num_pieces:
            raise ValueError(f"data.tokenizer: the saved tokenizer has {learned} pieces, more "
                             f"than the config's {num_pieces}")
        self.num_pieces = num_pieces
        self.vocab_size = BYTE_OFFSET + num_pieces + NUM_SENTINELS

    def encode(self, text: str) -> np.ndarray:
        """str -> int32 ids (no eos/bos added)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, np.int32) + BYTE_OFFSET

    def decode(self, ids) -> str:
        """ids -> str; sentinels as ``<extra_id_N>``, mask as ``<mask>``; pad, eos, bos and
        mode tokens dropped (as ``ByteTokenizer.decode``)."""
        return decode_ids(ids, self.vocab_size, self.num_sentinels, self._tok.decode)

    def token_flags(self) -> np.ndarray:
        """uint8 [vocab_size]: each piece's flags from its decoded text (``text_flags``: starts
        or ends with whitespace, holds a newline); specials, sentinels and unused ids 0."""
        table = np.zeros(self.vocab_size, np.uint8)
        for piece in range(self._tok.get_vocab_size()):
            table[BYTE_OFFSET + piece] = text_flags(self._tok.decode([piece]))
        return table

    def to_json(self) -> str:
        return json.dumps({"num_pieces": self.num_pieces, "tokenizer": json.loads(self._json)})

    @classmethod
    def from_json(cls, text: str) -> "SubwordTokenizer":
        saved = json.loads(text)
        return cls(json.dumps(saved["tokenizer"]), saved["num_pieces"])


def train_bpe(texts: Iterable[str], num_pieces: int, *,
              max_chars: int = TRAIN_CHARS) -> SubwordTokenizer:
    """Learns a byte-level BPE of at most ``num_pieces`` pieces from the first ``max_chars``
    characters of ``texts`` (whole documents, in order)."""
    tokenizers = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    if num_pieces < MIN_PIECES:
        raise ValueError(f"data.tokenizer: {num_pieces} pieces; allowed: >= {MIN_PIECES}")
    tok = tokenizers.Tokenizer(models.BPE())
    # Newlines stand alone, so a line (BART's sentence) never shares a piece with the next
    # line's indentation: code's "\n    " would otherwise merge into one piece.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=num_pieces, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])

    def prefix():
        used = 0
        for text in texts:
            if used >= max_chars:
                return
            used += len(text)
            yield text

    tok.train_from_iterator(prefix(), trainer=trainer)
    return SubwordTokenizer(tok.to_str(), num_pieces)


def corpus_texts(data_config) -> Iterable[str]:
    """The documents of the run's training split, in the source's order."""
    import zoo.data
    source = zoo.data.get_text_source(data_config.name, "train", data_dir=data_config.data_dir)
    for index in range(len(source)):
        yield source[index]["text"]


def tokenizer_for(data_config, workdir: str | None = None):
    """The tokenizer of a run: the byte tokenizer, or the workdir's saved BPE (trained from the
    run's corpus and saved there first if the workdir has none). Without a workdir a BPE is
    trained in memory only."""
    from zoo.text.tokenizer import ByteTokenizer
    kind, pieces = parse(data_config.tokenizer)
    if kind == "byte":
        return ByteTokenizer()
    path = storage.join(workdir, TOKENIZER_FILE) if workdir else None
    if path and storage.exists(path):
        saved = SubwordTokenizer.from_json(storage.read_text(path))
        if saved.num_pieces != pieces:
            raise ValueError(f"data.tokenizer: {data_config.tokenizer!r}, but {path} holds "
                             f"{saved.num_pieces} pieces; use a new --workdir")
        return saved
    log.info("training a %d-piece byte-level BPE on %s (first %d characters)", pieces,
             data_config.name, TRAIN_CHARS)
    tokenizer = train_bpe(corpus_texts(data_config), pieces, max_chars=TRAIN_CHARS)
    if path:   # complete or absent, never half-written
        storage.write_text_atomically(path, tokenizer.to_json())
    return tokenizer
