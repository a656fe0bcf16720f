"""Backbones, looked up by name: ``zoo.models.get("vit", size="S", ...)``."""
from __future__ import annotations

import dataclasses

from flax import nnx

from zoo.models.layers import Block, TransformerStack
from zoo.models.text import (ARCHITECTURES, TEXT_POSEMB_KINDS, EncoderDecoder, TextTransformer,
                             shift_right)
from zoo.models.vit import POSEMB_KINDS, ViT

KNOWN_MODELS = ("vit",) + ARCHITECTURES   # vit: patches; encoder/decoder/encdec: tokens


@dataclasses.dataclass(frozen=True)
class Size:
    width: int
    depth: int
    num_heads: int
    mlp_dim: int


# "test" and "micro" are for CPU tests and the bundled comparison; the rest are the ViT paper's.
SIZES = {
    "test": Size(32, 2, 2, 64),
    "micro": Size(96, 4, 4, 384),
    "Ti": Size(192, 12, 3, 768),
    "S": Size(384, 12, 6, 1536),
    "B": Size(768, 12, 12, 3072),
    "L": Size(1024, 24, 16, 4096),
}


def size_of(size: str) -> Size:
    if size not in SIZES:
        raise ValueError(f"model.size: unknown {size!r}; allowed: {tuple(SIZES)}")
    return SIZES[size]


def get(name: str, **kwargs):
    """Builds a backbone by name. Width/depth/heads/mlp_dim override the size's defaults.

    Examples: ``get("vit", grid=(4, 4), patch_dim=48, size="test", rngs=nnx.Rngs(0))``;
    ``get("encoder", vocab_size=363, max_len=128, size="test", rngs=nnx.Rngs(0))`` (also
    "decoder" for a causal decoder-only model and "encdec" for a T5-style encoder-decoder).
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"model.name: unknown {name!r}; allowed: {KNOWN_MODELS}")
    size = size_of(kwargs.pop("size", "test"))
    dims = {}
    for field in dataclasses.fields(Size):
        value = kwargs.pop(field.name, None)
        if value is not None and value <= 0:
            raise ValueError(f"model.{field.name}: must be positive, got {value}")
        dims[field.name] = getattr(size, field.name) if value is None else value
    if name == "vit":
        return ViT(**dims, **kwargs)
    if name == "encdec":
        return EncoderDecoder(**dims, **kwargs)
    return TextTransformer(**dims, causal=name == "decoder", **kwargs)


class PretrainModel(nnx.Module):
    """The shared backbone plus the heads an objective adds on top of it."""

    def __init__(self, encoder: nnx.Module, heads: nnx.Module | None):
        self.encoder = encoder
        self.heads = heads


__all__ = ["ARCHITECTURES", "Block", "EncoderDecoder", "KNOWN_MODELS", "POSEMB_KINDS",
           "PretrainModel", "SIZES", "TEXT_POSEMB_KINDS", "TextTransformer", "TransformerStack",
           "ViT", "get", "shift_right", "size_of"]
