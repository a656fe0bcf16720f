"""The dense layers' float32 products on AMX tiles (cpu_kernel.amx_matmul) against XLA's dots.

Times, in one process and alternating, every dense product of one MAE bench step (ViT-S/16
encoder over 16 x 50 kept tokens, 256 x 4 decoder over 16 x 197 tokens: forward ``x W``, input
gradient ``g W^T`` and weight gradient ``x^T g`` of each layer, as many times as the step has
that layer), run one after another, and prints the totals, their ratio and each pass count's
error against float64 on one of the shapes:

    python experiments/bench_amx.py --rounds 3

Prints figures; not a test. Needs a CPU with AMX (``cpu_kernel.amx_available()``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from zoo.models import cpu_kernel

# (tokens, fan_in, fan_out, layers per step): encoder qkv, proj, fc1, fc2; the same for the
# decoder (its last block's proj and MLP run on fewer rows in the real step; counted in full).
MAE_LAYERS = [(800, 384, 1152, 12), (800, 384, 384, 12), (800, 384, 1536, 12),
              (800, 1536, 384, 12), (3152, 256, 768, 4), (3152, 256, 256, 4),
              (3152, 256, 1024, 4), (3152, 1024, 256, 4)]
PRODUCTS = ("forward", "input gradient", "weight gradient")


def products(passes: int | None):
    """The three products of a dense layer, through XLA (passes None) or AMX."""
    if passes is None:
        return [jax.jit(lambda x, w: x @ w), jax.jit(lambda g, w: g @ w.T),
                jax.jit(lambda x, g: x.T @ g)]
    amx = cpu_kernel.amx_matmul
    return [jax.jit(lambda x, w: amx(x, w, passes=passes)),
            jax.jit(lambda g, w: amx(g, w, transpose_b=True, passes=passes)),
            jax.jit(lambda x, g: amx(x, g, transpose_a=True, passes=passes))]


def best_time(fn, args, repeats: int) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def step_products_time(fns, operands, repeats: int) -> list[float]:
    """Seconds per step for each of the three products (best of `repeats` per shape)."""
    totals = [0.0, 0.0, 0.0]
    for (tokens, fan_in, fan_out, count), (x, w, g) in zip(MAE_LAYERS, operands):
        for i, (fn, args) in enumerate(zip(fns, [(x, w), (g, w), (x, g)])):
            totals[i] += count * best_time(fn, args, repeats)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timings per shape (best kept)")
    args = parser.parse_args()
    if not cpu_kernel.amx_available():
        raise SystemExit(f"no AMX here: {cpu_kernel.unavailable_reason() or 'the CPU lacks it'}")
    rng = np.random.default_rng(0)
    operands = [tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                      for shape in ((t, i), (i, o), (t, o))) for t, i, o, _ in MAE_LAYERS]
    variants = {"xla": products(None), "amx x6": products(6), "amx x3": products(3),
                "amx x1": products(1)}
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            times[name].append(step_products_time(variants[name], operands, args.repeats))
    xla_total = statistics.median(sum(t) for t in times["xla"])
    print(f"dense products of one MAE bench step, run one after another ({args.rounds} rounds, "
          "medians):")
    for name, runs in times.items():
        parts = [statistics.median(run[i] for run in runs) * 1e3 for i in range(3)]
        total = statistics.median(sum(run) for run in runs)
        print(f"  {name:7s} " + "  ".join(f"{p}: {v:6.1f} ms" for p, v in zip(PRODUCTS, parts))
              + f"  total {total * 1e3:6.1f} ms  ({total / xla_total:.2f}x xla)")
    x, w, _ = operands[4]
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    scale = np.abs(want).max()
    errors = {"xla": np.abs(np.asarray(x @ w) - want).max() / scale}
    for passes in cpu_kernel.AMX_PASSES:
        got = np.asarray(cpu_kernel.amx_matmul(x, w, passes=passes))
        errors[f"amx x{passes}"] = np.abs(got - want).max() / scale
    print("largest error against float64, relative to the largest entry (3152 x 256 x 768): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
