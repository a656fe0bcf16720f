"""The TPU pod example configs and the tpu/ scripts.

Configs: every pod argument loads and validates, its mesh fills that pod's devices, the global
batch splits evenly over them, FSDP really shards every parameter's width, and the recipe's
numbers are the papers'. Scripts: `bash -n` (and shellcheck where installed), then run against
a stand-in `gcloud` that records its arguments and runs the "remote" commands locally, with
$HOME a temporary folder and a fake `zoo` that checkpoints on SIGTERM.
"""
import http.server
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import jax
import pytest
from flax import nnx

import objectives
import zoo.config
import zoo.models
from objectives.span_corruption import corrupted_lengths, input_and_target_lengths
from zoo.mesh import MESH_AXES, logical_to_spec

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"pod_mae_vitl16_imagenet": "experiments/pod_mae_vitl16_imagenet.py",
           "pod_t5_base_c4": "experiments/pod_t5_base_c4.py"}
SCRIPTS = sorted((ROOT / "tpu").glob("*.sh"))


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / CONFIGS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pods():
    return [(name, pod) for name in CONFIGS for pod in _module(name).POD_DEVICES]


def _mesh_sizes(mesh, devices):
    """The config's mesh with its -1 resolved for ``devices`` devices."""
    sizes = dict(mesh)
    fixed = math.prod(s for s in sizes.values() if s != -1)
    assert devices % fixed == 0
    return {name: devices // fixed if s == -1 else s for name, s in sizes.items()}


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,pod", _pods())
def test_pod_config_loads_and_its_batch_splits_over_the_pod(name, pod):
    module = _module(name)
    config = zoo.config.load(f"{CONFIGS[name]}:{pod}")
    assert zoo.config.validate(config) is config
    devices = module.POD_DEVICES[pod]
    sizes = _mesh_sizes(config.mesh, devices)
    assert tuple(sizes) == MESH_AXES and math.prod(sizes.values()) == devices
    parallel = sizes["data"] * sizes["fsdp"]
    assert config.data.batch_size % parallel == 0, (pod, config.data.batch_size, parallel)
    assert config.data.batch_size // parallel >= 1
    assert config.model.dtype == "bfloat16"


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_pod_is_refused_naming_the_known_ones(name):
    with pytest.raises(ValueError, match="unknown pod 'v9-4096'") as error:
        zoo.config.load(f"{CONFIGS[name]}:v9-4096")
    for pod in _module(name).POD_DEVICES:
        assert pod in str(error.value)


@pytest.mark.parametrize("name", CONFIGS)
def test_default_pod_and_tables_agree(name):
    module = _module(name)
    assert set(module.MESHES) == set(module.POD_DEVICES)
    assert zoo.config.load(CONFIGS[name]) == zoo.config.load(
        f"{CONFIGS[name]}:{module.DEFAULT_POD}")
    assert zoo.config.load(f"{CONFIGS[name]}:tiny").data.name in ("digits", "pycode")


def test_mae_recipe_is_the_reference_one():
    config = zoo.config.load(f"{CONFIGS['pod_mae_vitl16_imagenet']}:v4-32")
    assert config.data.name == "tfds:imagenet2012" and config.data.batch_size == 4096
    assert (config.model.size, config.model.patch_size) == ("L", 16)
    assert config.optim.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert (config.optim.weight_decay, config.optim.b2, config.optim.clip_norm) == (0.05, 0.95,
                                                                                      None)
    per_epoch = 1_281_167 / 4096
    assert config.steps == round(800 * per_epoch)
    assert config.optim.warmup_steps == round(40 * per_epoch)
    objective = objectives.get(**config.objective, patch_size=config.model.patch_size)
    objective.validate(image_shape=(224, 224, 3))
    assert (objective.mask_ratio, objective.norm_pix_loss) == (0.75, True)
    assert (objective.decoder_width, objective.decoder_depth, objective.decoder_heads) == (
        512, 8, 16)


def test_t5_rows_become_512_inputs_and_114_targets():
    config = zoo.config.load(f"{CONFIGS['pod_t5_base_c4']}:v4-32")
    objective = objectives.get(**config.objective)
    assert config.data.seq_len == input_and_target_lengths(512)[0] == 568
    assert corrupted_lengths(config.data.seq_len, objective.noise_density,
                             objective.mean_noise_span_length) == (512, 114)
    objective.validate(seq_len=config.data.seq_len)
    assert objective.model_lengths(config.data.seq_len) == {"encoder": 512, "decoder": 114}


def _abstract_model(config):
    """The config's backbone (plus MAE's decoder) as shapes only, and its parameter count."""
    m = config.model
    if config.objective["name"] == "mae":
        patch = m.patch_size
        backbone = nnx.eval_shape(lambda: zoo.models.get(
            "vit", size=m.size, grid=(224 // patch, 224 // patch), patch_dim=patch**2 * 3,
            rngs=nnx.Rngs(0)))
        objective = objectives.get(**config.objective, patch_size=patch)
        heads = nnx.eval_shape(lambda: objective.make_heads(backbone, rngs=nnx.Rngs(0)))
        return [backbone, heads]
    objective = objectives.get(**config.objective)
    return [nnx.eval_shape(lambda: zoo.models.get(
        m.name, size=m.size, vocab_size=objective.vocab_size,
        max_len=objective.max_len(config.data.seq_len), rngs=nnx.Rngs(0)))]


@pytest.mark.parametrize("name,pod", _pods())
def test_fsdp_splits_every_parameter_width_on_the_pod_mesh(name, pod):
    """Every parameter with an `embed` dimension is split fsdp ways (never silently
    replicated for a size that does not divide), so the memory per device is the total / fsdp."""
    config = zoo.config.load(f"{CONFIGS[name]}:{pod}")
    sizes = _mesh_sizes(config.mesh, _module(name).POD_DEVICES[pod])
    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    total = per_device = 0
    for model in _abstract_model(config):
        params = nnx.state(model, nnx.Param)
        logical = nnx.get_partition_spec(params)
        for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(
                logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
            spec = logical_to_spec(tuple(names), config.rules, leaf.shape, mesh)
            if "embed" in tuple(names):
                assert spec[tuple(names).index("embed")] == "fsdp", (names, leaf.shape, spec)
            split = math.prod(sizes[axis] for axis in spec if axis is not None)
            total += leaf.size
            per_device += leaf.size / split
    assert per_device == pytest.approx(total / sizes["fsdp"], rel=0.01)
    expected = {"pod_mae_vitl16_imagenet": 329.2e6, "pod_t5_base_c4": 199.2e6}[name]
    assert total == pytest.approx(expected, rel=0.001)   # ViT-L/16 + decoder; T5-base shape


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_variant_trains(name, data_dir, tmp_path):
    from zoo.train import train
    config = zoo.config.load(f"{CONFIGS[name]}:tiny", ["steps=2"])
    summary = train(config, str(tmp_path / "run"))
    assert summary["step"] == 2 and math.isfinite(summary["loss"])


# ---------------------------------------------------------------------------------------------
# Scripts
# ---------------------------------------------------------------------------------------------

def test_scripts_exist_and_parse():
    names = {path.name for path in SCRIPTS}
    assert {"create.sh", "install.sh", "launch.sh", "logs.sh", "stop.sh", "teardown.sh",
            "worker.sh", "common.sh"} <= names
    for path in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (path.name, result.stderr)
        text = path.read_text()
        if path.name != "common.sh":
            assert "set -euo pipefail" in text and "# Usage:" in text, path.name


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:3] == ["compute", "tpus", "tpu-vm"] and args[3] == "scp":
    for arg in args[4:]:
        if not arg.startswith("-") and ":" not in arg and os.path.exists(arg):
            shutil.copy(arg, os.environ["FAKE_SCP_DIR"])
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and os.environ.get("FAKE_GCLOUD_EXEC"):
    command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
    sys.exit(subprocess.call(["bash", "-c", command], cwd=os.environ["HOME"]))
"""

FAKE_ZOO = """#!/usr/bin/env bash
echo "fake zoo $* nargs=$# process=${JAX_PROCESS_ID:-none}/${JAX_NUM_PROCESSES:-none}" \\
     "coordinator=${JAX_COORDINATOR_ADDRESS:-none} data=${ZOO_DATA_DIR:-none} cwd=$PWD"
trap 'echo "SIGTERM: checkpointed, exiting"; exit 0' TERM
while true; do sleep 0.05; done
"""


@pytest.fixture
def fake_pod(tmp_path):
    """$HOME with the checkout at ~/zoo and a fake zoo in ~/zoo-venv; a recording gcloud."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "zoo-venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    (tmp_path / "scp").mkdir()
    (home / "zoo").symlink_to(ROOT)
    zoo_bin = home / "zoo-venv" / "bin" / "zoo"
    zoo_bin.write_text(FAKE_ZOO)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    for path in (zoo_bin, gcloud):
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "LANG": "C.UTF-8",
           "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.jsonl"),
           "FAKE_SCP_DIR": str(tmp_path / "scp"), "TPU_NAME": "test-pod",
           "ZONE": "test-zone1-a", "PROJECT": "test-project"}

    def run(script, *args, check=True, **extra):
        result = subprocess.run(["bash", str(ROOT / "tpu" / script), *args],
                                env={**env, **extra}, capture_output=True, text=True,
                                timeout=120)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def calls():
        path = Path(env["FAKE_GCLOUD_LOG"])
        return [json.loads(line) for line in path.read_text().splitlines()] if \
            path.exists() else []

    yield run, calls, home, tmp_path
    pid_file = home / "zoo-logs" / "pretrain.pid"   # never leave a fake run behind
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_create_and_teardown_commands(fake_pod):
    run, calls, _, _ = fake_pod
    run("create.sh", SPOT="1", ACCELERATOR_TYPE="v5litepod-64")
    run("teardown.sh", YES="1")
    create, delete = calls()
    assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "test-pod"]
    assert {"--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite", "--spot",
            "--zone=test-zone1-a"} <= set(create)
    assert delete == ["compute", "tpus", "tpu-vm", "delete", "test-pod", "--quiet",
                      "--zone=test-zone1-a"]
    run("create.sh")                                # v4-32 by default, on demand
    assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"} <= set(calls()[-1])
    assert "--spot" not in calls()[-1]


