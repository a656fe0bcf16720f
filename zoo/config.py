"""Experiment configs: frozen, validated dataclasses built from a Python file's ``get_config()``.

An experiment file returns a ``Config`` (or a nested dict of the same fields); ``--set
optim.lr=3e-4`` style overrides use dotted paths; ``objective`` is a dict ``{"name": ..., **hparams}``.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from zoo.mesh import DEFAULT_RULES

NONFINITE_POLICIES = ("skip", "stop")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_batch")
ATTENTIONS = ("auto", "einsum", "blas", "fused")  # = zoo.models.layers.ATTENTION_IMPLEMENTATIONS
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "auto"            # "auto": the objective's backbone (vit for images; encoder,
                                  # decoder or encdec for text)
    size: str = "test"
    patch_size: int = 4           # images only
    posemb: str = "auto"          # "auto": sincos2d for vit, learn for text models
    cls_token: bool = True
    dtype: str = "float32"        # compute dtype; parameters stay float32
    width: int | None = None      # optional overrides of the size's dimensions
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    remat: str = "none"           # rematerialise each Transformer block in the backward pass:
                                  # "none" | "full" (keep only block inputs) | "dots" (keep
                                  # matmul outputs without batch dims) | "dots_with_batch"
    attention: str = "auto"       # "einsum" | "blas" (BLAS per (batch, head) matrix; CPU,
                                  # float32, one device) | "fused" (jax.nn.dot_product_attention;
                                  # cuDNN on GPU) | "auto" (fused on GPU with 16-bit compute
                                  # where there is no mask, blas where it runs, else einsum)
    scan_layers: bool = False     # stack the blocks' parameters and lax.scan over them (one
                                  # block compiled; changes the checkpoint layout)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str = "digits"
    split: str = "train"
    batch_size: int = 64          # global batch size
    seq_len: int = 128            # text only: tokens per packed row
    tokenizer: str = "byte"       # text only: "byte", or "bpe:N" (N-piece BPE saved in workdir)
    seed: int = 0
    data_dir: str | None = None   # default: $ZOO_DATA_DIR or the user cache dir


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-3              # peak learning rate
    schedule: str = "cosine"      # after linear warmup
    warmup_steps: int = 20
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1     # micro-batches per update: the same update on 1/k the memory


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpikeConfig:
    """Skip updates whose loss or gradient norm is far above the recent running statistics (as
    OLMo 2's skip-step): a spike if ``value > mean + threshold * std`` of the previous
    ``window`` applied steps' values, once ``window`` steps have been seen. Off by default."""
    enabled: bool = False
    window: int = 128
    threshold: float = 6.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    dataset: str = "auto"         # "auto": digits for image objectives, pycode for text
    batch_size: int = 256
    knn_k: int = 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = ModelConfig()
    objective: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"name": "mae"})
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    probe: ProbeConfig = ProbeConfig()
    spike: SpikeConfig = SpikeConfig()
    mesh: tuple = (("data", -1), ("fsdp", 1), ("tensor", 1))
    rules: tuple = DEFAULT_RULES
    steps: int = 100
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    nonfinite: str = "skip"       # what a non-finite loss or gradient does: skip | stop
    peak_flops: float | None = None   # MFU denominator; None measures a matmul at start
    progress: bool = True
    init_from: str | None = None  # a workdir whose latest checkpoint's encoder initialises a
                                  # NEW run (fine-tuning); heads and optimizer start fresh
    # Several objectives on one backbone (see zoo/mixture.py): {key: {"kind": NAME,
    # "weight": 1.0, "start_step": 0, "end_step": None, "ramp_steps": 0, "data": NAME,
    # **hparams}}; when set, `objective` is not used.
    objectives: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    mixing: str = "sum"           # mixtures: "sum" (weighted sum) | "per_example" (UL2-style)


# Fields that may change between runs in one workdir (they do not change what a step computes).
RESUMABLE_FIELDS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "progress",
                    "peak_flops", "probe", "data.data_dir", "model.remat", "model.attention",
                    "optim.grad_accum_steps")


