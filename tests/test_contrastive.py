"""Contrastive and self-distillation losses against hand-computed cases, their EMA schedules, and
the point of writing every loss over the global batch: the loss AND its gradients are the same on
1 device and on 8 (data=8, and data=4 x fsdp=2).

The hand computations are plain Python/numpy loops written from the papers' definitions, not
from the vectorised code under test.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import objectives
import zoo.config
import zoo.train
from objectives.contrastive import clip_loss, nt_xent_loss, siglip_loss
from objectives.distill import byol_regression_loss, dino_loss
from zoo.data import DatasetSpec
from zoo.data.pairs import PairDatasetSpec


def unit_rows(seed, n, d):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax_at(row, index):
    return row[index] - math.log(sum(math.exp(v) for v in row))


# ---------------------------------------------------------------------------------------------
# Loss formulas.
# ---------------------------------------------------------------------------------------------

def test_nt_xent_matches_simclr_definition():
    z1, z2, temperature = unit_rows(0, 3, 5), unit_rows(1, 3, 5), 0.1
    z = np.concatenate([z1, z2])
    n, b = len(z), len(z1)
    per_anchor = []
    for i in range(n):
        positive = (i + b) % n
        others = [j for j in range(n) if j != i]          # self-similarity excluded
        row = [float(z[i] @ z[j]) / temperature for j in others]
        per_anchor.append(-log_softmax_at(row, others.index(positive)))
    # SimCLR's loss_a + loss_b: the mean over the first view's anchors plus the second's.
    expected = np.mean(per_anchor[:b]) + np.mean(per_anchor[b:])
    loss, accuracy = nt_xent_loss(jnp.asarray(z1), jnp.asarray(z2), temperature)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert 0.0 <= float(accuracy) <= 1.0


def test_nt_xent_accuracy_is_one_for_identical_views():
    z = unit_rows(2, 4, 16)
    _, accuracy = nt_xent_loss(jnp.asarray(z), jnp.asarray(z), 0.1)
    assert float(accuracy) == 1.0


def test_clip_loss_is_mean_of_both_directions():
    za, zb, scale = unit_rows(3, 4, 6), unit_rows(4, 4, 6), math.log(1 / 0.07)
    s = math.exp(scale)
    image_to_text = np.mean([-log_softmax_at([s * za[i] @ zb[j] for j in range(4)], i)
                             for i in range(4)])
    text_to_image = np.mean([-log_softmax_at([s * zb[i] @ za[j] for j in range(4)], i)
                             for i in range(4)])
    got = clip_loss(jnp.asarray(za), jnp.asarray(zb), jnp.float32(scale))
    np.testing.assert_allclose(float(got), (image_to_text + text_to_image) / 2, rtol=1e-5)


def test_siglip_loss_sums_all_pairs_over_batch_size():
    za, zb = unit_rows(5, 3, 4), unit_rows(6, 3, 4)
    log_scale, bias = math.log(10.0), -10.0
    total = 0.0
    for i in range(3):
        for j in range(3):
            logit = math.exp(log_scale) * float(za[i] @ zb[j]) + bias
            label = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-label * logit)))
    got = siglip_loss(jnp.asarray(za), jnp.asarray(zb), jnp.float32(log_scale),
                      jnp.float32(bias))
    np.testing.assert_allclose(float(got), total / 3, rtol=1e-5)


def test_byol_loss_is_two_minus_two_cosine():
    p = np.array([[3.0, 4.0], [1.0, 0.0]])
    z = np.array([[4.0, 3.0], [0.0, 2.0]])
    cosines = [24 / 25, 0.0]
    expected = np.mean([2 - 2 * c for c in cosines])
    got = byol_regression_loss(jnp.asarray(p), jnp.asarray(z))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_dino_loss_pairs_each_teacher_crop_with_every_other_student_crop():
    rng = np.random.default_rng(7)
    views, batch, k = 4, 2, 5           # 2 global + 2 local crops
    student = rng.normal(size=(views, batch, k))
    teacher = rng.normal(size=(2, batch, k))
    center = rng.normal(size=(1, k)) * 0.1
    student_temp, teacher_temp = 0.1, 0.04

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    terms = []
    for iq in range(2):
        for v in range(views):
            if v == iq:
                continue
            per_example = []
            for b in range(batch):
                q = softmax((teacher[iq, b] - center[0]) / teacher_temp)
                log_p = np.log(softmax(student[v, b] / student_temp))
                per_example.append(-(q * log_p).sum())
            terms.append(np.mean(per_example))
    assert len(terms) == 2 * views - 2
    got = dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center),
                    student_temp, jnp.float32(teacher_temp))
    np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-5)


@pytest.mark.parametrize("base", [0.996, 0.99])
def test_cosine_momentum_start_middle_end(base):
    total = 100
    assert float(objectives.cosine_momentum(base, 0, total)) == pytest.approx(base, abs=1e-7)
    assert float(objectives.cosine_momentum(base, 50, total)) == pytest.approx(
        1 - (1 - base) / 2, abs=1e-7)
    assert float(objectives.cosine_momentum(base, total, total)) == pytest.approx(1.0, abs=1e-7)
    values = [float(objectives.cosine_momentum(base, s, total)) for s in range(0, total + 1, 10)]
    assert values == sorted(values)   # never decreases


def test_dino_teacher_temperature_warms_up_linearly():
    dino = objectives.get("dino", warmup_teacher_temp=0.04, teacher_temp=0.07,
                          teacher_temp_warmup_steps=30)
    temps = [float(dino.teacher_temperature(s)) for s in (0, 15, 30, 100)]
    np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07], rtol=1e-6)
    assert float(objectives.get("dino").teacher_temperature(0)) == pytest.approx(0.04)


def test_clip_logit_scale_clamped_at_log_100():
    clip = objectives.get("clip")
    params = {"heads": {"logit_scale": jnp.float32(7.0), "other": jnp.float32(9.0)}}
    out = clip.constrain_params(params)
    assert float(out["heads"]["logit_scale"]) == pytest.approx(math.log(100), rel=1e-6)
    assert float(out["heads"]["other"]) == 9.0


# ---------------------------------------------------------------------------------------------
# 1 device vs 8 devices: loss and gradients.
# ---------------------------------------------------------------------------------------------

MESHES = {"one": (((("data", 1), ("fsdp", 1), ("tensor", 1))), 1),
          "data8": (((("data", 8), ("fsdp", 1), ("tensor", 1))), 8),
          "data4_fsdp2": (((("data", 4), ("fsdp", 2), ("tensor", 1))), 8)}
BATCH = 8
IMAGE_SPEC = DatasetSpec(name="synthetic", image_shape=(16, 16, 3), num_classes=None,
                         splits={"train": 1 << 20})
CODE_SPEC = PairDatasetSpec(name="synthetic_pairs", towers=("code", "text"), image_shape=None,
                            vocab_size=363, splits={"train": 1 << 20})
SMALL_HEADS = {
    "simclr": {"proj_dim": 16},
    "byol": {"proj_hidden": 32, "proj_dim": 16},
    "dino": {"out_dim": 64, "head_hidden": 32, "head_bottleneck": 16, "num_local": 2},
    # The BN head (the image suite's setting) normalises over the GLOBAL batch of all crops.
    "dino+bn": {"out_dim": 64, "head_hidden": 32, "head_bottleneck": 16, "num_local": 2,
                "use_bn_in_head": True},
    "clip": {"embed_dim": 16},
    "siglip": {"embed_dim": 16},
}


def mesh_config(name, mesh):
    return zoo.config.validate(zoo.config.Config(
        model=zoo.config.ModelConfig(size="test", patch_size=4),
        objective={"name": name.split("+")[0], **SMALL_HEADS[name]},
        data=zoo.config.DataConfig(name="synthetic", batch_size=BATCH, seq_len=16),
        mesh=mesh, steps=10, progress=False, peak_flops=1e12))


def synthetic_batch(name):
    rng = np.random.default_rng(0)
    if name.split("+")[0] in ("simclr", "byol", "dino"):
        return {"image": rng.integers(0, 256, (BATCH, 16, 16, 3), dtype=np.uint8)}
    tokens = lambda: np.concatenate(
        [rng.integers(7, 263, (BATCH, 12)), np.ones((BATCH, 1), int),
         np.zeros((BATCH, 3), int)], axis=1).astype(np.int32)
    return {"code": tokens(), "text": tokens()}


def loss_and_grads(name, key):
    mesh, count = MESHES[key]
    config = mesh_config(name, mesh)
    spec = IMAGE_SPEC if name.split("+")[0] in ("simclr", "byol", "dino") else CODE_SPEC
    experiment = zoo.train.build(config, devices=jax.devices()[:count], data_spec=spec)
    state = zoo.train.init_state(experiment)
    with jax.set_mesh(experiment.mesh):
        batch = zoo.train.global_batch(experiment, synthetic_batch(name))
        loss, grads = zoo.train.make_loss_and_grad(experiment)(state, batch)
    return float(loss), dict(zoo.train.leaves_by_path(jax.device_get(grads)))


# clip in the fast suite (the global-batch InfoNCE across two towers); the others compile the
# same three meshes in the slow step (~50 s each on 2 cores).
@pytest.mark.parametrize("name", [
    "clip", pytest.param("simclr", marks=pytest.mark.slow),
    pytest.param("siglip", marks=pytest.mark.slow), pytest.param("byol", marks=pytest.mark.slow),
    pytest.param("dino", marks=pytest.mark.slow),
    pytest.param("dino+bn", marks=pytest.mark.slow)])
def test_loss_and_gradients_same_on_1_and_8_devices(name):
    loss_one, grads_one = loss_and_grads(name, "one")
    assert np.isfinite(loss_one)
    total_norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads_one.values()))
    assert total_norm > 0
    # Absolute tolerance relative to the largest gradient: a 1/world_size bug is off by 8x,
    # float reassociation across devices by ~1e-7 relative. (Some leaves' gradients are
    # structurally zero, e.g. the encoder's last LayerNorm bias under SimCLR's BatchNorm head,
    # and are float noise of that size.)
    scale = max(float(np.abs(g).max()) for g in grads_one.values())
    for key in ("data8", "data4_fsdp2"):
        loss, grads = loss_and_grads(name, key)
        np.testing.assert_allclose(loss, loss_one, rtol=1e-5, err_msg=key)
        assert grads.keys() == grads_one.keys()
        for path, grad in grads.items():
            np.testing.assert_allclose(grad, grads_one[path], rtol=1e-4, atol=1e-4 * scale,
                                       err_msg=f"{key} {path}")
