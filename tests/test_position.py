"""Tests for MP3 position prediction (Zhai et al. 2022, "Position Prediction as an Effective
Pretraining Strategy"): ``objectives/position.py``.

The properties checked are the ones that tell the published algorithm from a lookalike:

* the context is MAE's keep set (``int(L * (1 - r))`` smallest-noise tokens per row);
* the encoder gets no position information: permuting the inputs permutes the predictions;
* only context tokens are keys/values, every token is a query (a non-context token influences
  only its own prediction);
* the loss is the cross-entropy of each token's own index, over all (weighted) tokens of the
  batch; padding is neither context nor target.

Every expected value is computed here independently (numpy, hand counts), never copied from a
run of the code under test.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import objectives
import zoo.config
import zoo.models
import zoo.train
from compile_log import NoCompilation
from objectives.mae import masking_indices
from objectives.position import Position, TokenPosition, context_mask, position_loss
from zoo.data import DatasetSpec
from zoo.text import BYTE_OFFSET, PAD, VOCAB_SIZE

# Images 8x8x3 in 2x2 patches: a 4x4 grid, 16 patches of 12 values.
IMAGE = (8, 8, 3)
PATCH = 2
GRID = (IMAGE[0] // PATCH, IMAGE[1] // PATCH)
L = GRID[0] * GRID[1]
PATCH_DIM = PATCH * PATCH * IMAGE[2]
SEQ = 16                      # text rows
ONE_DEVICE_MESH = (("data", 1), ("fsdp", 1), ("tensor", 1))
CALL_BATCH = 6                # every model call below has this batch size: one compile each


# ---------------------------------------------------------------------------------------------
# Tiny models, built once per module.
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _image_model(posemb: str = "none", cls_token: bool = True, mask_ratio: float = 0.75):
    obj = objectives.get("position", patch_size=PATCH, mask_ratio=mask_ratio)
    rngs = nnx.Rngs(0)
    encoder = zoo.models.get("vit", grid=GRID, patch_dim=PATCH_DIM, size="test", posemb=posemb,
                             cls_token=cls_token, rngs=rngs)
    model = zoo.models.PretrainModel(encoder, obj.make_heads(encoder, rngs=rngs))
    return obj, model, _batched(jax.jit(lambda inputs: obj.apply(model, inputs)))


def _batched(apply):
    """Runs ``apply`` on a batch of exactly CALL_BATCH examples (repeating the last one), so
    each tiny model compiles once."""
    def run(inputs):
        n = len(next(iter(inputs.values())))
        assert n <= CALL_BATCH
        padded = {k: np.concatenate([np.asarray(v)] + [np.asarray(v)[-1:]] * (CALL_BATCH - n))
                  for k, v in inputs.items()}
        return np.asarray(apply(padded))[:n]
    return run


@functools.lru_cache(maxsize=None)
def _text_model(posemb: str = "none"):
    obj = objectives.get("token_position", mask_ratio=0.75)
    rngs = nnx.Rngs(1)
    encoder = zoo.models.get("encoder", vocab_size=obj.vocab_size, max_len=SEQ, size="test",
                             posemb=posemb, rngs=rngs)
    model = zoo.models.PretrainModel(encoder, obj.make_heads(encoder, rngs=rngs))
    return obj, model, _batched(jax.jit(lambda inputs: obj.apply(model, inputs)))


@pytest.fixture(scope="module")
def image_setup():
    return _image_model()


@pytest.fixture(scope="module")
def text_setup():
    return _text_model()


def _patches(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, L, PATCH_DIM)).astype(np.float32)


def _byte_tokens(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(BYTE_OFFSET, BYTE_OFFSET + 256, shape,
                                                dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# 1. The context mask is MAE's keep set.
# ---------------------------------------------------------------------------------------------

@settings(max_examples=6, deadline=None)
@given(length=st.sampled_from([5, 16]),   # few shapes: each new one compiles
       ratio=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.9]),
       seed=st.integers(0, 2**16))
def test_context_mask_is_the_smallest_noise_keep_set(length, ratio, seed):
    batch = 4
    key = jax.random.PRNGKey(seed)
    ctx = np.asarray(context_mask(key, batch, length, ratio))
    assert ctx.shape == (batch, length) and ctx.dtype == np.bool_
    keep = int(length * (1 - ratio))                  # floor, as MAE's len_keep
    np.testing.assert_array_equal(ctx.sum(axis=1), [keep] * batch)
    # Independently: the keep positions are those of the `keep` smallest uniform noises.
    noise = np.asarray(jax.random.uniform(key, (batch, length)))
    ids_keep = np.asarray(masking_indices(key, batch, length, ratio)[0])
    for b in range(batch):
        smallest = set(np.argsort(noise[b], kind="stable")[:keep].tolist())
        assert set(np.flatnonzero(ctx[b]).tolist()) == smallest
        assert set(ids_keep[b].tolist()) == smallest


def test_context_mask_rows_and_keys():
    batch, length = 8, 16
    m0 = np.asarray(context_mask(jax.random.PRNGKey(0), batch, length, 0.75))
    m0b = np.asarray(context_mask(jax.random.PRNGKey(0), batch, length, 0.75))
    m1 = np.asarray(context_mask(jax.random.PRNGKey(1), batch, length, 0.75))
    assert len({row.tobytes() for row in m0}) > 1, "every example got the same context"
    np.testing.assert_array_equal(m0, m0b)
    assert not np.array_equal(m0, m1)


def test_prepare_image_inputs():
    obj = objectives.get("position", patch_size=PATCH, mask_ratio=0.75)
    n = CALL_BATCH          # the shapes of test_image_loss_end_to_end_matches_numpy
    images = np.random.default_rng(0).integers(0, 256, (n, *IMAGE), dtype=np.uint8)
    inputs, targets = obj.prepare({"image": jnp.asarray(images)}, jax.random.PRNGKey(4))
    assert targets is None
    ctx = np.asarray(inputs["context"])
    np.testing.assert_array_equal(ctx.sum(1), [int(L * 0.25)] * n)
    # Patches: the image in [-1, 1], cut row-major into 2x2x3 patches (written out by hand).
    img = images.astype(np.float64) / 127.5 - 1.0
    expected = np.stack([img[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH, :]
                         .reshape(n, -1) for r in range(GRID[0]) for c in range(GRID[1])], 1)
    np.testing.assert_allclose(np.asarray(inputs["patches"]), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. No position information reaches the encoder.
# ---------------------------------------------------------------------------------------------

def _permuted_pair(apply, batch=3, seed=0):
    patches = _patches(batch, seed)
    context = np.asarray(context_mask(jax.random.PRNGKey(seed + 10), batch, L, 0.75))
    perm = np.random.default_rng(seed + 1).permutation(L)
    both = apply({"patches": np.concatenate([patches, patches[:, perm]]),
                  "context": np.concatenate([context, context[:, perm]])})
    return both[:batch], both[batch:], perm


@pytest.mark.parametrize("cls_token", [True, False])
def test_permuting_patches_permutes_predictions(cls_token, image_setup):
    if cls_token:
        _, _, apply = image_setup
    else:
        _, _, apply = _image_model(cls_token=False)
    out, out_p, perm = _permuted_pair(apply)
    assert out.shape == (3, L, L)
    # Without position embeddings the encoder is permutation-equivariant: patch perm[i] now
    # sits at index i and gets exactly the scores it got before.
    np.testing.assert_allclose(out_p, out[:, perm], atol=2e-5)
    assert np.abs(out_p - out).max() > 1e-3, "degenerate: all rows equal"


def test_permutation_control_with_position_embeddings():
    """Negative control: the same check fails when the encoder does get position embeddings,
    so the test above would catch them."""
    _, _, apply = _image_model(posemb="sincos2d")
    out, out_p, perm = _permuted_pair(apply)
    assert np.abs(out_p - out[:, perm]).max() > 1e-3


def test_permuting_tokens_permutes_predictions(text_setup):
    _, _, apply = text_setup
    tokens = _byte_tokens((3, SEQ), seed=3)
    context = np.asarray(context_mask(jax.random.PRNGKey(7), 3, SEQ, 0.75))
    perm = np.random.default_rng(5).permutation(SEQ)
    both = apply({"tokens": np.concatenate([tokens, tokens[:, perm]]),
                  "context": np.concatenate([context, context[:, perm]])})
    out, out_p = both[:3], both[3:]
    assert out.shape == (3, SEQ, SEQ)
    np.testing.assert_allclose(out_p, out[:, perm], atol=2e-5)
    assert np.abs(out_p - out).max() > 1e-3


def _config(experiment: str, objective: str, *overrides: str) -> zoo.config.Config:
    config = zoo.config.load(experiment)
    return zoo.config.override(config, [f"objective={{'name': '{objective}'}}",
                                        f"mesh={ONE_DEVICE_MESH!r}", "progress=False",
                                        *overrides])


SPEC = DatasetSpec(name="synthetic", image_shape=(16, 16, 3), num_classes=None,
                   splits={"train": 1 << 20})


def test_build_gives_position_an_encoder_without_posemb():
    config = _config("experiments/mae_digits.py:tiny", "position")
    assert config.model.posemb == "auto"
    experiment = zoo.train.build(config, devices=jax.devices()[:1], data_spec=SPEC)
    assert isinstance(experiment.objective, Position)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(experiment.abstract_state.params)]
    assert not any("posemb" in p for p in paths), paths
    model = nnx.eval_shape(lambda: zoo.train.create_model(
        experiment.config, experiment.objective, SPEC, nnx.Rngs(0)))
    assert model.encoder.posemb_kind == "none"
    assert model.encoder.position_embeddings() is None
    # Asking for "none" explicitly is fine too.
    zoo.train.build(_config("experiments/mae_digits.py:tiny", "position", "model.posemb='none'"),
                    devices=jax.devices()[:1], data_spec=SPEC)


@pytest.mark.parametrize("posemb", ["sincos2d", "learn"])
def test_build_refuses_position_embeddings_for_position(posemb):
    config = _config("experiments/mae_digits.py:tiny", "position", f"model.posemb='{posemb}'")
    with NoCompilation(), pytest.raises(ValueError) as error:
        zoo.train.build(config, devices=jax.devices()[:1], data_spec=SPEC)
    message = str(error.value)
    assert "model.posemb" in message and posemb in message and "\n" not in message


def test_token_position_posemb_none_required():
    config = _config("experiments/text_pycode.py:tiny", "token_position")
    obj = zoo.train.make_objective(config)
    assert isinstance(obj, TokenPosition)
    assert zoo.train.model_posemb(config, obj) == "none"
    bad = dataclasses.replace(config, model=dataclasses.replace(config.model, posemb="learn"))
    with pytest.raises(ValueError, match=r"model\.posemb"):
        zoo.train.model_posemb(bad, obj)


# ---------------------------------------------------------------------------------------------
# 3. Only the context tokens are keys/values; every token is a query.
# ---------------------------------------------------------------------------------------------

def _row_changes(base, variants):
    """Max |change| per row of each variant against the base: [variants, L]."""
    return np.abs(variants - base[None]).max(axis=-1)


@pytest.mark.parametrize("cls_token", [True, False])
def test_non_context_patch_changes_only_its_own_row(cls_token, image_setup):
    apply = image_setup[2] if cls_token else _image_model(cls_token=False)[2]
    base = _patches(1, seed=4)[0]
    context = np.asarray(context_mask(jax.random.PRNGKey(2), 1, L, 0.75))[0]
    outside = np.flatnonzero(~context)[:3]
    inside = np.flatnonzero(context)[:2]
    assert len(outside) == 3 and len(inside) == 2, context
    noise = np.random.default_rng(9).standard_normal(PATCH_DIM).astype(np.float32) * 2
    variants = [base]
    for j in [*outside, *inside]:
        changed = base.copy()
        changed[j] += noise
        variants.append(changed)
    patches = np.stack(variants)                               # one call, one example each
    out = np.asarray(apply({"patches": patches,
                            "context": np.broadcast_to(context, (len(variants), L))}))
    change = _row_changes(out[0], out[1:])
    for v, j in enumerate(outside):
        assert change[v, j] > 1e-3, "the changed patch is still its own query"
        others = np.delete(change[v], j)
        assert others.max() < 1e-6, f"non-context patch {j} leaked into rows {others}"
    for v, j in enumerate(inside, start=len(outside)):
        others = np.delete(change[v], j)
        assert others.min() > 1e-6, f"context patch {j} is not a key of every query"


def test_non_context_token_changes_only_its_own_row(text_setup):
    _, _, apply = text_setup
    base = _byte_tokens((SEQ,), seed=6)
    context = np.asarray(context_mask(jax.random.PRNGKey(3), 1, SEQ, 0.75))[0]
    outside = np.flatnonzero(~context)[:3]
    inside = np.flatnonzero(context)[:2]
    assert len(outside) == 3 and len(inside) == 2, context
    variants = [base]
    for j in [*outside, *inside]:
        changed = base.copy()
        changed[j] = BYTE_OFFSET + (changed[j] - BYTE_OFFSET + 101) % 256   # another byte
        variants.append(changed)
    out = np.asarray(apply({"tokens": np.stack(variants),
                            "context": np.broadcast_to(context, (len(variants), SEQ))}))
    change = _row_changes(out[0], out[1:])
    for v, j in enumerate(outside):
        assert change[v, j] > 1e-3
        assert np.delete(change[v], j).max() < 1e-6
    for v, j in enumerate(inside, start=len(outside)):
        assert np.delete(change[v], j).min() > 1e-6


# ---------------------------------------------------------------------------------------------
# 4. The loss.
# ---------------------------------------------------------------------------------------------

def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("num_positions", [3, 5])       # N == L (images) and N > L
def test_position_loss_hand_computed(num_positions):
    logits = np.random.default_rng(0).standard_normal((2, 3, num_positions)).astype(np.float32)
    logp = _np_log_softmax(logits)
    ce = np.array([[-logp[b, i, i] for i in range(3)] for b in range(2)])   # target = index
    loss, metrics = position_loss(jnp.asarray(logits))
    assert float(loss) == pytest.approx(ce.mean(), rel=1e-5)      # over all 6 tokens
    assert float(metrics["loss"]) == float(loss)

    # Weighted: row 0 has one target, row 1 three; normalised over the 4 targets of the batch.
    weights = np.array([[1, 0, 0], [1, 1, 1]], np.float32)
    wloss, _ = position_loss(jnp.asarray(logits), jnp.asarray(weights))
    expected = (ce[0, 0] + ce[1].sum()) / 4
    per_example = (ce[0, 0] + ce[1].mean()) / 2
    assert abs(expected - per_example) > 1e-2                        # the check can tell
    assert float(wloss) == pytest.approx(expected, rel=1e-5)
    # Zero-weight tokens do not count, whatever their logits.
    moved = logits.copy()
    moved[0, 1:] += 100 * np.random.default_rng(1).standard_normal((2, num_positions))
    assert float(position_loss(jnp.asarray(moved), jnp.asarray(weights))[0]) == \
        pytest.approx(expected, rel=1e-5)


def test_position_accuracy_counts_argmax_equal_to_index():
    logits = np.zeros((2, 3, 5), np.float32)
    winners = [[0, 3, 2],       # row 0: tokens 0 and 2 right, token 1 wrong
               [1, 1, 4]]       # row 1: token 1 right
    for b in range(2):
        for i in range(3):
            logits[b, i, winners[b][i]] = 5.0
    _, metrics = position_loss(jnp.asarray(logits))
    assert float(metrics["position_accuracy"]) == pytest.approx(3 / 6)
    weights = np.array([[1, 0, 1], [0, 1, 0]], np.float32)    # only the right ones
    _, metrics = position_loss(jnp.asarray(logits), jnp.asarray(weights))
    assert float(metrics["position_accuracy"]) == pytest.approx(1.0)
    weights = np.array([[0, 1, 0], [1, 0, 1]], np.float32)    # only the wrong ones
    _, metrics = position_loss(jnp.asarray(logits), jnp.asarray(weights))
    assert float(metrics["position_accuracy"]) == pytest.approx(0.0)


def test_head_classifies_among_all_positions(image_setup, text_setup):
    _, model, apply = image_setup
    assert model.heads.classifier.kernel[...].shape == (model.encoder.width, L)
    out = apply({"patches": _patches(2), "context": np.ones((2, L), bool)})
    assert out.shape == (2, L, L)                             # cls row dropped, L classes
    _, tmodel, tapply = text_setup
    assert tmodel.heads.classifier.kernel[...].shape == (tmodel.encoder.width, SEQ)
    out = tapply({"tokens": _byte_tokens((2, SEQ)), "context": np.ones((2, SEQ), bool)})
    assert out.shape == (2, SEQ, SEQ)


def test_image_loss_end_to_end_matches_numpy(image_setup):
    obj, _, apply = image_setup
    images = np.random.default_rng(2).integers(0, 256, (CALL_BATCH, *IMAGE), dtype=np.uint8)
    inputs, targets = obj.prepare({"image": jnp.asarray(images)}, jax.random.PRNGKey(8))
    logits = np.asarray(apply(inputs))
    loss, metrics = obj.loss(jnp.asarray(logits), targets)
    logp = _np_log_softmax(logits)
    expected = -np.mean([logp[b, i, i] for b in range(CALL_BATCH) for i in range(L)])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    acc = np.mean(logits.argmax(-1) == np.arange(L))
    assert float(metrics["position_accuracy"]) == pytest.approx(acc)


# ---------------------------------------------------------------------------------------------
# 5. Text: padding is never context and never a target.
# ---------------------------------------------------------------------------------------------

def test_token_position_padding_is_neither_context_nor_target():
    obj = objectives.get("token_position", mask_ratio=0.5)
    tokens = _byte_tokens((4, SEQ), seed=1)
    real_len = [SEQ, 11, 5, 1]
    for b, n in enumerate(real_len):
        tokens[b, n:] = PAD
    inputs, weights = obj.prepare({"tokens": jnp.asarray(tokens)}, jax.random.PRNGKey(5))
    ctx, weights = np.asarray(inputs["context"]), np.asarray(weights)
    real = tokens != PAD
    np.testing.assert_array_equal(weights, real.astype(np.float32))
    assert not ctx[~real].any(), "padding became context"
    # Each row's context: int(n * 0.5) of its n real tokens (at least one).
    np.testing.assert_array_equal(ctx.sum(1), [max(1, int(n * 0.5)) for n in real_len])
    np.testing.assert_array_equal(np.asarray(inputs["tokens"]), tokens)

    # The loss ignores padded positions whatever their logits.
    logits = np.random.default_rng(3).standard_normal((4, SEQ, SEQ)).astype(np.float32)
    moved = np.where(real[..., None], logits, logits + 50.0 * np.arange(SEQ))
    a, _ = obj.loss(jnp.asarray(logits), jnp.asarray(weights))
    b, _ = obj.loss(jnp.asarray(moved), jnp.asarray(weights))
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    logp = _np_log_softmax(logits)
    expected = -sum(logp[b, i, i] for b in range(4) for i in range(real_len[b])) / sum(real_len)
    assert float(a) == pytest.approx(expected, rel=1e-5)


def test_padding_is_not_attended(text_setup):
    """Real tokens' predictions do not depend on what sits at padded (non-context) positions:
    the same row with the padding replaced by bytes, context unchanged, predicts the same."""
    obj, _, apply = text_setup
    tokens = _byte_tokens((1, SEQ), seed=2)
    tokens[0, 9:] = PAD
    inputs, _ = obj.prepare({"tokens": jnp.asarray(tokens)}, jax.random.PRNGKey(11))
    ctx = np.asarray(inputs["context"])
    assert ctx[0, :9].any(), "pick another key: this row has no context"
    filled = tokens.copy()
    filled[0, 9:] = _byte_tokens((SEQ - 9,), seed=3)
    out = np.asarray(apply({"tokens": np.concatenate([tokens, filled]),
                            "context": np.concatenate([ctx, ctx])}))
    np.testing.assert_allclose(out[1, :9], out[0, :9], atol=1e-6)


# A short row must still have a context among its real tokens: drawing the int(L * (1 - r))
# context slots over the whole row would often leave none (2 real tokens of 16 at r=0.75:
# ~55% of draws), and a row whose keys are all masked falls back to uniform attention over
# every key, padding included. So the context is drawn among the n real tokens of each row:
# exactly max(1, int(n * (1 - r))) of them.
def test_short_rows_get_an_exact_context_among_their_real_tokens():
    obj = objectives.get("token_position", mask_ratio=0.75)
    real_len = [SEQ, 11, 5, 2, 1, 0]
    tokens = _byte_tokens((len(real_len), SEQ), seed=4)
    for b, n in enumerate(real_len):
        tokens[b, n:] = PAD
    prepare = jax.jit(obj.prepare)
    seen = np.zeros((len(real_len), SEQ), bool)
    for seed in range(20):
        inputs, _ = prepare({"tokens": jnp.asarray(tokens)}, jax.random.PRNGKey(seed))
        ctx = np.asarray(inputs["context"])
        assert not ctx[tokens == PAD].any(), "padding became context"
        for b, n in enumerate(real_len):
            expected = max(1, int(n * 0.25)) if n else 0
            assert ctx[b].sum() == expected, (seed, b, n, ctx[b])
        seen |= ctx
    # Every real token of the short rows is drawn as context at some point (uniform draws).
    assert seen[2, :5].all() and seen[3, :2].all()


# ---------------------------------------------------------------------------------------------
# 6. Validation.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, 0.99])   # 0.99 of 16: int(0.16) = 0 left
def test_position_rejects_bad_mask_ratio(ratio):
    obj = objectives.get("position", patch_size=PATCH, mask_ratio=ratio)
    with pytest.raises(ValueError, match=r"objective\.mask_ratio"):
        obj.validate(image_shape=IMAGE)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 0.97])         # 0.97 of 16: int(0.48) = 0 left
def test_token_position_rejects_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match=r"objective\.mask_ratio"):
        objectives.get("token_position", mask_ratio=ratio).validate(seq_len=SEQ)


def test_valid_mask_ratios_accepted():
    for ratio in (0.0, 0.75, 0.9):                               # 0.9 of 16 keeps 1
        objectives.get("position", patch_size=PATCH, mask_ratio=ratio).validate(
            image_shape=IMAGE)
        objectives.get("token_position", mask_ratio=ratio).validate(seq_len=SEQ)
    assert objectives.get("position").mask_ratio == 0.75
    assert "position" in objectives.names("image")
    assert "token_position" in objectives.names("text")
    assert objectives.get("token_position").vocab_size == VOCAB_SIZE


# ---------------------------------------------------------------------------------------------
# 7. FLOPs.
# ---------------------------------------------------------------------------------------------

def _block_flops(tokens, width, mlp):
    """One pre-norm block, 2 FLOPs per multiply-add: qkv, out projection, MLP, QK^T and AV."""
    qkv = 2 * tokens * width * (3 * width)
    out = 2 * tokens * width * width
    mlp_flops = 2 * tokens * width * mlp + 2 * tokens * mlp * width
    attention = 2 * tokens * tokens * width + 2 * tokens * tokens * width
    return qkv + out + mlp_flops + attention


def test_position_forward_flops_hand_count(image_setup):
    obj, model, _ = image_setup
    width, depth, mlp = 32, 2, 64                                 # size "test"
    tokens = L + 1                                                # every patch + cls
    expected = (2 * L * PATCH_DIM * width                         # patch embedding
                + depth * _block_flops(tokens, width, mlp)        # full encoder (masked keys
                + 2 * L * width * L)                              # are computed too) + head
    assert obj.forward_flops(model) == pytest.approx(expected)
    _, model_nocls, _ = _image_model(cls_token=False)
    assert obj.forward_flops(model_nocls) == pytest.approx(
        expected - depth * (_block_flops(L + 1, width, mlp) - _block_flops(L, width, mlp)))


def test_token_position_forward_flops_hand_count(text_setup):
    obj, model, _ = text_setup
    width, depth, mlp = 32, 2, 64
    expected = depth * _block_flops(SEQ, width, mlp) + 2 * SEQ * width * SEQ
    assert obj.forward_flops(model, seq_len=SEQ) == pytest.approx(expected)
