"""Benchmark: our train step vs the peers', side by side, alternating (same as `zoo bench --vs-peers`).

* mae: MAE ViT-S/16 at 224, decoder 256x4, batch 16, AdamW vs PyTorch HF ViTMAEForPreTraining
  (target: ours <= 0.85x the peer's step time).
* mlm: BERT-base MLM, batch 16 x 128, AdamW vs HF's Flax BERT MLM example (target: <= 0.75x).

The peer packages (torch, transformers, flax<0.11, jax) install into .peers-venv/ on first use,
never into the project's environment. Prints a table of medians over rounds, ratios, our MFU
against the matmul peak measured in the same run, and each side's peak host memory.

Run: python experiments/bench_vs_peers.py [--only mae|mlm] [--rounds 3] [--out peers.json]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.peers import BENCHMARKS, bench_vs_peers  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run only this benchmark (repeatable; default: all)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating ours/peer rounds per benchmark (default 3)")
    parser.add_argument("--steps", type=int, default=5,
                        help="our timed steps per round (the peer scripts time 5)")
    parser.add_argument("--venv", default=".peers-venv", help="the peers' virtual environment")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="fail instead of creating/installing the peers' venv")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    bench_vs_peers(tuple(args.only or BENCHMARKS), rounds=args.rounds, venv=args.venv,
                   install=args.install, out=args.out, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
