"""Tests for BART's noising functions against fairseq's published algorithm (Lewis et al. 2019,
``fairseq/data/denoising_dataset.py``).

Expected values are hand-derived, or come from short pure-Python re-statements of the algorithm
written from its description (span stepping, sentence splitting, trimming the span budget), or
are properties every correct output has (subsequences, multisets, cyclic shifts, counts).
Static shapes are fixed per jitted function; hypothesis varies data and keys only.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from objectives import bart
from objectives.bart import (NEWLINE, apply_span_mask, bart_noise,
                             bart_output_length, ceil_ratio, document_rotation,
                             insert_tokens, insertion_noise, mask_insert_budget,
                             sample_span_lengths, sentence_permutation, span_length_distribution,
                             span_plan, whole_word_mask, word_starts)
from zoo.text import BYTE_OFFSET, MASK, PAD, ByteTokenizer, is_special

TOK = ByteTokenizer()
L = 32
SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def key(seed):
    return jax.random.key(seed)


def row(ids, size=L):
    """int32 [size]: ids then PAD."""
    out = np.zeros(size, np.int32)
    out[:len(ids)] = ids
    return jnp.asarray(out)


def content(tokens, length):
    tokens = np.asarray(tokens)
    length = int(length)
    assert (tokens[length:] == PAD).all(), "padding must follow the content"
    return tokens[:length].tolist()


def is_subsequence(small, big):
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def distinct_bytes(n):
    """n distinct byte ids, none of them whitespace."""
    return [BYTE_OFFSET + ord("A") + k for k in range(n)]


# ---------------------------------------------------------------------------------------------
# Static helpers
# ---------------------------------------------------------------------------------------------

def test_ceil_ratio_is_exact():
    assert ceil_ratio(10, 0.3) == 3          # float: 10 * 0.3 = 3.0000000000000004
    assert ceil_ratio(11, 0.3) == 4
    assert ceil_ratio(0, 0.3) == 0
    assert ceil_ratio(7, 1.0) == 7
    assert ceil_ratio(100, 0.15) == 15
    np.testing.assert_array_equal(ceil_ratio(jnp.array([10, 11, 1]), 0.3), [3, 4, 1])


def test_span_length_distribution_is_truncated_poisson():
    probs = span_length_distribution(3.0)
    assert abs(sum(probs) - 1) < 1e-12
    for k in range(6):
        assert probs[k] == pytest.approx(math.exp(-3) * 3**k / math.factorial(k), rel=1e-6)
    # fairseq's table stops after the first probability below 1e-7: 3^k e^-3 / k! < 1e-7 first
    # at k = 17 (1.2e-7 at 16, 2.2e-8 at 17).
    assert len(probs) == 18
    assert len(span_length_distribution(40.0)) > 40   # mode far from 0 still covered


def test_sampled_span_lengths_have_mean_lambda():
    draws = np.asarray(jax.jit(functools.partial(sample_span_lengths, shape=(20000,),
                                                 poisson_lambda=3.0))(key(0)))
    # Poisson(3): sd of the mean of 20000 draws is sqrt(3 / 20000) = 0.012; allow 5 sd.
    assert abs(draws.mean() - 3.0) < 0.06
    assert abs(draws.var() - 3.0) < 0.2
    assert abs((draws == 0).mean() - math.exp(-3)) < 5 * math.sqrt(0.05 * 0.95 / 20000)
    assert draws.min() >= 0 and draws.max() < 18


def test_negative_binomial_quantile_matches_geometric_tail():
    # One success: P(X > z) = p^(z + 1); with p = 1/2 and tail 1e-3, z + 1 >= 9.97 -> z = 9.
    assert bart._negative_binomial_quantile(1, 0.5, 1e-3) == 9
    assert bart._negative_binomial_quantile(5, 0.0, 1e-3) == 0
    assert mask_insert_budget(512, mask_ratio=0.3, poisson_lambda=None) == 0
    assert mask_insert_budget(512, mask_ratio=0.0, poisson_lambda=3.0) == 0
    budget = mask_insert_budget(512, mask_ratio=0.3, poisson_lambda=3.0)
    # Mean zeros for 154 spans at P(0) = e^-3: 154 * 0.0524 = 8.1; budget is a far tail.
    assert 16 < budget < 64


def test_output_length_rule():
    z = mask_insert_budget(L, mask_ratio=0.3, poisson_lambda=3.0)
    assert bart_output_length(L) == L + z
    assert bart_output_length(L, insert_ratio=0.1) == L + z + math.ceil((L + z) / 10)
    assert bart_output_length(L, mask_ratio=0.0, insert_ratio=0.5) == L + L // 2
    assert bart_output_length(L, poisson_lambda=None) == L
    assert bart_output_length(L, max_mask_inserts=2) == L + 2


def test_bad_hyperparameters_raise():
    tokens = jnp.zeros((1, 8), jnp.int32)
    for bad in ({"replace_length": -1}, {"mask_ratio": 1.5}, {"rotate_ratio": -0.1},
                {"insert_ratio": -1.0}, {"poisson_lambda": 0.0}):
        with pytest.raises(ValueError):
            bart_noise(tokens, key(0), **bad)


# ---------------------------------------------------------------------------------------------
# Word starts and the span plan
# ---------------------------------------------------------------------------------------------

def test_word_starts():
    ids = TOK.encode("ab  cd\ne")
    got = np.asarray(word_starts(row(ids, 12), len(ids), mask_whole_word=True))
    expected = [c in (0, 2, 3, 4, 6, 7) for c in range(12)]
    np.testing.assert_array_equal(got, expected)
    got = np.asarray(word_starts(row(ids, 12), len(ids), mask_whole_word=False))
    np.testing.assert_array_equal(got, [c < 8 for c in range(12)])


def ref_plan(draws, num_to_mask):
    """fairseq's trimming, stated in Python: draw until the sum reaches the budget, trim the
    last draw to fit; zeros before that are insertions. Also says whether the budget was met
    within the given draws."""
    lengths, total, inserts = [], 0, 0
    if num_to_mask == 0:
        return [], 0, True
    for d in draws:
        if total + d >= num_to_mask:
            lengths.append(num_to_mask - total)
            return lengths, inserts, True
        total += d
        if d == 0:
            inserts += 1
        else:
            lengths.append(d)
    return lengths, inserts, False


PLAN_MAX, PLAN_INSERTS = 12, 6


@jax.jit
def plan_and_draws(seed, num_to_mask):
    # lambda = 0.5: P(0) = 0.61, so both outcomes occur: the budget met within the 18 draws,
    # and more than 6 zeros first (masking cut short, insertions capped).
    lengths, inserts = span_plan(jax.random.key(seed), num_to_mask, max_to_mask=PLAN_MAX,
                                 poisson_lambda=0.5, max_inserts=PLAN_INSERTS)
    draws = sample_span_lengths(jax.random.key(seed), (PLAN_MAX + PLAN_INSERTS,), 0.5)
    return lengths, inserts, draws


@settings(max_examples=40, deadline=None)
@given(seed=seeds, num_to_mask=st.integers(0, PLAN_MAX))
def test_span_plan_trims_to_budget(seed, num_to_mask):
    lengths, inserts, draws = plan_and_draws(seed, num_to_mask)
    expected, expected_inserts, reached = ref_plan(np.asarray(draws).tolist(), num_to_mask)
    got = [x for x in np.asarray(lengths).tolist() if x > 0]
    assert got == expected
    assert int(inserts) == min(expected_inserts, PLAN_INSERTS)
    assert (sum(got) == num_to_mask) == reached
    if not reached:
        assert expected_inserts > PLAN_INSERTS    # T = 12 + 6 draws: only > 6 zeros miss


def test_span_plan_without_poisson_is_single_tokens():
    lengths, inserts = span_plan(key(0), 3, max_to_mask=5, poisson_lambda=None, max_inserts=0)
    np.testing.assert_array_equal(lengths, [1, 1, 1, 0, 0])
    assert int(inserts) == 0


# ---------------------------------------------------------------------------------------------
# Applying spans
# ---------------------------------------------------------------------------------------------

def ref_apply(tokens, n, ws, spans, replace_length):
    """fairseq's span stepping, per span: the head becomes its token (or is deleted with
    replace_length 0); then step right, spending one unit of the span per word start crossed,
    deleting each token reached while units remain; stop at the content end."""
    value, keep = list(tokens[:n]), [True] * n
    for start, _, token in spans:
        value[start] = token
        if replace_length == 0:
            keep[start] = False
    for start, words, _ in spans:
        left, pos = words - 1, start + 1
        while pos < n:
            left -= int(ws[pos])
            if left < 0:
                break
            keep[pos] = False
            pos += 1
    return [v for v, k in zip(value, keep) if k]


T_SPANS = 6
apply_jit = jax.jit(apply_span_mask)   # replace_length traced: one compile for 0 and 1
starts_jit = jax.jit(word_starts, static_argnames="mask_whole_word")


def spans_arrays(spans):
    starts = np.zeros(T_SPANS, np.int32)
    lengths = np.zeros(T_SPANS, np.int32)
    toks = np.full(T_SPANS, MASK, np.int32)
    for j, (s, w, t) in enumerate(spans):
        starts[j], lengths[j], toks[j] = s, w, t
    return jnp.asarray(starts), jnp.asarray(lengths), jnp.asarray(toks)


def run_apply(text, spans, replace_length=1, whole_word=False):
    ids = TOK.encode(text)
    tokens = row(ids)
    ws = starts_jit(tokens, len(ids), mask_whole_word=whole_word)
    out, n = apply_jit(tokens, len(ids), ws, *spans_arrays(spans), replace_length=replace_length)
    return TOK.decode(content(out, n))


def test_apply_span_mask_by_hand():
    m = MASK
    assert run_apply("abcdefgh", [(2, 3, m)]) == "ab<mask>fgh"
    assert run_apply("abcdefgh", [(2, 2, m), (4, 1, m)]) == "ab<mask><mask>fgh"   # adjacent
    assert run_apply("abcdefgh", [(2, 3, m), (3, 2, m)]) == "ab<mask>fgh"         # overlap
    assert run_apply("abcdefgh", [(3, 2, m), (2, 3, m)]) == "ab<mask>fgh"         # any order
    assert run_apply("abcdefgh", [(6, 5, m)]) == "abcdef<mask>"                   # past the end
    assert run_apply("abcdefgh", [(0, 1, m), (7, 1, m)]) == "<mask>bcdefg<mask>"  # both ends
    assert run_apply("abcdefgh", [(2, 3, m)], replace_length=0) == "abfgh"        # deletion
    assert run_apply("abcdefgh", [(2, 1, BYTE_OFFSET + ord("Z"))]) == "abZdefgh"
    # Whole words: "ab cd ef" has words "ab", " ", "cd", " ", "ef".
    assert run_apply("ab cd ef", [(3, 1, m)], whole_word=True) == "ab <mask> ef"
    assert run_apply("ab cd ef", [(0, 2, m)], whole_word=True) == "<mask>cd ef"
    assert run_apply("ab cd ef", [(6, 4, m)], whole_word=True) == "ab cd <mask>"


@SETTINGS
@given(data=st.data(), whole_word=st.booleans(), replace_length=st.sampled_from([0, 1]))
def test_apply_span_mask_matches_stepping(data, whole_word, replace_length):
    text = data.draw(st.text(alphabet="ab \n", min_size=1, max_size=L))
    ids = TOK.encode(text)
    n = len(ids)
    tokens = row(ids)
    ws = np.asarray(starts_jit(tokens, n, mask_whole_word=whole_word))
    candidates = [i for i in range(n) if ws[i]]
    starts = data.draw(st.lists(st.sampled_from(candidates), max_size=T_SPANS, unique=True))
    spans = [(s, data.draw(st.integers(1, 5)), data.draw(st.sampled_from([MASK, 100])))
             for s in starts]
    out, new_n = apply_jit(tokens, n, jnp.asarray(ws), *spans_arrays(spans),
                           replace_length=replace_length)
    assert content(out, new_n) == ref_apply(ids.tolist(), n, ws, spans, replace_length)


# ---------------------------------------------------------------------------------------------
# Whole-word masking end to end
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def masker(**kwargs):
    return jax.jit(functools.partial(whole_word_mask, **kwargs))


def mask_row(ids, seed, **kwargs):
    out, n = masker(**kwargs)(row(ids), len(ids), key(seed))
    budget = mask_insert_budget(L, mask_ratio=kwargs["mask_ratio"],
                                poisson_lambda=kwargs.get("poisson_lambda", 3.0),
                                max_mask_inserts=kwargs.get("max_mask_inserts"))
    assert out.shape == (L + budget,)
    return content(out, n)


byte_rows = st.lists(st.integers(BYTE_OFFSET, BYTE_OFFSET + 255), min_size=0, max_size=L)


@SETTINGS
@given(ids=byte_rows, seed=seeds)
def test_token_deletion_removes_without_masks(ids, seed):
    out = mask_row(ids, seed, mask_ratio=0.3, poisson_lambda=None, replace_length=0)
    assert MASK not in out
    assert len(out) == len(ids) - math.ceil(len(ids) * 3 / 10)
    assert is_subsequence(out, ids)


@SETTINGS
@given(ids=byte_rows, seed=seeds)
def test_text_infilling_keeps_order_and_budget(ids, seed):
    out = mask_row(ids, seed, mask_ratio=0.3, poisson_lambda=3.0)
    kept = [t for t in out if t != MASK]
    assert is_subsequence(kept, ids)
    num_to_mask = math.ceil(len(ids) * 3 / 10)
    removed = len(ids) - len(kept)
    assert removed <= num_to_mask          # overlaps and the row end can only shrink it
    assert (MASK in out) == (num_to_mask > 0)
    if num_to_mask == 0:
        assert out == ids
    assert not any(is_special(t) and t != MASK for t in out)


def test_text_infilling_masks_about_the_budget_on_average():
    ids = distinct_bytes(L)
    budget = math.ceil(L * 3 / 10)
    removed = [L - sum(t != MASK for t in mask_row(ids, s, mask_ratio=0.3)) for s in range(40)]
    # Overlaps merge spans and the row end cuts them, but most tokens of the budget go.
    assert budget * 0.6 < np.mean(removed) <= budget


@SETTINGS
@given(seed=seeds, n=st.integers(2, 20))
def test_zero_length_spans_insert_masks(seed, n):
    # ratio 1/20 of at most 20 tokens -> num_to_mask = 1: one span of one token, plus one
    # inserted MASK per zero-length draw before it (P(0) = e^-0.5 = 0.61 at lambda 0.5).
    ids = distinct_bytes(n)
    out = mask_row(ids, seed, mask_ratio=0.05, poisson_lambda=0.5)
    num_masks = out.count(MASK)
    assert num_masks >= 1
    assert len(out) == n - 1 + num_masks    # one token replaced, the other masks inserted
    kept = [t for t in out if t != MASK]
    assert len(kept) == n - 1 and is_subsequence(kept, ids)


def test_zero_length_span_lands_between_untouched_neighbours():
    n = 12
    ids = distinct_bytes(n)
    adjacent = {(ids[i], ids[i + 1]) for i in range(n - 1)}
    longer = between = 0
    for seed in range(30):
        out = mask_row(ids, seed, mask_ratio=0.05, poisson_lambda=0.5)
        longer += len(out) > n
        between += any(out[j] == MASK and (out[j - 1], out[j + 1]) in adjacent
                       for j in range(1, len(out) - 1))
    assert longer > 0 and between > 0


@SETTINGS
@given(seed=seeds)
def test_zero_length_span_budget_truncates_and_random_tokens_are_bytes(seed):
    # lambda = 0.3: P(0) = 0.74, so a row has many zero-length spans; at most one is kept.
    # random_ratio = 1: every span and inserted token is a random byte, never MASK.
    ids = distinct_bytes(L)
    out = mask_row(ids, seed, mask_ratio=0.3, poisson_lambda=0.3, max_mask_inserts=1,
                   random_ratio=1.0)
    assert len(out) <= L + 1
    assert MASK not in out and not any(is_special(t) for t in out)
    assert out != ids


def ref_words(ids):
    """Words as the module documents them: letter runs, and each whitespace byte alone."""
    words = []
    for t in ids:
        letter = not chr(t - BYTE_OFFSET).isspace()
        if letter and words and not chr(words[-1][-1] - BYTE_OFFSET).isspace():
            words[-1].append(t)
        else:
            words.append([t])
    return words


@SETTINGS
@given(text=st.text(alphabet="ab \n", min_size=1, max_size=L), seed=seeds)
def test_whole_word_masking_replaces_whole_words(text, seed):
    # Single-word spans at distinct word starts: each word is kept or becomes one MASK.
    ids = TOK.encode(text).tolist()
    out = mask_row(ids, seed, mask_ratio=0.5, poisson_lambda=None, mask_whole_word=True)
    words = ref_words(ids)
    pos = masked = 0
    for w in words:
        if out[pos] == MASK:
            pos, masked = pos + 1, masked + 1
        else:
            assert out[pos:pos + len(w)] == w
            pos += len(w)
    assert pos == len(out)
    assert masked == math.ceil(len(words) / 2)


# ---------------------------------------------------------------------------------------------
# Sentence permutation
# ---------------------------------------------------------------------------------------------

def ref_sentences(ids, boundary):
    """A sentence ends at the first boundary of a run of boundaries; the last one at the end."""
    sentences, current = [], []
    for i, t in enumerate(ids):
        current.append(t)
        first_of_run = t == boundary and (i == 0 or ids[i - 1] != boundary)
        if first_of_run and i < len(ids) - 1:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def is_concatenation(out, pieces):
    """True if ``out`` is the pieces concatenated in some order."""
    if not pieces:
        return not out
    tried = set()
    for k, p in enumerate(pieces):
        if tuple(p) in tried:
            continue
        tried.add(tuple(p))
        if out[:len(p)] == p and is_concatenation(out[len(p):], pieces[:k] + pieces[k + 1:]):
            return True
    return False


def test_ref_sentences_by_hand():
    split = [TOK.decode(s) for s in ref_sentences(TOK.encode("a\n\nb\nc").tolist(), NEWLINE)]
    assert split == ["a\n", "\nb\n", "c"]


@functools.lru_cache(maxsize=None)
def permuter(ratio):
    return jax.jit(functools.partial(sentence_permutation, ratio=ratio))


sentence_text = st.text(alphabet="ab\n", min_size=0, max_size=L)


@SETTINGS
@given(text=sentence_text, seed=seeds)
def test_sentence_permutation_is_a_permutation_of_sentences(text, seed):
    ids = TOK.encode(text).tolist()
    out = content(permuter(1.0)(row(ids), len(ids), key(seed)), len(ids))
    assert is_concatenation(out, ref_sentences(ids, NEWLINE))


def test_sentence_permutation_changes_order():
    ids = TOK.encode("one\ntwo\nthree\nfour\n").tolist()
    outs = {tuple(content(permuter(1.0)(row(ids), len(ids), key(s)), len(ids)))
            for s in range(10)}
    assert len(outs) > 1


DOT = BYTE_OFFSET + ord(".")
permute_half_dots = jax.jit(functools.partial(sentence_permutation, ratio=0.5, boundary=DOT))
distinct_lines = st.lists(st.text(alphabet="ab", min_size=1, max_size=3), unique=True,
                          min_size=1, max_size=8)


@SETTINGS
@given(lines=distinct_lines, seed=seeds)
def test_partial_sentence_permutation_moves_at_most_ceil_ratio(lines, seed):
    # Distinct sentences, each ending with one '.': the output splits back unambiguously.
    ids = TOK.encode("".join(line + "." for line in lines)).tolist()[:L]
    out = content(permute_half_dots(row(ids), len(ids), key(seed)), len(ids))
    sentences = ref_sentences(ids, DOT)
    shuffled = ref_sentences(out, DOT)
    assert sorted(shuffled) == sorted(sentences)
    moved = sum(a != b for a, b in zip(shuffled, sentences))
    assert moved <= math.ceil(len(sentences) / 2)


def test_sentence_permutation_boundary_is_a_parameter():
    # Three sentences "ab.", "cd.", "ef" (the last needs no boundary); ceil(3 * 0.5) = 2 of
    # them are permuted: the identity or one swap.
    ids = TOK.encode("ab.cd.ef").tolist()
    outs = {TOK.decode(content(permute_half_dots(row(ids), len(ids), key(s)), len(ids)))
            for s in range(16)}
    assert outs <= {"ab.cd.ef", "cd.ab.ef", "efcd.ab.", "ab.efcd."}
    assert len(outs) > 2


# ---------------------------------------------------------------------------------------------
# Insertion noise and rotation
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def inserter(**kwargs):
    return jax.jit(functools.partial(insertion_noise, **kwargs))


@SETTINGS
@given(ids=byte_rows, seed=seeds)
def test_insertion_noise_inserts_ceil_ratio_tokens(ids, seed):
    fn = inserter(insert_ratio=0.25, random_ratio=0.5)
    out, n = fn(row(ids), len(ids), key(seed))
    assert out.shape == (L + L // 4,)
    out = content(out, n)
    added = math.ceil(len(ids) / 4)
    assert len(out) == len(ids) + added
    assert out.count(MASK) == added - math.ceil(added / 2)   # the rest are random bytes
    assert not any(is_special(t) and t != MASK for t in out)
    assert is_subsequence(ids, out)


def test_insert_tokens_caps_the_count():
    ids = distinct_bytes(5)
    out, n = jax.jit(functools.partial(insert_tokens, max_count=2))(row(ids, 8), 5, key(0), 4)
    assert out.shape == (10,) and int(n) == 7
    assert [t for t in content(out, n) if t != MASK] == ids


ROWS = 64
rotate_rows = jax.jit(jax.vmap(functools.partial(document_rotation, rotate_ratio=0.5),
                               in_axes=(None, None, 0)))


@SETTINGS
@given(n=st.integers(0, L), seed=seeds)
def test_rotation_is_identity_or_a_nontrivial_cyclic_shift(n, seed):
    ids = distinct_bytes(n)
    outs = np.asarray(rotate_rows(row(ids), n, jax.random.split(key(seed), ROWS)))
    for out in outs:
        out = content(out, n)
        if out != ids:
            shifts = [s for s in range(1, n) if out == ids[s:] + ids[:s]]
            assert len(shifts) == 1


def test_rotation_probability():
    ids = distinct_bytes(10)
    out = np.asarray(rotate_rows(row(ids), 10, jax.random.split(key(0), ROWS)))
    rotated = (out[:, :10] != np.asarray(ids)).any(axis=1).mean()
    assert abs(rotated - 0.5) < 4 * math.sqrt(0.25 / ROWS)
    # Offsets are uniform over 1..n-1: with n = 4, about 32 rotated rows show all three
    # (each missing with probability (2/3)^32 ~ 2e-6).
    ids = distinct_bytes(4)
    out = np.asarray(rotate_rows(row(ids), 4, jax.random.split(key(1), ROWS)))
    shifts = {int(np.argmax(np.asarray(ids) == r[0])) for r in out}
    assert shifts == {0, 1, 2, 3}   # 0: rows not rotated


# ---------------------------------------------------------------------------------------------
# The composed batch function
# ---------------------------------------------------------------------------------------------

B = 4
ALL = dict(mask_ratio=0.3, poisson_lambda=3.0, random_ratio=0.1, permute_sentences=1.0,
           insert_ratio=0.1, rotate_ratio=0.5)
N_ALL = bart_output_length(L, mask_ratio=0.3, poisson_lambda=3.0, insert_ratio=0.1)
TRACES = []   # one entry per trace of the composed function


def _count_traces(tokens, rng):
    TRACES.append(1)
    return bart_noise(tokens, rng, **ALL)


noise_all = jax.jit(_count_traces)



def batch(texts):
    return jnp.stack([row(TOK.encode(t).tolist()) for t in texts])


batch_texts = st.lists(st.text(alphabet="ab \n", max_size=L), min_size=B, max_size=B)


@SETTINGS
@given(texts=batch_texts, seed=seeds)
def test_bart_noise_layout(texts, seed):
    tokens = batch(texts)
    inputs, lengths = noise_all(tokens, key(seed))
    assert inputs.shape == (B, N_ALL) and inputs.dtype == jnp.int32
    assert lengths.shape == (B,)
    for out, n, text in zip(np.asarray(inputs), np.asarray(lengths), texts):
        body = content(out, n)                      # PAD only after the content
        assert PAD not in body
        assert all(t == MASK or not is_special(t) for t in body)
        assert (n > 0) == (len(text) > 0)


def test_bart_noise_same_key_same_output_different_key_different():
    tokens = batch(["def f(x):\n    return x\n", "class A:\n    pass\n", "a b c d e f g\n",
                    "import os\nimport sys\n"])
    a = noise_all(tokens, key(7))
    b = noise_all(tokens, key(7))
    c = noise_all(tokens, key(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    rows = np.asarray(a[0])
    assert not all(np.array_equal(rows[0], r) for r in rows[1:])   # rows get their own keys


def test_bart_noise_composes_in_fairseq_order():
    """Row b uses split(rng, B)[b], split in 4: permute -> mask -> insert -> rotate."""
    texts = ["x = 1\ny = 2\nz = x + y\nprint(z)\n", "a\nb\n", "", "q"]
    got, got_n = noise_all(batch(texts), key(5))

    @jax.jit
    def by_hand(tokens, n, rng):
        k_perm, k_mask, k_ins, k_rot = jax.random.split(rng, 4)
        t = sentence_permutation(tokens, n, k_perm, ratio=1.0)
        t, m = whole_word_mask(t, n, k_mask, mask_ratio=0.3, poisson_lambda=3.0,
                               random_ratio=0.1)
        t, m = insertion_noise(t, m, k_ins, insert_ratio=0.1, random_ratio=0.1)
        return document_rotation(t, m, k_rot, rotate_ratio=0.5), m

    ids = TOK.encode(texts[0]).tolist()
    want, want_n = by_hand(row(ids), len(ids), jax.random.split(key(5), B)[0])
    np.testing.assert_array_equal(got[0], want)
    assert int(got_n[0]) == int(want_n)


def test_bart_noise_does_not_retrace():
    jax.block_until_ready(noise_all(batch(["a\nb\n"] * B), key(0)))
    before = len(TRACES)
    jax.block_until_ready(noise_all(batch(["xyz", "", "q\n", "hello world\n"]), key(1)))
    assert len(TRACES) == before == 1
