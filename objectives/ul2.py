"""UL2's mixture of denoisers (Tay et al., 2022, "UL2: Unifying Language Learning Paradigms").

Seven denoisers, one sampled per example inside jit:

    R (mean span 3, rate 0.15)   R (8, 0.15)                        regular span corruption
    X (3, 0.5)   X (8, 0.5)   X (64, 0.15)   X (64, 0.5)            extreme span corruption
    S                                                               prefix LM

R and X are T5 span corruption (:mod:`objectives.span_corruption`: same counts, masks, sentinels
and EOS) with the paradigm's mode token (``MODE_TOKENS``: [R] 4, [X] 5, [S] 6) put in front of
the inputs. S splits the row into ``inputs = [S] + prefix + EOS`` and ``targets = rest + EOS``
without sentinels; the prefix length is uniform in ``[1, n - 1]`` for a row of ``n >= 2``
tokens, as in T5's ``random_prefix_noise_mask`` (``prefix_lm``), so on average half the row is
predicted (the paper writes S as one span, "mu = L/4, r = 0.25"; we follow the released T5
prefix-LM code). Default mixture: R 0.4, X 0.4, S 0.2, each paradigm's mass split equally among
its denoisers.

Shapes are static: every denoiser writes into the same PAD-filled buffers, sized by
:func:`ul2_lengths` to the longest output any denoiser can give for a full row (for rows of
``L >= 10`` tokens: inputs ``L + 1`` from S, targets ``L`` from S). Raw rows lose their trailing
PADs first, exactly as in :func:`objectives.span_corruption.span_corrupt`.

Randomness: one ``jax.random.bits`` draw per batch; the denoiser is drawn on a 2**-24 grid of
the mixture (a zero rate is never drawn), the S prefix by a modulo (bias below n / 2**32).
Sentinels: X (3, 0.5) puts about L / 6 spans in a row, so the byte tokenizer's 100 sentinels
allow rows of up to 602 tokens while that denoiser has a positive rate (longer rows raise).
"""
from __future__ import annotations

import dataclasses
import types
from typing import ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from objectives.span_corruption import (_compact, _device_counts, _span_keep_values,
                                        _spans_mask, check_num_sentinels, corrupted_lengths,
                                        noise_counts, unpadded_lengths)
