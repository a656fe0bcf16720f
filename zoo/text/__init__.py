"""Text support: the byte-level tokenizer and its special ids (``zoo.text.subword``: the optional
BPE, ``data.tokenizer = "bpe:N"``)."""
from zoo.text.tokenizer import (BOS, BYTE_OFFSET, EOS, MASK, MODE_TOKENS, NUM_SENTINELS, PAD,
                                VOCAB_SIZE, ByteTokenizer, is_special, sentinel)

__all__ = ["BOS", "BYTE_OFFSET", "EOS", "MASK", "MODE_TOKENS", "NUM_SENTINELS", "PAD",
           "VOCAB_SIZE", "ByteTokenizer", "is_special", "sentinel"]
