"""A byte-level tokenizer: UTF-8 bytes plus special ids, so nothing needs downloading.

Id layout (vocabulary of 363)::

    0 pad   1 eos   2 bos   3 mask   4 [R]   5 [X]   6 [S]      (UL2 mode tokens)
    7 .. 262        the 256 byte values (byte b -> b + 7)
    263 .. 362      100 sentinels, counting DOWN from the last id as in T5:
                    sentinel(0) = 362 = vocab_size - 1, sentinel(1) = 361, ...

Example::

    tok = ByteTokenizer()
    ids = tok.encode("def f(): pass")       # int32 numpy array, no eos added
    tok.decode(ids) == "def f(): pass"
"""
from __future__ import annotations

import numpy as np

PAD, EOS, BOS, MASK = 0, 1, 2, 3
MODE_TOKENS = {"R": 4, "X": 5, "S": 6}   # UL2's [R], [X], [S] paradigm tokens
BYTE_OFFSET = 7
NUM_SENTINELS = 100
VOCAB_SIZE = BYTE_OFFSET + 256 + NUM_SENTINELS


def sentinel(index, vocab_size: int = VOCAB_SIZE):
    """Id of the ``index``-th sentinel (T5's ``<extra_id_index>``): ``vocab_size - 1 - index``.

    Works on Python ints and on (jax or numpy) integer arrays."""
    return vocab_size - 1 - index


def is_special(ids, vocab_size: int = VOCAB_SIZE, num_sentinels: int = NUM_SENTINELS):
    """True where ``ids`` is not an ordinary byte token (pad, eos, bos, mask, modes, sentinels).

    Works on numpy and jax arrays, inside jit."""
    return (ids < BYTE_OFFSET) | (ids >= vocab_size - num_sentinels)


# Per-id token flags (bits of a uint8), what whole-word masking and BART's sentence
# permutation need to know about a token without looking at its bytes on device:
STARTS_WITH_SPACE = 1   # the token's text begins with ASCII whitespace (it starts a word)
ENDS_WITH_SPACE = 2     # ... ends with whitespace (the next token starts a word)
HAS_NEWLINE = 4         # ... contains a newline (it ends a line: BART's sentence boundary)
WHITESPACE = " \t\n\x0b\x0c\r"


def text_flags(text: str) -> int:
    """The flags of a token whose text is ``text`` (0 for the empty string)."""
    if not text:
        return 0
    return ((STARTS_WITH_SPACE if text[0] in WHITESPACE else 0)
            | (ENDS_WITH_SPACE if text[-1] in WHITESPACE else 0)
            | (HAS_NEWLINE if "\n" in text else 0))


def decode_ids(ids, vocab_size: int, num_sentinels: int, decode_run) -> str:
    """The decoding loop shared by zoo's tokenizers: each run of ordinary ids (offset removed)
    goes through ``decode_run(list[int]) -> str``; sentinels read ``<extra_id_N>``, mask reads
    ``<mask>``; pad, eos, bos and mode tokens are dropped."""
    first_sentinel = vocab_size - num_sentinels
    out, pending = [], []
    for i in np.asarray(ids).reshape(-1).tolist():
        if BYTE_OFFSET <= i < first_sentinel:
            pending.append(i - BYTE_OFFSET)
            continue
        out.append(decode_run(pending))
        pending = []
        if i >= first_sentinel:
            out.append(f"<extra_id_{vocab_size - 1 - i}>")
        elif i == MASK:
            out.append("<mask>")
    out.append(decode_run(pending))
    return "".join(out)


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids; see the module docstring for the layout."""

    vocab_size = VOCAB_SIZE
    pad_id, eos_id, bos_id, mask_id = PAD, EOS, BOS, MASK
    num_sentinels = NUM_SENTINELS

    def encode(self, text: str) -> np.ndarray:
        """str -> int32 ids (no eos/bos added)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_OFFSET

    def decode(self, ids) -> str:
        """ids -> str. Byte ids decode as text (invalid UTF-8 replaced); sentinels as
        ``<extra_id_N>``, mask as ``<mask>``; pad, eos, bos and mode tokens are dropped."""
        return decode_ids(ids, self.vocab_size, self.num_sentinels,
                          lambda run: bytes(run).decode("utf-8", errors="replace"))

    def token_flags(self) -> np.ndarray:
        """uint8 [vocab_size]: each id's flags (``text_flags`` of its byte; specials 0)."""
        table = np.zeros(self.vocab_size, np.uint8)
        for byte in range(256):
            table[BYTE_OFFSET + byte] = text_flags(chr(byte)) if byte < 128 else 0
        return table

    def is_whitespace(self, ids):
        """True at the byte tokens of ASCII whitespace (space, tab, newline, CR, FF, VT): word
        boundaries for whole-word masking. Works on numpy and jax arrays."""
        result = ids == (BYTE_OFFSET + 32)
        for byte in (9, 10, 11, 12, 13):
            result = result | (ids == BYTE_OFFSET + byte)
        return result
