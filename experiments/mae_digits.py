"""MAE on the bundled digits (32x32 grayscale), probed on the digits test split.

Run:   zoo pretrain --config experiments/mae_digits.py --workdir runs/mae_digits
Tiny:  zoo pretrain --config experiments/mae_digits.py:tiny --workdir /tmp/mae_tiny
Probe: zoo probe --workdir runs/mae_digits
"""
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig


def get_config(arg: str = "") -> Config:
    tiny = arg == "tiny"
    return Config(
        model=ModelConfig(size="test" if tiny else "micro", patch_size=4),
        objective={"name": "mae", "mask_ratio": 0.75, "norm_pix_loss": False,
                   "decoder_width": 32 if tiny else 64, "decoder_depth": 1 if tiny else 2,
                   "decoder_heads": 2 if tiny else 4},
        data=DataConfig(name="digits", batch_size=16 if tiny else 128),
        optim=OptimConfig(lr=1e-3 if tiny else 1.5e-3, warmup_steps=2 if tiny else 100,
                          weight_decay=0.05),
        steps=6 if tiny else 1500,
        log_every=2 if tiny else 50,
        checkpoint_every=3 if tiny else 500,
    )
