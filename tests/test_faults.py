"""Faults a long run meets: preemption (SIGTERM), kill -9 at random moments (also during a
checkpoint write), and an unwritable checkpoint directory. Real ``zoo pretrain`` processes."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import zoo.config
import zoo.train
from zoo.metric_writer import read_metrics
from zoo.preemption import PreemptionWatcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, *settings):
    return [sys.executable, "-m", "zoo.cli", "-v", "pretrain", "--config",
            "experiments/mae_digits.py:tiny", "--workdir", str(workdir),
            "--set", "progress=False", "--set", "mesh=(('data',2),('fsdp',1),('tensor',1))",
            *[arg for s in settings for arg in ("--set", s)]]


def _env(data_dir, cache_dir):
    env = dict(os.environ, ZOO_DATA_DIR=data_dir, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return env


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def _final_params(workdir, settings):
    config = zoo.config.load(os.path.join(ROOT, "experiments/mae_digits.py:tiny"),
                             ["progress=False", *settings])
    experiment = zoo.train.build(config, devices=jax.devices()[:2])
    state, step = zoo.train.restore_or_init(experiment, str(workdir))
    return jax.device_get(state.params), step


def test_watcher_turns_sigterm_into_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert not watcher.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)      # would end pytest without the handler
        deadline = time.time() + 5
        while not watcher.stop_requested() and time.time() < deadline:
            time.sleep(0.01)
        assert watcher.stop_requested()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_requested_stop_checkpoints_that_step_and_resume_finishes(data_dir, tmp_path,
                                                                 monkeypatch):
    """In process: a stop requested during step 3 ends the run after step 3 with a checkpoint
    there; the next call resumes and reproduces the uninterrupted run's losses."""
    import zoo.preemption
    config = zoo.config.load(os.path.join(ROOT, "experiments/mae_digits.py:tiny"),
                             ["progress=False", "steps=6", "log_every=1", "checkpoint_every=100"])
    full = zoo.train.train(config, str(tmp_path / "full"))
    calls = {"n": 0}
    real = zoo.preemption.PreemptionWatcher.stop_requested

    def stop_after_three(self, step=None):
        calls["n"] += 1
        return calls["n"] >= 3 or real(self, step)

    monkeypatch.setattr(zoo.preemption.PreemptionWatcher, "stop_requested", stop_after_three)
    first = zoo.train.train(config, str(tmp_path / "cut"))
    assert first["preempted"] and first["step"] == 3
    assert zoo.train.completed_checkpoint_steps(str(tmp_path / "cut")) == [3]
    monkeypatch.setattr(zoo.preemption.PreemptionWatcher, "stop_requested", real)
    second = zoo.train.train(config, str(tmp_path / "cut"))
    assert not second["preempted"] and second["step"] == 6 and not full["preempted"]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_exits_0_and_resumes(data_dir, tmp_path):
    settings = ["steps=400", "log_every=1", "checkpoint_every=1000"]
    env = _env(data_dir, tmp_path / "cache")
    workdir = tmp_path / "run"
    process = subprocess.Popen(_command(workdir, *settings), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not _losses(workdir):
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be preempted"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    stopped = zoo.train.completed_checkpoint_steps(str(workdir))
    assert len(stopped) == 1 and 1 <= stopped[0] < 400, stopped
    assert '"preempted": true' in out
    # Resume to a short end and compare with an uninterrupted run (same schedule, same end).
    end = ["--stop-at", str(stopped[0] + 3)]
    subprocess.run(_command(workdir, *settings) + end, cwd=ROOT, env=env, check=True,
                   capture_output=True)
    subprocess.run(_command(tmp_path / "full", *settings) + end, cwd=ROOT, env=env, check=True,
                   capture_output=True)
    resumed, full = _losses(workdir), _losses(tmp_path / "full")
    assert sorted(resumed) == list(range(1, stopped[0] + 4))
    assert resumed == full


@pytest.mark.slow
def test_twenty_random_kill9s_never_restore_a_partial_checkpoint(data_dir, tmp_path):
    """SIGKILL at random moments (a checkpoint every step, so most kills after start-up land
    inside a write); each restart resumes from the newest COMPLETE checkpoint on disk, and the
    final parameters equal an uninterrupted run's bit for bit."""
    # A schedule far longer than 20 short lives can cover on any machine (200 steps did not
    # last 20 lives on a fast one); both runs then stop at the same step after the kills.
    steps = 100_000
    settings = [f"steps={steps}", "log_every=10", "checkpoint_every=1", "keep_checkpoints=2"]
    env = _env(data_dir, tmp_path / "cache")
    workdir, rng, kills, resumes = tmp_path / "killed", random.Random(0), 0, []
    while kills < 20:
        complete = zoo.train.completed_checkpoint_steps(str(workdir))
        log_path = tmp_path / f"stderr_{kills}.txt"
        with open(log_path, "w") as stderr:
            process = subprocess.Popen(_command(workdir, *settings), cwd=ROOT, env=env,
                                       stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                process.wait(timeout=rng.uniform(0.2, 12.0))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
        assert process.returncode == -signal.SIGKILL, log_path.read_text()[-2000:]
        log = log_path.read_text()
        found = re.search(r"resumed from step (\d+)", log)
        if found:   # it got far enough to restore: from the newest complete checkpoint
            resumes.append(int(found.group(1)))
            assert int(found.group(1)) == max(complete), (found.group(1), complete)
        elif "new run (no checkpoint yet)" in log:
            assert not complete, "a run with checkpoints on disk started from scratch"
        # else: killed during start-up, before it looked at the checkpoints
    assert len(resumes) >= 5 and resumes[-1] > 0, resumes   # kills landed after progress
    end = ["--stop-at", str(max(zoo.train.completed_checkpoint_steps(str(workdir))) + 5)]
    subprocess.run(_command(workdir, *settings) + end, cwd=ROOT, env=env, check=True,
                   capture_output=True)
    # The reference: same schedule, uninterrupted, one checkpoint where it stops (saving does
    # not change the parameters).
    subprocess.run(_command(tmp_path / "full", *settings, f"checkpoint_every={steps}") + end,
                   cwd=ROOT, env=env, check=True, capture_output=True)
    ours, step = _final_params(workdir, settings)
    reference, reference_step = _final_params(tmp_path / "full", settings)
    assert step == reference_step == int(end[1])
    jax.tree.map(np.testing.assert_array_equal, ours, reference)


def _tiny_config(*settings):
    return zoo.config.load(os.path.join(ROOT, "experiments/mae_digits.py:tiny"),
                           ["progress=False", "steps=4", "checkpoint_every=2", *settings])


def _assert_only_step_2_left_and_it_restores(workdir, config):
    directory = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(directory)) == ["2"]          # no partial step-4 files
    state, step = zoo.train.restore_or_init(zoo.train.build(config), str(workdir))
    assert step == 2 and int(state.step) == 2


def test_a_full_disk_is_refused_before_writing_and_the_last_checkpoint_stays(
        data_dir, tmp_path, monkeypatch):
    import zoo.checkpoint
    config = _tiny_config()
    real_usage, saves = zoo.checkpoint.shutil.disk_usage, []

    def full_after_first_save(path):
        saves.append(path)
        usage = real_usage(path)
        return usage._replace(free=usage.free if len(saves) == 1 else 1024)

    monkeypatch.setattr(zoo.checkpoint.shutil, "disk_usage", full_after_first_save)
    with pytest.raises(zoo.checkpoint.CheckpointWriteError,
                       match=r"cannot write step 4 .*1024|previous checkpoint \(step 2\)") as info:
        zoo.train.train(config, str(tmp_path / "run"))
    assert "MiB free" in str(info.value) and "previous checkpoint (step 2) is intact" in str(
        info.value)
    monkeypatch.undo()
    _assert_only_step_2_left_and_it_restores(tmp_path / "run", config)


def test_a_write_failing_midway_removes_its_partial_files(data_dir, tmp_path, monkeypatch):
    """The disk fills up during the write (tensorstore reports it as a ValueError)."""
    import zoo.checkpoint
    config = _tiny_config()
    real_save = zoo.checkpoint.ocp.CheckpointManager.save

    def fail_at_step_4(self, step, *args, **kwargs):
        if step != 4:
            return real_save(self, step, *args, **kwargs)
        os.makedirs(os.path.join(self.directory, "4.orbax-checkpoint-tmp", "state"))
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ...: No space left on device")

    monkeypatch.setattr(zoo.checkpoint.ocp.CheckpointManager, "save", fail_at_step_4)
    with pytest.raises(zoo.checkpoint.CheckpointWriteError,
                       match=r"step 4 .*RESOURCE_EXHAUSTED.*previous checkpoint \(step 2\)"):
        zoo.train.train(config, str(tmp_path / "run"))
    monkeypatch.undo()
    _assert_only_step_2_left_and_it_restores(tmp_path / "run", config)


@pytest.mark.slow
def test_real_full_and_read_only_filesystems_give_one_line_errors(data_dir, tmp_path):
    """On a real 1 MiB tmpfs (needs mount privileges): the CLI prints one line and exits 2,
    the previous checkpoint stays restorable; then the same for a read-only remount."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        env = _env(data_dir, tmp_path / "cache")
        command = _command(mount / "run", "steps=6", "checkpoint_every=2", "keep_checkpoints=5")
        command.remove("-v")
        full = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        assert full.returncode == 2
        error_lines = [l for l in full.stderr.splitlines() if l.startswith("zoo pretrain:")]
        assert len(error_lines) == 1 and "previous checkpoint (step 2) is intact" in \
            error_lines[0], full.stderr[-2000:]
        assert zoo.train.completed_checkpoint_steps(str(mount / "run")) == [2]
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        read_only = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        assert read_only.returncode == 2
        assert read_only.stderr.strip().endswith("is not writable"), read_only.stderr[-2000:]
        config = _tiny_config("steps=6")
        state, step = zoo.train.restore_or_init(zoo.train.build(config), str(mount / "run"))
        assert step == 2
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_checkpoint_without_the_optional_state_fields_restores(data_dir, tmp_path):
    """Checkpoints written before ``spike_stats`` existed stored the train state's fields
    without it; they must restore into today's state (here: written by hand the old way)."""
    import orbax.checkpoint as ocp
    import zoo.checkpoint
    config = _tiny_config()
    experiment = zoo.train.build(config)
    state = zoo.train.init_state(experiment)
    old_fields = {k: v for k, v in state._asdict().items() if k != "spike_stats"}
    directory = tmp_path / "run" / "checkpoints"
    manager = ocp.CheckpointManager(str(directory))
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(old_fields),
                                            data=ocp.args.JsonSave({"step": 2})))
    manager.wait_until_finished()
    manager.close()
    checkpointer = zoo.checkpoint.Checkpointer(str(directory))
    restored, data = checkpointer.restore(2, experiment.abstract_state)
    checkpointer.close()
    assert isinstance(restored, zoo.train.TrainState) and restored.spike_stats is None
    assert data == {"step": 2}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
                 jax.device_get(state.params))
