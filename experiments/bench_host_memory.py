"""What keeping freed host memory mapped (zoo/host_memory.py) is worth for the MAE bench step.

One process, alternating blocks of steps between glibc's default trimming and zoo's "keep" mode
(switched with mallopt at run time; both with one malloc arena, which is fixed at import), and
prints step time, page faults and user/system CPU seconds per step for each:

    python experiments/bench_host_memory.py --rounds 12

Prints figures; not a test. Only meaningful on Linux with glibc.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import zoo  # noqa: F401  (applies keep_freed_memory before JAX starts its threads)
from zoo import host_memory


def set_mode(libc, keep: bool) -> None:
    if keep:
        libc.mallopt(host_memory.M_MMAP_MAX, 0)
        libc.mallopt(host_memory.M_TRIM_THRESHOLD, host_memory.KEEP_TRIM_THRESHOLD)
    else:  # glibc's defaults (the mmap threshold stays at its 128 KiB default)
        libc.mallopt(host_memory.M_MMAP_MAX, 65536)
        libc.mallopt(host_memory.M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="blocks of 3 steps (2 timed)")
    args = parser.parse_args(argv)
    libc = host_memory.glibc_library()
    if libc is None or not host_memory.keep_freed_memory():
        raise SystemExit("needs glibc and ZOO_HOST_MALLOC unset or 'keep'")

    import jax
    from flax import nnx

    from zoo.bench import mae_bench_setup

    config, experiment, state, step_fn, batches = mae_bench_setup()
    batch = batches[0]
    rows = {"keep": [], "system": []}
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        for _ in range(2):
            state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        for block in range(args.rounds):
            mode = "keep" if block % 2 == 0 else "system"
            set_mode(libc, mode == "keep")
            for i in range(3):  # the first step of a block adapts the heap; not timed
                before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                state, metrics = step_fn(state, batch)
                jax.block_until_ready(metrics)
                seconds = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_SELF)
                if i:
                    rows[mode].append((seconds, after.ru_minflt - before.ru_minflt,
                                       after.ru_utime - before.ru_utime,
                                       after.ru_stime - before.ru_stime))
    set_mode(libc, True)
    result = {}
    print(f"MAE ViT-S/16 bench step, {args.rounds} alternating blocks (medians per step)")
    print(f"{'host memory':>12} {'step s':>8} {'min s':>7} {'page faults':>12} "
          f"{'user s':>7} {'sys s':>6}")
    for mode, values in rows.items():
        column = lambda j: statistics.median(v[j] for v in values)  # noqa: E731
        result[mode] = {"step_seconds": column(0), "min_seconds": min(v[0] for v in values),
                        "page_faults": column(1), "user_seconds": column(2),
                        "system_seconds": column(3)}
        r = result[mode]
        print(f"{mode:>12} {r['step_seconds']:8.3f} {r['min_seconds']:7.3f} "
              f"{r['page_faults']:12.0f} {r['user_seconds']:7.2f} {r['system_seconds']:6.2f}")
    ratio = result["keep"]["step_seconds"] / result["system"]["step_seconds"]
    print(f"keep / system step time: {ratio:.3f}")
    return result


if __name__ == "__main__":
    main()
