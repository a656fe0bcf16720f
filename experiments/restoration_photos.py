"""Restoration pretraining (dcpt, mask_dcpt) or the restoration task (restore) on 32x32 crops of
the bundled photos, degraded on device with noise, blur, haze, rain and low light.

The objective is the config argument (default dcpt); add ",tiny" for the smoke-test size:

Pretrain:  zoo pretrain --config experiments/restoration_photos.py:dcpt --workdir runs/dcpt
Fine-tune: zoo pretrain --config experiments/restoration_photos.py:restore \\
               --set init_from=runs/dcpt --workdir runs/restore_from_dcpt
Tiny:      zoo pretrain --config experiments/restoration_photos.py:mask_dcpt,tiny --workdir /tmp/m

`zoo compare --suite restoration` runs the whole study (pretrain, fine-tune vs scratch, PSNR).
"""
from zoo.config import Config
from zoo.restoration import restoration_config


def get_config(arg: str = "") -> Config:
    parts = [p for p in arg.split(",") if p]
    tiny = "tiny" in parts
    names = [p for p in parts if p != "tiny"]
    return restoration_config(names[0] if names else "dcpt", steps=6 if tiny else 1000,
                              tiny=tiny)
