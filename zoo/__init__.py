"""zoo: pretraining objectives in JAX/Flax NNX, one sharded train step from a CPU to a TPU pod.

The notebook API mirrors the CLI::

    import zoo
    cfg = zoo.config.load("experiments/mae_digits.py:tiny")
    zoo.train(cfg, "/tmp/mae")          # zoo pretrain
    zoo.probe(cfg, "/tmp/mae")          # zoo probe
    zoo.compare("image", "/tmp/cmp")    # zoo compare
"""
from __future__ import annotations

import importlib

from zoo.host_memory import keep_freed_memory

# Before JAX creates its CPU threads: XLA:CPU's per-step buffers then reuse pages instead of
# page-faulting through ~1 GB each step (zoo/host_memory.py; ZOO_HOST_MALLOC=system opts out).
keep_freed_memory()

_LAZY = {"train": ("zoo.train", "train"), "probe": ("zoo.probe", "probe"),
         "compare": ("zoo.compare", "compare"), "bench": ("zoo.bench", "bench_mae")}


def __getattr__(name):
    # Lazy so that `import zoo.mesh` or `import zoo.config` stays light.
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("config", "data", "models", "mesh", "flops"):
        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
