"""Left-to-right language modelling: next-token prediction, prefix LM and MEAP.

* Next-token prediction (Radford et al., 2018): inputs ``tokens[:, :-1]``, labels
  ``tokens[:, 1:]``.
* Prefix LM (Raffel et al., 2020, T5 ``prefix_lm``; Tay et al., 2022, UL2's S-denoiser): the
  first tokens of each row are a prefix the model reads bidirectionally; the loss covers only the
  tokens after it. The prefix length is drawn as in T5's ``random_prefix_noise_mask``.
* MEAP (Zhuang et al., 2025, "Mask-Enhanced Autoregressive Prediction: Pay Less Attention to
  Learn More"): a fraction of the INPUT tokens is replaced with ``MASK`` and the model does plain
  next-token prediction of the ORIGINAL tokens.

All functions run on device under ``jax.jit`` with static shapes; random draws use one key per
row (``jax.random.split(rng, batch)``). Attention masks are bool, True where a query may attend
to a key, shaped ``[B or 1, 1, L, L]`` to broadcast over heads.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from objectives.mlm import prediction_counts, random_subset
from objectives.text_base import TextObjective, token_cross_entropy
from zoo.models.text import causal_mask, prefix_mask, text_forward_flops
from zoo.text import MASK, PAD, VOCAB_SIZE, is_special


def next_token_targets(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shift by one for next-token prediction.

    Args:
      tokens: int32 [B, L].

    Returns:
      ``(inputs [B, L-1], labels [B, L-1], weights float32 [B, L-1])``: ``labels[:, i]`` is the
      token after ``inputs[:, i]``; weights are 0 where the label is ``PAD``.
    """
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    return inputs, labels, (labels != PAD).astype(jnp.float32)


# The attention masks the decoder uses (zoo/models/text.py), under the names this module's
# callers know: True where a query may attend to a key.
causal_attention_mask = causal_mask            # [1, 1, L, L]: key <= query
prefix_lm_attention_mask = prefix_mask         # [B, 1, L, L]: key < prefix_len or key <= query