from objectives.text_base import Seq2SeqObjective
from zoo.text import MODE_TOKENS, NUM_SENTINELS, VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: its paradigm ("R", "X" or "S") and, for span corruption, the mean
    noise span length and the noise density (None for the prefix-LM S denoiser)."""

    paradigm: str
    mean_noise_span_length: float | None = None
    noise_density: float | None = None

    @property
    def mode_token(self) -> int:
        return MODE_TOKENS[self.paradigm]

    @property
    def is_prefix_lm(self) -> bool:
        return self.mean_noise_span_length is None


DENOISERS = (
    Denoiser("R", 3.0, 0.15),
    Denoiser("R", 8.0, 0.15),
    Denoiser("X", 3.0, 0.5),
    Denoiser("X", 8.0, 0.5),
    Denoiser("X", 64.0, 0.15),
    Denoiser("X", 64.0, 0.5),
    Denoiser("S"),
)
S_INDEX = next(i for i, d in enumerate(DENOISERS) if d.is_prefix_lm)
DEFAULT_RATES = types.MappingProxyType({"R": 0.4, "X": 0.4, "S": 0.2})


def denoiser_probabilities(rates: Mapping[str, float] | Sequence[float] = DEFAULT_RATES):
    """Per-denoiser sampling probabilities (a tuple aligned with :data:`DENOISERS`).

    Args:
      rates: either per-paradigm weights ``{"R": .., "X": .., "S": ..}`` (a missing paradigm
        gets 0; each paradigm's weight is split equally among its denoisers) or one weight per
        denoiser. Weights are normalised to sum to 1.
    """
    if isinstance(rates, Mapping):
        unknown = set(rates) - set(MODE_TOKENS)
        if unknown:
            raise ValueError(f"ul2 rates: unknown paradigms {sorted(unknown)}; known: "
                             f"{sorted(MODE_TOKENS)}")
        sizes = {p: sum(d.paradigm == p for d in DENOISERS) for p in MODE_TOKENS}
        weights = [float(rates.get(d.paradigm, 0.0)) / sizes[d.paradigm] for d in DENOISERS]
    else:
        weights = [float(w) for w in rates]
        if len(weights) != len(DENOISERS):
            raise ValueError(f"ul2 rates: {len(weights)} weights for {len(DENOISERS)} "
                             "denoisers")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"ul2 rates: weights must be >= 0 with a positive sum, got {rates}")
    total = sum(weights)
    return tuple(w / total for w in weights)


def ul2_lengths(length: int):
    """``(inputs_length, targets_length)``: the longest inputs (mode token and EOS included)
    and targets (EOS included) that any denoiser gives for a row of ``length >= 2`` tokens.

    Span denoisers: ``1 + corrupted_lengths(length, ...)``'s inputs, its targets. S: a prefix
    of at most ``length - 1`` tokens, so ``length + 1`` inputs and ``length`` targets. Every
    count is non-decreasing in the row length, so shorter (padded) rows fit too.
    """
    if length < 2:
        raise ValueError(f"ul2: rows need at least 2 tokens, got {length}")
    inputs_length, targets_length = length + 1, length          # S
    for d in DENOISERS:
        if not d.is_prefix_lm:
            i, t = corrupted_lengths(length, d.noise_density, d.mean_noise_span_length)
            inputs_length, targets_length = max(inputs_length, 1 + i), max(targets_length, t)
    return inputs_length, targets_length


def ul2_corrupt(tokens: jax.Array, rng: jax.Array, *,
                rates: Mapping[str, float] | Sequence[float] = DEFAULT_RATES,
                vocab_size: int = VOCAB_SIZE, inputs_length: int | None = None,
                targets_length: int | None = None,
                num_sentinels: int | None = NUM_SENTINELS):
    """UL2 mixture-of-denoisers corruption of a batch (jittable, static shapes).

    Args:
      tokens: ``int [B, L]`` raw rows, ``L >= 2``; trailing PADs are not part of a row.
      rng: a jax key.
      rates: mixture weights, see :func:`denoiser_probabilities` (Python values: static).
      vocab_size: sentinels are ``vocab_size - 1, vocab_size - 2, ...``.
      inputs_length, targets_length: static buffer sizes, default :func:`ul2_lengths` ``(L)``;
        smaller ones raise ``ValueError``, larger ones are PAD-filled.
      num_sentinels: sentinel ids available; a denoiser that can need more raises
        ``ValueError`` (None: no check).

    Returns:
      ``(inputs int32 [B, I], targets int32 [B, T], denoiser_index int32 [B])``: inputs start
      with the sampled denoiser's mode token; both end with EOS, then PAD. ``denoiser_index``
      indexes :data:`DENOISERS`.
    """
    batch, length = tokens.shape
    need_inputs, need_targets = ul2_lengths(length)
    inputs_length = need_inputs if inputs_length is None else inputs_length
    targets_length = need_targets if targets_length is None else targets_length
    if inputs_length < need_inputs or targets_length < need_targets:
        raise ValueError(f"ul2_corrupt: rows of {length} tokens need inputs_length >= "
                         f"{need_inputs} and targets_length >= {need_targets}, got "
                         f"{inputs_length} and {targets_length}")
    probabilities = denoiser_probabilities(rates)
    for d, p in zip(DENOISERS, probabilities):
        if p > 0 and not d.is_prefix_lm:
            check_num_sentinels(noise_counts(length, d.noise_density,
                                             d.mean_noise_span_length)[1],
                                num_sentinels, f"ul2_corrupt ({d})")

    # Per-denoiser tables, gathered by the sampled index (S's span entries are unused).
    densities = jnp.asarray([d.noise_density or 0.5 for d in DENOISERS], jnp.float32)
    means = jnp.asarray([d.mean_noise_span_length or 1.0 for d in DENOISERS], jnp.float32)
    modes = jnp.asarray([d.mode_token for d in DENOISERS], jnp.int32)

    # Sampling thresholds on a 24-bit grid: denoiser k owns [edges[k], edges[k + 1]), so a
    # zero rate gives an empty interval and is never drawn.
    edges = np.round(np.cumsum((0.0,) + probabilities) * 2**24).astype(np.int64)
    edges[-1] = 2**24
    edges = jnp.asarray(edges[1:-1], jnp.uint32)

    tokens = jnp.asarray(tokens).astype(jnp.int32)
    size = max(length, 2)
    position = jnp.arange(length)
    # One draw of random bits for the whole batch (one threefry call, cheap to compile): per row,
    # bits[:, :2] drive the span mask, bits[:, 2, 0] the denoiser and bits[:, 2, 1] the prefix.
    bits = jax.random.bits(rng, (batch, 3, size), jnp.uint32)
    index = (bits[:, 2, 0, None] >> 8 >= edges).sum(axis=-1).astype(jnp.int32)

    def corrupt_row(row, row_bits, n, k):
        valid = position < n
        # Span corruption with the sampled denoiser's counts.
        num_noise, num_spans = _device_counts(n, densities[k], means[k])
        noise = _spans_mask(row_bits[:2], n, num_noise, num_spans)[:length]
        in_keep, in_values = _span_keep_values(row, noise, valid, vocab_size)
        tg_keep, tg_values = _span_keep_values(row, ~noise, valid, vocab_size)
        # Prefix LM: prefix length uniform in [1, n - 1] (0 when n < 2, as in T5); the modulo
        # bias is below n / 2**32.
        low = jnp.clip(n - 1, 0, 1)
        span = jnp.maximum(n - low, 1).astype(jnp.uint32)
        prefix = low + (row_bits[2, 1] % span).astype(jnp.int32)
        is_s = k == S_INDEX
        in_keep = jnp.where(is_s, position < prefix, in_keep)
        tg_keep = jnp.where(is_s, valid & (position >= prefix), tg_keep)
        in_values = jnp.where(is_s, row, in_values)
        tg_values = jnp.where(is_s, row, tg_values)
        inputs = jnp.concatenate([modes[k][None],
                                  _compact(in_values, in_keep, inputs_length - 1, eos=True)])
        targets = _compact(tg_values, tg_keep, targets_length, eos=True)
        return inputs, targets

    inputs, targets = jax.vmap(corrupt_row)(tokens, bits, unpadded_lengths(tokens), index)
    return inputs, targets, index


# ---------------------------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class UL2(Seq2SeqObjective):
    """UL2's mixture of denoisers on an encoder-decoder; one denoiser sampled per example.

    ``rates`` = mixture weights of the (R, X, S) paradigms, split equally among a paradigm's
    denoisers (or 7 per-denoiser weights in ``DENOISERS`` order). Reported metrics add the
    token accuracy of each paradigm."""

    name: ClassVar[str] = "ul2"
    reference: ClassVar[str] = ("UL2 (Tay et al. 2022): Unifying Language Learning Paradigms, "
                                "mixture of denoisers")
    rates: tuple = (DEFAULT_RATES["R"], DEFAULT_RATES["X"], DEFAULT_RATES["S"])

    def mixture(self):
        rates = tuple(float(r) for r in self.rates)
        return dict(zip("RXS", rates)) if len(rates) == 3 else rates

    def validate(self, *, seq_len: int) -> None:
        if len(self.rates) not in (3, len(DENOISERS)):
            raise ValueError(f"objective.rates: give 3 (R, X, S) or {len(DENOISERS)} weights, "
                             f"got {self.rates!r}")
        try:
            denoiser_probabilities(self.mixture())
        except ValueError as error:
            raise ValueError(f"objective.rates: {error}") from None
        super().validate(seq_len=seq_len)

    def model_lengths(self, seq_len: int) -> dict[str, int]:
        inputs, targets = ul2_lengths(seq_len)
        return {"encoder": inputs, "decoder": targets}

    def corrupt(self, tokens, rng):
        inputs, targets, _ = ul2_corrupt(tokens, rng, rates=self.mixture(),
                                         vocab_size=self.vocab_size)
        return inputs, targets
