"""Text support: the byte-level tokenizer and its special ids."""
from zoo.text.tokenizer import (BOS, BYTE_OFFSET, EOS, MASK, MODE_TOKENS, NUM_SENTINELS, PAD,
                                VOCAB_SIZE, ByteTokenizer, is_special, sentinel)

__all__ = ["BOS", "BYTE_OFFSET", "EOS", "MASK", "MODE_TOKENS", "NUM_SENTINELS", "PAD",
           "VOCAB_SIZE", "ByteTokenizer", "is_special", "sentinel"]
