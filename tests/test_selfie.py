"""Tests for Selfie masked patch selection (Trinh, Luong and Le 2019): ``objectives/selfie.py``.

The properties checked are the ones that tell the published algorithm from a lookalike:

* the masked/visible split is a partition of the patches, the complement of MAE's keep set;
* the candidates are the image's own masked patches and carry no position information (moving
  pixels between masked locations permutes the candidates exactly);
* the summary ``u`` depends only on the visible patches, the query of location ``j`` is
  ``u + pos_j``;
* the loss is a CPC cross-entropy whose correct candidate for location ``j`` is column ``j``.

Every expected value is computed here independently (numpy, hand counts), never copied from a
run of the code under test.
"""
from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import objectives
import zoo.models
from objectives.mae import masking_indices
from objectives.selfie import Selfie, SelfieHead, selection_loss, selfie_split

# Images 8x8x3 in 2x2 patches: a 4x4 grid, 16 patches of 12 values; 25% masked -> 4 candidates.
IMAGE = (8, 8, 3)
PATCH = 2
GRID = (IMAGE[0] // PATCH, IMAGE[1] // PATCH)
L = GRID[0] * GRID[1]
PATCH_DIM = PATCH * PATCH * IMAGE[2]
RATIO = 0.25
KEEP = int(L * (1 - RATIO))
M = L - KEEP
CALL_BATCH = 4            # every model call below has this batch size: one compile


@pytest.fixture(scope="module")
def setup():
    obj = objectives.get("selfie", patch_size=PATCH, mask_ratio=RATIO)
    rngs = nnx.Rngs(0)
    # Selfie's pooling network gets position embeddings (sincos2d, the trainer's default):
    # the candidates must not.
    encoder = zoo.models.get("vit", grid=GRID, patch_dim=PATCH_DIM, size="test",
                             posemb="sincos2d", rngs=rngs)
    model = zoo.models.PretrainModel(encoder, obj.make_heads(encoder, rngs=rngs))
    apply = jax.jit(lambda inputs: obj.apply(model, inputs))
    return obj, model, apply


def _split_inputs(seed: int = 0):
    """One example's patches and split, tiled CALL_BATCH times (variants edit the copies)."""
    patches = np.random.default_rng(seed).standard_normal((L, PATCH_DIM)).astype(np.float32)
    vis, msk = map(np.asarray, selfie_split(jax.random.PRNGKey(seed + 100), 1, L, RATIO))
    return (np.repeat(patches[None], CALL_BATCH, axis=0), np.repeat(vis, CALL_BATCH, axis=0),
            np.repeat(msk, CALL_BATCH, axis=0))


# ---------------------------------------------------------------------------------------------
# 1. The split.
# ---------------------------------------------------------------------------------------------

@settings(max_examples=6, deadline=None)
@given(length=st.sampled_from([5, 16]),           # few shapes: each new one compiles
       ratio=st.sampled_from([0.1, 0.25, 0.5, 0.75]),
       seed=st.integers(0, 2**16))
def test_selfie_split_partitions_positions(length, ratio, seed):
    batch = 3
    key = jax.random.PRNGKey(seed)
    vis, msk = map(np.asarray, selfie_split(key, batch, length, ratio))
    keep = int(length * (1 - ratio))
    assert vis.shape == (batch, keep) and msk.shape == (batch, length - keep)
    noise = np.asarray(jax.random.uniform(key, (batch, length)))
    ids_keep = np.asarray(masking_indices(key, batch, length, ratio)[0])
    for b in range(batch):
        v, m = vis[b].tolist(), msk[b].tolist()
        assert len(set(v)) == len(v) and len(set(m)) == len(m)
        assert not set(v) & set(m)
        assert set(v) | set(m) == set(range(length))
        smallest = set(np.argsort(noise[b], kind="stable")[:keep].tolist())
        assert set(v) == smallest == set(ids_keep[b].tolist())


def test_selfie_split_keys_and_rows():
    a = [np.asarray(x) for x in selfie_split(jax.random.PRNGKey(0), 6, L, RATIO)]
    b = [np.asarray(x) for x in selfie_split(jax.random.PRNGKey(0), 6, L, RATIO)]
    c = [np.asarray(x) for x in selfie_split(jax.random.PRNGKey(1), 6, L, RATIO)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.sort(a[1], 1), np.sort(c[1], 1))
    assert len({tuple(sorted(row)) for row in a[1].tolist()}) > 1, "same split for every row"


def test_prepare(setup):
    obj, _, _ = setup
    images = np.random.default_rng(0).integers(0, 256, (3, *IMAGE), dtype=np.uint8)
    inputs, targets = obj.prepare({"image": jnp.asarray(images)}, jax.random.PRNGKey(3))
    assert targets is None
    assert inputs["ids_visible"].shape == (3, KEEP) and inputs["ids_masked"].shape == (3, M)
    img = images.astype(np.float64) / 127.5 - 1.0
    expected = np.stack([img[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH, :]
                         .reshape(3, -1) for r in range(GRID[0]) for c in range(GRID[1])], 1)
    np.testing.assert_allclose(np.asarray(inputs["patches"]), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. The loss.
# ---------------------------------------------------------------------------------------------

def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_selection_loss_hand_computed():
    scores = np.random.default_rng(0).standard_normal((2, 3, 3)).astype(np.float32) * 3
    # Location j chooses among candidates k (softmax over the last axis); the answer is k = j.
    logp = _np_log_softmax(scores)
    expected = -np.mean([logp[b, j, j] for b in range(2) for j in range(3)])
    # Softmax over locations instead (the transposed problem) gives a different number.
    logp_t = _np_log_softmax(np.swapaxes(scores, 1, 2))
    assert abs(expected + np.mean([logp_t[b, j, j] for b in range(2) for j in range(3)])) > 1e-2
    loss, metrics = selection_loss(jnp.asarray(scores))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["loss"]) == float(loss)


def test_selection_accuracy_is_the_diagonal_fraction():
    scores = np.zeros((2, 3, 3), np.float32)
    picks = [[0, 2, 2],          # rows 0 and 2 right
             [1, 1, 0]]          # row 1 right
    for b in range(2):
        for j in range(3):
            scores[b, j, picks[b][j]] = 4.0
    _, metrics = selection_loss(jnp.asarray(scores))
    assert float(metrics["selection_accuracy"]) == pytest.approx(3 / 6)


def test_dominant_diagonal_and_antidiagonal():
    eye = np.broadcast_to(np.eye(5, dtype=np.float32) * 30.0, (2, 5, 5))
    loss, metrics = Selfie(patch_size=PATCH).loss(jnp.asarray(eye), None)
    assert float(metrics["selection_accuracy"]) == 1.0
    assert 0.0 <= float(loss) < 1e-6
    anti = np.ascontiguousarray(eye[:, ::-1])
    loss, metrics = Selfie(patch_size=PATCH).loss(jnp.asarray(anti), None)
    assert float(metrics["selection_accuracy"]) == pytest.approx(1 / 5)   # only the centre
    # Rows 0, 1, 3, 4 put 30 on a wrong candidate; row 2 (the centre) is right.
    assert float(loss) == pytest.approx(4 / 5 * 30.0, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# 3-4. Candidates have no position; the queries see only the visible patches.
# ---------------------------------------------------------------------------------------------

def test_scores_columns_follow_the_masked_pixels(setup):
    _, _, apply = setup
    patches, vis, msk = _split_inputs(seed=1)
    a, c = msk[0, 1], msk[0, 3]             # two masked locations (candidates 1 and 3)
    k_changed = 2                           # the candidate whose pixels change
    visible_location = vis[0, 5]
    rng = np.random.default_rng(2)
    patches[1, msk[0, k_changed]] += 2 * rng.standard_normal(PATCH_DIM).astype(np.float32)
    patches[2, [a, c]] = patches[2, [c, a]]                 # swap two masked patches' pixels
    patches[3, visible_location] += 2 * rng.standard_normal(PATCH_DIM).astype(np.float32)
    scores = np.asarray(apply({"patches": patches, "ids_visible": vis, "ids_masked": msk}))
    assert scores.shape == (CALL_BATCH, M, M)
    base = scores[0]
    assert np.abs(base[:, 1] - base[:, 3]).max() > 1e-3, "degenerate candidates"

    # Moving pixels between masked locations permutes the candidates, nothing else: a position
    # embedding of the location in a candidate would break this.
    perm = np.arange(M)
    perm[[1, 3]] = [3, 1]
    np.testing.assert_allclose(scores[2], base[:, perm], rtol=1e-5, atol=1e-5)

    # A masked patch's pixels change only its own column: the queries (u + pos_j) never see it.
    change = np.abs(scores[1] - base)
    assert change[:, k_changed].min() > 1e-4
    assert np.delete(change, k_changed, axis=1).max() < 1e-6

    # A visible patch changes u, hence every query and every score.
    assert np.abs(scores[3] - base).min() > 1e-6


def _bias(linear):
    return 0.0 if linear.bias is None else np.asarray(linear.bias[...], np.float64)


def test_scores_recomputed_by_hand(setup):
    """scores[j, k] = (u + pos[ids_masked[j]]) . MLP(patch_embed(patch[ids_masked[k]])), u the
    cls output of the encoder over the visible patches (position embeddings of their own
    locations added before the gather)."""
    _, model, apply = setup
    patches, vis, msk = _split_inputs(seed=3)
    patches = patches + np.arange(CALL_BATCH, dtype=np.float32)[:, None, None] * 0.3
    scores = np.asarray(apply({"patches": patches, "ids_visible": vis, "ids_masked": msk}))
    enc, head = model.encoder, model.heads
    f64 = lambda x: np.asarray(x, np.float64)     # noqa: E731
    kernel, bias = f64(enc.patch_embed.kernel[...]), f64(enc.patch_embed.bias[...])
    table = f64(enc.position_embeddings())
    rows = np.arange(CALL_BATCH)[:, None]
    visible_tokens = patches[rows, vis] @ kernel + bias + table[vis]
    u = f64(jax.jit(enc.encode)(jnp.asarray(visible_tokens, jnp.float32)))[:, 0]   # cls
    queries = u[:, None, :] + f64(head.position[...])[msk]
    hidden = patches[rows, msk] @ kernel + bias
    hidden = hidden @ f64(head.candidate_fc1.kernel[...]) + _bias(head.candidate_fc1)
    erf = np.vectorize(math.erf)
    hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))           # exact GELU
    cands = hidden @ f64(head.candidate_fc2.kernel[...]) + _bias(head.candidate_fc2)
    expected = np.einsum("bjw,bkw->bjk", queries, cands)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_queries_carry_the_masked_locations_position():
    width = 32                  # the fixture's shapes: the eager ops are already compiled
    with nnx.use_eager_sharding(False):
        head = SelfieHead(width, L, rngs=nnx.Rngs(0))
    table = np.arange(L * width, dtype=np.float32).reshape(L, width)
    head.position[...] = jnp.asarray(table)
    summary = np.array([[1.0] * width, [-2.0] * width], np.float32)
    ids = np.array([[5, 0, 9], [15, 3, 3]])
    q = np.asarray(head.queries(jnp.asarray(summary), jnp.asarray(ids)))
    for b in range(2):
        for j in range(3):
            np.testing.assert_allclose(q[b, j], summary[b] + table[ids[b, j]])


