"""MAE ViT-L/16 on ImageNet-1k at 224x224: the reference's 800-epoch recipe on a TPU pod.

The argument names the pod; it picks the mesh (see tpu/README.md for the whole workflow):

Run:   CONFIG=experiments/pod_mae_vitl16_imagenet.py:v4-32 WORKDIR=gs://BUCKET/mae_vitl16 \
           DATA_DIR=gs://BUCKET/tensorflow_datasets tpu/launch.sh
Tiny:  zoo pretrain --config experiments/pod_mae_vitl16_imagenet.py:tiny --workdir /tmp/pod_mae
       (the same recipe scaled down to the bundled digits, on the local devices)

Recipe (facebookresearch/mae PRETRAIN.md, ViT-L): mask 0.75, norm_pix_loss, decoder 512 wide x
8 blocks x 16 heads, global batch 4096, AdamW with lr = 1.5e-4 * 4096 / 256, weight decay 0.05,
betas (0.9, 0.95), 40 warm-up epochs then a cosine to 0 over 800 epochs, no gradient clipping.
Deviation: the reference's RandomResizedCrop(0.2-1) + flip is not applied, and zoo reads
fixed-size images, so `tfds:imagenet2012` (variable-size JPEGs) must first be prepared at
224x224 (see tpu/README.md, "Data").

Meshes (data x fsdp; per-device batch = 4096 / (data * fsdp)):

  pod            devices  mesh (data x fsdp x tensor)  images per device
  v4-32          16       4 x 4 x 1                    256
  v4-128         64       16 x 4 x 1                   64
  v5litepod-64   64       8 x 8 x 1                    64

Memory, estimated: ViT-L (304M) + decoder (26M) parameters with AdamW moments and gradients in
float32 are ~5.3 GB, divided by fsdp. Saved activations are ~100 MB per image in bfloat16
without rematerialisation (Korthikanti et al. 2022's 34*s*h + 5*a*s^2 bytes per layer: the
encoder sees 50 tokens, the decoder 197), i.e. ~25 GB at 256 images per v4 chip (32 GiB HBM):
on v4-32 add `--set model.remat=dots` (or `full`), or `--set optim.grad_accum_steps=2`. The
v5e chips have 16 GiB, hence fsdp 8 there. `model.scan_layers=True` shortens the compile of
the 24 encoder blocks. None of these change the loss; they are left out of the config so that
it loads with any zoo version.
"""
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig

IMAGENET_TRAIN_IMAGES = 1_281_167
GLOBAL_BATCH = 4096
EPOCHS, WARMUP_EPOCHS = 800, 40
BASE_LR = 1.5e-4                  # per 256 images (the reference's blr)

# Devices that jax.devices() lists on each pod: a v4 chip is one device (its two TensorCores
# form one "megacore"), so v4-32 = 32 TensorCores = 16 chips = 16 devices; a v5e chip has one
# TensorCore.
POD_DEVICES = {"v4-32": 16, "v4-128": 64, "v5litepod-64": 64}
MESHES = {
    "v4-32": (("data", -1), ("fsdp", 4), ("tensor", 1)),
    "v4-128": (("data", -1), ("fsdp", 4), ("tensor", 1)),
    "v5litepod-64": (("data", -1), ("fsdp", 8), ("tensor", 1)),
}
DEFAULT_POD = "v4-32"


def epochs_to_steps(epochs: float, batch: int = GLOBAL_BATCH) -> int:
    """Steps that cover ``epochs`` passes over ImageNet's train split. zoo's iterator is one
    stream over per-epoch permutations (no ragged last batch is dropped), so an epoch is
    1,281,167 / 4096 = 312.8 steps; the reference drops the last batch (312 steps)."""
    return round(epochs * IMAGENET_TRAIN_IMAGES / batch)


def get_config(arg: str = DEFAULT_POD) -> Config:
    if arg == "tiny":
        return _tiny()
    if arg not in MESHES:
        raise ValueError(f"pod_mae_vitl16_imagenet: unknown pod {arg!r}; allowed: "
                         f"{', '.join(MESHES)} (or tiny)")
    return Config(
        model=ModelConfig(size="L", patch_size=16, cls_token=True, dtype="bfloat16"),
        objective={"name": "mae", "mask_ratio": 0.75, "norm_pix_loss": True,
                   "decoder_width": 512, "decoder_depth": 8, "decoder_heads": 16},
        # data_dir: the GCS dir holding the prepared dataset; give it at launch
        # (DATA_DIR=gs://... or --set data.data_dir=gs://...), it may change on resume.
        data=DataConfig(name="tfds:imagenet2012", split="train", batch_size=GLOBAL_BATCH),
        optim=OptimConfig(lr=BASE_LR * GLOBAL_BATCH / 256, schedule="cosine",
                          warmup_steps=epochs_to_steps(WARMUP_EPOCHS), end_lr_fraction=0.0,
                          weight_decay=0.05, b1=0.9, b2=0.95, clip_norm=None),
        mesh=MESHES[arg],
        steps=epochs_to_steps(EPOCHS),           # 250,228
        log_every=100,
        # ~3 epochs; bounds what a preemption without notice loses. SIGTERM (spot
        # preemption, tpu/stop.sh) checkpoints at the next step anyway.
        checkpoint_every=1000,
        keep_checkpoints=2,
    )


def _tiny() -> Config:
    """The same code path (MAE, norm_pix_loss, bf16, an fsdp axis) on digits, 8 devices."""
    return Config(
        model=ModelConfig(size="test", patch_size=4, dtype="bfloat16"),
        objective={"name": "mae", "mask_ratio": 0.75, "norm_pix_loss": True,
                   "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
        data=DataConfig(name="digits", batch_size=16),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.05, b2=0.95, clip_norm=None),
        mesh=(("data", -1), ("fsdp", 2), ("tensor", 1)),
        steps=4, log_every=2, checkpoint_every=2,
    )
