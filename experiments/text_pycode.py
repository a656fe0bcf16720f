"""A text objective on the bundled pycode corpus (the Python standard library's own source).

The objective is the config argument (default mlm); add ",tiny" for the smoke-test size:

Run:   zoo pretrain --config experiments/text_pycode.py:span_corruption --workdir runs/t5
Tiny:  zoo pretrain --config experiments/text_pycode.py:clm,tiny --workdir /tmp/clm_tiny
Probe: zoo probe --workdir runs/t5        (classifies held-out chunks by stdlib package)

Objectives: mlm, span_corruption, bart, ul2, clm, prefix_lm, meap.
"""
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig


def get_config(arg: str = "") -> Config:
    parts = [p for p in arg.split(",") if p]
    tiny = "tiny" in parts
    names = [p for p in parts if p != "tiny"]
    objective = names[0] if names else "mlm"
    return Config(
        model=ModelConfig(size="test" if tiny else "micro"),
        objective={"name": objective},
        data=DataConfig(name="pycode", batch_size=8 if tiny else 32, seq_len=64 if tiny else 128),
        optim=OptimConfig(lr=1e-3, warmup_steps=2 if tiny else 50, weight_decay=0.01),
        steps=6 if tiny else 1000,
        log_every=2 if tiny else 50,
        checkpoint_every=3 if tiny else 500,
    )