def test_install_copies_the_checkout_and_installs_jax_tpu_on_every_worker(fake_pod):
    run, calls, _, tmp_path = fake_pod
    run("install.sh")
    scp, setup, check = calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert "test-pod:zoo.tar.gz" in scp
    with tarfile.open(tmp_path / "scp" / "zoo.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "tpu/worker.sh", "experiments/pod_t5_base_c4.py"} <= names
    assert "--worker=all" in setup and "--worker=all" in check
    command = [a for a in setup if a.startswith("--command=")][0]
    assert "uv pip install" in command and "-e $HOME/zoo\\[gcs\\]" in command
    assert "jax\\[tpu\\]" in command and "--python 3.11" in command
    run("install.sh", REPO_URL="https://example.invalid/zoo.git", CHECK="0")
    (clone,) = calls()[3:]
    assert "git clone --quiet https://example.invalid/zoo.git $HOME/zoo" in clone[-2]


def test_launch_needs_config_and_workdir(fake_pod):
    run, calls, _, _ = fake_pod
    result = run("launch.sh", check=False, CONFIG="experiments/pod_t5_base_c4.py:v4-8")
    assert result.returncode == 2 and "usage:" in result.stderr and calls() == []


def test_launch_logs_stop_and_resume_on_a_fake_worker(fake_pod):
    run, calls, home, _ = fake_pod
    launch_env = dict(CONFIG="experiments/pod_t5_base_c4.py:v4-8", WORKDIR="gs://b/run 1",
                      DATA_DIR="gs://b/tfds", FAKE_GCLOUD_EXEC="1",
                      REMOTE_ENV="METADATA_URL=http://127.0.0.1:9")   # no metadata server
    run("launch.sh", "--set", "optim.lr=1e-4", **launch_env)
    assert "--worker=all" in calls()[-1]
    log = home / "zoo-logs" / "worker-0.log"
    _wait_for(lambda: "fake zoo" in log.read_text())
    text = log.read_text()
    assert ("fake zoo pretrain --config experiments/pod_t5_base_c4.py:v4-8 --workdir gs://b/run 1"
            " --set optim.lr=1e-4 nargs=7 process=none/none coordinator=none data=gs://b/tfds") in text
    assert f"cwd={home}/zoo" in text

    again = run("launch.sh", check=False, **launch_env)      # one run per worker at a time
    assert again.returncode != 0 and "already running" in again.stderr

    status = run("logs.sh", WORKER="all", LINES="5", FAKE_GCLOUD_EXEC="1")
    assert ": running (pid" in status.stdout and "] fake zoo pretrain" in status.stdout
    tail = run("logs.sh", FOLLOW="0", FAKE_GCLOUD_EXEC="1")
    assert "fake zoo pretrain" in tail.stdout and "--worker=0" in calls()[-1]

    stopped = run("stop.sh", TIMEOUT="30", FAKE_GCLOUD_EXEC="1")
    assert "sent SIGTERM" in stopped.stdout and "zoo exited" in stopped.stdout
    assert "SIGTERM: checkpointed, exiting" in log.read_text()
    assert not (home / "zoo-logs" / "pretrain.pid").exists()
    assert "no zoo run" in run("stop.sh", FAKE_GCLOUD_EXEC="1").stdout
    assert "not running" in run("logs.sh", WORKER="all", FAKE_GCLOUD_EXEC="1").stdout

    run("launch.sh", **launch_env)                            # resume: the same command
    _wait_for(lambda: log.read_text().count("fake zoo pretrain") == 2)
    run("stop.sh", TIMEOUT="30", FAKE_GCLOUD_EXEC="1")


class _Metadata(http.server.BaseHTTPRequestHandler):
    """The two TPU VM metadata attributes worker.sh reads (worker 2 of a 4-host slice)."""
    values = {"worker-network-endpoints": "unknown:unknown:10.1.0.7,unknown:unknown:10.1.0.8,"
                                          "unknown:unknown:10.1.0.9,unknown:unknown:10.1.0.10",
              "agent-worker-number": "2"}

    def do_GET(self):
        key = self.path.rsplit("/", 1)[-1]
        if (self.headers.get("Metadata-Flavor") != "Google"
                or not self.path.startswith("/computeMetadata/v1/instance/attributes/")
                or key not in self.values):
            self.send_error(404)
            return
        body = self.values[key].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_worker_takes_jax_distributed_settings_from_the_tpu_metadata(fake_pod):
    run, _, home, _ = fake_pod
    server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1"
        started = run("worker.sh", "start", "experiments/pod_mae_vitl16_imagenet.py:v4-32",
                      "gs://b/mae", METADATA_URL=url)
        assert "worker 2 started zoo" in started.stdout
        log = home / "zoo-logs" / "worker-2.log"
        _wait_for(lambda: "fake zoo" in log.read_text())
        assert "process=2/4 coordinator=10.1.0.7:8476" in log.read_text()
        assert "worker 2 of 4 (coordinator 10.1.0.7:8476)" in log.read_text()
        run("worker.sh", "stop", "30")
        # Settings given by the caller win over the metadata.
        run("worker.sh", "start", "c.py", "w", METADATA_URL=url, JAX_PROCESS_ID="1",
            JAX_NUM_PROCESSES="2", JAX_COORDINATOR_ADDRESS="10.9.9.9:1234")
        log = home / "zoo-logs" / "worker-1.log"
        _wait_for(lambda: "fake zoo" in log.read_text())
        assert "process=1/2 coordinator=10.9.9.9:1234" in log.read_text()
        run("worker.sh", "stop", "30")
    finally:
        server.shutdown()


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)
