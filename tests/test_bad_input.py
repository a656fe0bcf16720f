"""Bad inputs fail fast: a one-line ValueError naming the config field, raised before anything
compiles and before anything is written to the workdir."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import jax
import numpy as np
import pytest

import zoo.config
import zoo.train
from compile_log import NoCompilation

ONE_DEVICE_MESH = (("data", 1), ("fsdp", 1), ("tensor", 1))
# The same config as tests/test_train.py's 1-device run, so the one real run here is served by
# the session's compilation cache when both files run.
CONFIG = ("steps=6", "log_every=1", "checkpoint_every=3", "keep_checkpoints=1",
          "progress=False", "peak_flops=1e12")


def tiny_config(*overrides: str) -> zoo.config.Config:
    config = zoo.config.load("experiments/mae_digits.py:tiny")
    return zoo.config.override(config, [*CONFIG, *overrides])


def assert_rejected(config, workdir, *, names: tuple[str, ...], devices=None) -> str:
    """``train`` raises a one-line ValueError naming ``names`` before compiling or writing."""
    with NoCompilation(), pytest.raises(ValueError) as error:
        zoo.train.train(config, workdir, devices=devices)
    message = str(error.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not named in {message!r}"
    assert not os.path.exists(workdir), f"{workdir} was created: {os.listdir(workdir)}"
    return message


# ---------------------------------------------------------------------------------------------
# Config values.
# ---------------------------------------------------------------------------------------------

def test_unknown_objective(data_dir, tmp_path):
    config = dataclasses.replace(tiny_config(), objective={"name": "nope"})
    message = assert_rejected(config, str(tmp_path / "run"), names=("objective.name", "nope"))
    assert "mae" in message   # lists the known ones


def test_unknown_objective_hyperparameter(data_dir, tmp_path):
    config = tiny_config("objective.mask_ration=0.5")   # --set allows new objective keys
    assert_rejected(config, str(tmp_path / "run"), names=("objective", "mask_ration"))


def test_unknown_model_name(data_dir, tmp_path):
    message = assert_rejected(tiny_config("model.name='nope'"), str(tmp_path / "run"),
                              names=("model.name", "nope"))
    assert "vit" in message


def test_unknown_model_size(data_dir, tmp_path):
    message = assert_rejected(tiny_config("model.size='huge'"), str(tmp_path / "run"),
                              names=("model.size", "huge"))
    assert "micro" in message


def test_unknown_dataset(data_dir, tmp_path):
    message = assert_rejected(tiny_config("data.name='nope'"), str(tmp_path / "run"),
                              names=("nope", "data.name"))
    assert "digits" in message


@pytest.mark.parametrize("ratio", [0, 1, 1.2, -0.5])
def test_mask_ratio_outside_0_1(data_dir, tmp_path, ratio):
    assert_rejected(tiny_config(f"objective.mask_ratio={ratio}"), str(tmp_path / "run"),
                    names=("objective.mask_ratio", str(ratio)))


def test_mask_ratio_that_keeps_no_patch(data_dir, tmp_path):
    # 32x32 digits in 4x4 patches: 64 patches, int(64 * 0.01) = 0 kept.
    assert_rejected(tiny_config("objective.mask_ratio=0.99"), str(tmp_path / "run"),
                    names=("objective.mask_ratio", "0.99"))


def test_image_size_not_divisible_by_patch_size(data_dir, tmp_path):
    assert_rejected(tiny_config("model.patch_size=5"), str(tmp_path / "run"),
                    names=("model.patch_size", "5", "32"))


def test_batch_not_divisible_by_data_parallel_devices(data_dir, tmp_path):
    config = tiny_config("data.batch_size=12", "mesh=(('data', 8), ('fsdp', 1), ('tensor', 1))")
    assert_rejected(config, str(tmp_path / "run"), names=("data.batch_size", "12", "8"))


def test_batch_not_divisible_over_data_and_fsdp(data_dir, tmp_path):
    # The batch is split over data x fsdp = 4 x 2: 12 is divisible by 4 but not by 8.
    config = tiny_config("data.batch_size=12", "mesh=(('data', 4), ('fsdp', 2), ('tensor', 1))")
    assert_rejected(config, str(tmp_path / "run"), names=("data.batch_size", "12", "8"))


@pytest.mark.parametrize("assignment, field", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("nope=1", "nope"),
    ("nope.deeper=1", "nope.deeper"),
    ("model.size.x=1", "model.size.x"),
])
def test_unknown_set_field(assignment, field):
    with pytest.raises(ValueError) as error:
        zoo.config.override(zoo.config.load("experiments/mae_digits.py:tiny"), [assignment])
    message = str(error.value)
    assert "\n" not in message and repr(field) in message, message


def test_set_without_a_value():
    with pytest.raises(ValueError, match="key=value"):
        zoo.config.override(zoo.config.load("experiments/mae_digits.py:tiny"), ["steps"])


# ---------------------------------------------------------------------------------------------
# Workdirs.
# ---------------------------------------------------------------------------------------------

def _file_hashes(root: str) -> dict[str, str]:
    hashes = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def test_workdir_of_a_different_config_is_left_untouched(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(f"mesh={ONE_DEVICE_MESH!r}")
    summary = zoo.train.train(config, workdir, stop_at=1, devices=jax.devices()[:1])
    assert summary["step"] == 1
    before = _file_hashes(workdir)
    assert "config.json" in before and any(p.startswith("checkpoints") for p in before)

    other = zoo.config.override(config, ["model.size='micro'"])
    with NoCompilation(), pytest.raises(ValueError) as error:
        zoo.train.train(other, workdir, devices=jax.devices()[:1])
    message = str(error.value)
    assert "\n" not in message
    assert "model.size" in message and "micro" in message and "workdir" in message, message
    assert _file_hashes(workdir) == before   # same files, byte for byte, none added


def test_workdir_accepts_a_resumable_change(data_dir, tmp_path):
    # The check compares only fields that change what a step computes: more steps may resume.
    workdir = str(tmp_path / "run")
    os.makedirs(os.path.join(workdir, "checkpoints", "6"))   # a complete checkpoint at step 6
    config = tiny_config(f"mesh={ONE_DEVICE_MESH!r}")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(zoo.config.to_dict(config), f)
    zoo.train.check_workdir(workdir, zoo.config.override(config, ["steps=60", "log_every=5"]))
    with pytest.raises(ValueError, match=r"optim\.lr"):
        zoo.train.check_workdir(workdir, zoo.config.override(config, ["optim.lr=0.5"]))
    with pytest.raises(ValueError, match=r"^steps: 4 is below"):
        zoo.train.check_workdir(workdir, zoo.config.override(config, ["steps=4"]))


def test_config_left_by_a_run_that_failed_before_its_first_checkpoint_is_replaced(
        data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    stale = zoo.config.override(tiny_config(), ["objective.decoder_width=36"])
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(zoo.config.to_dict(stale), f)
    zoo.train.check_workdir(workdir, tiny_config())   # no checkpoint: nothing to protect


@pytest.mark.parametrize("assignment, field", [
    ("steps=6.5", "steps"), ("optim.lr='fast'", "optim.lr"), ("progress=1", "progress"),
    ("mesh=(('data',-1),)", None)])
def test_wrongly_typed_or_partial_settings(data_dir, tmp_path, assignment, field):
    if field is None:   # a mesh without fsdp/tensor axes is valid: the batch rule skips them
        config = zoo.config.override(tiny_config(), [assignment, "steps=1"])
        experiment = zoo.train.build(config)
        assert experiment.mesh.axis_names == ("data",)
        rows = config.data.batch_size
        batch = zoo.train.global_batch(experiment, {
            "image": np.zeros((rows, 32, 32, 1), np.uint8), "label": np.zeros(rows, np.int32)})
        assert batch["image"].sharding.spec[0] in ("data", ("data",)), batch["image"].sharding
        assert len(batch["image"].sharding.device_set) == len(jax.devices())
        return
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: expected"):
        zoo.config.override(tiny_config(), [assignment])


def test_unwritable_workdir(data_dir, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: root may write into a read-only (chmod 500) directory, "
                    "so an unwritable workdir cannot be made here")
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir.chmod(0o500)
    try:
        with NoCompilation(), pytest.raises(ValueError) as error:
            zoo.train.train(tiny_config(), str(workdir))
        assert "workdir" in str(error.value) and "\n" not in str(error.value)
        assert os.listdir(workdir) == []
    finally:
        workdir.chmod(0o700)


def test_workdir_that_cannot_be_created(data_dir, tmp_path):
    # Works as root too: nothing may create a directory below a regular file.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    workdir = str(blocker / "run")
    with NoCompilation(), pytest.raises(ValueError) as error:
        zoo.train.train(tiny_config(), workdir)
    message = str(error.value)
    assert "workdir" in message and "\n" not in message, message
    assert blocker.read_text() == "not a directory"
