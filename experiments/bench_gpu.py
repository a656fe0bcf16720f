"""MAE train-step figures on a GPU: images/s and MFU for ViT-B/16 in bf16 (issue 6's GPU check).

Runs several variants in ONE process (so they share the machine's state), each through
``zoo.bench.bench_mae``, and prints a table last. MFU is against the bf16 matmul peak measured
in the same run (8192^3 products), and also against the datasheet's dense bf16 peak when the
card is known.

Run: python experiments/bench_gpu.py [--out DIR] [--steps 20] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# (label, bench_mae keyword arguments). The MAE paper's ViT-B uses a 512-wide, 8-deep decoder
# with 16 heads; `zoo bench mae` defaults to the 256x4 decoder of the CPU peer comparison.
PAPER_DECODER = dict(decoder_width=512, decoder_depth=8, decoder_heads=16)
VARIANTS = [
    ("B/16 bf16 dec512x8 b256 einsum", dict(size="B", batch_size=256, dtype="bfloat16",
                                            attention="einsum", **PAPER_DECODER)),
    ("B/16 bf16 dec512x8 b256 fused", dict(size="B", batch_size=256, dtype="bfloat16",
                                           attention="fused", **PAPER_DECODER)),
    ("B/16 bf16 dec512x8 b128 einsum", dict(size="B", batch_size=128, dtype="bfloat16",
                                            attention="einsum", **PAPER_DECODER)),
    ("B/16 bf16 dec512x8 b128 fused", dict(size="B", batch_size=128, dtype="bfloat16",
                                           attention="fused", **PAPER_DECODER)),
    ("B/16 bf16 dec256x4 b256 auto", dict(size="B", batch_size=256, dtype="bfloat16")),
    ("B/16 f32 dec512x8 b128 einsum", dict(size="B", batch_size=128, dtype="float32",
                                           attention="einsum", **PAPER_DECODER)),
    ("S/16 f32 dec256x4 b16 (CPU bench config)", dict(size="S", batch_size=16, dtype="float32")),
]


def check_fused_attention(shapes=((4, 50, 12, 64), (4, 197, 16, 32))) -> bool:
    """cuDNN's fused attention (padded for odd lengths) against the einsum path in float32:
    outputs and gradients, relative error (bf16 operands: expect ~1e-2 or less)."""
    import jax
    import jax.numpy as jnp
    from zoo.models.layers import cudnn_takes, einsum_attention, fused_attention

    def einsum_blhd(q, k, v):
        return jnp.swapaxes(einsum_attention(*(jnp.swapaxes(t, 1, 2) for t in (q, k, v)),
                                             None), 1, 2)

    ok = True
    for i, shape in enumerate(shapes):
        keys = jax.random.split(jax.random.key(i), 4)
        q, k, v, cot = (jax.random.normal(key, shape) for key in keys)
        half = q.astype(jnp.bfloat16)
        assert cudnn_takes(half, half, None), f"{shape}: would not run on cuDNN"
        results = {}
        for name, fn, dtype in (("fused", fused_attention, jnp.bfloat16),
                                ("reference", einsum_blhd, jnp.float32)):
            def loss(q, k, v):
                args = [t.astype(dtype) for t in (q, k, v)]
                out = fn(*args, None) if name == "fused" else fn(*args)
                return jnp.sum(out.astype(jnp.float32) * cot), out
            (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                         has_aux=True))(q, k, v)
            results[name] = (out.astype(jnp.float32), *grads)
        errors = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                  for a, b in zip(results["fused"], results["reference"])]
        good = all(e < 2e-2 for e in errors)
        ok &= good
        print(f"fused attention {shape}: relative error out {errors[0]:.1e}, dq {errors[1]:.1e}"
              f", dk {errors[2]:.1e}, dv {errors[3]:.1e} -> {'ok' if good else 'WRONG'}",
              flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run only")
    args = parser.parse_args(argv)

    import jax
    import flax
    import optax
    from zoo.bench import bench_mae

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}; "
          f"{device.platform}: {device.device_kind} x{jax.device_count()}", flush=True)
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in device.device_kind), None)

    if device.platform == "gpu" and not check_fused_attention():
        print("fused attention disagrees with the reference: its rows are not trustworthy")
    variants = VARIANTS
    if args.quick:
        variants = [("smoke: test/8 at 32", dict(size="test", patch_size=8, batch_size=8,
                                                image_size=32, dtype="bfloat16"))]
    rows, log_path = [], os.path.join(args.out, "bench_gpu.jsonl")
    for label, kwargs in variants:
        kwargs = {"image_size": 224, **kwargs}
        print(f"\n== {label}", flush=True)
        start = time.perf_counter()
        try:
            r = bench_mae(steps=args.steps, warmup=3, **kwargs)
        except Exception as error:  # keep going: one failing variant must not lose the rest
            traceback.print_exc()
            r = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        r.update(label=label, wall_seconds=time.perf_counter() - start,
                 datasheet_bf16=datasheet)
        rows.append(r)
        with open(log_path, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")

    print("\n| variant | step ms | images/s | model TFLOP/step | TFLOP/s | peak TFLOP/s "
          "(measured) | MFU (measured peak) | MFU (datasheet bf16) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | failed: {r['error'][:120]} |")
            continue
        datasheet_mfu = ("-" if not datasheet or r["dtype"] != "bfloat16" else
                         f"{100 * r['achieved_gflops_per_second'] * 1e9 / datasheet:.1f}%")
        print(f"| {r['label']} | {1e3 * r['step_seconds']:.1f} | {r['images_per_second']:.0f}"
              f" | {r['model_gflops_per_step'] / 1e3:.2f} | "
              f"{r['achieved_gflops_per_second'] / 1e3:.1f} | "
              f"{r['matmul_peak_gflops_per_second'] / 1e3:.0f} | {100 * r['mfu']:.1f}% | "
              f"{datasheet_mfu} |")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
