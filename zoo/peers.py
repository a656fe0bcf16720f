"""``zoo bench --vs-peers``: our train step against widely used implementations, side by side.

Two benchmarks, each ours vs a peer script (``experiments/peers/``, copies of the project's
``shared/peers/``), on the same machine and configuration, in one invocation:

* ``mae``: MAE ViT-S/16 at 224, decoder 256 x 4, batch 16, AdamW, float32, vs the PyTorch
  reference (HF transformers ``ViTMAEForPreTraining`` on CPU torch). Target: ours <= 0.85 x.
* ``mlm``: BERT-base MLM, batch 16 x 128, AdamW, float32, vs HF's Flax example
  (``FlaxBertForMaskedLM``, host numpy masking, logits at every position). Target: <= 0.75 x.

Both sides run as child processes, alternating (ours first in even rounds, the peer first in odd
ones, so a drift in machine load hits both alike), and are measured the same way: each prints
the median of its timed steps, and a small measuring parent reports each child's own peak
resident memory (``getrusage`` of its children). Our side also reports MFU against the matmul
peak it measures in the same process.

The peer's packages (torch, transformers, an older flax) live in a virtual environment of their
own (``.peers-venv/`` by default), created here, never in the project's dependencies. This module
imports neither torch nor JAX: the timed code runs in the children.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]

# What the peer scripts import (torch; transformers' PyTorch ViT-MAE and Flax BERT; flax.linen,
# which flax >= 0.11 no longer ships with the APIs transformers 4.46 uses; jax; optax via flax).
PEER_REQUIREMENTS: tuple[str, ...] = ("torch==2.13.0", "transformers==4.46.3", "flax<0.11", "jax")
PEER_PACKAGES = ("torch", "transformers", "flax", "jax", "jaxlib", "optax", "numpy")
MARKER = "zoo-peer-requirements.txt"

# Ours/peer step-time ratio each benchmark must stay at or below (issue: "Speed against the peers").
TARGETS = {"mae": 0.85, "mlm": 0.75}
BENCHMARKS = {
    "mae": {"title": "MAE ViT-S/16 224, dec 256x4, b16", "peer": "peer_mae.py",
            "peer_args": ("16",), "peer_key": "torch_vitmae_step_s",
            "peer_name": "PyTorch HF ViTMAEForPreTraining"},
    "mlm": {"title": "BERT-base MLM, b16 x 128", "peer": "peer_mlm.py",
            "peer_args": ("16", "128"), "peer_key": "hf_flax_bert_mlm_step_s",
            "peer_name": "HF Flax FlaxBertForMaskedLM example"},
}


def default_peer_dir() -> Path:
    """The repo's copies of the peer scripts, else the shared folder beside the checkout."""
    for candidate in (ROOT / "experiments" / "peers", ROOT.parent / "shared" / "peers"):
        if (candidate / "peer_mae.py").exists():
            return candidate
    raise FileNotFoundError("no peer scripts in experiments/peers/ nor ../shared/peers/")


# ---------------------------------------------------------------------------------------------
# The peers' virtual environment.
# ---------------------------------------------------------------------------------------------

def venv_python(path: str | os.PathLike) -> Path:
    return Path(path) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _create_venv(path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)


def _pip_install(python: Path, requirements: Sequence[str]) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", *requirements], check=True)


def _marker_text(requirements: Sequence[str]) -> str:
    return "".join(f"{r}\n" for r in requirements)


def peer_venv_ready(path: str | os.PathLike = ".peers-venv",
                    requirements: Sequence[str] = PEER_REQUIREMENTS) -> bool:
    """True if ``path`` holds a venv whose last successful install was exactly ``requirements``."""
    path = Path(path)
    marker = path / MARKER
    return (venv_python(path).exists() and marker.exists()
            and marker.read_text() == _marker_text(requirements))


