"""``zoo bench mae``: step time, images/s and MFU of the shared train step (prints figures).

The matmul peak is measured in the same process next to every timed step (``paired_peak``), and
MFU is the median of the per-step ratios, so a fast or slow moment of a shared machine lands on
both sides of each ratio.
"""
from __future__ import annotations

import dataclasses
import resource
import statistics
import time

import jax
import numpy as np

from zoo import config as config_lib
from zoo.flops import compiled_flops, measure_matmul_peak


def mae_bench_config(*, size: str = "S", patch_size: int = 16, batch_size: int = 16,
                     dtype: str = "float32", decoder_width: int = 256, decoder_depth: int = 4,
                     decoder_heads: int = 8, attention: str = "auto",
                     mesh=(("data", -1), ("fsdp", 1), ("tensor", 1))) -> config_lib.Config:
    """MAE with a ViT-S/16 encoder and a 256x4 (8-head) decoder, norm_pix_loss on: the same
    configuration as the PyTorch peer (shared/peers/peer_mae.py)."""
    return config_lib.validate(config_lib.Config(
        model=config_lib.ModelConfig(size=size, patch_size=patch_size, dtype=dtype,
                                     attention=attention),
        objective={"name": "mae", "norm_pix_loss": True, "decoder_width": decoder_width,
                   "decoder_depth": decoder_depth, "decoder_heads": decoder_heads},
        data=config_lib.DataConfig(name="synthetic", batch_size=batch_size),
        mesh=mesh, steps=1000, progress=False))


def paired_peak(experiment, config: config_lib.Config) -> float:
    """The matmul peak (FLOP/s) taken next to one timed step: two products in the run's compute
    dtype on one device (times the mesh's devices on accelerators; on CPU they share the cores),
    outside the mesh context, which rejects it."""
    peak = measure_matmul_peak(dtype=config_lib.DTYPES[config.model.dtype], repeats=2)
    return peak if jax.devices()[0].platform == "cpu" else peak * len(experiment.mesh.devices.flat)


def mae_bench_setup(*, image_size: int = 224, devices=None, **config_kwargs):
    """The MAE bench's pieces: ``(config, experiment, state, step_fn, batches)`` with two
    synthetic global batches (also used by experiments/bench_host_memory.py)."""
    from zoo.data import DatasetSpec
    from zoo.train import build, global_batch, init_state, make_train_step

    config = mae_bench_config(**config_kwargs)
    spec = DatasetSpec(name="synthetic", image_shape=(image_size, image_size, 3),
                       num_classes=None, splits={"train": 1 << 20})
    experiment = build(config, devices=devices, data_spec=spec)
    rng = np.random.default_rng(0)
    local = config.data.batch_size // jax.process_count()
    batches = [global_batch(experiment, {
        "image": rng.integers(0, 256, (local, image_size, image_size, 3), dtype=np.uint8),
        "label": np.zeros((local,), np.int32)}) for _ in range(2)]
    return config, experiment, init_state(experiment), make_train_step(experiment), batches


def xla_counted_gflops(experiment, config, state, batch) -> float | None:
    """The GFLOPs XLA's cost analysis counts for one train step (the cross-check printed next
    to the model's count; None where the backend does not say), compiled from a fresh trace
    with zoo's CPU kernels off: the analysis does not look inside custom calls (with them it
    misses ~40% of the MAE step). Call it after reading peak memory: it compiles once more."""
    from flax import nnx
    from zoo.models import cpu_kernel
    from zoo.train import make_train_step
    with (jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules),
          cpu_kernel.disabled()):
        flops = compiled_flops(make_train_step(experiment).lower(state, batch).compile())
    return None if flops is None else flops / 1e9


