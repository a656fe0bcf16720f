"""Tests for next-token prediction, prefix LM, MEAP and the shared token cross-entropy
(objectives/causal.py).

Expected values are built by hand or by element-by-element numpy loops written from the
definitions (T5's prefix-LM mask and prefix distribution, MEAP's exact mask count with
hand-computed half-to-even cases), never from the code's own output.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_log import CompileLog
from hypothesis import given, settings
from hypothesis import strategies as st

from objectives.causal import (causal_attention_mask, meap_corrupt, next_token_targets,
                               prefix_lm_attention_mask, prefix_lm_split, token_cross_entropy)
from zoo.text import BOS, BYTE_OFFSET, EOS, MASK, PAD, sentinel

B, L = 8, 32
SEEDS = st.integers(0, 2**31 - 1)
SETTINGS = settings(max_examples=25, deadline=None)


def prefix_split(tokens, rng):
    return prefix_lm_split(tokens, rng)


def meap(tokens, rng):
    return meap_corrupt(tokens, rng)


def meap_quarter(tokens, rng):
    return meap_corrupt(tokens, rng, mask_rate=0.25)


PREFIX_SPLIT, MEAP, MEAP_QUARTER = map(jax.jit, (prefix_split, meap, meap_quarter))
CROSS_ENTROPY = jax.jit(token_cross_entropy)
CALLS = 64   # statistical tests: CALLS batches of B rows (one compiled shape)


def many(fn, tokens: np.ndarray, seed: int, output: int) -> np.ndarray:
    """Output ``output`` of ``fn`` over ``tokens`` [CALLS * B, L] in batches of B."""
    keys = jax.random.split(jax.random.key(seed), CALLS)
    return np.concatenate([np.asarray(fn(tokens[i * B:(i + 1) * B], keys[i])[output])
                           for i in range(CALLS)])


def is_byte(x):
    x = np.asarray(x)
    return (x >= BYTE_OFFSET) & (x < BYTE_OFFSET + 256)


def random_rows(seed: int, batch: int = B) -> np.ndarray:
    """Byte tokens with ~10% specials, a random real length (row 0 full), then PAD."""
    r = np.random.default_rng(seed)
    rows = r.integers(BYTE_OFFSET, BYTE_OFFSET + 256, (batch, L))
    specials = np.array([EOS, BOS, 4, sentinel(3)])
    rows = np.where(r.random((batch, L)) < 0.1, specials[r.integers(0, 4, (batch, L))], rows)
    real = r.integers(0, L + 1, batch)
    real[0] = L
    return np.where(np.arange(L)[None] < real[:, None], rows, PAD).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# next-token targets
# ---------------------------------------------------------------------------------------------

def test_next_token_targets_by_hand():
    tokens = jnp.array([[10, 11, 12, EOS, 13, PAD],
                        [20, 21, PAD, PAD, PAD, PAD]], jnp.int32)
    inputs, labels, weights = next_token_targets(tokens)
    np.testing.assert_array_equal(inputs, [[10, 11, 12, EOS, 13], [20, 21, PAD, PAD, PAD]])
    np.testing.assert_array_equal(labels, [[11, 12, EOS, 13, PAD], [21, PAD, PAD, PAD, PAD]])
    np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    assert weights.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# token cross-entropy
# ---------------------------------------------------------------------------------------------

def _numpy_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return log_z - np.take_along_axis(logits, np.asarray(labels)[..., None], -1)[..., 0]


def test_cross_entropy_normalises_over_the_whole_batch():
    # Row 0 has 6 targets that the logits predict well, row 1 has 1 target predicted badly.
    r = np.random.default_rng(0)
    labels = r.integers(0, 5, (2, 6))
    logits = np.zeros((2, 6, 5), np.float32)
    logits[0, np.arange(6), labels[0]] = 4.0               # confident and right
    logits[1, 0, (labels[1, 0] + 1) % 5] = 4.0             # confident and wrong
    weights = np.zeros((2, 6), np.float32)
    weights[0] = 1
    weights[1, 0] = 1
    ce = _numpy_ce(logits, labels)
    whole_batch = (ce * weights).sum() / 7
    mean_of_means = ((ce[0] * weights[0]).sum() / 6 + ce[1, 0]) / 2
    assert abs(whole_batch - mean_of_means) > 0.5          # the case tells them apart
    loss, metrics = CROSS_ENTROPY(logits, labels, weights)
    np.testing.assert_allclose(loss, whole_batch, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 6 / 7, rtol=1e-6)
    assert float(metrics["tokens"]) == 7
    assert loss.dtype == jnp.float32


def test_cross_entropy_uniform_logits_give_log_vocab():
    logits = jnp.zeros((4, 8, 300), jnp.bfloat16)
    labels = np.zeros((4, 8), np.int64)
    loss, _ = CROSS_ENTROPY(logits, labels, np.ones((4, 8), np.float32))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, math.log(300), rtol=1e-6)


def test_cross_entropy_bf16_is_computed_in_float32():
    r = np.random.default_rng(1)
    logits = jnp.asarray(r.normal(0, 3, (4, 8, 300)), jnp.bfloat16)
    labels = r.integers(0, 300, (4, 8))
    weights = (r.random((4, 8)) < 0.7).astype(np.float32)
    loss, metrics = CROSS_ENTROPY(logits, labels, weights)
    # Reference in float64 on the SAME bf16-rounded values.
    ce = _numpy_ce(np.asarray(logits.astype(jnp.float32)), labels)
    assert loss.dtype == metrics["accuracy"].dtype == jnp.float32
    np.testing.assert_allclose(loss, (ce * weights).sum() / weights.sum(), rtol=1e-5)


def test_cross_entropy_without_targets_is_zero_not_nan():
    logits = np.ones((2, 6, 5), np.float32)
    labels = np.zeros((2, 6), np.int64)
    weights = np.zeros((2, 6), np.float32)
    loss, metrics = CROSS_ENTROPY(logits, labels, weights)
    assert float(loss) == 0 and float(metrics["accuracy"]) == 0 and float(metrics["tokens"]) == 0
    grad = jax.jit(jax.grad(lambda x: token_cross_entropy(x, labels, weights)[0]))(logits)
    assert np.all(np.isfinite(grad)) and not np.any(grad)


# ---------------------------------------------------------------------------------------------
# attention masks
# ---------------------------------------------------------------------------------------------

def test_causal_attention_mask():
    mask = np.asarray(causal_attention_mask(5))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == bool
    for q in range(5):
        for k in range(5):
            assert mask[0, 0, q, k] == (k <= q)


def test_prefix_lm_attention_mask_by_loops():
    prefix_len = np.array([0, 1, 3, 6], np.int32)
    mask = np.asarray(prefix_lm_attention_mask(jnp.asarray(prefix_len), 6))
    assert mask.shape == (4, 1, 6, 6) and mask.dtype == bool
    for b, p in enumerate(prefix_len):
        for q in range(6):
            for k in range(6):
                # bidirectional inside the prefix, causal after; the prefix is visible to all
                expected = (q < p and k < p) or k <= q or k < p
                assert mask[b, 0, q, k] == expected, (b, q, k)
    # prefix 0 and 1 are plain causal; a full prefix is fully bidirectional
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((6, 6), bool)))
    np.testing.assert_array_equal(mask[1, 0], np.tril(np.ones((6, 6), bool)))
    assert mask[3].all()


# ---------------------------------------------------------------------------------------------
# prefix LM
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=SEEDS)
def test_prefix_lm_split(seed):
    tokens = random_rows(seed)
    inputs, labels, weights, prefix_len = PREFIX_SPLIT(tokens, jax.random.key(seed))
    inputs, labels, weights = map(np.asarray, (inputs, labels, weights))
    prefix_len = np.asarray(prefix_len)
    assert prefix_len.shape == (B,) and prefix_len.dtype == np.int32
    np.testing.assert_array_equal(inputs, tokens[:, :-1])
    np.testing.assert_array_equal(labels, tokens[:, 1:])
    mask = np.asarray(prefix_lm_attention_mask(jnp.asarray(prefix_len), L - 1))
    for b in range(B):
        n, p = int((tokens[b] != PAD).sum()), int(prefix_len[b])
        assert 1 <= p <= max(n - 1, 1)
        # the loss covers exactly the real tokens after the prefix: tokens[p:n]
        target_tokens = np.zeros(L, bool)
        target_tokens[p:n] = True
        np.testing.assert_array_equal(weights[b], target_tokens[1:].astype(np.float32))
        for i in np.flatnonzero(weights[b]):
            # no leak: query i never sees the token it predicts (input position i + 1) or later
            assert not mask[b, 0, i, i + 1:].any(), (b, i, p)
        assert mask[b, 0, :p, :p].all()   # the prefix reads itself bidirectionally


def test_prefix_len_is_uniform_between_1_and_n_minus_1():
    # 9 real tokens -> prefix lengths 1..8 equally likely (T5's random_prefix_noise_mask).
    rows = CALLS * B
    tokens = np.zeros((rows, L), np.int32)
    tokens[:, :9] = BYTE_OFFSET + 65
    prefix_len = many(PREFIX_SPLIT, tokens, 1, output=3)
    counts = np.bincount(prefix_len, minlength=10)
    assert counts[0] == 0 and counts[9] == 0
    p = 1 / 8
    assert np.all(np.abs(counts[1:9] - rows * p) < 5 * math.sqrt(rows * p * (1 - p))), counts


# ---------------------------------------------------------------------------------------------
# MEAP
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=SEEDS)
def test_meap(seed):
    tokens = random_rows(seed)
    inputs, labels, weights = map(np.asarray, MEAP(tokens, jax.random.key(seed)))
    original = tokens[:, :-1]
    np.testing.assert_array_equal(labels, tokens[:, 1:])             # labels are not masked
    np.testing.assert_array_equal(weights, (tokens[:, 1:] != PAD).astype(np.float32))
    changed = inputs != original
    assert np.all(inputs[changed] == MASK)
    assert not np.any(changed & ~is_byte(original))                   # specials never masked
    for b in range(B):
        n = int(is_byte(original[b]).sum())
        assert changed[b].sum() == int(round(n * 0.15)), (b, n)


def test_meap_count_rounds_half_to_even():
    # rate 0.25 over n input candidates: 2 -> 0.5 -> 0; 6 -> 1.5 -> 2; 10 -> 2.5 -> 2;
    # 14 -> 3.5 -> 4; 18 -> 4.5 -> 4; 1 -> 0; 31 -> 7.75 -> 8; 0 -> 0.
    counts = [2, 6, 10, 14, 18, 1, 31, 0]
    tokens = np.zeros((B, L), np.int32)
    for b, n in enumerate(counts):
        tokens[b, :n] = BYTE_OFFSET + 66
        if n < L:
            tokens[b, n] = EOS     # the EOS is an input but never a candidate
    inputs = np.asarray(MEAP_QUARTER(tokens, jax.random.key(2))[0])
    np.testing.assert_array_equal((inputs == MASK).sum(1), [0, 2, 2, 4, 4, 0, 8, 0])


def test_meap_masks_uniformly():
    rows = CALLS * B
    tokens = np.full((rows, L), BYTE_OFFSET + 70, np.int32)          # 31 input candidates
    inputs = many(MEAP, tokens, 3, output=0)
    per_position = (inputs == MASK).sum(0)                            # round(4.65) = 5 per row
    assert np.all((inputs == MASK).sum(1) == 5)
    p = 5 / 31
    assert np.all(np.abs(per_position - rows * p) < 5 * math.sqrt(rows * p * (1 - p)))


# ---------------------------------------------------------------------------------------------
# randomness and compilation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [PREFIX_SPLIT, MEAP], ids=["prefix_lm", "meap"])
def test_same_key_same_result_other_key_differs(fn):
    tokens = np.tile(random_rows(4)[:1], (B, 1))        # identical full rows
    a, b, c = (fn(tokens, jax.random.key(s)) for s in (5, 5, 6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    differs = [not np.array_equal(x, y) for x, y in zip(a, c)]
    assert any(differs)
    # rows get their own keys: identical rows are split or masked differently
    varying = a[3] if fn is PREFIX_SPLIT else a[0]
    assert len({tuple(np.asarray(row).ravel()) for row in varying}) > 1


@pytest.mark.parametrize("fn,name", [(PREFIX_SPLIT, "prefix_split"), (MEAP, "meap")])
def test_jit_compiles_once(fn, name):
    fn(random_rows(7), jax.random.key(7))               # may compile
    tokens, rng = random_rows(8), jax.random.key(8)
    with CompileLog() as log:
        jax.block_until_ready(fn(tokens, rng))
    assert log.count(name) == 0, log.messages
