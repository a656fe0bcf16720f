"""A real `zoo pretrain` process killed with SIGKILL after a checkpoint resumes exactly."""
import os
import signal
import subprocess
import sys
import time

import pytest

from zoo.metric_writer import read_metrics

SETTINGS = ["--set", "steps=8", "--set", "log_every=1", "--set", "checkpoint_every=2",
            "--set", "progress=False", "--set", "mesh=(('data',2),('fsdp',1),('tensor',1))"]


def _command(workdir):
    return [sys.executable, "-m", "zoo.cli", "pretrain", "--config",
            "experiments/mae_digits.py:tiny", "--workdir", str(workdir), *SETTINGS]


def _env(data_dir):
    env = dict(os.environ, ZOO_DATA_DIR=data_dir)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return env


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted(data_dir, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_command(full), cwd=root, env=_env(data_dir), check=True,
                   capture_output=True)

    process = subprocess.Popen(_command(killed), cwd=root, env=_env(data_dir),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    checkpoints = killed / "checkpoints"
    # Kill as soon as the step-4 checkpoint is complete (orbax renames it into place).
    while time.time() < deadline and process.poll() is None:
        if (checkpoints / "4").is_dir():
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert max(_losses(killed)) < 8

    subprocess.run(_command(killed), cwd=root, env=_env(data_dir), check=True,
                   capture_output=True)
    full_losses, resumed_losses = _losses(full), _losses(killed)
    assert sorted(resumed_losses) == list(range(1, 9))
    assert resumed_losses == full_losses   # bit-identical per-step losses
