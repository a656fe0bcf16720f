"""Multi-process training without a pod: `zoo pretrain` as 2 processes on localhost.

Each process has 4 simulated CPU devices (8 in the global mesh ``data=4 x fsdp=2``: batch rows
split 8 ways, parameters split over fsdp), joins through ``zoo.distributed``
(``--coordinator-address 127.0.0.1:PORT``, gloo CPU collectives, loopback only), reads only its
half of every global batch and writes its shards of every checkpoint.

The slow tests (CI's separate step) run two phases of two concurrent runs (a 2-process run
mostly waits on its second process's compile, which misses the persistent cache because JAX
keys executables per process, so a 1-process run fits beside it):

1. ``ref``: 1 process x 8 devices, steps 1-6  ||  ``two``: 2 processes x 4 devices, steps 1-6;
2. ``a``: 1 process resumes ``two``'s step-3 checkpoint to 6  ||  ``b``: 2 processes resume
   ``ref``'s step-3 checkpoint to 6.

A step-3 checkpoint of a 6-step run is the one ``--stop-at 3`` writes (same save call, same
state); reusing it saves two runs. ``a`` and ``b`` get only ``config.json`` and that checkpoint,
no metrics, so every loss they report is their own. (The same tests passed with mesh
``data=8``; one mesh keeps this file near 2.5 minutes on 2 cores.)

Loss tolerance: rtol 1e-5. One process reduces gradients inside one XLA program, two processes
all-reduce them over gloo in another order, so results may differ in the last float32 bits
(measured: at most 1.2e-7, one ulp of a loss near 1-2.5); AdamW keeps such differences near
1e-7 relative over 6 steps. A wrong batch row, a swapped half or a bad restore moves the loss by
1e-2 or more (a permuted global batch: 1.5e-2 at step 1; consecutive steps differ by 0.03-0.5).

The subprocesses run ``zoo.cli.main`` through a small wrapper (``_WRAPPER``) that only records
which example indices each ``BatchIterator.__next__`` read, per process: the test then checks
that process p read exactly rows [8p, 8p+8) of each 16-row global batch of the 1-process run.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from zoo import distributed
from zoo.metric_writer import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "experiments/mae_digits.py:tiny"
STEPS, RESUME_FROM, BATCH = 6, 3, 16     # the tiny config's global batch is 16
RTOL = 1e-5
RUN_TIMEOUT_S = 300
MESH = "(('data',4),('fsdp',2))"

# Test harness only, no change to zoo: log what each BatchIterator.__next__ reads, then run the
# CLI exactly as `python -m zoo.cli` does. Imports nothing that initialises the JAX backend.
_WRAPPER = r"""
import json, os, sys
import zoo.data.iterator as iterator
_next = iterator.BatchIterator.__next__
def _logged_next(self):
    import jax
    step, indices = self.step, self._local_indices(self.step)
    batch = _next(self)
    with open(f"{os.environ['ZOO_TEST_READS']}.{jax.process_index()}", "a") as f:
        f.write(json.dumps({"step": step, "indices": indices}) + "\n")
    return batch