# ---------------------------------------------------------------------------------------------
# 5. The correct candidate of location j is column j.
# ---------------------------------------------------------------------------------------------

def test_label_is_the_patch_from_the_same_location():
    """A stub backbone and head: each patch is the one-hot code of its location, each query the
    code of its location. Scores are then 10 exactly where candidate and query locations agree,
    which must be the diagonal for every row of every example."""
    obj = objectives.get("selfie", patch_size=PATCH, mask_ratio=0.5)
    batch = 3
    vis, msk = selfie_split(jax.random.PRNGKey(4), batch, L, 0.5)
    patches = np.broadcast_to(np.eye(L, dtype=np.float32), (batch, L, L))
    stub = types.SimpleNamespace(
        encoder=types.SimpleNamespace(embed=lambda p: p, encode=lambda t: t,
                                      patch_embed=lambda x: x, has_cls=False),
        heads=types.SimpleNamespace(candidates=lambda h: h,
                                    queries=lambda u, ids: 10.0 * jax.nn.one_hot(ids, L)))
    scores = np.asarray(obj.apply(stub, {"patches": jnp.asarray(patches), "ids_visible": vis,
                                         "ids_masked": msk}))
    m = L - int(L * 0.5)
    np.testing.assert_array_equal(scores, np.broadcast_to(10 * np.eye(m), (batch, m, m)))
    loss, metrics = obj.loss(jnp.asarray(scores), None)
    assert float(metrics["selection_accuracy"]) == 1.0
    expected = -math.log(math.exp(10) / (math.exp(10) + (m - 1)))
    assert float(loss) == pytest.approx(expected, abs=4e-6)       # float32 logsumexp near 10


