"""T5 span corruption (Raffel et al., 2019), on device with static shapes.

Matches ``t5/data/preprocessors.py`` of google-research/text-to-text-transfer-transformer:
``random_spans_noise_mask``, ``noise_span_to_unique_sentinel`` (inputs),
``nonnoise_span_to_unique_sentinel`` (targets) and ``random_spans_helper``, with the EOS that
seqio appends to both features. Example (sentinel ``<k>`` = ``vocab_size - 1 - k``)::

    tokens   a b c d e f g h          noise mask  . . X X . . . X
    inputs   a b <0> e f g <1> EOS
    targets  <0> c d <1> h EOS

Everything runs inside ``jax.jit``: counts that fix shapes are Python ints, positions are drawn
on device from a jax key, and variable-length results are compacted into fixed PAD-filled
buffers by a cumsum scatter.

Rounding: the reference rounds with ``tf.round`` (round half to EVEN) on FLOAT32 values inside
the mask (``num_noise = round(float32(length) * float32(density))``), but with Python's
``round`` (also half to even) on FLOAT64 values in ``random_spans_helper``. The two disagree on
a few lengths (length 190 at density 0.15: the mask has 29 noise tokens, the helper assumes 28).
Each function here matches its reference counterpart: the masks and the buffers sized from a raw
length use the float32 rule (:func:`noise_counts`), :func:`input_and_target_lengths` the float64
one.

Padding in raw rows: a row is corrupted as T5 corrupts the unpadded example. Its length is the
position after its last non-PAD token, so trailing PADs are removed first, PADs before that
point count as ordinary tokens, and an all-PAD row gives ``[EOS]`` for both outputs. Rows
without padding (packed rows) are corrupted at full length.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from objectives.text_base import Seq2SeqObjective
from zoo.text import EOS, NUM_SENTINELS, PAD, VOCAB_SIZE


# ---------------------------------------------------------------------------------------------
# Counts (Python ints, or int32 scalars on device) and buffer lengths
# ---------------------------------------------------------------------------------------------

def noise_counts(length: int, noise_density: float, mean_noise_span_length: float):
    """``(num_noise_tokens, num_noise_spans)`` of a ``length``-token mask, as T5 computes them.

    ``num_noise = clip(round(max(length, 2) * density), 1, max(length, 2) - 1)`` and
    ``num_spans = max(1, round(num_noise / mean_span))``, in float32 with round-half-to-even
    (``tf.round``). For ``length < 2`` the reference builds a length-2 mask and truncates it,
    which leaves no noise, so this returns ``(0, 0)`` there.
    """
    if length < 2:
        return 0, 0
    num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
    return num_noise, max(num_spans, 1)


def corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float):
    """``(inputs_length, targets_length)`` of span corruption of ``length`` raw tokens, EOS
    included: ``length - num_noise + num_spans + 1`` and ``num_noise + num_spans + 1``.

    Both are non-decreasing in ``length`` (for ``noise_density <= 1``), so they also bound the
    outputs of every shorter (padded) row.
    """
    if length == 0:
        return 1, 1
    if length == 1:
        return 2, 2   # [token, EOS] and [sentinel(0), EOS]: the reference mask has no noise
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                             mean_noise_span_length: float = 3.0):
    """T5's ``random_spans_helper`` with one sentinel per span: ``(tokens_length,
    targets_length)``.

    ``tokens_length`` is the largest raw length whose corruption fits ``inputs_length`` inputs
    (EOS included), ``targets_length`` the length of its targets (EOS included). Python float64
    rounding as in the reference, including its adjustment for ``noise_density == 0.5`` (one
    raw token fewer when the targets would be longer than the inputs). For 512 inputs at
    0.15 / 3: ``(568, 114)``.
    """
    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    new_inputs_length, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > new_inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def check_num_sentinels(num_spans: int, num_sentinels: int | None, what: str):
    """Raise if a mask can have more spans than the vocabulary has sentinel ids."""
    if num_sentinels is not None and num_spans > num_sentinels:
        raise ValueError(f"{what}: up to {num_spans} noise spans need that many sentinels but "
                         f"the vocabulary has {num_sentinels}; use shorter rows, a lower "
                         "noise density or longer spans, or a vocabulary with more sentinels "
                         "(num_sentinels=None counts down through the vocabulary as T5 does)")


def check_feasible(lengths, noise_density: float, mean_noise_span_length: float, what: str):
    """Raise unless every row length ``n >= 2`` in ``lengths`` has at least as many non-noise
    tokens as noise spans (the reference silently builds broken masks otherwise, e.g. at density
    0.9 with mean span 1)."""
    for n in lengths:
        if n < 2:
            continue
        num_noise, num_spans = noise_counts(n, noise_density, mean_noise_span_length)
        if num_spans > n - num_noise:
            raise ValueError(f"{what}: noise_density={noise_density} with "
                             f"mean_noise_span_length={mean_noise_span_length} gives a row of "
                             f"{n} tokens {num_spans} noise spans but only {n - num_noise} "
                             "non-noise tokens to separate them")


def unpadded_lengths(tokens: jax.Array) -> jax.Array:
    """``int32 [B]``: per row, the position after the last non-PAD token (0 for all-PAD)."""
    nonpad = tokens != PAD
    length = tokens.shape[-1]
    last_from_end = jnp.argmax(nonpad[..., ::-1], axis=-1)
    return jnp.where(nonpad.any(axis=-1), length - last_from_end, 0).astype(jnp.int32)


def _device_counts(n, noise_density, mean_noise_span_length):
    """:func:`noise_counts` for a traced length ``n`` (float32, round half to even). Returns the
    counts for the length-``max(n, 2)`` mask that the reference builds before truncating."""
    m = jnp.maximum(n, 2)
    num_noise = jnp.round(m.astype(jnp.float32) * jnp.asarray(noise_density, jnp.float32))
    num_noise = jnp.clip(num_noise.astype(jnp.int32), 1, m - 1)
    num_spans = jnp.round(num_noise.astype(jnp.float32)
                          / jnp.asarray(mean_noise_span_length, jnp.float32))
    return num_noise, jnp.maximum(num_spans.astype(jnp.int32), 1)


# ---------------------------------------------------------------------------------------------
# Noise masks
# ---------------------------------------------------------------------------------------------

def _random_segmentation(bits, num_items, num_segments):
    """T5's ``_random_segmentation`` in a static buffer: ``int32 [size]`` whose first
    ``num_segments`` entries are a uniformly random composition of ``num_items`` into positive
    parts (the rest zero), for ``bits`` uint32 ``[size]`` random, ``num_items <= size`` and
    ``1 <= num_segments <= num_items``.

    The reference shuffles ``num_segments - 1`` ones among ``num_items - 1`` gaps, i.e. picks a
    uniformly random set of segment starts among items ``1 .. num_items - 1``. Here the starts
    are the candidates ranked first when sorted by random bits (ties, rare, broken by position),
    so exactly ``num_segments - 1`` are chosen.
    """
    size = bits.shape[-1]
    index = jnp.arange(size)
    candidate = (index >= 1) & (index < num_items)
    key = jnp.where(candidate, bits >> 1, jnp.uint32(0xFFFFFFFF))   # candidates sort first
    _, order = jax.lax.sort((key, index), num_keys=2)
    rank = jnp.zeros(size, jnp.int32).at[order].set(index)
    first_in_segment = candidate & (rank < num_segments - 1)
    segment_id = jnp.cumsum(first_in_segment)
    return jnp.zeros(size, jnp.int32).at[segment_id].add((index < num_items).astype(jnp.int32))


def _spans_mask(bits, n, num_noise, num_spans):
    """Random-spans noise mask of a traced length ``n`` in a ``bool [size]`` buffer (False from
    ``n`` on), from random ``bits`` uint32 ``[2, size]`` (``size >= max(n, 2)``);
    ``num_noise, num_spans`` come from :func:`_device_counts`."""
    size = bits.shape[-1]
    num_nonnoise = jnp.maximum(n, 2) - num_noise
    noise_lengths = _random_segmentation(bits[0], num_noise, num_spans)
    nonnoise_lengths = _random_segmentation(bits[1], num_nonnoise, num_spans)
    # Spans alternate non-noise, noise, non-noise, ...; unused (zero-length) pairs at the end
    # all start at max(n, 2), past every position that is kept.
    interleaved = jnp.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = jnp.cumsum(interleaved)[:-1]
    start_indicator = jnp.zeros(size, jnp.int32).at[span_starts].add(1, mode="drop")
    is_noise = jnp.cumsum(start_indicator) % 2 == 1
    return is_noise & (jnp.arange(size) < n)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: jax.Array) -> jax.Array:
    """T5's ``random_spans_noise_mask``: ``bool [length]``, True at noise tokens.

    Exactly ``num_noise`` noise tokens in exactly ``num_spans`` noise spans
    (:func:`noise_counts`), alternating with as many non-noise spans, starting with non-noise
    and ending with noise; subject to that every mask is equally likely (the span lengths are
    two independent uniformly random compositions). Lengths below 2 are handled like the
    reference: a length-2 mask truncated, i.e. no noise.
    """
    size = max(length, 2)
    check_feasible([size], noise_density, mean_noise_span_length, "random_spans_noise_mask")
    num_noise, num_spans = noise_counts(size, noise_density, mean_noise_span_length)
    bits = jax.random.bits(rng, (2, size), jnp.uint32)
    mask = _spans_mask(bits, jnp.int32(length), jnp.int32(num_noise), jnp.int32(num_spans))
    return mask[:length]


# ---------------------------------------------------------------------------------------------
# Sentinels and static-shape compaction
# ---------------------------------------------------------------------------------------------

def _span_keep_values(tokens, span_mask, valid, vocab_size: int):
    """Replace each run of ``span_mask`` by one sentinel, counting down from ``vocab_size - 1``.

    Returns ``(keep, values)``: which positions survive (the valid ones, less every span token
    after the first) and what they hold (the sentinel at a span's first token, else the token).
    """
    span_mask = span_mask & valid
    previous = jnp.concatenate([jnp.zeros_like(span_mask[:1]), span_mask[:-1]])
    first = span_mask & ~previous
    sentinels = (vocab_size - jnp.cumsum(first)).astype(tokens.dtype)   # first span -> V - 1
    return valid & ~(span_mask & previous), jnp.where(first, sentinels, tokens)


def _compact(values, keep, size: int, *, eos: bool):
    """Scatter ``values[keep]`` in order to the front of a PAD-filled ``[size]`` buffer, then
    EOS after them if ``eos``. Whatever does not fit is dropped (callers size buffers so that
    nothing has to be)."""
    destination = jnp.where(keep, jnp.cumsum(keep) - 1, size)
    out = jnp.full(size, PAD, values.dtype).at[destination].set(values, mode="drop")
    if eos:
        out = out.at[keep.sum()].set(EOS, mode="drop")
    return out


def noise_span_to_unique_sentinel(tokens: jax.Array, noise_mask: jax.Array, *, length: int,
                                  vocab_size: int = VOCAB_SIZE, num_tokens=None) -> jax.Array:
    """T5's ``noise_span_to_unique_sentinel`` for one row: each noise span becomes one sentinel
    (first span ``vocab_size - 1``, then counting down) and the rest of the span is dropped.

    Args:
      tokens: ``int [L]``.
      noise_mask: ``bool [L]``.
      length: static size of the result; it holds the result left-aligned, PAD after it.
      vocab_size: sentinels count down from ``vocab_size - 1``.
      num_tokens: optional (traced) scalar: only ``tokens[:num_tokens]`` is the example.

    Returns:
      ``[length]``, without EOS.
    """
    valid = jnp.arange(tokens.shape[0]) < (tokens.shape[0] if num_tokens is None else num_tokens)
    keep, values = _span_keep_values(tokens, noise_mask, valid, vocab_size)
    return _compact(values, keep, length, eos=False)


def nonnoise_span_to_unique_sentinel(tokens: jax.Array, noise_mask: jax.Array, *, length: int,
                                     vocab_size: int = VOCAB_SIZE, num_tokens=None) -> jax.Array:
    """T5's ``nonnoise_span_to_unique_sentinel``: :func:`noise_span_to_unique_sentinel` with
    the mask inverted (within the first ``num_tokens`` tokens), giving the targets."""
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, length=length,
                                         vocab_size=vocab_size, num_tokens=num_tokens)


# ---------------------------------------------------------------------------------------------
# The batched objective
# ---------------------------------------------------------------------------------------------

def span_corrupt(tokens: jax.Array, rng: jax.Array, *, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0, vocab_size: int = VOCAB_SIZE,
                 inputs_length: int | None = None, targets_length: int | None = None,
                 num_sentinels: int | None = NUM_SENTINELS):
    """T5 span corruption of a batch, one independent mask per row (jittable, static shapes).

    Args:
      tokens: ``int [B, L]`` raw rows; trailing PADs are not part of a row (module docstring).
      rng: a jax key; each row gets its own independent random bits from it.
      noise_density: fraction of tokens corrupted (T5: 0.15).
      mean_noise_span_length: mean noise span length (T5: 3).
      vocab_size: sentinels are ``vocab_size - 1, vocab_size - 2, ...``.
      inputs_length, targets_length: static buffer sizes; default (None) the exact lengths of a
        full row, :func:`corrupted_lengths` ``(L, ...)``, so full rows carry no padding.
        Smaller buffers raise ``ValueError``; larger ones are PAD-filled.
      num_sentinels: sentinel ids available; more spans per row raise ``ValueError``
        (None: no check).

    Returns:
      ``(inputs int32 [B, I], targets int32 [B, T])``, each row ending with EOS then PAD.
    """
    batch, length = tokens.shape
    need_inputs, need_targets = corrupted_lengths(length, noise_density, mean_noise_span_length)
    inputs_length = need_inputs if inputs_length is None else inputs_length
    targets_length = need_targets if targets_length is None else targets_length
    if inputs_length < need_inputs or targets_length < need_targets:
        raise ValueError(f"span_corrupt: rows of {length} tokens need inputs_length >= "
                         f"{need_inputs} and targets_length >= {need_targets}, got "
                         f"{inputs_length} and {targets_length}")
    check_feasible(range(2, length + 1), noise_density, mean_noise_span_length,
                   "span_corrupt")   # every row length a padded row can have
    check_num_sentinels(noise_counts(length, noise_density, mean_noise_span_length)[1],
                        num_sentinels, "span_corrupt")
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    size = max(length, 2)
    position = jnp.arange(length)

    def corrupt_row(row, row_bits, n):
        num_noise, num_spans = _device_counts(n, noise_density, mean_noise_span_length)
        noise = _spans_mask(row_bits, n, num_noise, num_spans)[:length]
        valid = position < n
        keep, values = _span_keep_values(row, noise, valid, vocab_size)
        inputs = _compact(values, keep, inputs_length, eos=True)
        keep, values = _span_keep_values(row, ~noise, valid, vocab_size)
        targets = _compact(values, keep, targets_length, eos=True)
        return inputs, targets

    # One draw of random bits for the whole batch (one threefry call: much cheaper to compile
    # than a split key per row); row b's mask only reads bits[b].
    bits = jax.random.bits(rng, (batch, 2, size), jnp.uint32)
    return jax.vmap(corrupt_row)(tokens, bits, unpadded_lengths(tokens))


# ---------------------------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class SpanCorruption(Seq2SeqObjective):
    """T5 span corruption on an encoder-decoder: ``data.seq_len`` raw tokens become
    ``corrupted_lengths(seq_len)`` (inputs, targets), e.g. 568 -> (512, 114) at 0.15 / 3
    (``input_and_target_lengths(512)`` gives the raw length for a wanted input length)."""

    name: ClassVar[str] = "span_corruption"
    reference: ClassVar[str] = ("T5 (Raffel et al. 2020): google-research/"
                                "text-to-text-transfer-transformer t5/data/preprocessors.py")
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0

    def validate(self, *, seq_len: int) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"objective.noise_density: {self.noise_density} must be in (0, 1)")
        if self.mean_noise_span_length < 1.0:
            raise ValueError(f"objective.mean_noise_span_length: "
                             f"{self.mean_noise_span_length} must be >= 1")
        super().validate(seq_len=seq_len)

    def model_lengths(self, seq_len: int) -> dict[str, int]:
        inputs, targets = corrupted_lengths(seq_len, self.noise_density,
                                            self.mean_noise_span_length)
        return {"encoder": inputs, "decoder": targets}

    def corrupt(self, tokens, rng):
        return span_corrupt(tokens, rng, noise_density=self.noise_density,
                            mean_noise_span_length=self.mean_noise_span_length,
                            vocab_size=self.vocab_size)
