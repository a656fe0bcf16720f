"""What the token-sequence objectives share: the data they read, the backbone they train, and
the token-level loss.

A text batch is ``{"tokens": int32 [B, seq_len]}`` of packed rows (documents joined with EOS,
padding = ``PAD``). Each objective names the backbone it trains (``architecture``: "encoder",
"decoder" or "encdec") and the sequence lengths that backbone sees (``model_lengths``), from
which the trainer sizes the position table and counts FLOPs.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from objectives.base import Objective
from zoo.models.text import shift_right, text_forward_flops
from zoo.text import BOS, PAD, VOCAB_SIZE


def token_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted token cross-entropy over the WHOLE batch, in float32.

    ``loss = sum(weights * CE) / sum(weights)``, i.e. every target token of the batch counts the
    same (long rows count more than short ones; not a mean of per-example means), as in T5 and
    BERT's ``get_masked_lm_output``. A batch without targets gives loss 0 and accuracy 0 (no NaN,
    zero gradients).

    Args:
      logits: [..., V], any float dtype (bf16 is upcast before the softmax).
      labels: int [...].
      weights: [...], 0 where there is no target.

    Returns:
      ``(loss, {"accuracy": weighted token accuracy, "tokens": sum of weights})``, float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # A one-hot product, not take_along_axis: its gradient is elementwise, where the gather's
    # is a scatter into a [V, tokens] buffer plus a copy (~0.1 s per BERT-base step on CPU).
    one_hot = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    label_logit = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
    total = weights.sum()
    safe_total = jnp.where(total > 0, total, 1.0)
    loss = jnp.where(total > 0, ((log_z - label_logit) * weights).sum() / safe_total, 0.0)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    accuracy = jnp.where(total > 0, (correct * weights).sum() / safe_total, 0.0)
    return loss, {"accuracy": accuracy, "tokens": total}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextObjective(Objective):
    """An objective over packed token rows. ``vocab_size`` comes from the tokenizer, and so does
    ``token_flags``: a per-id table of ``zoo.text.tokenizer`` flags (starts/ends with
    whitespace, holds a newline) for options that find words or lines (whole-word masking,
    BART's sentence permutation). ``None`` means the byte tokenizer's, read off the byte ids;
    ``zoo.train.attach_tokenizer`` sets a subword tokenizer's."""

    modality: ClassVar[str] = "text"
    suite: ClassVar[str | None] = "text"
    architecture: ClassVar[str] = "encoder"   # "encoder" | "decoder" | "encdec"
    vocab_size: int = VOCAB_SIZE
    subword: bool = False         # ids are a subword tokenizer's pieces (data.tokenizer "bpe:N")
    token_flags: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)

    def flags_of(self, tokens: jax.Array, *, field: str) -> jax.Array | None:
        """uint8 flags of ``tokens`` from ``token_flags``; None for byte ids without a table
        (the byte functions read whitespace and newlines off the ids themselves). ``field``
        names the option that needs them, for the error when neither applies."""
        if self.token_flags is not None:
            return jnp.asarray(self.token_flags, jnp.uint8)[tokens]
        if not self.subword and self.vocab_size == VOCAB_SIZE:
            return None
        kind = "subword" if self.subword else f"{self.vocab_size}-id"
        raise ValueError(f"objective.{field}: finds words or lines by whitespace, but these "
                         f"{kind} ids come without token flags; a subword run gets its "
                         "tokenizer's from zoo.train.attach_tokenizer")

    def with_placeholder_flags(self) -> "TextObjective":
        """Self, with an all-zero flag table if it is a subword objective without its table
        yet (to trace shapes before the run's tokenizer exists)."""
        if self.subword and self.token_flags is None:
            return dataclasses.replace(self, token_flags=(0,) * self.vocab_size)
        return self

    def validate(self, *, seq_len: int) -> None:
        """Subclasses check their fields first, then call this: it traces ``prepare`` on an
        abstract row (no compilation), so any shape or count problem of the corruption
        surfaces here as a one-line error, before anything compiles."""
        if seq_len < 4:
            raise ValueError(f"data.seq_len: {seq_len} is too short; use at least 4")
        row = {"tokens": jax.ShapeDtypeStruct((1, seq_len), jnp.int32)}
        prepare = self.with_placeholder_flags().prepare   # shapes only: any table will do
        try:
            jax.eval_shape(prepare, row, jax.random.key_data(jax.random.PRNGKey(0)))
        except ValueError as error:
            raise ValueError(f"objective {self.name!r} with data.seq_len={seq_len}: "
                             f"{error}") from None

    def model_lengths(self, seq_len: int) -> dict[str, int]:
        """Tokens each stack sees per example: ``{"encoder": n}`` or ``{"encoder": n,
        "decoder": m}`` (a decoder-only model's stack is called "encoder" here too)."""
        return {"encoder": seq_len}

    def max_len(self, seq_len: int) -> int:
        return max(self.model_lengths(seq_len).values())

    def forward_flops(self, model, *, seq_len: int) -> float | None:
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Seq2SeqObjective(TextObjective):
    """A denoiser on a T5-style encoder-decoder: ``corrupt`` gives (encoder inputs, targets),
    both padded with PAD; the decoder is teacher-forced on the targets shifted right behind
    BOS; the loss covers every non-pad target token, normalised over the whole batch."""

    architecture: ClassVar[str] = "encdec"

    def corrupt(self, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def prepare(self, batch, rng):
        inputs, targets = self.corrupt(batch["tokens"], rng)
        return (inputs, shift_right(targets, BOS)), targets

    def apply(self, model, inputs):
        encoder_inputs, decoder_inputs = inputs
        return model.encoder.logits(model.encoder(encoder_inputs, decoder_inputs))

    def loss(self, outputs, targets):
        return token_cross_entropy(outputs, targets, targets != PAD)

    def forward_flops(self, model, *, seq_len: int) -> float:
        lengths = self.model_lengths(seq_len)
        return text_forward_flops(model.encoder, lengths, logits_positions=lengths["decoder"])
