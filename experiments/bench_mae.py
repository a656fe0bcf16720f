"""Benchmark: MAE ViT-S/16 at 224, decoder 256x4, batch 16, AdamW (same as `zoo bench mae`).

Run: python experiments/bench_mae.py [--dtype bfloat16] [--steps 5]
"""
import sys

from zoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "mae", *sys.argv[1:]]))
