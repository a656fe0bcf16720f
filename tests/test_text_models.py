"""Tests for the token models: encoder, causal / prefix-LM decoder and T5-style encoder-decoder.

Attention patterns are checked by perturbation: change one input token and see which output
positions move. The expected visibility patterns, FLOP counts and pooled features are written
out here from their definitions, not taken from the code under test.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.models
from zoo.flops import compiled_flops
from zoo.models import cpu_kernel
from zoo.models.text import shift_right, text_forward_flops
from zoo.text import PAD

VOCAB = 50
MAX_LEN = 12
L = 8
CHANGED = 1e-4      # an output that depends on a changed token moves by more than this
SAME = 1e-5         # an output that does not depend on it moves by less than this


def _model(name, **kw):
    kw = {"vocab_size": VOCAB, "max_len": MAX_LEN, "size": "test", "rngs": nnx.Rngs(0), **kw}
    return zoo.models.get(name, **kw)


@pytest.fixture(scope="module")
def encoder():
    return _model("encoder")


@pytest.fixture(scope="module")
def decoder():
    return _model("decoder")


@pytest.fixture(scope="module")
def encdec():
    return _model("encdec", decoder_depth=1)


def _tokens(length=L, seed=0, batch=None):
    shape = (length,) if batch is None else (batch, length)
    return np.random.default_rng(seed).integers(1, VOCAB, shape).astype(np.int32)  # no PAD


def _replace(token):
    """A different non-pad token."""
    out = (token + 7) % (VOCAB - 1) + 1
    assert out != token and out != PAD
    return out


def _variants(x):
    """[L + 1, L]: row 0 is ``x``; row j + 1 is ``x`` with token j replaced."""
    rows = [x.copy()]
    for j in range(len(x)):
        row = x.copy()
        row[j] = _replace(row[j])
        rows.append(row)
    return np.stack(rows)


def _dependency(hidden):
    """hidden [L + 1, L, W] from ``_variants`` -> diff[i, j]: how much output i moved when
    input token j changed."""
    hidden = np.asarray(hidden, np.float64)
    return np.abs(hidden[1:] - hidden[:1]).max(-1).T        # [query i, changed key j]


def _check_pattern(diff, allowed, what):
    """Output i must move when a token it may see changes, and stay put otherwise."""
    allowed = np.asarray(allowed, bool)
    leaked = np.argwhere(~allowed & (diff > SAME))
    assert leaked.size == 0, (f"{what}: output position i changed when token j changed although "
                              f"i must not see j; (i, j) = {leaked.tolist()}")
    blind = np.argwhere(allowed & (diff < CHANGED))
    assert blind.size == 0, (f"{what}: output position i ignored a token j it should see; "
                             f"(i, j) = {blind.tolist()}")


def _prefix_lm_pattern(prefix, length=L):
    """Query i sees key j iff both lie in the prefix (bidirectional there) or j <= i."""
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    return ((i < prefix) & (j < prefix)) | (j <= i)


# ---------------------------------------------------------------------------------------------
# Attention patterns: causal decoder, prefix LM, bidirectional encoder
# ---------------------------------------------------------------------------------------------

def test_decoder_attention_patterns_causal_and_prefix_lm(decoder, encoder):
    x = _tokens(seed=1)
    rows = _variants(x)                                   # [L + 1, L]
    prefixes = [0, 3, 5, L]                               # per-example prefix lengths, one batch
    batch = np.concatenate([rows] * len(prefixes))
    prefix_len = np.repeat(np.asarray(prefixes, np.int32), len(rows))

    @nnx.jit
    def run(decoder, encoder, tokens, prefix_len, plain):
        return decoder(tokens, prefix_len=prefix_len), decoder(plain), encoder(plain)
    prefixed, causal, bidir = run(decoder, encoder, batch, prefix_len, rows)
    prefixed = np.asarray(prefixed).reshape(len(prefixes), len(rows), L, -1)

    # Plain causal decoder: position i is unchanged by tokens after i, changed by tokens <= i.
    _check_pattern(_dependency(causal), np.tril(np.ones((L, L), bool)), "causal decoder")
    # Encoder: fully bidirectional (the last token changes the first position).
    _check_pattern(_dependency(bidir), np.ones((L, L), bool), "encoder")

    for k, prefix in enumerate(prefixes):
        diff = _dependency(prefixed[k])
        _check_pattern(diff, _prefix_lm_pattern(prefix), f"prefix LM with prefix_len={prefix}")
        if 0 < prefix < L:
            assert diff[0, prefix - 1] > CHANGED, "first position must see the last prefix token"
            assert diff[prefix - 1, prefix] < SAME, "prefix positions must not see past the prefix"
            assert diff[prefix, prefix + 1] < SAME, "after the prefix attention is causal"
            assert diff[L - 1, 0] > CHANGED, "positions after the prefix see the prefix"
    # prefix_len=0 is the causal decoder; prefix_len=L is full bidirectional attention with the
    # same parameters (encoder and decoder were built from the same seed and sizes).
    np.testing.assert_allclose(prefixed[0], causal, atol=1e-5)
    np.testing.assert_allclose(prefixed[-1], bidir, atol=1e-5)


def test_prefix_len_rejected_by_encoder(encoder):
    with pytest.raises(ValueError, match="prefix_len"):
        encoder(jnp.asarray(_tokens(batch=1)), prefix_len=jnp.array([2]))


# ---------------------------------------------------------------------------------------------
# Encoder padding and features
# ---------------------------------------------------------------------------------------------

def test_encoder_ignores_pad_keys_and_pools_non_pad_only(encoder):
    n = 5
    x = _tokens(n, seed=2)
    # Row 0: x padded to max_len (7 PADs). Rows 1-3: different pad counts, one without padding
    # and one with a single real token, for features.
    batch = _tokens(MAX_LEN, seed=3, batch=4)
    batch[0, :n], batch[0, n:] = x, PAD
    batch[1, 5:] = PAD
    batch[3, 1:] = PAD

    @nnx.jit
    def run(encoder, short, batch):
        return encoder(short), encoder(batch), encoder.features(short), encoder.features(batch)
    h5, h, f5, f = map(np.asarray, run(encoder, x[None], batch))

    # Learned position embeddings depend only on the position: the non-pad positions see the
    # same tokens at the same positions whatever the padded length, so they must be identical
    # to those of the unpadded sequence.
    np.testing.assert_allclose(h[0, :n], h5[0], atol=1e-5,
                               err_msg="pad keys leak into the non-pad positions")
    np.testing.assert_allclose(f[0], h5[0].mean(0), atol=1e-5, err_msg="features must ignore pads")
    np.testing.assert_allclose(f5[0], h5[0].mean(0), atol=1e-5)

    valid = batch != PAD
    manual = np.stack([h[b][valid[b]].mean(0) for b in range(len(batch))])
    assert f.shape == (4, encoder.width) and f.dtype == np.float32
    np.testing.assert_allclose(f, manual, atol=1e-5)
    np.testing.assert_allclose(f[3], h[3, 0], atol=1e-5)      # one real token: its own state
    # Row 2 has no padding: features is the plain mean; a padded row's differs from it.
    np.testing.assert_allclose(f[2], h[2].mean(0), atol=1e-5)
    assert np.abs(f[1] - h[1].mean(0)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Encoder-decoder
# ---------------------------------------------------------------------------------------------

def test_encdec_causal_decoder_cross_attention_and_encoder_padding(encdec):
    assert len(encdec.decoder_blocks) == 1 and len(encdec.encoder.blocks) == 2
    n_in, n_pad = 6, 4
    inputs = np.concatenate([_tokens(n_in, seed=4), np.zeros(n_pad, np.int32)])  # 4 PADs
    targets = _tokens(L, seed=5)
    dec_rows = _variants(targets)                            # rows 0..L: decoder perturbations
    changed = inputs.copy()                                  # row L+1: last real input changed
    changed[n_in - 1] = _replace(changed[n_in - 1])
    filled = inputs.copy()                                   # row L+2: real tokens, not PADs
    filled[n_in:] = _tokens(n_pad, seed=6)
    enc_rows = np.stack([inputs] * len(dec_rows) + [changed, filled, inputs, inputs])
    dec_rows = np.concatenate([dec_rows] + [targets[None]] * 4)
    # Rows L+3 and L+4: the encoder output at the PAD positions replaced by noise.
    noise = np.random.default_rng(7).standard_normal((2, n_pad, encdec.width)) * 3
    noise = jnp.asarray(noise, jnp.float32)

    @nnx.jit
    def run(encdec, enc, dec, noise):
        memory = encdec.encode(enc)
        memory = memory.at[-2:, n_in:].set(noise)
        return encdec.decode(dec, memory, enc)
    out = np.asarray(run(encdec, enc_rows, dec_rows, noise))

    base = out[0]
    _check_pattern(_dependency(out[:L + 1]), np.tril(np.ones((L, L), bool)), "encdec decoder")
    moved = np.abs(out[L + 1] - base).max(-1)
    assert np.all(moved > CHANGED), f"decoder positions ignore the encoder input: {moved}"
    # Sanity: real tokens where the PADs were do change the output ...
    assert np.all(np.abs(out[L + 2] - base).max(-1) > CHANGED)
    # ... but whatever the encoder puts at PAD positions is never attended to.
    for row in (L + 3, L + 4):
        np.testing.assert_allclose(out[row], base, atol=1e-5,
                                   err_msg="cross-attention attends to encoder pad positions")


def test_shift_right_puts_start_first_and_drops_last():
    targets = jnp.asarray([[5, 6, 7, 8], [9, 10, 0, 0]], jnp.int32)
    out = np.asarray(shift_right(targets, 2))
    np.testing.assert_array_equal(out, [[2, 5, 6, 7], [2, 9, 10, 0]])
    assert out.dtype == np.int32
    one = shift_right(jnp.asarray([11, 12, 13], jnp.int32), 1)    # unbatched
    np.testing.assert_array_equal(np.asarray(one), [1, 11, 12])


# ---------------------------------------------------------------------------------------------
# Tied output, parameter metadata, length limit
# ---------------------------------------------------------------------------------------------

def test_logits_are_tied_to_the_token_table(encoder, decoder, encdec):
    h = jax.random.normal(jax.random.key(0), (2, 3, 32))
    for model in (encoder, decoder, encdec):
        table = np.asarray(model.embedding.table[...], np.float64)
        assert table.shape == (VOCAB, 32)
        logits = model.logits(h)
        assert logits.shape == (2, 3, VOCAB) and logits.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(logits), np.asarray(h, np.float64) @ table.T,
                                   atol=1e-5)
    # The encoder-decoder has exactly one token table, shared by both stacks and the output.
    names = ["/".join(map(str, path)) for path, _ in _params(encdec)]
    assert [n for n in names if n.endswith("table")] == ["encoder/embedding/table"], names


def _params(module):
    return list(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def _axes(module):
    out = {}
    for path, p in _params(module):
        axes = p.get_metadata().get("out_sharding")
        name = "/".join(map(str, path))
        assert isinstance(axes, tuple), (name, axes)
        assert len(axes) == p.ndim, (name, axes, p.shape)
        assert all(a is None or isinstance(a, str) for a in axes), (name, axes)
        assert p.dtype == jnp.float32, name
        out[name] = axes
    assert out
    return out


def test_params_carry_logical_axes(encoder, decoder, encdec):
    for model, prefix in ((encoder, ""), (decoder, ""), (encdec, "encoder/")):
        axes = _axes(model)
        assert axes[prefix + "embedding/table"] == ("vocab", "embed")
        assert axes[prefix + "embedding/posemb"] == (None, "embed")
        block = prefix + "blocks/0/"
        assert set(axes[block + "attn/qkv/kernel"]) == {"embed", "heads"}
        assert axes[block + "mlp/fc1/kernel"] == ("embed", "mlp")
        assert axes[block + "mlp/fc2/kernel"] == ("mlp", "embed")
    axes = _axes(encdec)
    for name in ("q", "kv", "proj"):
        assert set(axes[f"decoder_blocks/0/cross/{name}/kernel"]) == {"embed", "heads"}, name
    assert axes["decoder_norm/scale"] == ("embed",)


def test_sequence_longer_than_max_len_raises(encoder, decoder, encdec):
    too_long = jnp.asarray(_tokens(MAX_LEN + 1, batch=1))
    ok = jnp.asarray(_tokens(4, batch=1))
    for call in (lambda: encoder(too_long), lambda: decoder(too_long),
                 lambda: encdec(too_long, ok), lambda: encdec(ok, too_long)):
        with pytest.raises(ValueError, match=r"longer") as err:
            jax.eval_shape(call)          # traced only: raised before anything runs
        assert str(MAX_LEN) in str(err.value) and str(MAX_LEN + 1) in str(err.value)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------

def _abstract(name, **kw):
    """The model's structure with shape-only parameters (nothing is initialised)."""
    return nnx.eval_shape(lambda: zoo.models.get(name, rngs=nnx.Rngs(0), **kw))


