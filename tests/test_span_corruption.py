"""Tests for T5 span corruption against the published algorithm (Raffel et al. 2019,
t5/data/preprocessors.py).

Expected values come from hand-worked examples, from brute-force enumeration, or from the small
pure-Python references below (written from the reference's description, not from the code under
test). Shapes stay fixed inside each test so every jitted function compiles once.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compile_log import CompileLog
from objectives.span_corruption import (corrupted_lengths, input_and_target_lengths,
                                        noise_counts, noise_span_to_unique_sentinel,
                                        nonnoise_span_to_unique_sentinel,
                                        random_spans_noise_mask, span_corrupt,
                                        unpadded_lengths)
from objectives import span_corruption
from zoo.text import EOS, PAD, VOCAB_SIZE, is_special, sentinel

V = VOCAB_SIZE
B, L = 4, 48          # the shape of every span_corrupt call in the hypothesis tests
BYTE_LOW, BYTE_HIGH = 7, 263


# ---------------------------------------------------------------------------------------------
# Pure-Python references
# ---------------------------------------------------------------------------------------------

def ref_counts(length, density, mean_span):
    """T5's mask counts: tf.round (half to even) on float32 values, clipped as in the paper."""
    m = max(length, 2)
    noise = int(np.round(np.float32(m) * np.float32(density)))
    noise = min(max(noise, 1), m - 1)
    spans = max(int(np.round(np.float32(noise) / np.float32(mean_span))), 1)
    return noise, spans


def ref_span_to_sentinel(tokens, mask, vocab=V):
    """noise_span_to_unique_sentinel, one token at a time."""
    out, count, previous = [], 0, False
    for token, noisy in zip(tokens, mask):
        if noisy and not previous:
            out.append(vocab - 1 - count)
            count += 1
        elif not noisy:
            out.append(token)
        previous = noisy
    return out


def runs(mask):
    """[(value, length), ...] of the consecutive runs of a boolean sequence."""
    return [(bool(k), len(list(g))) for k, g in itertools.groupby(mask)]


def parse(row, vocab=V):
    """Split one output row at its EOS: (body, tail); the tail must be all PAD."""
    row = [int(x) for x in row]
    assert EOS in row, row
    cut = row.index(EOS)
    assert all(x == PAD for x in row[cut + 1:]), row
    return row[:cut]


def split_at_sentinels(body, vocab=V, num_sentinels=100):
    """(pieces, sentinels): the runs of ordinary tokens between sentinels, and the sentinels."""
    pieces, sentinels, current = [], [], []
    for x in body:
        if x >= vocab - num_sentinels:
            pieces.append(current)
            sentinels.append(x)
            current = []
        else:
            current.append(x)
    pieces.append(current)
    return pieces, sentinels


def check_corruption(original, inputs_row, targets_row):
    """Everything T5 promises about one corrupted row; returns (num_noise, num_spans)."""
    n = len(original)
    inputs, targets = parse(inputs_row), parse(targets_row)
    in_pieces, in_sentinels = split_at_sentinels(inputs)
    tg_pieces, tg_sentinels = split_at_sentinels(targets)
    if n == 0:
        assert inputs == [] and targets == []
        return 0, 0
    if n == 1:   # the reference's length-2 mask truncated to one non-noise token
        assert inputs == original and targets == [V - 1]
        return 0, 0
    spans = len(in_sentinels)
    # Sentinels count down from vocab_size - 1, one per span, in both features.
    assert in_sentinels == [sentinel(i, V) for i in range(spans)]
    assert tg_sentinels == in_sentinels
    # The mask starts with non-noise and ends with noise.
    assert tg_pieces[0] == [] and in_pieces[-1] == []
    assert all(in_pieces[:-1]) and all(tg_pieces[1:]), (in_pieces, tg_pieces)  # spans >= 1
    rebuilt = []
    for j in range(spans):
        rebuilt += in_pieces[j] + tg_pieces[j + 1]
    assert rebuilt == original
    return sum(len(p) for p in tg_pieces), spans


