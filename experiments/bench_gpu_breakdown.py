"""Where an MAE train step's time goes: forward only, forward + backward, and the whole step
(AdamW, clipping, the non-finite guard), each compiled and timed alone in one process.

Run: python experiments/bench_gpu_breakdown.py [--size B] [--batch-size 256] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def timed(fn, *args, steps: int, warmup: int = 3) -> float:
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="B")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from zoo.bench import mae_bench_config
    from zoo.data import DatasetSpec
    from zoo.train import (build, global_batch, init_state, make_loss_and_grad, make_loss_fn,
                           make_train_step, objective_salt)

    config = mae_bench_config(size=args.size, patch_size=args.patch_size,
                              batch_size=args.batch_size, dtype=args.dtype,
                              attention=args.attention, decoder_width=512, decoder_depth=8,
                              decoder_heads=16)
    spec = DatasetSpec(name="synthetic", image_shape=(args.image_size, args.image_size, 3),
                       num_classes=None, splits={"train": 1 << 20})
    experiment = build(config, data_spec=spec)
    state = init_state(experiment)
    rng = np.random.default_rng(0)
    batch = global_batch(experiment, {
        "image": rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3),
                              dtype=np.uint8),
        "label": np.zeros((args.batch_size,), np.int32)})
    loss_fn, salt = make_loss_fn(experiment), objective_salt(experiment.objective.name)

    def forward(state, batch):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), salt)
        return loss_fn(state.params, state.objective_state, state.step, batch, key)[0]

    flops = experiment.step_flops
    rows = []
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        rows.append(("forward (loss only)", timed(jax.jit(forward), state, batch,
                                                  steps=args.steps), flops / 3))
        rows.append(("forward + backward", timed(make_loss_and_grad(experiment), state, batch,
                                                 steps=args.steps), flops))
        step = make_train_step(experiment)
        holder = [state]

        def one_step(batch):
            holder[0], metrics = step(holder[0], batch)
            return metrics
        rows.append(("whole step (+ AdamW, clip, guard)", timed(one_step, batch,
                                                                steps=args.steps), flops))
    device = jax.devices()[0]
    print(f"MAE ViT-{args.size}/{args.patch_size} dec 512x8, batch {args.batch_size}, "
          f"{args.dtype}, attention {args.attention}, on {device.device_kind}")
    print("| part | ms | model TFLOP/s |")
    print("|---|---:|---:|")
    for name, seconds, part_flops in rows:
        print(f"| {name} | {1e3 * seconds:.1f} | {part_flops / seconds / 1e12:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