iterator.BatchIterator.__next__ = _logged_next
import zoo.cli
sys.exit(zoo.cli.main(sys.argv[1:]))
"""


# ---------------------------------------------------------------------------------------------
# Fast: settings from flags and environment, no real initialisation.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                            "SLURM_", "OMPI_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_resolve_single_process_without_settings():
    assert distributed.resolve(environ={}) is None
    assert distributed.resolve(environ={"JAX_NUM_PROCESSES": "1"}) is None
    assert distributed.resolve(num_processes=1, environ={}) is None


def test_resolve_from_arguments_environment_and_both():
    expected = distributed.Settings("10.0.0.1:1234", 4, 2)
    assert distributed.resolve("10.0.0.1:1234", 4, 2, environ={}) == expected
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "2"}
    assert distributed.resolve(environ=env) == expected
    # A flag overrides its own variable only.
    assert distributed.resolve(process_id=3, environ=env) == expected._replace(process_id=3)


@pytest.mark.parametrize("kwargs, env, flag", [
    (dict(num_processes=2, process_id=0), {}, "--coordinator-address"),
    (dict(coordinator_address="localhost:1234", process_id=0), {}, "--num-processes"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "--process-id"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), {},
     "--process-id"),
    (dict(process_id=-1), {}, "--process-id"),
    (dict(num_processes=0), {}, "--num-processes"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "--num-processes"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), {},
     "--coordinator-address"),
    (dict(coordinator_address="localhost:http", num_processes=2, process_id=0), {},
     "--coordinator-address"),
])
def test_resolve_rejects_partial_or_bad_settings_naming_the_flag(kwargs, env, flag):
    with pytest.raises(ValueError) as error:
        distributed.resolve(**kwargs, environ=env)
    message = str(error.value)
    assert message.startswith(flag) and "\n" not in message, message


def test_resolve_leaves_slurm_and_mpi_launches_to_jax_detection():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}
    assert distributed.resolve(environ=slurm).auto
    assert distributed.resolve(environ={**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.resolve(environ={"OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1",
                                        "OMPI_COMM_WORLD_SIZE": "4"}).auto
    # Explicit settings win over detection.
    assert not distributed.resolve("h:1", 2, 0, environ=slurm).auto


def test_initialize_is_a_no_op_for_one_process(clean_env):
    import jax
    assert distributed.initialize() is False
    assert not jax.distributed.is_initialized()


def test_initialize_refuses_once_the_backend_is_up(clean_env):
    import jax
    jax.devices()   # the test session's backend (conftest) is initialised
    with pytest.raises(RuntimeError, match="must be called before"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=1)
    assert not jax.distributed.is_initialized()


def test_cli_pretrain_flags(clean_env, capsys):
    from zoo import cli
    args = cli.make_parser().parse_args(
        ["pretrain", "--config", CONFIG, "--workdir", "w", "--coordinator-address",
         "localhost:1234", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator_address, args.num_processes, args.process_id) == \
        ("localhost:1234", 2, 1)
    code = cli.main(["pretrain", "--config", CONFIG, "--workdir", "w",
                     "--num-processes", "2", "--process-id", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("zoo pretrain: error: --coordinator-address") \
        and "\n" not in err, err


# ---------------------------------------------------------------------------------------------
# Slow: real processes.
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(data_dir, cache_dir, devices: int, reads: Path) -> dict:
    # Launcher variables would turn a 1-process run into a member of some other job; proxy
    # variables could route gRPC to 127.0.0.1 through a proxy.
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy")
           and not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                 "SLURM_", "OMPI_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", ZOO_DATA_DIR=data_dir, ZOO_TEST_READS=str(reads),
               JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


class _Run:
    """One command started as ``processes`` processes with 8 devices in all (2-process runs
    get ``--coordinator-address 127.0.0.1:PORT --num-processes 2 --process-id I``)."""

    def __init__(self, name: str, args: list[str], processes: int, data_dir: str,
                 cache_dir: str, logs: Path, workdir: Path | None = None):
        self.name, self.workdir, self.reads = name, workdir, logs / f"{name}.reads"
        env = _env(data_dir, cache_dir, 8 // processes, self.reads)
        port = _free_port()
        self.procs, self.outputs = [], []
        for index in range(processes):
            extra = ([] if processes == 1 else
                     ["--coordinator-address", f"127.0.0.1:{port}",
                      "--num-processes", str(processes), "--process-id", str(index)])
            output = logs / f"{name}.{index}.log"
            with open(output, "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, "-c", *args, *extra],
                                                   cwd=ROOT, env=env, stdout=f,
                                                   stderr=subprocess.STDOUT))
            self.outputs.append(output)

    def output(self, process: int) -> str:
        return "\n".join(line for line in self.outputs[process].read_text().splitlines()
                         if not line.startswith("[Gloo]"))

    def tails(self) -> str:
        return "\n".join(f"--- {self.name} process {i} (exit {p.poll()}), last lines:\n"
                         + self.output(i)[-3000:] for i, p in enumerate(self.procs))

    def read_log(self, process: int) -> list[dict]:
        with open(f"{self.reads}.{process}") as f:
            return [json.loads(line) for line in f]


def _pretrain(name: str, workdir: Path, processes: int, **common) -> _Run:
    args = [_WRAPPER, "pretrain", "--config", CONFIG, "--workdir", str(workdir),
            "--set", "progress=False", "--set", "log_every=1",
            "--set", f"steps={STEPS}", "--set", f"checkpoint_every={RESUME_FROM}",
            "--set", f"mesh={MESH}",
            "--set", "peak_flops=1e12"]   # no matmul timing at start
    return _Run(name, args, processes, workdir=workdir, **common)


def _wait(*runs: _Run, timeout: float = RUN_TIMEOUT_S) -> None:
    """Waits for every process; on a failure or the timeout kills them all and fails with the
    tails of their output (a process whose peer died would otherwise wait minutes)."""
    deadline = time.monotonic() + timeout
    procs = [p for run in runs for p in run.procs]
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(code == 0 for code in codes):
            return
        if any(code not in (None, 0) for code in codes):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    pytest.fail("zoo pretrain failed or timed out:\n" + "\n".join(r.tails() for r in runs))


def _copy_until(source: Path, target: Path, step: int) -> None:
    """``config.json`` and the step-``step`` checkpoint of ``source``; no metrics, no later
    checkpoints, so a run in ``target`` resumes at ``step``."""
    target.mkdir(parents=True)
    shutil.copy(source / "config.json", target / "config.json")
    shutil.copytree(source / "checkpoints", target / "checkpoints",
                    ignore=lambda d, names: [n for n in names if d == str(source / "checkpoints")
                                             and n.isdigit() and int(n) != step])


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


@pytest.fixture(scope="module")
def common(data_dir, compilation_cache_dir, tmp_path_factory):
    import zoo.data
    zoo.data.get_source("digits", "train", data_dir=data_dir)   # prepared once, not raced
    logs = tmp_path_factory.mktemp("multihost_logs")
    return dict(data_dir=data_dir, cache_dir=compilation_cache_dir, logs=logs)


@pytest.fixture(scope="module")
def runs(common, tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    start = time.monotonic()
    ref = _pretrain("ref", root / "ref", processes=1, **common)
    two = _pretrain("two", root / "two", processes=2, **common)
    _wait(ref, two)
    phase1 = time.monotonic() - start
    _copy_until(two.workdir, root / "a", RESUME_FROM)
    _copy_until(ref.workdir, root / "b", RESUME_FROM)
    a = _pretrain("a", root / "a", processes=1, **common)
    b = _pretrain("b", root / "b", processes=2, **common)
    _wait(a, b)
    print(f"\n[multihost] phase 1 {phase1:.0f} s, phase 2 "
          f"{time.monotonic() - start - phase1:.0f} s")
    return {"ref": ref, "two": two, "a": a, "b": b}


def _assert_close(losses: dict, reference: dict, steps) -> None:
    assert sorted(losses) == list(steps), sorted(losses)
    got = np.array([losses[s] for s in steps])
    want = np.array([reference[s] for s in steps])
    print(f"max |loss difference| over steps {list(steps)}: {np.abs(got - want).max():.3g}")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    reference = _losses(runs["ref"].workdir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    _assert_close(_losses(runs["two"].workdir), reference, range(1, STEPS + 1))
    # Process 0 alone wrote metrics: one record per step, not one per process.
    records = (runs["two"].workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == list(range(1, STEPS + 1))
    assert json.loads((runs["two"].workdir / "config.json").read_text())["steps"] == STEPS


@pytest.mark.slow
def test_each_process_reads_only_its_half_of_every_batch(runs):
    one = runs["ref"].read_log(0)
    assert [r["step"] for r in one] == list(range(STEPS))
    assert all(len(r["indices"]) == BATCH for r in one)
    for name, steps in (("two", range(STEPS)), ("b", range(RESUME_FROM, STEPS))):
        halves = [runs[name].read_log(p) for p in (0, 1)]
        for p, log in enumerate(halves):
            assert [r["step"] for r in log] == list(steps), (name, p)
            for r in log:
                rows = one[r["step"]]["indices"][p * BATCH // 2:(p + 1) * BATCH // 2]
                assert r["indices"] == rows, (name, p, r["step"])
    assert not Path(f"{runs['two'].reads}.2").exists()


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(runs):
    state = runs["two"].workdir / "checkpoints" / str(RESUME_FROM) / "state"
    # Both processes wrote array data into that checkpoint (orbax's OCDBT layout: one
    # ocdbt.process_<i> store per process).
    for p in (0, 1):
        assert any((state / f"ocdbt.process_{p}").rglob("d/*")), p
    assert [r["step"] for r in runs["a"].read_log(0)] == list(range(RESUME_FROM, STEPS))
    _assert_close(_losses(runs["a"].workdir), _losses(runs["ref"].workdir),
                  range(RESUME_FROM + 1, STEPS + 1))


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_in_two(runs):
    _assert_close(_losses(runs["b"].workdir), _losses(runs["ref"].workdir),
                  range(RESUME_FROM + 1, STEPS + 1))


# Each of 2 processes passes its 8 rows (global rows 8p..8p+7) through zoo.train.global_batch
# on several meshes and prints the assembled global batch's row order (or the ValueError).
_LAYOUT = r"""
import argparse, json, types
parser = argparse.ArgumentParser()
parser.add_argument("meshes")
parser.add_argument("--coordinator-address")
parser.add_argument("--num-processes", type=int)
parser.add_argument("--process-id", type=int)
args = parser.parse_args()
from zoo import distributed
distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
import jax, numpy as np
from jax.experimental import multihost_utils
from zoo.mesh import DEFAULT_RULES, make_mesh
from zoo.train import global_batch
results, p = {}, jax.process_index()
for name, axes in json.loads(args.meshes).items():
    experiment = types.SimpleNamespace(mesh=make_mesh([tuple(a) for a in axes]),
                                       config=types.SimpleNamespace(rules=DEFAULT_RULES))
    local = {"row": np.arange(8 * p, 8 * p + 8, dtype=np.int32)}
    try:
        batch = global_batch(experiment, local)["row"]
        results[name] = np.asarray(multihost_utils.process_allgather(batch, tiled=True)).tolist()
    except ValueError as error:
        results[name] = f"ValueError: {error}"