def prefix_lm_split(tokens: jax.Array, rng: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Prefix-LM targets for a decoder-only model.

    The prefix length ``p`` of a row with ``n`` non-``PAD`` tokens is uniform over the integers
    ``[1, n - 1]`` (T5's ``random_prefix_noise_mask``: at least one prefix token and at least one
    target), and 1 when ``n < 2``. Padding is assumed to trail the real tokens. The prefix is
    ``tokens[:p]``, i.e. input positions ``0 .. p-1`` in the shifted coordinates of
    :func:`next_token_targets`; use ``prefix_lm_attention_mask(prefix_len, L - 1)``. The loss
    covers the tokens ``p .. n-1``: label positions ``i >= p - 1`` (input ``p - 1`` is the last
    prefix token and, seeing only the prefix, predicts the first target).

    Args:
      tokens: int32 [B, L].
      rng: a jax key; row ``b`` uses ``jax.random.split(rng, B)[b]``.

    Returns:
      ``(inputs [B, L-1], labels [B, L-1], weights float32 [B, L-1], prefix_len int32 [B])``.
    """
    inputs, labels, weights = next_token_targets(tokens)
    num_tokens = (tokens != PAD).sum(axis=-1, dtype=jnp.int32)
    high = jnp.maximum(num_tokens - 1, 1)                                 # inclusive
    prefix_len = jax.vmap(lambda key, hi: jax.random.randint(key, (), 1, hi + 1, jnp.int32))(
        jax.random.split(rng, tokens.shape[0]), high)
    after_prefix = jnp.arange(labels.shape[1])[None, :] >= prefix_len[:, None] - 1
    return inputs, labels, weights * after_prefix, prefix_len


def meap_corrupt(tokens: jax.Array, rng: jax.Array, *, mask_rate: float = 0.15,
                 vocab_size: int = VOCAB_SIZE) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MEAP: mask some input tokens, predict every next ORIGINAL token.

    In each row, exactly ``round(n * mask_rate)`` (Python's round, half to even) of the ``n``
    non-special input positions (``tokens[:, :-1]``; the last token is never an input), chosen
    uniformly, become ``MASK``; special tokens are never masked. Labels are the unmasked
    ``tokens[:, 1:]``.

    Args:
      tokens: int32 [B, L].
      rng: a jax key; row ``b`` uses ``jax.random.split(rng, B)[b]``.
      mask_rate: fraction of the input tokens to mask, in [0, 1].
      vocab_size: the vocabulary, for telling sentinels from bytes.

    Returns:
      ``(inputs [B, L-1], labels [B, L-1], weights float32 [B, L-1])``, weights 0 at ``PAD``
      labels.
    """
    if not 0.0 <= mask_rate <= 1.0:
        raise ValueError(f"mask_rate: must be in [0, 1], got {mask_rate}")
    inputs, labels, weights = next_token_targets(tokens)
    candidates = ~is_special(inputs, vocab_size)
    counts = jnp.asarray(prediction_counts(inputs.shape[1], mask_rate))
    masked = jax.vmap(random_subset)(candidates, counts[candidates.sum(axis=-1)],
                                     jax.random.split(rng, tokens.shape[0]))
    inputs = jnp.where(masked, jnp.asarray(MASK, inputs.dtype), inputs)
    return inputs, labels, weights


# ---------------------------------------------------------------------------------------------
# The objectives (decoder-only backbone).
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class CLM(TextObjective):
    """Next-token prediction on a causal decoder: row ``t[0..L-1]`` gives inputs ``t[:-1]`` and
    labels ``t[1:]``; loss = CE summed over non-pad labels / their number in the whole batch."""

    name: ClassVar[str] = "clm"
    architecture: ClassVar[str] = "decoder"
    reference: ClassVar[str] = "GPT (Radford et al. 2018): causal language modelling"

    def model_lengths(self, seq_len: int) -> dict[str, int]:
        return {"encoder": seq_len - 1}

    def prepare(self, batch, rng):
        inputs, labels, weights = next_token_targets(batch["tokens"])
        return inputs, (labels, weights)

    def apply(self, model, inputs):
        return model.encoder.logits(model.encoder(inputs))

    def loss(self, outputs, targets):
        return token_cross_entropy(outputs, *targets)

    def forward_flops(self, model, *, seq_len: int) -> float:
        return text_forward_flops(model.encoder, {"encoder": seq_len - 1},
                                  logits_positions=seq_len - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixLM(CLM):
    """Prefix LM on a decoder-only model: a random-length prefix per example is attended
    bidirectionally, the rest causally; the loss covers only the tokens after the prefix."""

    name: ClassVar[str] = "prefix_lm"
    reference: ClassVar[str] = ("T5 (Raffel et al. 2020) prefix LM / UL2 S-denoiser, as a "
                                "decoder-only model with a prefix attention mask")

    def prepare(self, batch, rng):
        inputs, labels, weights, prefix_len = prefix_lm_split(batch["tokens"], rng)
        return (inputs, prefix_len), (labels, weights)

    def apply(self, model, inputs):
        tokens, prefix_len = inputs
        return model.encoder.logits(model.encoder(tokens, prefix_len=prefix_len))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MEAP(CLM):
    """Mask-Enhanced Autoregressive Prediction: ``mask_rate`` of the input positions become the
    mask id, then plain next-token prediction against the original tokens."""

    name: ClassVar[str] = "meap"
    reference: ClassVar[str] = ("MEAP (Zhuang et al. 2025): Mask-Enhanced Autoregressive "
                                "Prediction")
    mask_rate: float = 0.15

    def validate(self, *, seq_len: int) -> None:
        if not 0.0 <= self.mask_rate < 1.0:
            raise ValueError(f"objective.mask_rate: {self.mask_rate} must be in [0, 1)")
        super().validate(seq_len=seq_len)

    def prepare(self, batch, rng):
        inputs, labels, weights = meap_corrupt(batch["tokens"], rng, mask_rate=self.mask_rate,
                                              vocab_size=self.vocab_size)
        return inputs, (labels, weights)