# ---------------------------------------------------------------------------------------------
# 6. Validation.
# ---------------------------------------------------------------------------------------------

# 16 patches: 0.05 masks 1 (no distractor), 0.95 keeps int(0.8) = 0 visible.
@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, 0.05, 0.95])
def test_rejects_bad_mask_ratio(ratio):
    obj = objectives.get("selfie", patch_size=PATCH, mask_ratio=ratio)
    with pytest.raises(ValueError, match=r"objective\.mask_ratio"):
        obj.validate(image_shape=IMAGE)


def test_accepts_edge_mask_ratios():
    for ratio in (0.1, 0.25, 0.9):          # 2 masked; 4 masked; 1 visible
        objectives.get("selfie", patch_size=PATCH, mask_ratio=ratio).validate(image_shape=IMAGE)
    assert "selfie" in objectives.names("image")
    assert objectives.get("selfie").mask_ratio == 0.25
    with pytest.raises(ValueError, match=r"model\.patch_size"):
        objectives.get("selfie", patch_size=3).validate(image_shape=IMAGE)


# ---------------------------------------------------------------------------------------------
# 7. End to end: jit, finite loss, gradients everywhere they should be.
# ---------------------------------------------------------------------------------------------

def test_jit_loss_and_gradients(setup):
    obj, model, _ = setup
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch, rng):
        m = nnx.merge(graphdef, params, rest)
        inputs, targets = obj.prepare(batch, rng)
        scores = obj.apply(m, inputs)
        loss, metrics = obj.loss(scores, targets)
        return loss, (scores, inputs["ids_masked"], metrics)

    images = np.random.default_rng(5).integers(0, 256, (CALL_BATCH, *IMAGE), dtype=np.uint8)
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (scores, ids_masked, metrics)), grads = step(params, {"image": jnp.asarray(images)},
                                                        jax.random.PRNGKey(0))
    assert np.isfinite(float(loss)) and float(metrics["loss"]) == float(loss)
    logp = _np_log_softmax(np.asarray(scores))
    assert float(loss) == pytest.approx(-np.mean(np.diagonal(logp, axis1=1, axis2=2)),
                                        rel=1e-5)
    paths = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in paths:
        g = np.asarray(g)
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).sum() > 0, f"no gradient reaches {name}"
    names = [jax.tree_util.keystr(p) for p, _ in paths]
    for expected in ("candidate_fc1", "candidate_fc2", "position", "patch_embed", "cls",
                     "blocks"):
        assert any(expected in n for n in names), expected
    # Query position embeddings: only the locations masked somewhere in the batch are used.
    position_grad = np.abs(np.asarray(grads["heads"]["position"][...])).sum(-1)
    used = np.zeros(L, bool)
    used[np.asarray(ids_masked).ravel()] = True
    assert (position_grad[used] > 0).all()
    assert (position_grad[~used] == 0).all() and (~used).any()


def test_forward_flops_hand_count(setup):
    obj, model, _ = setup
    width, depth, mlp = 32, 2, 64                               # size "test"

    def block(t):
        return (2 * t * width * 3 * width + 2 * t * width * width
                + 2 * t * width * mlp + 2 * t * mlp * width + 4 * t * t * width)

    expected = (2 * (L + M) * PATCH_DIM * width      # embed every patch, then the candidates
                + depth * block(KEEP + 1)            # encoder over visible patches + cls
                + 2 * (2 * M * width * width)        # the candidates' 2-layer MLP
                + 2 * M * M * width)                 # the M x M score matrix
    assert obj.forward_flops(model) == pytest.approx(expected)