def test_text_forward_flops_hand_count():
    # W=8, M=16, 2 encoder layers, V=11, L=5 tokens, logits at all 5 positions.
    enc = _abstract("encoder", vocab_size=11, max_len=8, width=8, depth=2, num_heads=2,
                    mlp_dim=16)
    # Per token per layer, multiply-adds: qkv 3*64=192, proj 64, mlp 2*8*16=256 -> 512 -> 1024
    # FLOPs; x 5 tokens = 5120. Attention per layer: scores 5*5*8=200 and mix 200 multiply-adds
    # -> 800 FLOPs. Layer = 5920; 2 layers = 11840. Logits: 5*8*11=440 multiply-adds = 880.
    assert text_forward_flops(enc, {"encoder": 5}, logits_positions=5) == 11840 + 880
    assert text_forward_flops(enc, {"encoder": 5}, logits_positions=2) == 11840 + 352

    # Encoder-decoder: 2 encoder layers over I=5, 1 decoder layer over T=3, logits on T.
    ed = _abstract("encdec", vocab_size=11, max_len=8, width=8, depth=2, num_heads=2,
                   mlp_dim=16, decoder_depth=1)
    # Decoder self-attention block over T=3: 3 * 1024 + (3*3*8)*2*2 = 3072 + 288 = 3360.
    # Cross attention: q and out on T: 2*3*64*2 = 768; k and v on I: 2*5*64*2 = 1280;
    # scores and mix T x I: 2*2*3*5*8 = 480 -> 2528. Logits on T: 2*3*8*11 = 528.
    expected = 11840 + 3360 + 2528 + 528
    got = text_forward_flops(ed, {"encoder": 5, "decoder": 3}, logits_positions=3)
    assert got == expected
    encoder_only = text_forward_flops(ed, {"encoder": 5}, logits_positions=3)
    assert got - encoder_only == 3360 + 2528