def bench_mae(*, image_size: int = 224, steps: int = 5, warmup: int = 2, devices=None,
              print_fn=print, count_xla_flops: bool = True, **config_kwargs) -> dict:
    """Times the MAE train step; returns (and prints) step time, images/s, MFU and friends.
    ``count_xla_flops`` also compiles the step once more to print XLA's own FLOP count."""
    from flax import nnx

    config, experiment, state, step_fn, batches = mae_bench_setup(
        image_size=image_size, devices=devices, **config_kwargs)
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        for i in range(warmup):
            state, metrics = step_fn(state, batches[i % 2])
        jax.block_until_ready(metrics)
    # The peak is measured next to every timed step (on one device, outside the mesh context,
    # which rejects it), and MFU is the median of the per-step ratios: a shared machine's speed
    # drifts by +-20% within minutes, and a peak taken once can land in a different moment.
    times, faults, peaks = [], [], []
    for i in range(steps):
        with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            state, metrics = step_fn(state, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        peaks.append(paired_peak(experiment, config))
    flops = experiment.step_flops
    mfus = [flops / t / p for t, p in zip(times, peaks)]
    peak = statistics.median(peaks)
    step_time = statistics.median(times)
    result = {
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x"
                  f"{len(experiment.mesh.devices.flat)}",
        "dtype": config.model.dtype, "batch_size": config.data.batch_size,
        "image_size": image_size, "step_seconds": step_time,
        "images_per_second": config.data.batch_size / step_time,
        "model_gflops_per_step": flops / 1e9,
        "achieved_gflops_per_second": flops / step_time / 1e9,
        "matmul_peak_gflops_per_second": peak / 1e9,
        "mfu": statistics.median(mfus),   # median of per-step ratios (see above)
        "mfu_per_step": mfus,
        "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Host page faults per step: ~0 when freed memory is kept mapped (zoo/host_memory.py).
        "page_faults_per_step": statistics.median(faults),
        "loss": float(metrics["loss"]),
    }
    # After the memory figure: a second compiled step must not count as the run's memory.
    result["xla_gflops_per_step"] = (xla_counted_gflops(experiment, config, state, batches[0])
                                     if count_xla_flops else None)
    print_fn(format_result(result, config))
    return result


def format_result(r: dict, config: config_lib.Config) -> str:
    xla = "n/a" if r["xla_gflops_per_step"] is None else f"{r['xla_gflops_per_step']:.1f}"
    return "\n".join([
        f"MAE ViT-{config.model.size}/{config.model.patch_size} at {r['image_size']}, decoder "
        f"{config.objective['decoder_width']}x{config.objective['decoder_depth']}, batch "
        f"{r['batch_size']}, {r['dtype']}, attention {config.model.attention}, AdamW on "
        f"{r['device']}",
        f"  step time (median)   {r['step_seconds']:.3f} s",
        f"  images/s             {r['images_per_second']:.1f}",
        f"  model GFLOP/step     {r['model_gflops_per_step']:.1f}  (XLA counts {xla})",
        f"  achieved GFLOP/s     {r['achieved_gflops_per_second']:.1f}",
        f"  matmul peak GFLOP/s  {r['matmul_peak_gflops_per_second']:.1f}",
        f"  MFU                  {100 * r['mfu']:.1f}%",
        f"  peak host memory     {r['peak_host_memory_mb']:.0f} MB",
        f"  page faults / step   {r['page_faults_per_step']:.0f}",
    ])


# ---------------------------------------------------------------------------------------------
# Text objectives: `zoo bench mlm` (BERT-base), span_corruption, ul2, ...
# ---------------------------------------------------------------------------------------------

BERT_VOCAB = 30522


@dataclasses.dataclass(frozen=True)
class SyntheticTextSpec:
    """A data spec for benchmarks: random token rows over ``vocab_size`` ids."""
    name: str = "synthetic-text"
    vocab_size: int = BERT_VOCAB
    splits: dict = dataclasses.field(default_factory=lambda: {"train": 1 << 20})
    num_classes: int | None = None
    class_names: tuple | None = None


def text_bench_config(objective: str = "mlm", *, size: str = "B", batch_size: int = 16,
                      seq_len: int = 128, dtype: str = "float32",
                      mesh=(("data", -1), ("fsdp", 1), ("tensor", 1))) -> config_lib.Config:
    """BERT-base-sized backbone (768 wide, 12 layers, 12 heads) on 16 x 128-token rows."""
    return config_lib.validate(config_lib.Config(
        model=config_lib.ModelConfig(size=size, dtype=dtype),
        objective={"name": objective},
        data=config_lib.DataConfig(name="synthetic-text", batch_size=batch_size,
                                   seq_len=seq_len),
        mesh=mesh, steps=1000, progress=False))


def bench_text(objective: str = "mlm", *, vocab_size: int = BERT_VOCAB, steps: int = 3,
               warmup: int = 1, vs_precorrupted: bool = True, devices=None, print_fn=print,
               count_xla_flops: bool = True, **config_kwargs) -> dict:
    """Times one AdamW step of a text objective, corruption included, with MFU; with
    ``vs_precorrupted`` also the same step fed batches corrupted beforehand (steps interleaved
    so both see the same machine load) and the relative cost of corrupting on device."""
    from flax import nnx
    from zoo.train import build, global_batch, init_state, make_train_step

    config = text_bench_config(objective, **config_kwargs)
    experiment = build(config, devices=devices, data_spec=SyntheticTextSpec(vocab_size=vocab_size))
    rng = np.random.default_rng(0)
    local = config.data.batch_size // jax.process_count()
    # Byte-range ids (7..262 are ordinary tokens for every objective) plus a few EOS separators.
    rows = rng.integers(7, 263, (2, local, config.data.seq_len), dtype=np.int32)
    rows[:, :, 50::61] = 1
    batches = [global_batch(experiment, {"tokens": r}) for r in rows]
    variants = {"on_device": make_train_step(experiment)}
    if vs_precorrupted:
        variants["precorrupted"] = make_train_step(experiment, prepared=True)
        prepare = jax.jit(experiment.objective.prepare)
        corrupted = [prepare(b, jax.random.PRNGKey(i)) for i, b in enumerate(batches)]
    states = {name: init_state(experiment) for name in variants}
    times = {name: [] for name in variants}
    peaks = []  # one next to every timed pair, as in bench_mae
    for i in range(warmup + steps):
        with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
            # Alternate which variant runs first: on this CPU the first step of a pair ran ~4%
            # slower whichever it was, which a fixed order charged to on-device corruption.
            order = list(variants) if i % 2 == 0 else list(variants)[::-1]
            for name in order:
                step_fn = variants[name]
                feed = corrupted if name == "precorrupted" else batches
                start = time.perf_counter()
                states[name], metrics = step_fn(states[name], feed[i % 2])
                jax.block_until_ready(metrics)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
        if i >= warmup:
            peaks.append(paired_peak(experiment, config))
    step_time = statistics.median(times["on_device"])
    flops = experiment.step_flops
    result = {
        "objective": objective, "device": f"{jax.devices()[0].platform}:"
        f"{jax.devices()[0].device_kind} x{len(experiment.mesh.devices.flat)}",
        "dtype": config.model.dtype, "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len, "vocab_size": vocab_size,
        "step_seconds": step_time,
        "tokens_per_second": config.data.batch_size * config.data.seq_len / step_time,
        "model_gflops_per_step": flops / 1e9,
        "matmul_peak_gflops_per_second": statistics.median(peaks) / 1e9,
        "mfu": statistics.median(flops / t / p for t, p in zip(times["on_device"], peaks)),
        "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": float(metrics["loss"]),
    }
    if vs_precorrupted:
        pre = statistics.median(times["precorrupted"])
        result["precorrupted_step_seconds"] = pre
        # Median of the per-iteration ratios: each pair ran back to back, so a drift in the
        # machine's speed (+-10% between steps here) cancels within a pair.
        result["corruption_overhead"] = statistics.median(
            a / b for a, b in zip(times["on_device"], times["precorrupted"])) - 1.0
    # Counted after the memory figure, as in bench_mae.
    result["xla_gflops_per_step"] = (
        xla_counted_gflops(experiment, config, states["on_device"], batches[0])
        if count_xla_flops else None)
    print_fn(format_text_result(result, config))
    return result


def format_text_result(r: dict, config: config_lib.Config) -> str:
    m = config.model
    xla = "n/a" if r["xla_gflops_per_step"] is None else f"{r['xla_gflops_per_step']:.1f}"
    lines = [
        f"{r['objective']}: size {m.size} backbone, vocab {r['vocab_size']}, batch "
        f"{r['batch_size']} x {r['seq_len']} tokens, {r['dtype']}, AdamW on {r['device']}",
        f"  step time (median)   {r['step_seconds']:.3f} s  (on-device corruption included)",
        f"  tokens/s             {r['tokens_per_second']:.0f}",
        f"  model GFLOP/step     {r['model_gflops_per_step']:.1f}  (XLA counts {xla})",
        f"  matmul peak GFLOP/s  {r['matmul_peak_gflops_per_second']:.1f}",
        f"  MFU                  {100 * r['mfu']:.1f}%",
        f"  peak host memory     {r['peak_host_memory_mb']:.0f} MB",
    ]
    if "corruption_overhead" in r:
        lines += [f"  pre-corrupted step   {r['precorrupted_step_seconds']:.3f} s  -> on-device "
                  f"corruption costs {100 * r['corruption_overhead']:+.1f}% (median of the "
                  "paired steps' ratios)"]
    return "\n".join(lines)


from zoo._callable_module import make_module_callable  # noqa: E402

make_module_callable(__name__, "bench_mae")   # zoo.bench(...) after `import zoo.bench`