# ---------------------------------------------------------------------------------------------
# Counts and lengths
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, density, mean, expected", [
    (568, 0.15, 3.0, (85, 28)),   # 85.2 -> 85; 85 / 3 = 28.3 -> 28
    (190, 0.15, 3.0, (29, 10)),   # float32 190 * 0.15 = 28.500002 -> 29 (float64: 28.5 -> 28)
    (30, 0.15, 3.0, (4, 1)),      # 4.5 exactly -> 4 (half to even)
    (10, 0.15, 3.0, (2, 1)),      # 1.5 -> 2; 2 / 3 -> 1
    (2, 0.15, 3.0, (1, 1)),       # 0.3 -> 0, clipped up to 1
    (5, 0.9, 4.0, (4, 1)),        # 4.5 -> 4 = length - 1
    (4, 0.9, 4.0, (3, 1)),        # 3.6 -> 4, clipped down to length - 1
    (20, 0.15, 8.0, (3, 1)),      # 3 / 8 -> 0, clipped up to 1
    (100, 0.5, 3.0, (50, 17)),
    (512, 0.5, 64.0, (256, 4)),
    (1, 0.15, 3.0, (0, 0)),       # below 2 tokens there is no noise
])
def test_noise_counts_hand_worked(length, density, mean, expected):
    assert noise_counts(length, density, mean) == expected


def test_device_counts_match_float32_rule():
    lengths = np.arange(0, 1200)
    cases = [(0.15, 3.0), (0.15, 8.0), (0.5, 3.0), (0.5, 64.0), (0.15, 64.0), (0.3, 1.5)]
    fn = jax.jit(jax.vmap(span_corruption._device_counts, in_axes=(0, None, None)))
    for density, mean in cases:
        noise, spans = fn(jnp.asarray(lengths, jnp.int32), np.float32(density), np.float32(mean))
        expected = np.array([ref_counts(int(n), density, mean) for n in lengths])
        np.testing.assert_array_equal(noise, expected[:, 0])
        np.testing.assert_array_equal(spans, expected[:, 1])


def ref_helper(inputs_length, density, mean):
    """random_spans_helper by brute force: the LARGEST raw length whose inputs fit (Python
    float64 rounding, no clipping), then the reference's noise_density == 0.5 adjustment."""
    def lengths(t):
        noise = round(t * density)
        spans = round(noise / mean)
        return t - noise + spans + 1, noise + spans + 1
    best = max(t for t in range(1, 4 * inputs_length) if lengths(t)[0] <= inputs_length)
    inputs, targets = lengths(best)
    if density == 0.5 and targets > inputs:
        best, targets = best - 1, targets - 1
    return best, targets


def test_input_and_target_lengths():
    assert input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    # 141 tokens: 21 noise (21.15), 7 spans -> 141 - 21 + 7 + 1 = 128 inputs, 29 targets;
    # 142 tokens: 21 noise (21.3), 7 spans -> 129 inputs, too many.
    assert input_and_target_lengths(128, 0.15, 3.0) == (141, 29)
    # 27 tokens at 0.5: 14 noise (13.5 -> 14), 5 spans -> 19 inputs but 20 targets, so the
    # reference drops one raw token and one target: (26, 19).
    assert input_and_target_lengths(19, 0.5, 3.0) == (26, 19)
    for inputs_length in (16, 64, 100, 256, 333, 1024):
        for density, mean in ((0.15, 3.0), (0.5, 3.0), (0.15, 8.0), (0.5, 8.0)):
            assert (input_and_target_lengths(inputs_length, density, mean)
                    == ref_helper(inputs_length, density, mean))


def test_corrupted_lengths_agree_with_helper_and_shapes():
    # The raw length the helper picks corrupts to exactly the requested inputs and its targets.
    for inputs_length in (64, 128, 256, 512, 1024):
        tokens_length, targets_length = input_and_target_lengths(inputs_length)
        assert corrupted_lengths(tokens_length, 0.15, 3.0) == (inputs_length, targets_length)
        shapes = jax.eval_shape(span_corrupt, jax.ShapeDtypeStruct((2, tokens_length), jnp.int32),
                                jax.random.key(0))
        assert [s.shape for s in shapes] == [(2, inputs_length), (2, targets_length)]
    # Where the reference's float32 mask and float64 helper disagree, the buffers follow the
    # mask: 190 tokens give 29 noise tokens in 10 spans, so 172 inputs and 40 targets, not 38.
    assert input_and_target_lengths(172) == (190, 38)
    assert corrupted_lengths(190, 0.15, 3.0) == (172, 40)
    assert corrupted_lengths(1, 0.15, 3.0) == (2, 2) and corrupted_lengths(0, 0.15, 3.0) == (1, 1)


# ---------------------------------------------------------------------------------------------
# Noise masks
# ---------------------------------------------------------------------------------------------

STRUCTURE_CASES = [(64, 0.15, 3.0), (57, 0.5, 8.0), (40, 0.5, 1.0), (3, 0.15, 3.0)]
UNIFORM_CASE, UNIFORM_DRAWS = (10, 0.3, 1.5), 2400