def test_text_forward_flops_agrees_with_xla_cost_analysis():
    batch, length, vocab = 2, 32, 64
    enc = _abstract("encoder", vocab_size=vocab, max_len=length, width=256, depth=1,
                    num_heads=4, mlp_dim=1024)
    graphdef, state = nnx.split(enc)

    def forward(state, tokens):
        model = nnx.merge(graphdef, state)
        return model.logits(model(tokens))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    with cpu_kernel.disabled():  # XLA's cost analysis cannot see inside zoo's CPU kernels
        compiled = jax.jit(forward).lower(state, tokens).compile()
    xla = compiled_flops(compiled)
    assert xla is not None, "XLA:CPU should report a flop count"
    ours = batch * text_forward_flops(enc, {"encoder": length}, logits_positions=length)
    assert 0.75 < ours / xla < 1.25, (ours, xla)


# ---------------------------------------------------------------------------------------------
# bfloat16 compute
# ---------------------------------------------------------------------------------------------

def test_bfloat16_compute_keeps_float32_params():
    models = {name: _model(name, dtype=jnp.bfloat16) for name in ("encoder", "decoder", "encdec")}
    for name, model in models.items():
        for path, p in _params(model):
            assert p.dtype == jnp.float32, (name, path)
    tokens = jnp.asarray(_tokens(batch=2, seed=6)).at[1, 5:].set(PAD)

    @nnx.jit
    def run(models, tokens):
        enc, dec, ed = models["encoder"], models["decoder"], models["encdec"]
        h_enc = enc(tokens)
        h_dec = dec(tokens, prefix_len=jnp.array([3, 0]))
        h_ed = ed(tokens, shift_right(tokens, 2))
        return (h_enc, h_dec, h_ed, enc.logits(h_enc), dec.logits(h_dec), ed.logits(h_ed),
                enc.features(tokens))
    h_enc, h_dec, h_ed, l_enc, l_dec, l_ed, feats = run(models, tokens)
    for h in (h_enc, h_dec, h_ed):
        assert h.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(h, np.float32)))
    for out in (l_enc, l_dec, l_ed, feats):
        assert out.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(out)))


# ---------------------------------------------------------------------------------------------
# Every parameter is used
# ---------------------------------------------------------------------------------------------

def test_every_encdec_parameter_gets_a_gradient(encdec):
    # Full-length sequences so every learned position embedding row is used.
    tokens = jnp.asarray(_tokens(MAX_LEN, batch=2, seed=7))

    def loss(model):
        return jnp.sum(jnp.sin(model.logits(model(tokens, shift_right(tokens, 2)))))
    grads = nnx.jit(nnx.grad(loss))(encdec)
    dead = ["/".join(map(str, path)) for path, g in nnx.to_flat_state(grads)
            if not np.any(np.asarray(g[...]) != 0)]
    assert not dead, ("BUG in zoo/models/text.py DecoderBlock: it builds a full Block as "
                      "self_block but uses only its norm1/attn (it has its own norm_mlp/mlp), so "
                      "these parameters never affect the output yet are counted, checkpointed, "
                      f"weight-decayed and given optimizer state: {dead}")