print("RESULT " + json.dumps(results), flush=True)
"""
LAYOUTS = {"data_fsdp": [["data", 4], ["fsdp", 2]],
           "data_fsdp_tensor": [["data", 2], ["fsdp", 2], ["tensor", 2]],
           "fsdp_data": [["fsdp", 2], ["data", 4]]}


@pytest.fixture(scope="module")
def layouts(common):
    run = _Run("layout", [_LAYOUT, json.dumps(LAYOUTS)], processes=2, **common)
    _wait(run, timeout=120)
    results = []
    for p in (0, 1):
        line = [x for x in run.output(p).splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    return {name: [r[name] for r in results] for name in LAYOUTS}


def _rows_in_order_or_refused(per_process: list) -> None:
    """Process p's rows must be global rows [8p, 8p+8), as in a 1-process run of the same
    config, or the mesh must be refused with a one-line error naming it."""
    for result in per_process:
        if isinstance(result, str):
            assert result.startswith("ValueError: mesh:") and "\n" not in result, result
        else:
            assert result == list(range(16)), result


@pytest.mark.slow
@pytest.mark.parametrize("name", ["data_fsdp", "data_fsdp_tensor"])
def test_global_batch_keeps_each_process_rows_in_place(layouts, name):
    _rows_in_order_or_refused(layouts[name])


@pytest.mark.slow
def test_global_batch_with_a_process_interleaving_mesh(layouts):
    """With fsdp before data a 2-process global batch would be rows [0,1,8,9,2,3,...] (a
    1-process run sees 0..15); zoo refuses such a mesh with a one-line error instead."""
    _rows_in_order_or_refused(layouts["fsdp_data"])


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(data_dir, tmp_path):
    """Preemption notice to process 1 only: JAX's sync manager makes both processes stop after
    the same step, write that step's checkpoint together and exit 0."""
    from zoo.train import completed_checkpoint_steps
    logs, workdir = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    args = [_WRAPPER, "pretrain", "--config", CONFIG, "--workdir", str(workdir),
            "--set", "progress=False", "--set", "log_every=1", "--set", "steps=400",
            "--set", "checkpoint_every=1000", "--set", f"mesh={MESH}",
            "--set", "peak_flops=1e12"]
    run = _Run("sigterm", args, 2, data_dir, str(tmp_path / "cache"), logs, workdir=workdir)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and not (workdir / "metrics.jsonl").exists():
        assert all(p.poll() is None for p in run.procs), run.tails()
        time.sleep(0.2)
    import signal
    run.procs[1].send_signal(signal.SIGTERM)
    _wait(run)
    steps = completed_checkpoint_steps(str(workdir))
    assert len(steps) == 1 and 1 <= steps[0] < 400, (steps, run.tails())
    assert '"preempted": true' in run.output(0), run.tails()
    assert max(r["step"] for r in read_metrics(str(workdir))) == steps[0]