def draw_masks(case, count, seed):
    """``count`` masks of one (length, density, mean) case from one compiled function."""
    fn = jax.jit(jax.vmap(lambda r: random_spans_noise_mask(*case, r)))
    return np.asarray(fn(jax.random.split(jax.random.key(seed), count)))


@pytest.mark.parametrize("length, density, mean", STRUCTURE_CASES)
def test_random_spans_noise_mask_structure(length, density, mean):
    drawn = draw_masks((length, density, mean), 200, seed=length)
    noise, spans = ref_counts(length, density, mean)
    assert drawn.shape == (200, length) and drawn.dtype == bool
    for mask in drawn:
        r = runs(mask.tolist())
        assert mask.sum() == noise
        assert [v for v, _ in r] == [False, True] * spans   # alternate, non-noise first
        assert all(size >= 1 for _, size in r)
    compositions = math.comb(noise - 1, spans - 1) * math.comb(length - noise - 1, spans - 1)
    assert (len({m.tobytes() for m in drawn}) == 1) == (compositions == 1)


def test_short_masks_match_reference_truncation():
    # Length 1: the reference builds [False, True] and keeps the first entry.
    assert draw_masks((1, 0.15, 3.0), 1, seed=1).tolist() == [[False]]


def test_masks_are_uniform_over_compositions():
    # 10 tokens at 0.3 / 1.5: 3 noise tokens in 2 spans (2 compositions) and 7 non-noise tokens
    # in 2 spans (6 compositions): 12 masks, each of probability 1/12.
    allowed = [m for m in itertools.product([False, True], repeat=UNIFORM_CASE[0])
               if sum(m) == 3 and [v for v, _ in runs(m)] == [False, True] * 2]
    assert len(allowed) == 12
    counts = {m: 0 for m in allowed}
    for mask in draw_masks(UNIFORM_CASE, UNIFORM_DRAWS, seed=7):
        counts[tuple(bool(x) for x in mask)] += 1      # KeyError if a mask is not allowed
    expected = UNIFORM_DRAWS / len(allowed)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 31.3, counts   # chi-square, 11 degrees of freedom, p = 0.001


# ---------------------------------------------------------------------------------------------
# Sentinel replacement
# ---------------------------------------------------------------------------------------------

SENTINEL_LENGTH = 24
_sentinel_fns = jax.jit(lambda t, m, n: (
    noise_span_to_unique_sentinel(t, m, length=SENTINEL_LENGTH, num_tokens=n),
    nonnoise_span_to_unique_sentinel(t, m, length=SENTINEL_LENGTH, num_tokens=n),
    nonnoise_span_to_unique_sentinel(t, m, length=SENTINEL_LENGTH, num_tokens=n,
                                     vocab_size=100)))


def sentinel_outputs(tokens, mask, n):
    tokens = np.pad(np.asarray(tokens), (0, SENTINEL_LENGTH - len(tokens)))
    mask = np.pad(np.asarray(mask, bool), (0, SENTINEL_LENGTH - len(mask)))
    outs = _sentinel_fns(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jnp.int32(n))
    return [np.asarray(o).tolist() for o in outs]


