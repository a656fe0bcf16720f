"""BERT masked language modelling (Devlin et al., 2019): choose positions, corrupt them 80/10/10.

Two ways of choosing the positions:

* ``selection="exact"`` matches google-research/bert ``create_pretraining_data.py``
  (``create_masked_lm_predictions``): shuffle the candidates and predict the first
  ``num_to_predict = min(max_predictions, max(1, round(n * rate)))`` of them, where ``round`` is
  Python's (half to even). BERT's ``n`` is ``len(tokens)`` including [CLS]/[SEP]; our packed byte
  rows have no such framing, so here ``n`` counts the CANDIDATE tokens of the row (ordinary byte
  tokens; pad, eos, bos, mask, mode tokens and sentinels are never candidates). A row without
  candidates predicts nothing. With ``whole_word`` BERT walks over the shuffled WORDS and skips a
  word that would overshoot ``num_to_predict`` but goes on with later words (it does not stop at
  the first misfit); that is matched exactly.
* ``selection="bernoulli"`` matches HF transformers ``DataCollatorForLanguageModeling``: each
  candidate (or each word, with ``whole_word``) is chosen independently with probability
  ``rate``. The number chosen is random but the outputs have ``max_predictions`` slots, so pass
  ``max_predictions=seq_len`` to never drop one. With a smaller ``max_predictions``, a row that
  draws more keeps a uniformly random subset of them (whole words, in shuffled order, with the
  same skip rule as above); the rest stay UNCHANGED in ``inputs`` and carry no label.

Everything runs on device under ``jax.jit`` with static shapes; every row gets its own key from
``jax.random.split(rng, batch)``. The model gathers hidden states at ``positions`` and computes
the output projection there only, like BERT's ``gather_indexes``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from objectives.text_base import TextObjective, token_cross_entropy
from zoo.flops import dense_flops
from zoo.models.layers import dense, gelu, layer_norm, param
from zoo.models.text import text_forward_flops

from zoo.text import (BYTE_OFFSET, MASK, NUM_SENTINELS, PAD, VOCAB_SIZE, ByteTokenizer,
                      is_special)
from zoo.text.tokenizer import ENDS_WITH_SPACE, STARTS_WITH_SPACE

SELECTIONS = ("exact", "bernoulli")


class MlmCorruption(NamedTuple):
    """What :func:`mlm_mask` returns; ``P = max_predictions``.

    Attributes:
      inputs: int32 [B, L], the corrupted tokens fed to the encoder.
      positions: int32 [B, P], the selected positions in increasing order, padded with 0.
      labels: int32 [B, P], the original tokens at ``positions`` (``PAD`` in padding slots).
      weights: float32 [B, P], 1 for real predictions and 0 for padding slots.
    """

    inputs: jax.Array
    positions: jax.Array
    labels: jax.Array
    weights: jax.Array


def prediction_counts(length: int, rate: float, *, at_least_one: bool = False,
                      cap: int | None = None) -> np.ndarray:
    """Host-side table ``counts[n]`` (``n = 0..length``): how many of ``n`` candidates to pick.

    ``round(n * rate)`` with Python's float64 round-half-to-even, as BERT's
    ``int(round(len(tokens) * masked_lm_prob))``; raised to 1 when ``at_least_one`` and ``n > 0``
    (BERT's ``max(1, ...)``), lowered to ``cap``. Indexing this constant on device avoids float32
    rounding differences from Python.
    """
    counts = []
    for n in range(length + 1):
        count = int(round(n * rate))
        if at_least_one and n > 0:
            count = max(1, count)
        if cap is not None:
            count = min(cap, count)
        counts.append(count)
    return np.asarray(counts, np.int32)


def random_subset(candidates: jax.Array, count: jax.Array, rng: jax.Array) -> jax.Array:
    """One row: exactly ``min(count, candidates.sum())`` candidate positions, uniformly at random.

    Args:
      candidates: bool [L].
      count: int scalar (traced is fine).
      rng: a key for this row.

    Returns:
      bool [L], True at the chosen positions.
    """
    order = jax.random.permutation(rng, candidates.shape[0])
    in_order = candidates[order]
    taken = in_order & (jnp.cumsum(in_order) <= count)
    return jnp.zeros_like(candidates).at[order].set(taken)


def take_in_order(lengths: jax.Array, eligible: jax.Array, budget: jax.Array) -> jax.Array:
    """BERT's whole-word loop over units already in shuffled order (one row).

    Walks the units in order, taking a unit when it is eligible and its length still fits in the
    budget; a unit that does not fit is SKIPPED and later (shorter) units are still considered.
    Eligible units must have length >= 1.

    Args:
      lengths: int32 [N], tokens per unit, in visiting order.
      eligible: bool [N], in visiting order.
      budget: int scalar, the most tokens to take.

    Returns:
      bool [N], which units were taken (visiting order).
    """
    def step(count, unit):
        length, ok = unit
        take = ok & (count + length <= budget)
        return count + jnp.where(take, length, 0), take

    _, taken = jax.lax.scan(step, jnp.zeros((), jnp.int32), (lengths.astype(jnp.int32), eligible))
    return taken


def word_ids(tokens: jax.Array, candidates: jax.Array,
             flags: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Words for whole-word masking over the last axis.

    A word is a maximal run of non-whitespace candidate tokens; each whitespace byte is a word of
    its own; non-candidates (special tokens) belong to no word and split words. With subword
    pieces (``flags``: ``zoo.text.tokenizer`` token flags of ``tokens``) a word starts at a
    piece that begins with whitespace or follows one that ends with it, so a whitespace-only
    piece is a word of its own, as a whitespace byte is.

    Returns:
      ``(ids, num_words)``: int32 word index of every candidate (``L`` at non-candidates) and the
      number of words per row.
    """
    length = tokens.shape[-1]
    if flags is None:
        begins = ends = ByteTokenizer().is_whitespace(tokens) & candidates
    else:
        begins = (flags & STARTS_WITH_SPACE) != 0
        ends = ((flags & ENDS_WITH_SPACE) != 0) & candidates

    def previous(x):
        return jnp.concatenate([jnp.zeros_like(x[..., :1]), x[..., :-1]], axis=-1)

    starts = candidates & (~previous(candidates) | begins | previous(ends))
    ids = jnp.cumsum(starts, axis=-1, dtype=jnp.int32) - 1
    return jnp.where(candidates, ids, length), starts.sum(axis=-1, dtype=jnp.int32)


def _select_row(tokens, candidates, rng, flags, *, counts, rate, selection, max_predictions,
                whole_word):
    """bool [L]: the positions one row predicts (at most ``max_predictions``)."""
    length = tokens.shape[0]
    rng_order, rng_draw = jax.random.split(rng)
    if selection == "exact":
        budget = jnp.asarray(counts)[candidates.sum()]
    else:
        budget = jnp.asarray(max_predictions, jnp.int32)
    if not whole_word:
        eligible = candidates
        if selection == "bernoulli":
            eligible = eligible & (jax.random.uniform(rng_draw, (length,)) < rate)
        return random_subset(eligible, budget, rng_order)
    ids, num_words = word_ids(tokens, candidates, flags)
    lengths = jnp.zeros(length, jnp.int32).at[ids].add(1, mode="drop")
    eligible = jnp.arange(length) < num_words
    if selection == "bernoulli":
        eligible = eligible & (jax.random.uniform(rng_draw, (length,)) < rate)
    order = jax.random.permutation(rng_order, length)
    taken = jnp.zeros(length, bool).at[order].set(
        take_in_order(lengths[order], eligible[order], budget))
    return candidates & jnp.take(taken, ids, mode="fill", fill_value=False)


def _mask_row(tokens, rng, flags, *, max_predictions, mask_prob, random_prob, vocab_size,
              **select):
    rng_select, rng_action, rng_random = jax.random.split(rng, 3)
    candidates = ~is_special(tokens, vocab_size)
    selected = _select_row(tokens, candidates, rng_select, flags,
                           max_predictions=max_predictions, **select)
    # One uniform draw per position: [0, mask_prob) -> MASK, the next random_prob -> a random
    # ordinary token (a byte, or a subword piece), the rest unchanged. Same distribution as
    # BERT's two draws (< 0.8, then < 0.5).
    action = jax.random.uniform(rng_action, tokens.shape)
    random_tokens = jax.random.randint(rng_random, tokens.shape, BYTE_OFFSET,
                                       vocab_size - NUM_SENTINELS, dtype=tokens.dtype)
    to_mask = selected & (action < mask_prob)
    to_random = selected & (action >= mask_prob) & (action < mask_prob + random_prob)
    inputs = jnp.where(to_mask, jnp.asarray(MASK, tokens.dtype),
                       jnp.where(to_random, random_tokens, tokens))
    (positions,) = jnp.nonzero(selected, size=max_predictions, fill_value=0)
    weights = jnp.arange(max_predictions) < selected.sum()
    labels = jnp.where(weights, tokens[positions], PAD)
    return MlmCorruption(inputs, positions.astype(jnp.int32), labels.astype(jnp.int32),
                         weights.astype(jnp.float32))


def mlm_mask(tokens: jax.Array, rng: jax.Array, *, rate: float = 0.15,
             selection: str = "exact", max_predictions: int, whole_word: bool = False,
             mask_prob: float = 0.8, random_prob: float = 0.1,
             vocab_size: int = VOCAB_SIZE, flags: jax.Array | None = None) -> MlmCorruption:
    """BERT's masked-LM corruption of a batch of token rows (see the module docstring).

    Args:
      tokens: int32 [B, L].
      rng: a jax key; row ``b`` uses ``jax.random.split(rng, B)[b]``.
      rate: BERT's ``masked_lm_prob`` ("exact") or HF's ``mlm_probability`` ("bernoulli").
      selection: "exact" (google-research/bert) or "bernoulli" (HF transformers).
      max_predictions: P, the static number of prediction slots per row (BERT's
        ``max_predictions_per_seq``); also caps "exact"'s ``num_to_predict``.
      whole_word: choose whole words (runs of non-whitespace bytes or pieces, see
        :func:`word_ids`) instead of single tokens.
      mask_prob: probability that a chosen position becomes ``MASK`` (BERT: 0.8).
      random_prob: probability that it becomes a uniformly random byte token (BERT: 0.1; the
        random byte may equal the original). The rest, ``1 - mask_prob - random_prob``, keep the
        original token.
      vocab_size: the vocabulary, for telling sentinels from bytes.
      flags: uint8 [B, L] token flags of a subword tokenizer's pieces (words for
        ``whole_word``); None reads whitespace off byte ids.

    Returns:
      An :class:`MlmCorruption` with ``P = max_predictions`` slots.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection: {selection!r} is not one of {SELECTIONS}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate: must be in (0, 1], got {rate}")
    if max_predictions < 1:
        raise ValueError(f"max_predictions: must be at least 1, got {max_predictions}")
    if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
        raise ValueError(f"mask_prob={mask_prob}, random_prob={random_prob}: each must be >= 0 "
                         "and their sum <= 1")
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected [batch, length], got shape {tokens.shape}")
    batch, length = tokens.shape
    counts = prediction_counts(length, rate, at_least_one=True, cap=max_predictions)
    row = functools.partial(
        _mask_row, counts=counts, rate=rate, selection=selection, whole_word=whole_word,
        max_predictions=max_predictions, mask_prob=mask_prob, random_prob=random_prob,
        vocab_size=vocab_size)
    if flags is None:
        return jax.vmap(lambda t, r: row(t, r, None))(tokens, jax.random.split(rng, batch))
    return jax.vmap(row)(tokens, jax.random.split(rng, batch), flags)


# ---------------------------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------------------------

SELECTIONS = ("exact", "bernoulli")


class MlmHead(nnx.Module):
    """BERT's ``cls/predictions``: dense + GELU + LayerNorm, then the tied token table plus an
    output bias. Applied only at the selected positions."""

    def __init__(self, width: int, vocab_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.transform = dense(width, width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.norm = layer_norm(width, rngs=rngs, dtype=dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (vocab_size,), ("vocab",))

    def __call__(self, hidden: jax.Array, embedding) -> jax.Array:
        x = self.norm(gelu(self.transform(hidden)))
        return embedding.attend(x) + self.bias[...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLM(TextObjective):
    """BERT masked language modelling on a bidirectional encoder.

    Selection (``selection``): "exact" as google-research/bert ``create_pretraining_data.py``,
    "bernoulli" as HF ``DataCollatorForLanguageModeling``; 80/10/10 replacement; optional
    whole-word masking. ``max_predictions`` (P) caps the gathered positions: default
    ``ceil(seq_len * rate)`` for "exact" (BERT uses 20 for 128 tokens at 0.15) and ``seq_len``
    for "bernoulli" (nothing is ever dropped). The hidden states are gathered at the P
    positions before the output projection, as BERT's ``gather_indexes``, so the vocabulary
    matmul costs P, not seq_len, rows. Loss: cross-entropy at the selected positions divided by
    their number in the whole batch.
    """

    name: ClassVar[str] = "mlm"
    architecture: ClassVar[str] = "encoder"
    reference: ClassVar[str] = ("BERT (Devlin et al. 2019): google-research/bert "
                                "create_pretraining_data.py; HF DataCollatorForLanguageModeling")
    rate: float = 0.15
    selection: str = "exact"
    max_predictions: int | None = None
    whole_word: bool = False
    mask_prob: float = 0.8
    random_prob: float = 0.1

    def validate(self, *, seq_len: int) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"objective.rate: {self.rate} must be in (0, 1)")
        if self.selection not in SELECTIONS:
            raise ValueError(f"objective.selection: unknown {self.selection!r}; allowed: "
                             f"{SELECTIONS}")
        if self.max_predictions is not None and not 0 < self.max_predictions <= seq_len:
            raise ValueError(f"objective.max_predictions: {self.max_predictions} must be in "
                             f"[1, data.seq_len={seq_len}]")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1:
            raise ValueError("objective.mask_prob, random_prob: need two non-negative "
                             "probabilities with mask_prob + random_prob <= 1")
        super().validate(seq_len=seq_len)

    def num_predictions(self, seq_len: int) -> int:
        if self.max_predictions is not None:
            return self.max_predictions
        return math.ceil(seq_len * self.rate) if self.selection == "exact" else seq_len

    def make_heads(self, encoder, *, rngs, dtype=jnp.float32):
        return MlmHead(encoder.width, encoder.vocab_size, rngs=rngs, dtype=dtype)

    def prepare(self, batch, rng):
        tokens = batch["tokens"]
        flags = self.flags_of(tokens, field="whole_word") if self.whole_word else None
        c = mlm_mask(tokens, rng, rate=self.rate, selection=self.selection,
                     max_predictions=self.num_predictions(tokens.shape[1]),
                     whole_word=self.whole_word, mask_prob=self.mask_prob,
                     random_prob=self.random_prob, vocab_size=self.vocab_size, flags=flags)
        return (c.inputs, c.positions), (c.labels, c.weights)

    def apply(self, model, inputs):
        tokens, positions = inputs
        hidden = model.encoder(tokens)
        selected = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        return model.heads(selected, model.encoder.embedding)

    def loss(self, outputs, targets):
        labels, weights = targets
        return token_cross_entropy(outputs, labels, weights)

    def forward_flops(self, model, *, seq_len: int) -> float:
        enc = model.encoder
        p = self.num_predictions(seq_len)
        return (text_forward_flops(enc, {"encoder": seq_len}, logits_positions=p)
                + dense_flops(p, enc.width, enc.width))
