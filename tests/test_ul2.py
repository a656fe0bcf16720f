"""Tests for UL2's mixture of denoisers (Tay et al. 2022) on top of T5 span corruption.

Expected values are hand-derived from the paper's denoiser table and T5's counting rules, or
checked by small pure-Python references written here. Two fixed shapes only, so each jitted
function compiles once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compile_log import CompileLog
from objectives.ul2 import DENOISERS, denoiser_probabilities, ul2_corrupt, ul2_lengths
from zoo.text import EOS, PAD, VOCAB_SIZE

V = VOCAB_SIZE
BYTE_LOW, BYTE_HIGH = 7, 263
# (paradigm mode token, mean span, density) written out from the paper, in DENOISERS order.
PAPER = [(4, 3.0, 0.15), (4, 8.0, 0.15), (5, 3.0, 0.5), (5, 8.0, 0.5), (5, 64.0, 0.15),
         (5, 64.0, 0.5), (6, None, None)]
B, L = 16, 96            # the shape of the property tests


def ref_counts(length, density, mean_span):
    """T5's mask counts: round half to even on float32 values, clipped."""
    m = max(length, 2)
    noise = int(np.round(np.float32(m) * np.float32(density)))
    noise = min(max(noise, 1), m - 1)
    return noise, max(int(np.round(np.float32(noise) / np.float32(mean_span))), 1)


def parse(row):
    """Tokens before the EOS of an output row; everything after it must be PAD."""
    row = [int(x) for x in row]
    cut = row.index(EOS)
    assert all(x == PAD for x in row[cut + 1:]), row
    return row[:cut]


def split_at_sentinels(body):
    pieces, sentinels, current = [], [], []
    for x in body:
        if x >= V - 100:
            pieces.append(current)
            sentinels.append(x)
            current = []
        else:
            current.append(x)
    return pieces + [current], sentinels


TRACES = []


@jax.jit
def corrupt(tokens, rng):
    TRACES.append(tokens.shape)
    return ul2_corrupt(tokens, rng)


@jax.jit
def corrupt_xs(tokens, rng):
    return ul2_corrupt(tokens, rng, rates={"X": 1.0, "S": 1.0})


# ---------------------------------------------------------------------------------------------
# Tables and lengths
# ---------------------------------------------------------------------------------------------

def test_denoiser_table_matches_paper():
    assert [(d.mode_token, d.mean_noise_span_length, d.noise_density) for d in DENOISERS] == PAPER


def test_denoiser_probabilities():
    # R 0.4 over 2 denoisers, X 0.4 over 4, S 0.2 over 1.
    np.testing.assert_allclose(denoiser_probabilities(), [0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.2])
    np.testing.assert_allclose(denoiser_probabilities({"X": 1.0, "S": 1.0}),
                               [0, 0, 0.125, 0.125, 0.125, 0.125, 0.5])
    np.testing.assert_allclose(denoiser_probabilities([1, 0, 0, 0, 0, 0, 3]),
                               [0.25, 0, 0, 0, 0, 0, 0.75])
    for bad in ({"Q": 1.0}, {"R": -1.0, "S": 2.0}, [1, 2, 3], {"R": 0.0}):
        with pytest.raises(ValueError, match="ul2 rates"):
            denoiser_probabilities(bad)


def test_ul2_lengths():
    # L >= 10: S dominates both buffers: [S] + (L - 1) prefix + EOS, and (L - 1) + EOS.
    assert ul2_lengths(96) == (97, 96)
    assert ul2_lengths(512) == (513, 512)
    # 4 tokens: R(3, .15) has 1 noise token in 1 span -> 1 + (4 - 1 + 1 + 1) = 6 inputs;
    # X(3, .5) has 2 noise tokens in 1 span -> 2 + 1 + 1 = 4 targets, as many as S.
    assert ul2_lengths(4) == (6, 4)
    with pytest.raises(ValueError, match="at least 2"):
        ul2_lengths(1)
    # X(3, .5) on 620 tokens: 310 noise tokens in 103 spans > the tokenizer's 100 sentinels.
    with pytest.raises(ValueError, match="103 noise spans"):
        jax.eval_shape(ul2_corrupt, jax.ShapeDtypeStruct((1, 620), jnp.int32), jax.random.key(0))
    shapes = jax.eval_shape(lambda t, r: ul2_corrupt(t, r, rates={"R": 1.0}),
                            jax.ShapeDtypeStruct((1, 620), jnp.int32), jax.random.key(1))
    assert [s.shape for s in shapes] == [(1, 621), (1, 620), (1,)]
    with pytest.raises(ValueError, match="inputs_length >= 97"):
        ul2_corrupt(jnp.ones((1, 96), jnp.int32), jax.random.key(2), inputs_length=96)


# ---------------------------------------------------------------------------------------------
# Corruption
# ---------------------------------------------------------------------------------------------

