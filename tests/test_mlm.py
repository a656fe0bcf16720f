"""Tests for BERT's masked-LM corruption (objectives/mlm.py).

Expected values come from the published algorithm, not from the code under test: BERT's
``num_to_predict = min(max_predictions, max(1, round(n * rate))))`` (with hand-computed
half-to-even cases), a pure-Python copy of BERT's whole-word loop written from its description,
a word segmentation written here, and binomial bounds for the random choices.
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

from objectives.mlm import MlmCorruption, mlm_mask, take_in_order
from zoo.text import BOS, BYTE_OFFSET, EOS, MASK, PAD, ByteTokenizer, sentinel

B, L, P = 8, 64, 16
CALLS = 32                       # statistical tests: CALLS batches of B rows (one compiled shape)
BIG = CALLS * B
SEEDS = st.integers(0, 2**31 - 1)
SETTINGS = settings(max_examples=25, deadline=None)


# One jitted function per static configuration (named, so the compile log can count them).
def exact_mask(tokens, rng):
    return mlm_mask(tokens, rng, selection="exact", max_predictions=P)


def exact_quarter(tokens, rng):
    return mlm_mask(tokens, rng, rate=0.25, selection="exact", max_predictions=12)


def exact_words(tokens, rng):
    return mlm_mask(tokens, rng, selection="exact", max_predictions=P, whole_word=True)


def bernoulli_mask(tokens, rng):
    return mlm_mask(tokens, rng, selection="bernoulli", max_predictions=L)


def bernoulli_capped(tokens, rng):
    return mlm_mask(tokens, rng, rate=0.5, selection="bernoulli", max_predictions=4)


def bernoulli_words(tokens, rng):
    return mlm_mask(tokens, rng, selection="bernoulli", max_predictions=L, whole_word=True)


EXACT, EXACT_QUARTER, EXACT_WORDS = map(jax.jit, (exact_mask, exact_quarter, exact_words))
BERNOULLI, BERNOULLI_CAPPED, BERNOULLI_WORDS = map(
    jax.jit, (bernoulli_mask, bernoulli_capped, bernoulli_words))
TAKE_IN_ORDER = jax.jit(take_in_order)

ALPHABET = np.frombuffer(b"abcdefgh  \n\t", np.uint8).astype(np.int32) + BYTE_OFFSET
SPECIALS = np.array([EOS, BOS, MASK, 4, sentinel(0), sentinel(7)], np.int32)


def many(fn, tokens: np.ndarray, seed: int) -> MlmCorruption:
    """``fn`` over ``tokens`` [BIG, L] in batches of B (each with its own key), concatenated."""
    keys = jax.random.split(jax.random.key(seed), CALLS)
    outs = [fn(tokens[i * B:(i + 1) * B], keys[i]) for i in range(CALLS)]
    return MlmCorruption(*(np.concatenate(parts) for parts in zip(*outs)))


def random_rows(seed: int, batch: int = B) -> np.ndarray:
    """Letters and whitespace, a random real length (row 0 full, last row all PAD), then PAD;
    about 5% of the real positions replaced by special tokens."""
    r = np.random.default_rng(seed)
    rows = ALPHABET[r.integers(0, len(ALPHABET), (batch, L))]
    real = r.integers(0, L + 1, batch)
    real[0], real[-1] = L, 0
    specials = r.random((batch, L)) < 0.05
    rows = np.where(specials, SPECIALS[r.integers(0, len(SPECIALS), (batch, L))], rows)
    return np.where(np.arange(L)[None] < real[:, None], rows, PAD).astype(np.int32)


def is_byte(x):
    """Candidates, written independently of zoo.text.is_special."""
    x = np.asarray(x)
    return (x >= BYTE_OFFSET) & (x < BYTE_OFFSET + 256)


def bert_num_to_predict(n: int, rate: float, max_predictions: int) -> int:
    return 0 if n == 0 else min(max_predictions, max(1, int(round(n * rate))))


def selected_mask(out: MlmCorruption) -> np.ndarray:
    """bool [B, L] from positions/weights."""
    positions, weights = np.asarray(out.positions), np.asarray(out.weights)
    sel = np.zeros((positions.shape[0], L), bool)
    for b in range(positions.shape[0]):
        sel[b, positions[b][weights[b] > 0]] = True
    return sel


def words_of(row) -> list[list[int]]:
    """Whole-word segmentation: runs of non-whitespace byte tokens; each whitespace byte alone."""
    space = set((np.frombuffer(b" \t\n\r\x0b\x0c", np.uint8) + BYTE_OFFSET).tolist())
    words, current = [], []
    for i, t in enumerate(np.asarray(row).tolist()):
        if not is_byte(t) or t in space:
            if current:
                words.append(current)
            current = []
            if is_byte(t):
                words.append([i])
        else:
            current.append(i)
    if current:
        words.append(current)
    return words


def check_structure(tokens: np.ndarray, out: MlmCorruption, max_predictions: int):
    """Invariants every mode must satisfy; returns the [B, L] selection."""
    inputs, positions = np.asarray(out.inputs), np.asarray(out.positions)
    labels, weights = np.asarray(out.labels), np.asarray(out.weights)
    assert inputs.shape == tokens.shape and inputs.dtype == np.int32
    assert positions.shape == labels.shape == weights.shape == (tokens.shape[0], max_predictions)
    assert positions.dtype == labels.dtype == np.int32 and weights.dtype == np.float32
    assert set(np.unique(weights)) <= {0.0, 1.0}
    for b in range(tokens.shape[0]):
        k = int(weights[b].sum())
        assert np.all(weights[b, :k] == 1) and np.all(weights[b, k:] == 0)   # real slots first
        assert np.all(np.diff(positions[b, :k]) > 0)                          # increasing
        assert np.all(positions[b, k:] == 0) and np.all(labels[b, k:] == PAD)
        np.testing.assert_array_equal(labels[b, :k], tokens[b, positions[b, :k]])
    sel = selected_mask(out)
    assert not np.any(sel & ~is_byte(tokens)), "a special token was selected"
    np.testing.assert_array_equal(inputs[~sel], tokens[~sel])   # unchanged outside selection
    changed = sel & (inputs != tokens)
    assert np.all((inputs[changed] == MASK) | is_byte(inputs[changed]))
    return sel


# ---------------------------------------------------------------------------------------------
# exact selection (google-research/bert)
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=SEEDS)
def test_exact_count_and_structure(seed):
    tokens = random_rows(seed)
    out = EXACT(tokens, jax.random.key(seed))
    sel = check_structure(tokens, out, P)
    for b in range(B):
        n = int(is_byte(tokens[b]).sum())
        assert sel[b].sum() == bert_num_to_predict(n, 0.15, P), (b, n)


def _rows_with_candidates(counts, length=L):
    rows = np.full((len(counts), length), PAD, np.int32)
    for b, n in enumerate(counts):
        rows[b, :n] = BYTE_OFFSET + ord("x")
        rows[b, n:n + 3] = [EOS, BOS, MASK][:max(0, min(3, length - n))]   # never candidates
    return rows


def test_exact_count_rounds_half_to_even():
    # rate 0.25: 2 -> 0.5 -> 0 -> raised to 1; 6 -> 1.5 -> 2; 10 -> 2.5 -> 2; 14 -> 3.5 -> 4;
    # 18 -> 4.5 -> 4 (half-up would give 3, 5); 0 -> nothing; 1 -> 0.25 -> 1; 60 -> 15,
    # capped by max_predictions = 12.
    counts = [2, 6, 10, 14, 18, 0, 1, 60]
    expected = [1, 2, 2, 4, 4, 0, 1, 12]
    out = EXACT_QUARTER(_rows_with_candidates(counts), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.weights).sum(1), expected)


def test_exact_count_by_hand():
    # rate 0.15: 64 candidates -> round(9.6) = 10; with P = 16 not capped. 3 -> 1.
    out = EXACT(_rows_with_candidates([64, 3, 0, 20, 40, 50, 7, 30]), jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out.weights).sum(1), [10, 1, 0, 3, 6, 8, 1, 4])


def test_all_pad_row_predicts_nothing():
    tokens = np.zeros((B, L), np.int32)
    out = EXACT(tokens, jax.random.key(3))
    assert float(out.weights.sum()) == 0
    np.testing.assert_array_equal(out.inputs, tokens)


def test_exact_selection_is_uniform_over_candidates():
    # Every candidate position should be chosen equally often (num_to_predict / n each).
    tokens = np.tile(_rows_with_candidates([40]), (BIG, 1))
    sel = selected_mask(many(EXACT, tokens, 4))
    assert np.all(sel.sum(1) == 6) and not sel[:, 40:].any()
    per_position = sel[:, :40].sum(0)                  # each ~ Binomial(256, 6/40)
    p = 6 / 40
    bound = 5 * math.sqrt(BIG * p * (1 - p))
    assert np.all(np.abs(per_position - BIG * p) < bound), per_position


# ---------------------------------------------------------------------------------------------
# 80/10/10
# ---------------------------------------------------------------------------------------------

def _within(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("fn", [EXACT, BERNOULLI], ids=["exact", "bernoulli"])
def test_80_10_10(fn):
    tokens = random_rows(5, BIG)
    out = many(fn, tokens, 5)
    sel = check_structure(tokens, out, out.positions.shape[1])
    inputs = np.asarray(out.inputs)
    n = int(sel.sum())
    assert n > 1000
    masked = int((inputs[sel] == MASK).sum())
    kept = int((inputs[sel] == tokens[sel]).sum())
    replaced = inputs[sel & (inputs != MASK) & (inputs != tokens)]
    # A random byte equals the original with probability 1/256.
    assert _within(masked, n, 0.8), (masked, n)
    assert _within(kept, n, 0.1 + 0.1 / 256), (kept, n)
    assert _within(len(replaced), n, 0.1 * 255 / 256), (len(replaced), n)
    assert np.all(is_byte(replaced))
    assert len(np.unique(replaced)) > 50   # drawn from all bytes, not from the row's alphabet


# ---------------------------------------------------------------------------------------------
# whole-word masking
# ---------------------------------------------------------------------------------------------

def bert_word_loop(lengths, budget):
    """BERT's loop over shuffled words, from its description: stop when full, skip a word that
    would overshoot, otherwise take it."""
    taken, count = [], 0
    for length in lengths:
        if count >= budget:
            taken.append(False)
            continue
        if count + length > budget:
            taken.append(False)
            continue
        taken.append(True)
        count += length
    return taken


@SETTINGS
@given(seed=SEEDS)
def test_take_in_order_matches_bert_loop(seed):
    r = np.random.default_rng(seed)
    lengths = r.integers(1, 8, 32).astype(np.int32)
    eligible = r.random(32) < 0.8
    budget = int(r.integers(0, 40))
    taken = np.asarray(TAKE_IN_ORDER(lengths, eligible, np.int32(budget)))
    # Ineligible words are simply absent from BERT's list.
    expected = iter(bert_word_loop(lengths[eligible].tolist(), budget))
    np.testing.assert_array_equal(taken, [bool(e) and next(expected) for e in eligible])


def test_take_in_order_skips_and_continues():
    # budget 3: 2 fits, 4 does not (skip), 1 still fits; stopping at the misfit would give 2.
    taken = TAKE_IN_ORDER(np.array([2, 4, 1, 1], np.int32), np.ones(4, bool), np.int32(3))
    np.testing.assert_array_equal(taken, [True, False, True, False])


def check_whole_words(tokens, sel):
    for b in range(tokens.shape[0]):
        for word in words_of(tokens[b]):
            assert len(set(sel[b, word].tolist())) == 1, (b, word, sel[b, word])


@SETTINGS
@given(seed=SEEDS)
def test_whole_word_exact(seed):
    tokens = random_rows(seed)
    sel = check_structure(tokens, EXACT_WORDS(tokens, jax.random.key(seed)), P)
    check_whole_words(tokens, sel)
    for b in range(B):
        budget = bert_num_to_predict(int(is_byte(tokens[b]).sum()), 0.15, P)
        count = int(sel[b].sum())
        assert count <= budget
        # Skip-and-continue leaves no unselected word that would still fit; stopping at the
        # first misfit would (a later, shorter word).
        for word in words_of(tokens[b]):
            if not sel[b, word[0]]:
                assert count + len(word) > budget, (b, word, count, budget)


def test_whole_word_exact_skips_words_that_do_not_fit():
    # "ab cd": 5 candidates -> num_to_predict = max(1, round(0.75)) = 1. Only the space (a word
    # of its own) fits; BERT skips "ab"/"cd" when they come first and still takes the space.
    tokens = np.zeros((B, L), np.int32)
    tokens[:, :5] = ByteTokenizer().encode("ab cd")
    for seed in range(3):
        out = EXACT_WORDS(tokens, jax.random.key(100 + seed))
        np.testing.assert_array_equal(out.weights.sum(1), np.ones(B))
        np.testing.assert_array_equal(out.positions[:, 0], np.full(B, 2))


def test_special_tokens_split_words():
    # "ab<eos>cd": two words of 2 (eos is not a candidate); 4 candidates -> 1 prediction, and
    # neither word fits, so nothing is chosen. Were eos joined into one word it would still be 0;
    # "a<eos>b" gives two 1-token words, so exactly one of them is chosen.
    tok = ByteTokenizer()
    tokens = np.zeros((B, L), np.int32)
    tokens[0, :5] = np.concatenate([tok.encode("ab"), [EOS], tok.encode("cd")])
    tokens[1, :3] = np.concatenate([tok.encode("a"), [EOS], tok.encode("b")])
    w = np.asarray(EXACT_WORDS(tokens, jax.random.key(6)).weights).sum(1)
    assert w[0] == 0 and w[1] == 1


def test_bernoulli_whole_words_rate():
    tokens = random_rows(7, BIG)
    sel = check_structure(tokens, many(BERNOULLI_WORDS, tokens, 7), L)
    check_whole_words(tokens, sel)
    words = [(b, w) for b in range(BIG) for w in words_of(tokens[b])]
    chosen = sum(bool(sel[b, w[0]]) for b, w in words)
    assert _within(chosen, len(words), 0.15), (chosen, len(words))


# ---------------------------------------------------------------------------------------------
# bernoulli selection (HF DataCollatorForLanguageModeling)
# ---------------------------------------------------------------------------------------------

def test_bernoulli_rate():
    tokens = random_rows(8, BIG)
    sel = check_structure(tokens, many(BERNOULLI, tokens, 8), L)
    n = int(is_byte(tokens).sum())
    assert _within(int(sel.sum()), n, 0.15), (int(sel.sum()), n)
    counts = sel.sum(1)
    assert len(np.unique(counts[is_byte(tokens).sum(1) > 30])) > 3   # random, not a fixed count


@SETTINGS
@given(seed=SEEDS)
def test_bernoulli_cap_leaves_extra_positions_untouched(seed):
    tokens = random_rows(seed)
    out = BERNOULLI_CAPPED(tokens, jax.random.key(seed))
    sel = check_structure(tokens, out, 4)   # includes: inputs unchanged outside the 4 slots
    n = is_byte(tokens).sum(1)
    # rate 0.5 over >= 40 candidates draws fewer than 4 with probability < 1e-8.
    assert np.all(sel.sum(1)[n >= 40] == 4)
    assert np.all(sel.sum(1) <= 4)


def test_bernoulli_cap_keeps_a_uniform_subset():
    # Keeping the first 4 drawn positions would put the mean kept position near 6; a uniform
    # subset of the 64 positions has mean 31.5.
    tokens = np.tile(_rows_with_candidates([L]), (B, 1))
    positions = np.asarray(BERNOULLI_CAPPED(tokens, jax.random.key(9)).positions)
    assert 20 < positions.mean() < 43, positions


# ---------------------------------------------------------------------------------------------
# randomness and compilation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [EXACT, EXACT_WORDS, BERNOULLI],
                         ids=["exact", "words", "bernoulli"])
def test_same_key_same_result_other_key_differs(fn):
    tokens = random_rows(10)
    a, b, c = (fn(tokens, jax.random.key(s)) for s in (11, 11, 12))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.positions, c.positions)
    # Rows get different keys: two identical rows are masked differently.
    same = fn(np.tile(tokens[:1], (B, 1)), jax.random.key(13))
    assert not np.array_equal(same.positions[0], same.positions[1])


def test_jit_compiles_once():
    EXACT_WORDS(random_rows(14), jax.random.key(14))       # may compile
    tokens, rng = random_rows(15), jax.random.key(15)
    with CompileLog() as log:
        out = EXACT_WORDS(tokens, rng)
        jax.block_until_ready(out)
    assert log.count("exact_words") == 0, log.messages


def test_rejects_bad_arguments():
    tokens = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="selection"):
        mlm_mask(tokens, jax.random.key(0), selection="uniform", max_predictions=2)
    with pytest.raises(ValueError, match="max_predictions"):
        mlm_mask(tokens, jax.random.key(0), max_predictions=0)
    with pytest.raises(ValueError, match="mask_prob"):
        mlm_mask(tokens, jax.random.key(0), max_predictions=2, mask_prob=0.9, random_prob=0.2)
