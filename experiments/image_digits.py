"""An image objective on the bundled digits (32x32 grayscale), probed on the digits test split.

The objective is the config argument (default position); add ",tiny" for the smoke-test size:

Run:   zoo pretrain --config experiments/image_digits.py:selfie --workdir runs/selfie
Tiny:  zoo pretrain --config experiments/image_digits.py:position,tiny --workdir /tmp/pos
Probe: zoo probe --workdir runs/selfie

Objectives: position (MP3; the encoder gets no position embeddings), selfie, mae (see also
experiments/mae_digits.py for MAE's own decoder settings).
"""
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig


def get_config(arg: str = "") -> Config:
    parts = [p for p in arg.split(",") if p]
    tiny = "tiny" in parts
    names = [p for p in parts if p != "tiny"]
    objective = names[0] if names else "position"
    return Config(
        model=ModelConfig(size="test" if tiny else "micro", patch_size=4),
        objective={"name": objective},
        data=DataConfig(name="digits", batch_size=16 if tiny else 128),
        optim=OptimConfig(lr=1e-3 if tiny else 1.5e-3, warmup_steps=2 if tiny else 100,
                          weight_decay=0.05),
        steps=6 if tiny else 1000,
        log_every=2 if tiny else 50,
        checkpoint_every=3 if tiny else 500,
    )
