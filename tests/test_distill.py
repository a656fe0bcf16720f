"""EMA teachers in the train state: the update rule and schedule, DINO's centre, the teacher
checkpointed and resumed exactly, and feature_mimic's frozen teacher from another workdir."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import objectives
import zoo.config
import zoo.train
from zoo.compare import suite_config


def test_byol_update_state_is_ema_with_cosine_momentum():
    byol = objectives.get("byol", base_momentum=0.9)
    teacher = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    params = {"w": jnp.array([0.0, 4.0]), "b": jnp.array(5.0)}
    for step, momentum in ((0, 0.9), (50, 0.95), (100, 1.0)):
        new = byol.update_state({"teacher": teacher}, params=params, outputs=None,
                                step=jnp.int32(step), total_steps=100)
        # By hand: m * teacher + (1 - m) * params.
        np.testing.assert_allclose(new["teacher"]["w"],
                                   [momentum * 1.0, momentum * 2 + (1 - momentum) * 4],
                                   rtol=1e-6)
        np.testing.assert_allclose(new["teacher"]["b"], momentum * 3 + (1 - momentum) * 5,
                                   rtol=1e-6)


def test_dino_center_is_ema_of_teacher_batch_mean():
    dino = objectives.get("dino", out_dim=3, center_momentum=0.9, base_momentum=1.0)
    center = jnp.array([[1.0, 0.0, -1.0]])
    teacher_logits = jnp.array([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]],      # crop 1, batch 2
                                [[0.0, 0.0, 0.0], [4.0, 4.0, 4.0]]])     # crop 2
    state = {"teacher": {"w": jnp.ones(2)}, "center": center}
    new = dino.update_state(state, params={"w": jnp.zeros(2)}, outputs={"teacher": teacher_logits},
                            step=jnp.int32(0), total_steps=10)
    batch_mean = np.array([8.0, 8.0, 8.0]) / 4
    np.testing.assert_allclose(new["center"], 0.9 * np.array([[1.0, 0.0, -1.0]])
                               + 0.1 * batch_mean, rtol=1e-6)
    np.testing.assert_allclose(new["teacher"]["w"], [1.0, 1.0])   # momentum 1: frozen


def test_feature_mimic_needs_a_teacher_workdir(data_dir):
    config = zoo.config.override(suite_config("image", "mae", tiny=True),
                                 ["objective.name='feature_mimic'"])
    with pytest.raises(ValueError, match="objective.teacher_workdir"):
        zoo.train.build(config)


def tiny(name, *extra):
    return zoo.config.override(suite_config("image", name, tiny=True),
                               ["progress=False", "steps=4", "log_every=1",
                                "checkpoint_every=2", *extra])


def state_of(config, workdir):
    experiment = zoo.train.build(config)
    state, step = zoo.train.restore_or_init(experiment, workdir)
    return jax.device_get(state), step


@pytest.mark.slow
def test_train_step_moves_teacher_by_ema_and_resume_is_exact(data_dir, tmp_path):
    config = tiny("byol")
    experiment = zoo.train.build(config)
    state0 = zoo.train.init_state(experiment)
    teacher0 = jax.device_get(state0.objective_state["teacher"])
    for (path, t), (_, p) in zip(zoo.train.leaves_by_path(teacher0),
                                 zoo.train.leaves_by_path(jax.device_get(state0.params))):
        np.testing.assert_array_equal(t, p, err_msg=path)   # the teacher starts as the student
    batch = next(zoo.train.make_batches(experiment))
    with jax.set_mesh(experiment.mesh):
        state1, _ = zoo.train.make_train_step(experiment)(
            state0, zoo.train.global_batch(experiment, batch))
    params1 = jax.device_get(state1.params)
    teacher1 = jax.device_get(state1.objective_state["teacher"])
    m = float(objectives.cosine_momentum(0.996, 0, config.steps))
    moved = 0
    for (path, t1), (_, t0), (_, p1) in zip(zoo.train.leaves_by_path(teacher1),
                                            zoo.train.leaves_by_path(teacher0),
                                            zoo.train.leaves_by_path(params1)):
        np.testing.assert_allclose(t1, m * t0 + (1 - m) * p1, rtol=1e-5, atol=1e-7,
                                   err_msg=path)
        moved += not np.array_equal(t1, t0)
    assert moved > 0

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    zoo.train.train(config, str(straight))
    zoo.train.train(config, str(interrupted), stop_at=2)
    zoo.train.train(config, str(interrupted))
    a, step_a = state_of(config, str(straight))
    b, step_b = state_of(config, str(interrupted))
    assert step_a == step_b == 4
    for (path, x), (_, y) in zip(zoo.train.leaves_by_path(a.objective_state),
                                 zoo.train.leaves_by_path(b.objective_state)):
        np.testing.assert_array_equal(x, y, err_msg=path)
    for (path, x), (_, y) in zip(zoo.train.leaves_by_path(a.params),
                                 zoo.train.leaves_by_path(b.params)):
        np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.mark.slow
def test_dino_resume_keeps_center_and_teacher(data_dir, tmp_path):
    config = tiny("dino")
    zoo.train.train(config, str(tmp_path / "a"))
    zoo.train.train(config, str(tmp_path / "b"), stop_at=2)
    zoo.train.train(config, str(tmp_path / "b"))
    a, _ = state_of(config, str(tmp_path / "a"))
    b, _ = state_of(config, str(tmp_path / "b"))
    assert np.abs(a.objective_state["center"]).sum() > 0      # the centre moved
    for (path, x), (_, y) in zip(zoo.train.leaves_by_path(a.objective_state),
                                 zoo.train.leaves_by_path(b.objective_state)):
        np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.mark.slow
def test_feature_mimic_teacher_is_the_source_encoder_and_stays_frozen(data_dir, tmp_path):
    source = tiny("mae", "steps=2")
    zoo.train.train(source, str(tmp_path / "teacher"))
    config = tiny("mae", "objective.name='feature_mimic'",
                  f"objective.teacher_workdir={str(tmp_path / 'teacher')!r}")
    summary = zoo.train.train(config, str(tmp_path / "student"))
    assert math.isfinite(summary["mimic_loss"]) and summary["mimic_loss"] > 0
    teacher_state, _ = state_of(source, str(tmp_path / "teacher"))
    state, _ = state_of(config, str(tmp_path / "student"))
    found = dict(zoo.train.leaves_by_path(state.objective_state["teacher"]["encoder"]))
    for path, leaf in zoo.train.leaves_by_path(teacher_state.params["encoder"]):
        np.testing.assert_array_equal(found[path], leaf, err_msg=path)
    # The student trained away from its own init, the teacher did not follow.
    student = dict(zoo.train.leaves_by_path(state.params["encoder"]))
    assert any(not np.array_equal(student[p], found[p]) for p in found)


def test_dino_pool_must_be_mean_or_cls():
    assert objectives.get("dino", pool="cls").pool == "cls"
    with pytest.raises(ValueError, match="objective.pool"):
        objectives.get("dino", pool="max")


def test_dino_freeze_last_layer_zeroes_only_the_prototype_gradient():
    """The reference cancels the last layer's gradient during the first epoch
    (``freeze_last_layer``); the MLP below it still learns."""
    from flax import nnx
    from zoo.models.heads import DinoHead
    head = DinoHead(8, 16, hidden_dim=12, bottleneck_dim=6, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(head, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (4, 8))

    def grads(freeze):
        def loss(p):
            out = nnx.merge(graphdef, p)(x, freeze_last=freeze)
            return jnp.sum(jax.nn.log_softmax(out / 0.1)[:, 0])
        return jax.grad(loss)(params)

    frozen, free = grads(jnp.bool_(True)), grads(jnp.bool_(False))
    assert np.all(np.asarray(frozen["last"][...]) == 0)
    assert np.abs(np.asarray(free["last"][...])).max() > 0
    for layer in range(3):
        np.testing.assert_allclose(frozen["layers"][layer]["kernel"][...],
                                   free["layers"][layer]["kernel"][...], rtol=1e-6)


def test_dino_freezes_prototypes_for_the_configured_steps():
    dino = objectives.get("dino", out_dim=4, freeze_last_layer_steps=3)
    assert dino.freeze_last_layer_steps == 3
    with pytest.raises(ValueError, match="objective.freeze_last_layer_steps"):
        objectives.get("dino", freeze_last_layer_steps=-1)


def _head_by_hand(params, x, use_bn):
    """DINOHead's forward written out in numpy: Linear (-> BN over the rows) -> exact GELU,
    twice; Linear to the bottleneck; L2 normalise; unit-norm prototypes."""
    from scipy.special import erf
    x = np.asarray(x, np.float64)
    layers = params["layers"]
    for i in range(2):
        x = x @ np.asarray(layers[i]["kernel"][...]) + np.asarray(layers[i]["bias"][...])
        if use_bn:
            x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)   # biased variance, eps 1e-5
        x = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    x = x @ np.asarray(layers[2]["kernel"][...]) + np.asarray(layers[2]["bias"][...])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = np.asarray(params["last"][...], np.float64)
    return x @ (w / np.linalg.norm(w, axis=0, keepdims=True))


@pytest.mark.parametrize("use_bn", [False, True])
def test_dino_head_matches_the_reference_forward(use_bn):
    from flax import nnx
    from zoo.models.heads import DinoHead
    head = DinoHead(8, 16, hidden_dim=12, bottleneck_dim=6, use_bn=use_bn, rngs=nnx.Rngs(0))
    _, params = nnx.split(head, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    np.testing.assert_allclose(head(x), _head_by_hand(params, x, use_bn), rtol=2e-4, atol=2e-5)
    # BN couples the rows (statistics of the batch); without it each row stands alone.
    alone = head(x[:3])
    assert np.allclose(alone, head(x)[:3], atol=1e-6) != use_bn


def test_dino_target_entropies_detect_both_collapses():
    from objectives.distill import dino_target_entropies
    k = 8
    # Uniform collapse: every crop's logits equal the centre -> H = ln K, no information.
    flat = jnp.zeros((2, 4, k))
    entropy, information = dino_target_entropies(flat, jnp.zeros((1, k)), 0.04)
    np.testing.assert_allclose([entropy, information], [math.log(k), 0.0], atol=1e-5)
    # Each of 4 images points sharply at its own prototype: H ~ 0, information = ln 4.
    sharp = jnp.tile(10.0 * jnp.eye(4, k)[None], (2, 1, 1))
    entropy, information = dino_target_entropies(sharp, jnp.zeros((1, k)), 0.04)
    np.testing.assert_allclose([entropy, information], [0.0, math.log(4)], atol=1e-4)
    # All images point at ONE prototype (dimension collapse): H ~ 0 and no information.
    one = jnp.zeros((2, 4, k)).at[..., 3].set(10.0)
    entropy, information = dino_target_entropies(one, jnp.zeros((1, k)), 0.04)
    np.testing.assert_allclose([entropy, information], [0.0, 0.0], atol=1e-4)


def test_dino_color_strength_scales_the_jitter():
    """A flat grey image stays flat under crop, flip, grey, blur and (below the threshold)
    solarize: only the colour jitter can change it."""
    images = jnp.full((6, 16, 16, 3), 77, jnp.uint8)
    batch = {"image": images}
    plain = objectives.get("dino", num_local=1, color_strength=0.0, patch_size=4)
    inputs, _ = plain.prepare(batch, jax.random.key(0))
    for views in (inputs["global"], inputs["local"]):
        np.testing.assert_allclose(views, 77 / 255 * 2 - 1, atol=2e-4)   # blur/grey rounding
    jittered, _ = objectives.get("dino", num_local=1, patch_size=4).prepare(batch,
                                                                           jax.random.key(0))
    assert np.abs(np.asarray(jittered["global"]) - (77 / 255 * 2 - 1)).max() > 0.01
    for bad in (-1.0, 6.0):
        with pytest.raises(ValueError, match="objective.color_strength"):
            objectives.get("dino", color_strength=bad)


def test_dino_bn_head_sees_all_student_crops_at_once_and_the_teacher_only_globals():
    """As the reference's MultiCropWrapper: the student's head runs once over every crop, so
    with BN its global-crop logits depend on the local crops; the teacher's head sees only the
    two global crops."""
    from flax import nnx

    from zoo.data import DatasetSpec
    config = zoo.config.validate(zoo.config.Config(
        model=zoo.config.ModelConfig(size="test", patch_size=4),
        objective={"name": "dino", "out_dim": 16, "head_hidden": 12, "head_bottleneck": 8,
                   "num_local": 2, "use_bn_in_head": True},
        data=zoo.config.DataConfig(name="synthetic", batch_size=4), steps=10, progress=False))
    spec = DatasetSpec(name="synthetic", image_shape=(16, 16, 3), num_classes=None,
                       splits={"train": 64})
    experiment = zoo.train.build(config, devices=jax.devices()[:1], data_spec=spec)
    dino, state = experiment.objective, zoo.train.init_state(experiment)
    model = nnx.merge(experiment.graphdef, state.params)
    context = objectives.StepContext(
        state=state.objective_state, teacher=nnx.merge(experiment.graphdef, state.params),
        step=jnp.int32(0), total_steps=10,
        merge=lambda params: nnx.merge(experiment.graphdef, params))
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    inputs, _ = dino.prepare({"image": jnp.asarray(images)}, jax.random.key(0))
    out = dino.apply(model, inputs, context)
    moved = dino.apply(model, {**inputs, "local": 0.5 * inputs["local"]}, context)
    assert np.abs(np.asarray(moved["student"][:2] - out["student"][:2])).max() > 1e-3
    np.testing.assert_array_equal(moved["teacher"], out["teacher"])
    # The teacher's logits are its head over the global crops' features alone.
    features = dino._features(context.teacher, inputs["global"])
    alone = context.teacher.heads(features.reshape(8, -1)).reshape(2, 4, -1)
    np.testing.assert_allclose(out["teacher"], alone, rtol=1e-5, atol=1e-6)
