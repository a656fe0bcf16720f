"""BART denoising noise: Denoising Sequence-to-Sequence Pre-training (Lewis et al., 2019).

Matches fairseq ``fairseq/data/denoising_dataset.py`` (``DenoisingDataset.__getitem__``), which
corrupts the source in this order, each step switched on by its own ratio:

1. sentence permutation (``permute_sentences``),
2. span masking / text infilling / token deletion (``add_whole_word_mask``),
3. insertion noise (``add_insertion_noise``),
4. document rotation (``add_rolling_noise``, applied with probability ``rotate_ratio``).

The decoder target is the original, uncorrupted sequence. BART's five named corruptions map onto
the switches of :func:`bart_noise` like fairseq's command-line flags do:

* text infilling: ``mask_ratio > 0``, ``poisson_lambda=3.0``, ``replace_length=1``;
* token masking: ``mask_ratio > 0``, ``poisson_lambda=None`` (every span one token);
* token deletion: ``mask_ratio > 0``, ``poisson_lambda=None``, ``replace_length=0``;
* sentence permutation: ``permute_sentences > 0``;
* document rotation: ``rotate_ratio > 0``;
* random-token replacement: ``random_ratio`` of the masked spans (and inserted tokens) get a
  random byte instead of ``MASK``.

Everything runs on device inside ``jax.jit`` with static shapes. Rows are packed byte-level
text: content first, then ``PAD``. Because masking can shrink a row and zero-length spans and
insertion noise grow it, the corrupted row lives in a fixed buffer of
``N = bart_output_length(L, ...)`` tokens, content first and ``PAD`` after, with its length
returned alongside.

Differences from fairseq, all deliberate:

* Rows carry no ``<bos>``/``<eos>`` framing, so the whole non-pad row is content: the first and
  last content tokens may be masked, insertions may land at either end and rotation moves every
  content token (fairseq protects its ``<bos>`` and ``<eos>``).
* Sentences end at a boundary token, by default the newline byte (``NEWLINE``: source code has
  lines, not full stops); fairseq uses the full stop (gpt2 bpe) or ``<eos>``. With a subword
  tokenizer a sentence ends at a piece that holds a newline (its token flags).
* Rotation offsets are uniform in ``[1, n-1]`` for ``n`` content tokens, so a rotated row always
  changes when ``n >= 2``; fairseq's offset also yields the identity with probability ``2/(n+1)``.
* Random replacement tokens are bytes (fairseq draws any id in ``[1, vocab)``, specials too).
* The zero-length spans of one row (each an inserted ``MASK``) are capped at a static budget
  chosen so that exceeding it has probability below ``1e-12`` (see :func:`mask_insert_budget`);
  fairseq's count is unbounded. Beyond the budget they are dropped.
* Ratios are applied as exact fractions (``ceil(count * ratio)`` with the ratio rounded to the
  nearest fraction of denominator <= 1000), so ``ceil(10 * 0.3) == 3`` and not 4 from float
  rounding.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from objectives.text_base import Seq2SeqObjective
from zoo.text import BYTE_OFFSET, MASK, NUM_SENTINELS, PAD, ByteTokenizer
from zoo.text.tokenizer import ENDS_WITH_SPACE, HAS_NEWLINE, STARTS_WITH_SPACE

NEWLINE = BYTE_OFFSET + ord("\n")   # default sentence boundary: the newline byte
MAX_SPAN = 128                      # fairseq's span-length table covers 0..127
SPAN_TAIL = 1e-7                    # fairseq stops the table after a probability below this
INSERT_TAIL = 1e-12                 # probability of overflowing the zero-length-span budget


# ---------------------------------------------------------------------------------------------
# Static (Python) helpers: counts that decide shapes
# ---------------------------------------------------------------------------------------------

def _fraction(ratio: float) -> Fraction:
    return Fraction(ratio).limit_denominator(1000)


def ceil_ratio(count, ratio: float):
    """``ceil(count * ratio)`` in exact rational arithmetic; ``count`` an int or int array."""
    frac = _fraction(ratio)
    return (count * frac.numerator + frac.denominator - 1) // frac.denominator


def span_length_distribution(poisson_lambda: float) -> tuple[float, ...]:
    """Probabilities of span lengths ``0, 1, ..., K``: Poisson(``poisson_lambda``) truncated.

    As fairseq: lengths up to 127, the table stopping after the first probability below 1e-7
    (normalised by sampling from it as a categorical). Unlike fairseq, the table only stops past
    the mode, so large lambdas (where ``P(0) < 1e-7``) still give a usable table.
    """
    if not poisson_lambda > 0:
        raise ValueError(f"poisson_lambda: must be > 0, got {poisson_lambda}")
    probs = []
    for k in range(MAX_SPAN):
        probs.append(math.exp(-poisson_lambda + k * math.log(poisson_lambda)
                              - math.lgamma(k + 1)))
        if probs[-1] < SPAN_TAIL and k > poisson_lambda:
            break
    total = sum(probs)
    return tuple(p / total for p in probs)


def sample_span_lengths(rng: jax.Array, shape, poisson_lambda: float) -> jax.Array:
    """int32 span lengths of ``shape`` drawn from :func:`span_length_distribution`.

    Inverse-CDF sampling, one uniform per draw (float32, so lengths whose probability is below
    ~1e-7, far in the tail, are drawn slightly less often than the table says).
    """
    cdf = np.cumsum(span_length_distribution(poisson_lambda))[:-1].astype(np.float32)
    u = jax.random.uniform(rng, tuple(shape))
    return (u[..., None] >= jnp.asarray(cdf)).sum(axis=-1, dtype=jnp.int32)


def _negative_binomial_quantile(successes: int, p_fail: float, tail: float) -> int:
    """Smallest ``z`` with ``P(X > z) <= tail``, ``X`` = failures before ``successes`` successes."""
    if successes == 0 or p_fail == 0.0:
        return 0
    log_fail, log_success = math.log(p_fail), math.log1p(-p_fail)
    cdf, z = 0.0, 0
    while True:
        cdf += math.exp(math.lgamma(z + successes) - math.lgamma(z + 1) - math.lgamma(successes)
                        + successes * log_success + z * log_fail)
        if 1.0 - cdf <= tail:
            return z
        z += 1
        if z > 1000 * (successes + 10):
            raise ValueError(f"poisson_lambda too small: zero-length spans (p={p_fail}) would "
                             "need an unbounded buffer")


def mask_insert_budget(length: int, *, mask_ratio: float, poisson_lambda: float | None,
                       max_mask_inserts: int | None = None) -> int:
    """Static cap on the zero-length spans (inserted masks) of one row of ``length`` tokens.

    A row draws span lengths until their sum reaches ``num_to_mask <= ceil(length * mask_ratio)``;
    that needs at most that many non-zero draws, and the zeros among them are negative-binomial.
    The cap is that distribution's ``1 - 1e-12`` quantile, unless ``max_mask_inserts`` gives one
    (zero-length spans past the cap are dropped).
    """
    if mask_ratio == 0 or poisson_lambda is None:
        return 0
    if max_mask_inserts is not None:
        return int(max_mask_inserts)
    return _negative_binomial_quantile(ceil_ratio(length, mask_ratio),
                                       span_length_distribution(poisson_lambda)[0], INSERT_TAIL)


def bart_output_length(length: int, *, mask_ratio: float = 0.3,
                       poisson_lambda: float | None = 3.0, insert_ratio: float = 0.0,
                       max_mask_inserts: int | None = None) -> int:
    """Buffer length ``N`` of :func:`bart_noise` for input rows of ``length`` tokens.

    ``N = L + Z + ceil((L + Z) * insert_ratio)`` with ``Z = mask_insert_budget(L, ...)``:
    permutation and rotation keep the length, masking leaves at most ``L`` tokens plus ``Z``
    inserted masks, and insertion noise adds ``ceil(m * insert_ratio)`` to ``m`` tokens.
    """
    grown = length + (mask_insert_budget(length, mask_ratio=mask_ratio,
                                         poisson_lambda=poisson_lambda,
                                         max_mask_inserts=max_mask_inserts)
                      if mask_ratio > 0 else 0)
    return grown + (ceil_ratio(grown, insert_ratio) if insert_ratio > 0 else 0)


# ---------------------------------------------------------------------------------------------
# Per-example noising ops: tokens [L] (content then PAD), length = number of content tokens
# ---------------------------------------------------------------------------------------------

def _rank(keys: jax.Array) -> jax.Array:
    """Position of each entry in ``argsort(keys)`` (stable)."""
    order = jnp.argsort(keys)
    return jnp.zeros(keys.shape, jnp.int32).at[order].set(jnp.arange(keys.shape[0],
                                                                      dtype=jnp.int32))


def _uniforms(rng: jax.Array, *sizes: int) -> list[jax.Array]:
    """Independent uniform [0, 1) vectors of the given sizes from ONE draw.

    One generator call per op keeps the compiled program small (each call inlines threefry).
    """
    u = jax.random.uniform(rng, (sum(sizes),))
    return jnp.split(u, np.cumsum(sizes)[:-1].tolist())


def _random_token(u: jax.Array, num_random_tokens: int = 256) -> jax.Array:
    """Uniform [0, 1) -> a uniformly random ordinary token: one of the ``num_random_tokens``
    ids from ``BYTE_OFFSET`` on (the 256 bytes, or a subword tokenizer's pieces)."""
    return BYTE_OFFSET + jnp.minimum(jnp.floor(u * num_random_tokens),
                                     num_random_tokens - 1).astype(jnp.int32)


def word_starts(tokens: jax.Array, length, *, mask_whole_word: bool,
                flags: jax.Array | None = None) -> jax.Array:
    """bool [L]: where a word begins among the first ``length`` tokens.

    Without ``mask_whole_word`` every content token is a word (fairseq's default). With it, a
    word is a maximal run of non-whitespace bytes and each whitespace byte is a word of its own
    (the convention of ``objectives/mlm.py``), so masks extend to cover whole words. Subword
    pieces (``flags``: their ``zoo.text.tokenizer`` flags) start a word when they begin with
    whitespace or follow a piece that ends with it.
    """
    valid = jnp.arange(tokens.shape[0]) < length
    if not mask_whole_word:
        return valid
    if flags is None:
        begins = ends = ByteTokenizer().is_whitespace(tokens)
    else:
        begins = (flags & STARTS_WITH_SPACE) != 0
        ends = (flags & ENDS_WITH_SPACE) != 0
    previous = jnp.concatenate([jnp.ones((1,), bool), ends[:-1]])
    first = jnp.arange(tokens.shape[0]) == 0
    return valid & (first | begins | previous)


def sentence_permutation(tokens: jax.Array, length, rng: jax.Array, *, ratio: float,
                         boundary: int = NEWLINE, flags: jax.Array | None = None):
    """fairseq ``permute_sentences``: shuffle ``ceil(S * ratio)`` of the ``S`` sentences.

    A sentence ends with the first ``boundary`` token of each run of boundary tokens (later
    boundaries of the run begin the next sentence, as in fairseq); the last sentence ends at
    ``length`` whether or not it ends with a boundary. A random subset of ``ceil(S * ratio)``
    sentences is permuted uniformly among its own slots; the others stay put.

    With subword pieces (``flags``), the boundary tokens are the pieces holding a newline
    (``HAS_NEWLINE``; ``boundary`` is not used) and the flags move with their tokens.

    Returns:
      int32 [L]: the same tokens, sentences reordered; padding untouched. With ``flags``:
      ``(tokens, flags)``, both reordered.
    """
    size = tokens.shape[0]
    i = jnp.arange(size, dtype=jnp.int32)
    valid = i < length
    if flags is None:
        is_boundary = (tokens == boundary) & valid
    else:
        is_boundary = ((flags & HAS_NEWLINE) != 0) & valid
    prev_boundary = jnp.concatenate([jnp.zeros((1,), bool), is_boundary[:-1]])
    ends = is_boundary & ~prev_boundary & (i < length - 1)
    starts = valid & ((i == 0) | jnp.concatenate([jnp.zeros((1,), bool), ends[:-1]]))
    sid = jnp.cumsum(starts, dtype=jnp.int32) - 1              # sentence of each token
    num = starts.sum(dtype=jnp.int32)
    seg_len = jnp.zeros(size, jnp.int32).at[jnp.where(valid, sid, size)].add(1, mode="drop")
    seg_start = jnp.cumsum(seg_len) - seg_len

    u_pick, u_order = _uniforms(rng, size, size)
    real = i < num                                             # sentence slots in use
    pick_rank = _rank(jnp.where(real, u_pick, 2.0))
    chosen = real & (pick_rank < ceil_ratio(num, ratio))
    # Chosen slots (ascending) receive the chosen sentences in random order; the unchosen sort
    # after them in ascending order on both sides, so they map to themselves.
    slots = jnp.argsort(jnp.where(chosen, i, size + i))
    sentences = jnp.argsort(jnp.where(chosen, u_order, 2.0 + i.astype(jnp.float32)))
    ordering = jnp.zeros(size, jnp.int32).at[slots].set(sentences.astype(jnp.int32))
    slot_of = jnp.zeros(size, jnp.int32).at[ordering].set(i)
    out_len = seg_len[ordering]
    out_start = jnp.cumsum(out_len) - out_len                  # start of each output slot
    target = out_start[slot_of[sid]] + (i - seg_start[sid])
    target = jnp.where(valid, target, i)
    permuted = jnp.zeros_like(tokens).at[target].set(tokens)
    if flags is None:
        return permuted
    return permuted, jnp.zeros_like(flags).at[target].set(flags)


def span_plan(rng: jax.Array, num_to_mask, *, max_to_mask: int,
              poisson_lambda: float | None, max_inserts: int):
    """Span lengths as fairseq's ``add_whole_word_mask`` draws them, with static shapes.

    Draws ``T = max_to_mask + max_inserts`` lengths (all 1 when ``poisson_lambda`` is None),
    keeps the draws up to the first whose running sum reaches ``num_to_mask``, and trims that
    last one so the kept lengths sum to exactly ``num_to_mask``. Zero-length draws become
    insertions. ``T`` draws always suffice unless more than ``max_inserts`` zeros come first;
    then fewer tokens are masked and the insertions are capped at ``max_inserts``.

    Returns:
      ``(lengths int32 [T], num_inserts)``: the non-zero span lengths in draw order (0 for
      zero-length and unused draws) and the number of zero-length spans, ``<= max_inserts``.
    """
    if poisson_lambda is None:
        j = jnp.arange(max_to_mask)
        return (j < num_to_mask).astype(jnp.int32), jnp.zeros((), jnp.int32)
    count = max_to_mask + max_inserts
    draws = sample_span_lengths(rng, (count,), poisson_lambda)
    total = jnp.cumsum(draws)
    reached = total >= num_to_mask
    found = reached.any()
    stop = jnp.where(found, jnp.argmax(reached), count - 1)
    j = jnp.arange(count)
    used = (j <= stop) & (num_to_mask > 0)
    lengths = jnp.where(found & (j == stop), num_to_mask - (total - draws), draws)
    lengths = jnp.where(used, lengths, 0).astype(jnp.int32)
    inserts = jnp.minimum((used & (draws == 0)).sum(dtype=jnp.int32), max_inserts)
    return lengths, inserts


def apply_span_mask(tokens: jax.Array, length, is_word_start: jax.Array, starts: jax.Array,
                    span_lengths: jax.Array, span_tokens: jax.Array, *,
                    replace_length: int = 1):
    """Replaces spans with one token each (or deletes them): the deterministic half of masking.

    Span ``j`` (active when ``span_lengths[j] > 0``) starts at word start ``starts[j]`` and
    covers ``span_lengths[j]`` words, stopping at ``length``. As in fairseq, the span's first
    token becomes ``span_tokens[j]`` (``MASK`` or a random byte) with ``replace_length=1`` or is
    deleted with ``replace_length=0``; its other tokens are deleted. A start covered by another
    span's tail is deleted too, so overlapping spans merge; adjacent spans keep one token each.

    Returns:
      ``(tokens int32 [L], new_length)``: the result compacted to the front, PAD after.
    """
    size = tokens.shape[0]
    i = jnp.arange(size)
    valid = i < length
    ws = is_word_start & valid
    active = span_lengths > 0
    start = jnp.clip(starts, 0, size - 1)
    word_rank = jnp.cumsum(ws, dtype=jnp.int32) - 1
    sorted_starts = jnp.argsort(jnp.where(ws, i, size + i))
    word_pos = jnp.concatenate([jnp.where(i < ws.sum(), sorted_starts, length),
                                jnp.full((1,), length, sorted_starts.dtype)])
    end = word_pos[jnp.clip(word_rank[start] + span_lengths, 0, size)]   # exclusive
    dump = jnp.where(active, 0, size)                    # inactive spans scatter out of range
    one = active.astype(jnp.int32)
    diff = (jnp.zeros(size + 1, jnp.int32).at[jnp.maximum(start + 1, dump)].add(one)
            .at[jnp.maximum(end, dump)].add(-one))
    tail = jnp.cumsum(diff)[:size] > 0
    head_idx = jnp.maximum(start, dump)
    is_head = jnp.zeros(size, bool).at[head_idx].set(True, mode="drop")
    head_token = jnp.zeros(size, tokens.dtype).at[head_idx].set(span_tokens, mode="drop")
    value = jnp.where(is_head & ~tail, head_token, tokens)
    keep = valid & ~tail & ~(is_head & (replace_length == 0))
    order = jnp.argsort(~keep, stable=True)              # kept positions first, in order
    new_length = keep.sum(dtype=jnp.int32)
    return jnp.where(i < new_length, value[order], PAD), new_length


def insert_tokens(tokens: jax.Array, length, rng: jax.Array, count, *, max_count: int,
                  random_ratio: float = 0.0, num_random_tokens: int = 256):
    """fairseq ``add_insertion_noise`` with a given count: ``count`` new tokens at random places.

    The new tokens take ``count`` of the ``length + count`` slots uniformly without replacement
    (anywhere, including both ends); ``ceil(count * random_ratio)`` of them are random bytes,
    the rest ``MASK``. The original tokens fill the other slots in order.

    Returns:
      ``(tokens int32 [L + max_count], length + min(count, max_count))``.
    """
    size = tokens.shape[0] + max_count
    count = jnp.minimum(count, max_count)
    total = length + count
    j = jnp.arange(size)
    valid = j < total
    u_pos, u_tok = _uniforms(rng, size, size)
    rank = _rank(jnp.where(valid, u_pos, 2.0))
    is_new = valid & (rank < count)
    new = jnp.where(rank < ceil_ratio(count, random_ratio),
                    _random_token(u_tok, num_random_tokens), MASK)
    source = jnp.clip(jnp.cumsum(valid & ~is_new) - 1, 0, tokens.shape[0] - 1)
    out = jnp.where(is_new, new, tokens[source])
    return jnp.where(valid, out, PAD).astype(tokens.dtype), total


def insertion_noise(tokens: jax.Array, length, rng: jax.Array, *, insert_ratio: float,
                    random_ratio: float = 0.0, num_random_tokens: int = 256):
    """fairseq ``add_insertion_noise``: insert ``ceil(length * insert_ratio)`` tokens.

    Returns:
      ``(tokens int32 [L + ceil(L * insert_ratio)], new_length)``.
    """
    return insert_tokens(tokens, length, rng, ceil_ratio(length, insert_ratio),
                         max_count=ceil_ratio(tokens.shape[0], insert_ratio),
                         random_ratio=random_ratio, num_random_tokens=num_random_tokens)


def whole_word_mask(tokens: jax.Array, length, rng: jax.Array, *, mask_ratio: float,
                    poisson_lambda: float | None = 3.0, random_ratio: float = 0.0,
                    replace_length: int = 1, mask_whole_word: bool = False,
                    max_mask_inserts: int | None = None, num_random_tokens: int = 256,
                    flags: jax.Array | None = None):
    """fairseq ``add_whole_word_mask``: text infilling, token masking or token deletion.

    ``num_to_mask = ceil(W * mask_ratio)`` for the ``W`` words of the row; span lengths (in
    words) from :func:`span_plan`; each non-zero span starts at a distinct word start chosen
    uniformly and is applied by :func:`apply_span_mask`; ``random_ratio`` of the spans get a
    random byte instead of ``MASK``. Each zero-length span inserts one token at a random place
    (:func:`insert_tokens`, ``ceil(k * random_ratio)`` of them random bytes).

    Returns:
      ``(tokens int32 [L + Z], new_length)`` with ``Z = mask_insert_budget(L, ...)``.
    """
    size = tokens.shape[0]
    budget = mask_insert_budget(size, mask_ratio=mask_ratio, poisson_lambda=poisson_lambda,
                                max_mask_inserts=max_mask_inserts)
    rng_plan, rng_spans, rng_insert = jax.random.split(rng, 3)
    ws = word_starts(tokens, length, mask_whole_word=mask_whole_word, flags=flags)
    num_to_mask = ceil_ratio(ws.sum(dtype=jnp.int32), mask_ratio)
    lengths, inserts = span_plan(rng_plan, num_to_mask, max_to_mask=ceil_ratio(size, mask_ratio),
                                 poisson_lambda=poisson_lambda, max_inserts=budget)
    count = lengths.shape[0]
    u_start, u_random, u_token = _uniforms(rng_spans, size, count, count)
    # The k-th non-zero span takes the k-th word start in a uniformly random order.
    shuffled = jnp.argsort(jnp.where(ws, u_start, 2.0))
    rank = jnp.clip(jnp.cumsum(lengths > 0) - 1, 0, size - 1)
    starts = shuffled[rank]
    span_tokens = jnp.where(u_random < random_ratio,
                            _random_token(u_token, num_random_tokens), MASK)
    out, new_length = apply_span_mask(tokens, length, ws, starts, lengths,
                                      span_tokens.astype(tokens.dtype),
                                      replace_length=replace_length)
    if budget == 0:
        return out, new_length
    return insert_tokens(out, new_length, rng_insert, inserts, max_count=budget,
                         random_ratio=random_ratio, num_random_tokens=num_random_tokens)


def document_rotation(tokens: jax.Array, length, rng: jax.Array, *, rotate_ratio: float):
    """fairseq ``add_rolling_noise``, applied with probability ``rotate_ratio``.

    Rotates the ``length`` content tokens left by an offset uniform in ``[1, length - 1]`` (the
    row starting at the token that was at the offset); rows of fewer than 2 tokens and rows not
    drawn are unchanged. Returns int32 [L].
    """
    u_apply, u_offset = jax.random.uniform(rng, (2,))
    apply = u_apply < rotate_ratio
    offset = jnp.clip(1 + jnp.floor(u_offset * (length - 1)).astype(jnp.int32), 1,
                      jnp.maximum(length - 1, 1))
    i = jnp.arange(tokens.shape[0])
    source = (i + jnp.where(apply, offset, 0)) % jnp.maximum(length, 1)
    return jnp.where(i < length, tokens[source], PAD)


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------

def _check(mask_ratio, poisson_lambda, random_ratio, permute_sentences, insert_ratio,
           rotate_ratio, replace_length):
    for name, value in (("mask_ratio", mask_ratio), ("random_ratio", random_ratio),
                        ("permute_sentences", permute_sentences),
                        ("rotate_ratio", rotate_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {value}")
    if not insert_ratio >= 0.0:
        raise ValueError(f"insert_ratio: must be >= 0, got {insert_ratio}")
    if poisson_lambda is not None and not poisson_lambda > 0:
        raise ValueError(f"poisson_lambda: must be > 0 or None, got {poisson_lambda}")
    if replace_length not in (0, 1):
        raise ValueError(f"replace_length: must be 0 (delete) or 1 (one mask per span), "
                         f"got {replace_length}")


def bart_noise_example(tokens: jax.Array, length, rng: jax.Array, *, mask_ratio: float = 0.3,
                       poisson_lambda: float | None = 3.0, random_ratio: float = 0.0,
                       permute_sentences: float = 1.0, insert_ratio: float = 0.0,
                       rotate_ratio: float = 0.0, replace_length: int = 1,
                       mask_whole_word: bool = False, boundary: int = NEWLINE,
                       max_mask_inserts: int | None = None, num_random_tokens: int = 256,
                       flags: jax.Array | None = None):
    """One row of :func:`bart_noise`: ``tokens [L]`` with ``length`` content tokens (and, for
    subword pieces, their token ``flags [L]``).

    ``rng`` is split in 4, one key per step in fairseq's order: sentence permutation, span
    masking, insertion noise, rotation (a step switched off leaves its key unused).

    Returns ``(tokens int32 [N], new_length)``, ``N = bart_output_length(L, ...)``.
    """
    _check(mask_ratio, poisson_lambda, random_ratio, permute_sentences, insert_ratio,
           rotate_ratio, replace_length)
    rng_permute, rng_mask, rng_insert, rng_rotate = jax.random.split(rng, 4)
    if permute_sentences > 0:
        permuted = sentence_permutation(tokens, length, rng_permute, ratio=permute_sentences,
                                        boundary=boundary, flags=flags)
        tokens, flags = permuted if flags is not None else (permuted, None)
    if mask_ratio > 0:
        tokens, length = whole_word_mask(tokens, length, rng_mask, mask_ratio=mask_ratio,
                                         poisson_lambda=poisson_lambda,
                                         random_ratio=random_ratio,
                                         replace_length=replace_length,
                                         mask_whole_word=mask_whole_word,
                                         max_mask_inserts=max_mask_inserts,
                                         num_random_tokens=num_random_tokens, flags=flags)
    if insert_ratio > 0:
        tokens, length = insertion_noise(tokens, length, rng_insert, insert_ratio=insert_ratio,
                                         random_ratio=random_ratio,
                                         num_random_tokens=num_random_tokens)
    if rotate_ratio > 0:
        tokens = document_rotation(tokens, length, rng_rotate, rotate_ratio=rotate_ratio)
    return tokens, length


def bart_noise(tokens: jax.Array, rng: jax.Array, *, mask_ratio: float = 0.3,
               poisson_lambda: float | None = 3.0, random_ratio: float = 0.0,
               permute_sentences: float = 1.0, insert_ratio: float = 0.0,
               rotate_ratio: float = 0.0, replace_length: int = 1,
               mask_whole_word: bool = False, boundary: int = NEWLINE,
               max_mask_inserts: int | None = None, num_random_tokens: int = 256,
               flags: jax.Array | None = None):
    """BART's source corruption of a batch, on device, in fairseq's order.

    Sentence permutation, then span masking (text infilling / token masking / deletion), then
    insertion noise, then document rotation. Row ``b`` uses key ``split(rng, B)[b]``. The
    keyword arguments are Python values (static under jit; fairseq's flag in brackets).

    Args:
      tokens: int32 [B, L], content then ``PAD`` (padding only at the end). This is the target.
      rng: a jax PRNG key.
      mask_ratio: fraction of words to mask (``--mask``); 0 switches masking off.
      poisson_lambda: span lengths ~ Poisson(lambda) (``--mask-length span-poisson``,
        ``--poisson-lambda``); None: one-word spans (``--mask-length subword``/``word``).
      random_ratio: fraction of masked spans, and of inserted tokens, that get a random byte
        instead of ``MASK`` (``--mask-random``).
      permute_sentences: fraction of sentences shuffled (``--permute-sentences``).
      insert_ratio: tokens inserted, as a fraction of the row's length (``--insert``).
      rotate_ratio: probability of rotating a row (``--rotate``).
      replace_length: 1: one ``MASK`` per span; 0: delete spans (``--replace-length``).
      mask_whole_word: spans cover whole words (letter runs / single whitespace bytes).
      boundary: the token that ends a sentence (default the newline byte).
      max_mask_inserts: cap on zero-length spans per row (default: a 1e-12 tail bound).
      flags: uint8 [B, L] token flags of subword pieces (lines and words for
        ``permute_sentences`` and ``mask_whole_word``); None reads them off byte ids.
      num_random_tokens: random tokens are drawn uniformly from the ordinary ids
        ``BYTE_OFFSET .. BYTE_OFFSET + num_random_tokens - 1`` (256 bytes; a subword
        tokenizer's pieces: ``vocab_size - 107``), as fairseq draws over its dictionary.

    Returns:
      ``(inputs int32 [B, N], lengths int32 [B])``: corrupted rows, content first and PAD after,
      ``N = bart_output_length(L, mask_ratio=..., poisson_lambda=..., insert_ratio=...,
      max_mask_inserts=...)``.
    """
    noise = functools.partial(
        bart_noise_example, mask_ratio=mask_ratio, poisson_lambda=poisson_lambda,
        random_ratio=random_ratio, permute_sentences=permute_sentences,
        insert_ratio=insert_ratio, rotate_ratio=rotate_ratio, replace_length=replace_length,
        mask_whole_word=mask_whole_word, boundary=boundary, max_mask_inserts=max_mask_inserts,
        num_random_tokens=num_random_tokens)
    lengths = (tokens != PAD).sum(axis=1, dtype=jnp.int32)
    keys = jax.random.split(rng, tokens.shape[0])
    if flags is None:
        return jax.vmap(noise)(tokens, lengths, keys)
    return jax.vmap(lambda t, n, k, f: noise(t, n, k, flags=f))(tokens, lengths, keys, flags)


# ---------------------------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class BART(Seq2SeqObjective):
    """BART denoising on an encoder-decoder: the encoder reads ``bart_noise(row)`` (a
    ``bart_output_length(seq_len)`` buffer, PAD after the content), the decoder reconstructs
    the original row. Defaults: text infilling (mask 0.3, Poisson(3) spans, 10% of spans get a
    random token) and sentence permutation at newlines, as BART's best configuration."""

    name: ClassVar[str] = "bart"
    reference: ClassVar[str] = ("BART (Lewis et al. 2020): fairseq "
                                "fairseq/data/denoising_dataset.py")
    mask_ratio: float = 0.3
    poisson_lambda: float | None = 3.0
    random_ratio: float = 0.1
    permute_sentences: float = 1.0
    insert_ratio: float = 0.0
    rotate_ratio: float = 0.0
    replace_length: int = 1
    mask_whole_word: bool = False

    def noise_kwargs(self) -> dict:
        return dict(mask_ratio=self.mask_ratio, poisson_lambda=self.poisson_lambda,
                    random_ratio=self.random_ratio, permute_sentences=self.permute_sentences,
                    insert_ratio=self.insert_ratio, rotate_ratio=self.rotate_ratio,
                    replace_length=self.replace_length, mask_whole_word=self.mask_whole_word,
                    num_random_tokens=self.vocab_size - BYTE_OFFSET - NUM_SENTINELS)

    def validate(self, *, seq_len: int) -> None:
        for field in ("mask_ratio", "random_ratio", "permute_sentences", "insert_ratio",
                      "rotate_ratio"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"objective.{field}: {value} must be in [0, 1]")
        if self.replace_length not in (0, 1):
            raise ValueError(f"objective.replace_length: {self.replace_length}; allowed: "
                             "0 (delete), 1 (one mask per span)")
        super().validate(seq_len=seq_len)

    def model_lengths(self, seq_len: int) -> dict[str, int]:
        length = bart_output_length(seq_len, mask_ratio=self.mask_ratio,
                                    poisson_lambda=self.poisson_lambda,
                                    insert_ratio=self.insert_ratio)
        return {"encoder": length, "decoder": seq_len}

    def corrupt(self, tokens, rng):
        flags = None
        if self.permute_sentences > 0 or self.mask_whole_word:
            field = "permute_sentences" if self.permute_sentences > 0 else "mask_whole_word"
            flags = self.flags_of(tokens, field=field)
        inputs, _ = bart_noise(tokens, rng, flags=flags, **self.noise_kwargs())
        return inputs, tokens