def ensure_peer_venv(path: str | os.PathLike = ".peers-venv", *, install: bool = True,
                     requirements: Sequence[str] = PEER_REQUIREMENTS,
                     create: Callable[[Path], None] = _create_venv,
                     installer: Callable[[Path, Sequence[str]], None] = _pip_install) -> Path:
    """Returns the python of a venv at ``path`` holding the pinned peer packages.

    Idempotent: a marker file in the venv lists the requirements of its last successful install;
    when it matches, nothing runs. A missing venv is created (``python -m venv``), and a missing
    or different marker (other pins) triggers an install into it. With ``install=False`` a venv
    that is not ready raises instead. ``create``/``installer`` are replaceable for tests.
    """
    path = Path(path)
    python = venv_python(path)
    if peer_venv_ready(path, requirements):
        return python
    if not install:
        raise RuntimeError(f"peer venv {path} is missing or not installed with "
                           f"{' '.join(requirements)}; run without --no-install to create it")
    if not python.exists():
        create(path)
    marker = path / MARKER
    if marker.exists():
        marker.unlink()   # a failed install below must not leave a stale "ready" marker
    installer(python, list(requirements))
    marker.write_text(_marker_text(requirements))
    return python


def peer_versions(python: str | os.PathLike) -> dict:
    """Installed versions of the peer's packages in the venv of ``python``."""
    code = ("import json, importlib.metadata as m\nout = {}\n"
            f"for p in {list(PEER_PACKAGES)!r}:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Child processes: one timing each, peak memory from a measuring parent.
# ---------------------------------------------------------------------------------------------

def cpu_busy_seconds() -> float | None:
    """Busy CPU time of the whole machine so far, all cores and processes (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user and nice)
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


# Runs the measured command and reports ITS rusage. Measuring through this small intermediate
# matters: Linux carries a process's peak RSS across fork and exec, so a child forked straight
# from a big parent (a pytest session, a JAX process) would report the parent's peak as its own.
_MEASURE = """\
import json, resource, subprocess, sys
report, cmd = sys.argv[1], sys.argv[2:]
code = subprocess.call(cmd)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(report, "w") as f:
    json.dump({"maxrss": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}, f)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: Sequence[str], *, env: dict | None = None, timeout: float = 3600,
                 echo: Callable[[str], None] | None = None) -> dict:
    """Runs ``cmd``; returns its last stdout line parsed as JSON plus ``wall_seconds`` and
    ``peak_rss_mib`` (the child's own peak resident memory, from a small measuring parent) and
    ``others_cpu_cores``: the cores the rest of the machine kept busy meanwhile (machine-wide
    busy CPU time less the child's own, over the wall time), which says how contended it was."""
    with tempfile.TemporaryDirectory() as tmp:
        report, out_path, err_path = (Path(tmp) / n for n in ("rusage.json", "out", "err"))
        with open(out_path, "w") as out, open(err_path, "w") as err:
            busy_before = cpu_busy_seconds()
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", _MEASURE, str(report), *cmd],
                                    stdout=out, stderr=err, env=env, cwd=str(ROOT),
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            finally:
                if proc.poll() is None:  # timed out or interrupted: stop the whole group
                    os.killpg(proc.pid, 9)
                    proc.wait()
            wall = time.perf_counter() - start
            busy_after = cpu_busy_seconds()
        stdout, stderr = out_path.read_text(), err_path.read_text()
        usage = json.loads(report.read_text()) if report.exists() else None
    if proc.returncode != 0 or usage is None:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} after {wall:.0f} s:\n"
                           f"{stderr[-4000:]}")
    lines = [line for line in stdout.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON line:\n{stdout[-2000:]}"
                           f"\n{stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["wall_seconds"] = wall
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    result["peak_rss_mib"] = usage["maxrss"] / scale
    result["child_cpu_seconds"] = usage["cpu"]
    result["others_cpu_cores"] = (
        None if busy_before is None or busy_after is None
        else max(0.0, (busy_after - busy_before - result["child_cpu_seconds"]) / wall))
    if echo:
        echo(f"    {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}: "
             f"{wall:.0f} s wall")
    return result


def _child_env(*, for_peer: bool) -> dict:
    env = dict(os.environ)
    if for_peer:   # nothing of the project's environment leaks into the peer's imports
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(key, None)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def ours_runner(*, steps: int = 5, python: str = sys.executable, timeout: float = 3600,
                echo=None) -> Callable[[str], dict]:
    """A runner timing our step for a benchmark name in a child process (``python -m zoo.peers
    ours NAME``); returns step_seconds, mfu, matmul peak, model GFLOP/step, peak memory."""
    def run(name: str) -> dict:
        r = run_measured([python, "-m", "zoo.peers", "ours", name, "--steps", str(steps)],
                         env=_child_env(for_peer=False), timeout=timeout, echo=echo)
        return {**r, "peak_host_memory_mib": r["peak_rss_mib"]}
    return run


def peer_runner(python: str | os.PathLike, *, peer_dir: str | os.PathLike | None = None,
                timeout: float = 3600, echo=None) -> Callable[[str], dict]:
    """A runner timing the peer script of a benchmark name with the peer venv's ``python``."""
    peer_dir = Path(peer_dir) if peer_dir else default_peer_dir()

    def run(name: str) -> dict:
        spec = BENCHMARKS[name]
        r = run_measured([str(python), str(peer_dir / spec["peer"]), *spec["peer_args"]],
                         env=_child_env(for_peer=True), timeout=timeout, echo=echo)
        return {**r, "step_seconds": float(r[spec["peer_key"]]),
                "peak_host_memory_mib": r["peak_rss_mib"]}
    return run


# ---------------------------------------------------------------------------------------------
# Alternating rounds, medians, ratios, the table.
# ---------------------------------------------------------------------------------------------

def round_order(round_index: int) -> tuple[str, str]:
    """Even rounds run ours first, odd rounds the peer first."""
    return ("ours", "peer") if round_index % 2 == 0 else ("peer", "ours")


def summarize(name: str, ours: Sequence[dict], peer: Sequence[dict],
              target: float | None = None) -> dict:
    """Medians over rounds (each round's figure is already a median over its steps), the
    ours/peer ratio of the medians, the target verdict, our MFU and both sides' peak memory."""
    target = TARGETS.get(name) if target is None else target
    ours_s = [float(r["step_seconds"]) for r in ours]
    peer_s = [float(r["step_seconds"]) for r in peer]
    ours_med, peer_med = statistics.median(ours_s), statistics.median(peer_s)
    ratio = ours_med / peer_med
    peaks = [float(r["matmul_peak_gflops_per_second"]) for r in ours
             if r.get("matmul_peak_gflops_per_second")]
    gflops = [float(r["model_gflops_per_step"]) for r in ours if r.get("model_gflops_per_step")]
    if peaks and gflops:   # MFU of the median step against the median peak of the same rounds
        mfu = statistics.median(gflops) / ours_med / statistics.median(peaks)
    else:
        mfus = [float(r["mfu"]) for r in ours if r.get("mfu") is not None]
        mfu = statistics.median(mfus) if mfus else None

    others = [float(r["others_cpu_cores"]) for r in (*ours, *peer)
              if r.get("others_cpu_cores") is not None]

    def peak_mem(runs):
        values = [float(r["peak_host_memory_mib"]) for r in runs
                  if r.get("peak_host_memory_mib") is not None]
        return max(values) if values else None

    return {
        "benchmark": name, "title": BENCHMARKS.get(name, {}).get("title", name),
        "peer": BENCHMARKS.get(name, {}).get("peer_name"), "rounds": len(ours_s),
        "ours_step_seconds": ours_med, "peer_step_seconds": peer_med,
        "ours_step_seconds_rounds": ours_s, "peer_step_seconds_rounds": peer_s,
        "ratio": ratio, "round_ratios": [o / p for o, p in zip(ours_s, peer_s)],
        "target": target, "met": None if target is None else ratio <= target,
        "ours_mfu": mfu,
        "matmul_peak_gflops_per_second": statistics.median(peaks) if peaks else None,
        "model_gflops_per_step": statistics.median(gflops) if gflops else None,
        "ours_peak_host_memory_mib": peak_mem(ours),
        "peer_peak_host_memory_mib": peak_mem(peer),
        "others_cpu_cores": statistics.median(others) if others else None,
    }


def format_table(rows: Iterable[dict]) -> str:
    header = ("benchmark", "ours s/step", "peer s/step", "ours/peer", "target", "met",
              "our MFU", "matmul peak", "ours peak MiB", "peer peak MiB", "round ratios",
              "others' CPU")
    table = [header]
    fmt = lambda v, f: "n/a" if v is None else f.format(v)   # noqa: E731
    for r in rows:
        table.append((
            r["benchmark"], f"{r['ours_step_seconds']:.3f}", f"{r['peer_step_seconds']:.3f}",
            f"{r['ratio']:.2f}x", fmt(r["target"], "<= {:.2f}x"),
            {True: "yes", False: "NO", None: "-"}[r["met"]],
            fmt(None if r["ours_mfu"] is None else 100 * r["ours_mfu"], "{:.1f}%"),
            fmt(r["matmul_peak_gflops_per_second"], "{:.1f} GFLOP/s"),
            fmt(r["ours_peak_host_memory_mib"], "{:.0f}"),
            fmt(r["peer_peak_host_memory_mib"], "{:.0f}"),
            f"{min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}x"
            if r.get("round_ratios") else "n/a",
            fmt(r.get("others_cpu_cores"), "{:.2f} cores")))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_alternating(name: str, rounds: int, run_ours: Callable[[str], dict],
                    run_peer: Callable[[str], dict], print_fn=print) -> tuple[list, list]:
    ours, peer = [], []
    for i in range(rounds):
        for side in round_order(i):
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            r = (run_ours if side == "ours" else run_peer)(name)
            r = {**r, "round": i, "load_average_before": load}
            (ours if side == "ours" else peer).append(r)
            others = r.get("others_cpu_cores")
            print_fn(f"  {name} round {i + 1}/{rounds} {side:>4}: {r['step_seconds']:.3f} s/step"
                     + ("" if others is None else f"  (others kept {others:.2f} cores busy)"))
    return ours, peer


def bench_vs_peers(which: Sequence[str] = ("mae", "mlm"), rounds: int = 3, *,
                   venv: str | os.PathLike = ".peers-venv", install: bool = True,
                   out: str | os.PathLike | None = None, steps: int = 5,
                   peer_dir: str | os.PathLike | None = None,
                   run_ours: Callable[[str], dict] | None = None,
                   run_peer: Callable[[str], dict] | None = None,
                   print_fn=print) -> dict:
    """Times our step and the peer's, alternating over ``rounds`` child-process pairs per
    benchmark; prints and returns medians, ratios and target verdicts (also JSON at ``out``).
    ``run_ours``/``run_peer`` (name -> {"step_seconds", ...}) replace the child processes."""
    unknown = [w for w in which if w not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    result: dict = {"machine": machine_description(), "rounds": rounds, "benchmarks": {}}
    if run_peer is None:
        python = ensure_peer_venv(venv, install=install)
        result["peer_versions"] = peer_versions(python)
        print_fn("peer venv " + str(venv) + ": " + ", ".join(
            f"{k} {v}" for k, v in result["peer_versions"].items() if v))
        run_peer = peer_runner(python, peer_dir=peer_dir, echo=None)
    run_ours = run_ours or ours_runner(steps=steps)
    rows = []
    for name in which:
        print_fn(f"{BENCHMARKS[name]['title']}: ours vs {BENCHMARKS[name]['peer_name']}")
        ours, peer = run_alternating(name, rounds, run_ours, run_peer, print_fn)
        row = summarize(name, ours, peer)
        row["ours_runs"], row["peer_runs"] = ours, peer
        result["benchmarks"][name] = row
        rows.append(row)
    table = format_table(rows)
    result["table"] = table
    print_fn(table)
    busy = [r["others_cpu_cores"] for r in rows if (r.get("others_cpu_cores") or 0) > 0.25]
    if busy:
        print_fn(f"note: other processes kept up to {max(busy):.2f} of {os.cpu_count()} cores "
                 "busy during the rounds: these figures are under contention (multi-threaded "
                 "peers, torch's OpenMP in particular, can slow down far more than ours).")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print_fn(f"wrote {out}")
    return result


def machine_description() -> dict:
    import platform
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), None)
        info["cpu_model"] = model
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    return info


# ---------------------------------------------------------------------------------------------
# Our side, as a child: python -m zoo.peers ours mae|mlm [--steps N]
# ---------------------------------------------------------------------------------------------

def time_ours(name: str, *, steps: int = 5) -> dict:
    """Our step in this process, in the peer's configuration: the median of ``steps`` timed
    steps (after warm-up), MFU against the matmul peak measured here, peak host memory."""
    from zoo import bench
    quiet = lambda text: print(text, file=sys.stderr)   # noqa: E731  (stdout carries the JSON)
    if name == "mae":
        r = bench.bench_mae(size="S", image_size=224, batch_size=16, dtype="float32",
                            steps=steps, warmup=2, print_fn=quiet, count_xla_flops=False)
    elif name == "mlm":
        r = bench.bench_text("mlm", size="B", batch_size=16, seq_len=128, dtype="float32",
                             steps=steps, warmup=1, vs_precorrupted=False, print_fn=quiet,
                             count_xla_flops=False)
    else:
        raise ValueError(f"unknown benchmark {name!r}")
    return r


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.peers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ours", help="time our step (child of bench_vs_peers); prints JSON")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(time_ours(args.name, steps=args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