def test_sentinels_hand_worked():
    a, b, c, d, e, f, g, h = range(10, 18)
    tokens, mask = [a, b, c, d, e, f, g, h], [0, 0, 1, 1, 0, 0, 0, 1]
    inputs, targets, targets_100 = sentinel_outputs(tokens, mask, 8)
    pad = lambda xs: xs + [PAD] * (SENTINEL_LENGTH - len(xs))  # noqa: E731
    assert inputs == pad([a, b, 362, e, f, g, 361])
    assert targets == pad([362, c, d, 361, h])
    assert targets_100 == pad([99, c, d, 98, h])
    # Only the first 5 tokens are the example: the trailing noise span and h are not.
    inputs, targets, _ = sentinel_outputs(tokens, mask, 5)
    assert inputs == pad([a, b, 362, e])
    assert targets == pad([362, c, d, 361])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_sentinels_match_reference(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(BYTE_LOW, BYTE_HIGH, SENTINEL_LENGTH)
    mask = rng.random(SENTINEL_LENGTH) < rng.random()
    n = int(rng.integers(0, SENTINEL_LENGTH + 1))
    outs = sentinel_outputs(tokens, mask, n)
    for got, m, vocab in zip(outs, (mask[:n], ~mask[:n], ~mask[:n]), (V, V, 100)):
        want = ref_span_to_sentinel(tokens[:n].tolist(), m.tolist(), vocab)
        assert got == want + [PAD] * (SENTINEL_LENGTH - len(want))


# ---------------------------------------------------------------------------------------------
# span_corrupt
# ---------------------------------------------------------------------------------------------

TRACES = []


@jax.jit
def corrupt_batch(tokens, rng):
    TRACES.append(tokens.shape)
    return span_corrupt(tokens, rng)


def random_rows(seed, pad_rows=True):
    """B rows of byte tokens; some rows end with padding (possibly all of it)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(BYTE_LOW, BYTE_HIGH, (B, L)).astype(np.int32)
    lengths = np.full(B, L)
    if pad_rows:
        lengths = rng.choice([0, 1, 2, 3, L // 2, L - 1, L], size=B)
        lengths[0] = L
    for row, n in zip(tokens, lengths):
        row[n:] = PAD
    return tokens, lengths


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_span_corrupt_properties(data_seed, key_seed):
    tokens, lengths = random_rows(data_seed)
    inputs, targets = corrupt_batch(jnp.asarray(tokens), jax.random.key(key_seed))
    # 48 tokens: 7 noise tokens (7.2) in 2 spans (2.33): 48 - 7 + 2 + 1 inputs, 7 + 2 + 1 targets
    assert (inputs.shape, targets.shape) == ((B, 44), (B, 10))
    assert inputs.dtype == targets.dtype == jnp.int32
    np.testing.assert_array_equal(unpadded_lengths(jnp.asarray(tokens)), lengths)
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    for row, n, inputs_row, targets_row in zip(tokens, lengths, inputs, targets):
        num_noise, num_spans = check_corruption(row[:n].tolist(), inputs_row, targets_row)
        if n >= 2:
            assert (num_noise, num_spans) == ref_counts(n, 0.15, 3.0)
        # Outputs hold only byte tokens, sentinels, EOS and PAD.
        for out in (inputs_row, targets_row):
            special = out[np.asarray(is_special(out))]
            assert np.all((special == PAD) | (special == EOS) | (special >= V - 100))
    # A full row fills both buffers exactly: no padding, EOS last.
    assert inputs[0, -1] == EOS and targets[0, -1] == EOS
    assert (inputs[0] != PAD).all() and (targets[0] != PAD).all()


def test_span_corrupt_rng_and_retracing():
    tokens, _ = random_rows(0, pad_rows=False)
    same = np.zeros((B, L), np.int32) + np.arange(BYTE_LOW, BYTE_LOW + L)   # identical rows
    corrupt_batch(jnp.asarray(tokens), jax.random.key(1))            # compile (maybe cached)
    traces = len(TRACES)
    with CompileLog() as log:
        a = corrupt_batch(jnp.asarray(tokens), jax.random.key(5))
        b = corrupt_batch(jnp.asarray(tokens), jax.random.key(5))
        c = corrupt_batch(jnp.asarray(tokens), jax.random.key(6))
        d = corrupt_batch(jnp.asarray(same), jax.random.key(7))
    assert log.count("corrupt_batch") == 0 and len(TRACES) == traces
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])            # another key, another mask
    # Each row draws its own mask: identical rows are corrupted differently.
    assert len({np.asarray(row).tobytes() for row in d[0]}) > 1


def test_span_corrupt_buffers_and_errors():
    tokens, _ = random_rows(3, pad_rows=False)
    tokens = jnp.asarray(tokens)
    exact_inputs, exact_targets = corrupt_batch(tokens, jax.random.key(2))
    wide = jax.jit(lambda t, r: span_corrupt(t, r, inputs_length=50, targets_length=20))
    inputs, targets = wide(tokens, jax.random.key(2))
    np.testing.assert_array_equal(inputs[:, :44], exact_inputs)
    np.testing.assert_array_equal(targets[:, :10], exact_targets)
    assert (inputs[:, 44:] == PAD).all() and (targets[:, 10:] == PAD).all()
    with pytest.raises(ValueError, match="targets_length >= 10"):
        span_corrupt(tokens, jax.random.key(3), targets_length=9)
    # 1000 tokens at 0.5 / 3: 167 spans, more than the tokenizer's 100 sentinels.
    with pytest.raises(ValueError, match="167 noise spans"):
        jax.eval_shape(lambda t, r: span_corrupt(t, r, noise_density=0.5),
                       jax.ShapeDtypeStruct((1, 1000), jnp.int32), jax.random.key(4))
    # Density 0.9 with mean span 1: a padded row of 3 tokens would have 2 noise tokens (2.7 -> 3,
    # clipped to 2) in 2 spans but 1 non-noise token to separate them.
    with pytest.raises(ValueError, match="3 tokens 2 noise spans but only 1 non-noise"):
        span_corrupt(tokens[:, :10], jax.random.key(5), noise_density=0.9,
                     mean_noise_span_length=1.0)
