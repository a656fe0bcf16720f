"""The ``zoo`` command line: pretrain, probe, compare, peak, bench.

Every command is a thin wrapper over a plain Python function (``zoo.train``, ``zoo.probe``,
``zoo.compare``, ...), so notebooks use the same code. Bad input prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _pretrain(args) -> None:
    # First, before anything initialises the JAX backend: join a multi-process run if the
    # flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID describe one.
    from zoo import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from zoo import config as config_lib
    from zoo.train import train
    config = config_lib.load(args.config, args.set or ())
    summary = train(config, args.workdir, stop_at=args.stop_at)
    print(json.dumps(summary))


def _load_workdir_config(workdir: str):
    from zoo import config as config_lib
    from zoo import storage
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise ValueError(f"--workdir: {workdir!r} has no config.json (not a zoo run)")
    return config_lib.validate(config_lib.from_dict(json.loads(storage.read_text(path))))


def _probe(args) -> None:
    from zoo.probe import probe
    config = _load_workdir_config(args.workdir)
    result = {"pretrained": probe(config, args.workdir)}
    if args.baseline:
        result["random_init"] = probe(config, None)
    for name, scores in result.items():
        print(f"{name:>12}: linear probe {100 * scores['linear_probe']:.1f}%  "
              f"k-NN {100 * scores['knn']:.1f}%  (step {scores['step']})")
    import jax
    if jax.process_index() == 0:
        from zoo import storage
        storage.write_text_atomically(storage.join(args.workdir, "probe.json"),
                                      json.dumps(result, indent=2))


def _compare(args) -> None:
    from zoo.compare import ComparisonPreempted, compare, results_table
    try:
        results = compare(args.suite, args.out, steps=args.steps, tiny=args.tiny,
                          only=tuple(args.only) if args.only else None)
    except ComparisonPreempted as preempted:    # checkpoint written: exit 0, rerun resumes
        print(f"zoo compare: {preempted}", file=sys.stderr)
        return
    print(results_table(results))
    print(f"wrote {args.out}/results.md, results.json, results.png")


def _peak(args) -> None:
    import jax
    import jax.numpy as jnp
    from zoo.flops import measure_matmul_peak
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    peak = measure_matmul_peak(args.size, dtype)
    size = args.size or ("2048" if jax.devices()[0].platform == "cpu" else "8192")
    print(f"matmul peak ({size}x{size}, {args.dtype}): {peak / 1e9:.1f} GFLOP/s")


def _bench(args) -> None:
    if args.vs_peers:
        from zoo.peers import BENCHMARKS, bench_vs_peers
        if args.what is not None and args.what not in BENCHMARKS:
            raise ValueError(f"--vs-peers: no peer for {args.what!r} (choose from "
                             f"{', '.join(BENCHMARKS)})")
        bench_vs_peers((args.what,) if args.what else tuple(BENCHMARKS), rounds=args.rounds,
                       steps=args.steps or 5, venv=args.peers_venv, out=args.out)
        return
    if args.what is None:
        raise ValueError("name what to time (mae or a text objective), or pass --vs-peers")
    from zoo.bench import bench_mae, bench_text
    if args.what == "mae":
        bench_mae(size=args.size or "S", image_size=args.image_size,
                  batch_size=args.batch_size or 16, dtype=args.dtype, steps=args.steps or 5,
                  decoder_width=args.decoder_width, decoder_depth=args.decoder_depth,
                  decoder_heads=args.decoder_heads, attention=args.attention)
    else:
        bench_text(args.what, size=args.size or "B", batch_size=args.batch_size or 16,
                   seq_len=args.seq_len, dtype=args.dtype, steps=args.steps or 3,
                   vs_precorrupted=args.vs_precorrupted)


BENCH_TEXT = ("mlm", "span_corruption", "bart", "ul2", "clm", "prefix_lm", "meap")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a config in a workdir (resumes if possible)")
    p.add_argument("--config", required=True, help="experiments/FILE.py or FILE.py:ARG")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step")
    g = p.add_argument_group(
        "multi-process runs", "one process per host, all with the same flags but --process-id; "
        "each defaults to its JAX_* variable (Slurm and Open MPI launches are detected)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                   help="process 0's address and a free port (default: "
                        "$JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", metavar="N", type=int, default=None,
                   help="processes in the run (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", metavar="I", type=int, default=None,
                   help="this process, 0..N-1 (default: $JAX_PROCESS_ID)")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("probe", help="linear probe and k-NN of a run's encoder")
    p.add_argument("--workdir", required=True)
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the random-init baseline row")
    p.set_defaults(func=_probe)

    p = sub.add_parser("compare", help="pretrain and probe every objective of a suite")
    p.add_argument("--suite", default="image", help="modality to compare (default: image)")
    p.add_argument("--out", default="compare_out", help="output dir (default: compare_out)")
    p.add_argument("--steps", type=int, default=None, help="steps per objective")
    p.add_argument("--only", nargs="*", help="only these objectives")
    p.add_argument("--tiny", action="store_true", help="tiny smoke-test budget")
    p.set_defaults(func=_compare)

    p = sub.add_parser("peak", help="measure the matmul peak of this device")
    p.add_argument("--size", type=int, default=None,
                   help="matrix side (default: 2048 on CPU, 8192 on an accelerator)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.set_defaults(func=_peak)

    p = sub.add_parser("bench", help="time a train step: step time, images|tokens/s, MFU")
    p.add_argument("what", nargs="?", choices=("mae",) + BENCH_TEXT,
                   help="mae: ViT-S/16 MAE; a text objective: BERT-base-sized backbone "
                        "(with --vs-peers: mae or mlm, default both)")
    p.add_argument("--size", default=None, help="backbone size (default: S for mae, B text)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None, help="default 16")
    p.add_argument("--seq-len", type=int, default=128, help="text: tokens per row")
    p.add_argument("--decoder-width", type=int, default=256,
                   help="mae: decoder width (the MAE paper's ViT-B/L use 512)")
    p.add_argument("--decoder-depth", type=int, default=4, help="mae: decoder blocks (paper: 8)")
    p.add_argument("--decoder-heads", type=int, default=8, help="mae: decoder heads (paper: 16)")
    p.add_argument("--attention", default="auto", choices=("auto", "einsum", "blas", "fused"),
                   help="mae: model.attention (auto: cuDNN's fused kernel on GPU with bf16, "
                        "blas on one CPU device)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=None, help="timed steps (mae 5, text 3)")
    p.add_argument("--no-precorrupted", dest="vs_precorrupted", action="store_false",
                   help="text: skip timing the same step fed pre-corrupted batches")
    g = p.add_argument_group("against the peers", "our step and a widely used implementation's "
                             "(PyTorch HF ViTMAE; HF Flax BERT MLM), alternating, same machine")
    g.add_argument("--vs-peers", action="store_true",
                   help="print medians, ours/peer ratios vs the targets, MFU, peak memory")
    g.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    g.add_argument("--peers-venv", default=".peers-venv",
                   help="the peers' own virtual environment, created on first use")
    g.add_argument("--out", default=None, help="also write the results as JSON here")
    p.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        args.func(args)
    except (ValueError, OSError) as error:   # bad input; a workdir that cannot be written
        if args.verbose:
            raise
        print(f"zoo {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