def random_rows(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(BYTE_LOW, BYTE_HIGH, (B, L)).astype(np.int32)
    lengths = rng.choice([0, 1, 2, 5, L // 2, L - 1, L, L, L, L], size=B)
    for row, n in zip(tokens, lengths):
        row[n:] = PAD
    return tokens, lengths


def check_row(original, inputs_row, targets_row, k):
    """The promises of denoiser ``k`` for one row of ``n = len(original)`` raw tokens."""
    n = len(original)
    mode, mean, density = PAPER[k]
    assert inputs_row[0] == mode
    inputs, targets = parse(inputs_row[1:]), parse(targets_row)
    if mean is None:   # S: prefix in [1, n - 1] (0 for n < 2), continuation, no sentinels
        assert inputs + targets == original
        assert (1 <= len(inputs) <= n - 1) if n >= 2 else inputs == []
        return
    in_pieces, in_sentinels = split_at_sentinels(inputs)
    tg_pieces, tg_sentinels = split_at_sentinels(targets)
    if n < 2:
        assert inputs == original and targets == ([V - 1] if n else [])
        return
    noise, spans = ref_counts(n, density, mean)
    assert in_sentinels == tg_sentinels == [V - 1 - i for i in range(spans)]
    assert sum(len(p) for p in tg_pieces) == noise
    assert tg_pieces[0] == [] and in_pieces[-1] == []
    assert all(in_pieces[:-1]) and all(tg_pieces[1:])
    rebuilt = []
    for j in range(spans):
        rebuilt += in_pieces[j] + tg_pieces[j + 1]
    assert rebuilt == original


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_ul2_corrupt_properties(data_seed, key_seed):
    tokens, lengths = random_rows(data_seed)
    inputs, targets, index = corrupt(jnp.asarray(tokens), jax.random.key(key_seed))
    assert (inputs.shape, targets.shape, index.shape) == ((B, L + 1), (B, L), (B,))
    for row, n, i_row, t_row, k in zip(tokens, lengths, np.asarray(inputs), np.asarray(targets),
                                       np.asarray(index)):
        check_row(row[:n].tolist(), i_row, t_row, int(k))


def test_ul2_every_denoiser_checked():
    # Enough rows that each of the 7 denoisers is drawn and checked (P(miss) ~ 1e-5).
    rng = np.random.default_rng(0)
    seen = set()
    for seed in range(12):
        tokens = rng.integers(BYTE_LOW, BYTE_HIGH, (B, L)).astype(np.int32)
        inputs, targets, index = corrupt(jnp.asarray(tokens), jax.random.key(100 + seed))
        for row, i_row, t_row, k in zip(tokens, np.asarray(inputs), np.asarray(targets),
                                        np.asarray(index)):
            check_row(row.tolist(), i_row, t_row, int(k))
            seen.add(int(k))
    assert seen == set(range(7))


def binomial_ok(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1e-9


def test_denoiser_frequencies_and_prefix_uniformity():
    # 200 batches of the property tests' shape (no new compile for the default rates).
    tokens = jnp.asarray(np.arange(BYTE_LOW, BYTE_LOW + L)[None].repeat(B, 0), jnp.int32)
    calls = 200
    for fn, rates, seed in ((corrupt, [0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.2], 1000),
                            (corrupt_xs, [0, 0, 0.125, 0.125, 0.125, 0.125, 0.5], 2000)):
        outs = [fn(tokens, jax.random.key(seed + i)) for i in range(calls)]
        inputs = np.concatenate([np.asarray(o[0]) for o in outs])
        index = np.concatenate([np.asarray(o[2]) for o in outs])
        counts = np.bincount(index, minlength=7)
        for count, p in zip(counts, rates):
            assert binomial_ok(count, calls * B, p), (counts, rates)
        assert (inputs[:, 0] == np.array([m for m, _, _ in PAPER])[index]).all()
    # S rows of the second mixture: prefix lengths uniform over 1 .. L - 1 (chi-square).
    s_rows = index == 6
    prefix = (inputs[s_rows] != PAD).sum(axis=1) - 2          # minus the mode token and EOS
    observed = np.bincount(prefix, minlength=L)
    assert observed[0] == 0 and observed[L:].sum() == 0
    expected = s_rows.sum() / (L - 1)
    chi2 = ((observed[1:L] - expected) ** 2 / expected).sum()
    assert chi2 < 142.1, observed   # 94 degrees of freedom, p = 0.001


def test_ul2_rng_and_retracing():
    tokens = jnp.asarray(np.arange(BYTE_LOW, BYTE_LOW + L)[None].repeat(B, 0), jnp.int32)
    corrupt(tokens, jax.random.key(10))                    # compile (or a cache hit)
    traces = len(TRACES)
    with CompileLog() as log:
        a = corrupt(tokens, jax.random.key(11))
        b = corrupt(tokens, jax.random.key(11))
        c = corrupt(tokens, jax.random.key(12))
    assert log.count("corrupt") == 0 and len(TRACES) == traces
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # Identical rows: per-example denoisers and masks differ.
    assert len(set(np.asarray(a[2]).tolist())) > 1
    assert len({np.asarray(r).tobytes() for r in a[0]}) > 1