def validate(config: Config) -> Config:
    """Checks the fields that need no data or devices; raises one-line ValueErrors."""
    m, o = config.model, config.optim
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype: unknown {m.dtype!r}; allowed: {tuple(DTYPES)}")
    if config.data.seq_len <= 0:
        raise ValueError(f"data.seq_len: must be positive, got {config.data.seq_len}")
    from zoo.text import subword
    subword.parse(config.data.tokenizer)
    if m.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat: unknown {m.remat!r}; allowed: {REMAT_POLICIES}")
    if m.attention not in ATTENTIONS:
        raise ValueError(f"model.attention: unknown {m.attention!r}; allowed: {ATTENTIONS}")
    if o.grad_accum_steps <= 0:
        raise ValueError(f"optim.grad_accum_steps: must be >= 1, got {o.grad_accum_steps}")
    if config.data.batch_size % o.grad_accum_steps:
        raise ValueError(f"optim.grad_accum_steps: {o.grad_accum_steps} does not divide the "
                         f"global batch {config.data.batch_size}")
    if config.spike.window < 2 or config.spike.threshold <= 0:
        raise ValueError(f"spike: window must be >= 2 and threshold > 0, got "
                         f"{config.spike.window} and {config.spike.threshold}")
    if m.patch_size <= 0:
        raise ValueError(f"model.patch_size: must be positive, got {m.patch_size}")
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: unknown {o.schedule!r}; allowed: {SCHEDULES}")
    if config.nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: unknown {config.nonfinite!r}; allowed: "
                         f"{NONFINITE_POLICIES}")
    for field in ("steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(config, field) <= 0:
            raise ValueError(f"{field}: must be positive, got {getattr(config, field)}")
    if config.data.batch_size <= 0:
        raise ValueError(f"data.batch_size: must be positive, got {config.data.batch_size}")
    if config.mixing not in ("sum", "per_example"):
        raise ValueError(f"mixing: unknown {config.mixing!r}; allowed: ('sum', 'per_example')")
    if "name" not in config.objective:
        raise ValueError("objective: needs a 'name' key, e.g. {'name': 'mae'}")
    return config


def from_dict(values: Mapping[str, Any]) -> Config:
    """Builds a Config from a nested dict (unknown keys raise, naming the field)."""
    return _build(Config, values, prefix="")


def to_dict(config: Config) -> dict[str, Any]:
    """JSON-friendly nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def override(config: Config, assignments: Sequence[str]) -> Config:
    """Applies ``key=value`` overrides, e.g. ``["optim.lr=3e-4", "objective.mask_ratio=0.5"]``.

    Values are Python literals; anything that does not parse as one is kept as a string.
    """
    values = dataclasses.asdict(config)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise ValueError(f"--set: expected key=value, got {assignment!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set: unknown field {key!r}")
            node = node[part]
        free = (parts[0] == "objective" and len(parts) == 2) or (
            parts[0] == "objectives" and len(parts) in (2, 3))
        if parts[-1] not in node and not free:
            raise ValueError(f"--set: unknown field {key!r}; fields here: {sorted(node)}")
        node[parts[-1]] = value
    return from_dict(values)


def load(path: str, overrides: Sequence[str] = ()) -> Config:
    """Loads ``experiments/x.py`` or ``experiments/x.py:tiny`` (the argument goes to get_config)."""
    path, _, arg = path.partition(":")
    if not os.path.exists(path):
        raise ValueError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location("zoo_experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    if isinstance(config, Mapping):
        config = from_dict(config)
    return validate(override(config, overrides))


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of fields that differ between two ``to_dict`` configs, skipping resumables."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in RESUMABLE_FIELDS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += differences(a, b, prefix=f"{name}.")
        elif a != b:
            diffs.append(name)
    return diffs


def _check_scalar(name: str, value, hint):
    """Checks int/float/bool/str fields (optionally None); returns the value (ints -> float)."""
    if typing.get_origin(hint) not in (None, typing.Union, types.UnionType):
        return value   # containers (objective dict, mesh tuples) are checked elsewhere
    args = set(typing.get_args(hint)) or {hint}
    if value is None and type(None) in args:
        return value
    for kind in (bool, int, float, str):
        if kind in args:
            ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                  or (kind is float and isinstance(value, int) and not isinstance(value, bool)))
            if ok:
                return float(value) if kind is float else value
            if not any(k in args for k in (bool, int, float, str) if k is not kind):
                raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _build(cls, values: Mapping[str, Any], prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"config: unknown field {prefix + key!r}; allowed: {sorted(fields)}")
        value = _check_scalar(prefix + key, value, hints[key])
        sub = _SUBCONFIGS.get(key) if cls is Config else None
        if sub is not None and isinstance(value, Mapping):
            value = _build(sub, value, prefix=f"{key}.")
        elif key in ("mesh", "rules"):
            value = _deep_tuple(value)
        elif key == "objective":
            value = dict(value)
        elif key == "objectives":
            if not isinstance(value, Mapping) or not all(
                    isinstance(v, Mapping) for v in value.values()):
                raise ValueError("objectives: expected {key: {'kind': NAME, ...}}, got "
                                 f"{value!r}")
            value = {str(k): dict(v) for k, v in value.items()}
        kwargs[key] = value
    return cls(**kwargs)


def _deep_tuple(value):
    if isinstance(value, (list, tuple)):
        return tuple(_deep_tuple(v) for v in value)
    return value


_SUBCONFIGS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
               "probe": ProbeConfig, "spike": SpikeConfig}
