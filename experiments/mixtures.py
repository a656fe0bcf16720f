"""Mixtures of objectives on one shared backbone (``config.objectives``; see zoo/mixture.py).

The mixture is the config argument; add ",tiny" for the smoke-test size:

  biphasic     CLM then MLM on one encoder/decoder-shared model (Should We Still Pretrain
               Encoders with MLM?): clm for the first 60% of steps, mlm after.
  ul2_style    mlm and span corruption sampled per example (3:1) from one batch of code.
  late_distill SigLIP-2-style schedule on images: MAE from the start, DINO self-distillation
               added at 50% of training with its weight ramped in over 10%.
  multimodal   MAE on digits + span corruption on code, one Transformer trunk.

Run:   zoo pretrain --config experiments/mixtures.py:biphasic --workdir runs/biphasic
Tiny:  zoo pretrain --config experiments/mixtures.py:multimodal,tiny --workdir /tmp/mm
"""
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig

MAE_HEAD = {"decoder_width": 64, "decoder_depth": 2, "decoder_heads": 4}
MAE_TINY = {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}
DINO_HEAD = {"out_dim": 1024, "head_hidden": 512, "head_bottleneck": 128, "num_local": 4}
DINO_TINY = {"out_dim": 64, "head_hidden": 32, "head_bottleneck": 16, "num_local": 2}


def get_config(arg: str = "biphasic") -> Config:
    parts = [p for p in arg.split(",") if p]
    tiny = "tiny" in parts
    names = [p for p in parts if p != "tiny"]
    name = names[0] if names else "biphasic"
    steps = 8 if tiny else 1000
    mixing = "sum"
    if name == "biphasic":
        objectives = {"clm": {"kind": "clm", "end_step": int(0.6 * steps)},
                      "mlm": {"kind": "mlm", "start_step": int(0.6 * steps)}}
        data = "pycode"
    elif name == "ul2_style":
        objectives = {"mlm": {"kind": "mlm", "weight": 3.0},
                      "span": {"kind": "span_corruption", "weight": 1.0}}
        data, mixing = "pycode", "per_example"
    elif name == "late_distill":
        objectives = {"mae": {"kind": "mae", **(MAE_TINY if tiny else MAE_HEAD)},
                      "dino": {"kind": "dino", **(DINO_TINY if tiny else DINO_HEAD),
                               "start_step": steps // 2, "ramp_steps": max(1, steps // 10),
                               "weight": 0.5}}
        data = "digits"
    elif name == "multimodal":
        objectives = {"mae": {"kind": "mae", **(MAE_TINY if tiny else MAE_HEAD)},
                      "span": {"kind": "span_corruption", "data": "pycode"}}
        data = "digits"
    else:
        raise ValueError(f"--config: unknown mixture {name!r}; allowed: biphasic, ul2_style, "
                         "late_distill, multimodal")
    return Config(
        model=ModelConfig(size="test" if tiny else "micro", patch_size=4),
        objectives=objectives, mixing=mixing,
        data=DataConfig(name=data, batch_size=8 if tiny else 32, seq_len=64 if tiny else 128),
        optim=OptimConfig(lr=1e-3, warmup_steps=2 if tiny else 50, weight_decay=0.05),
        steps=steps, log_every=2 if tiny else 50, checkpoint_every=4 if tiny else 500)
