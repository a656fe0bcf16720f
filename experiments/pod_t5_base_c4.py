"""T5-base span corruption on C4 (Raffel et al. 2020's pretraining setup) on a TPU pod.

The argument names the pod; it picks the mesh (see tpu/README.md for the whole workflow):

Run:   CONFIG=experiments/pod_t5_base_c4.py:v4-32 WORKDIR=gs://BUCKET/t5_base \
           DATA_DIR=gs://BUCKET/tensorflow_datasets tpu/launch.sh
Tiny:  zoo pretrain --config experiments/pod_t5_base_c4.py:tiny --workdir /tmp/pod_t5
       (the same recipe scaled down to the bundled pycode corpus, on the local devices)

Recipe: T5's span corruption (noise density 0.15, mean span 3, one sentinel per span) on packed
rows of `input_and_target_lengths(512) = (568, 114)`: 568 raw tokens per row become 512 encoder
inputs and 114 targets; 128 rows per batch (2^16 input tokens), 2^19 steps; an encoder-decoder
of T5-base's shape (768 wide, 12 + 12 blocks, 12 heads, MLP 3072).

Deviations, all forced by what zoo has (none tuned yet):
  * tokens are zoo's UTF-8 bytes (363 ids, 100 sentinels), not T5's 32k SentencePiece
    vocabulary, so a 568-token row holds ~4x less text and the model has ~200M parameters,
    not 220M. ByT5 (Xue et al. 2022), the byte-level T5, corrupts spans of mean length 20
    bytes: try `--set objective.mean_noise_span_length=20.0`.
  * AdamW (lr 3e-4, 10k warm-up steps, cosine to 10%, weight decay 0.01) instead of
    Adafactor with T5's inverse-square-root schedule (lr 0.01 for 10^4 steps): zoo has no
    Adafactor.
  * learned absolute position embeddings and GELU MLPs instead of T5's relative position
    buckets and ReLU.

Meshes (data x fsdp; per-device batch = 128 / (data * fsdp)):

  pod            devices  mesh (data x fsdp x tensor)  rows per device
  v4-8           4        4 x 1 x 1                    32
  v4-32          16       8 x 2 x 1                    8
  v5litepod-16   16       8 x 2 x 1                    8

Memory, estimated: parameters, AdamW moments and gradients in float32 are ~3.2 GB (divided by
fsdp); saved activations ~0.4 GB per row in bfloat16 (the encoder's 512 tokens dominate), so
~13 GB per v4 chip at 32 rows. With `--set model.remat=dots` or `optim.grad_accum_steps` a
larger batch fits; `model.scan_layers=True` shortens the compile. Packed rows always hold 114
targets, so micro-batch means average to the batch mean exactly. Those options are left out
of the config so that it loads with any zoo version.
"""
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig

GLOBAL_BATCH = 128                # rows of 568 raw tokens -> 512 inputs, 114 targets
RAW_LENGTH = 568                  # objectives.span_corruption.input_and_target_lengths(512)[0]
STEPS = 2**19

# Devices that jax.devices() lists on each pod (a v4 chip is one device: its two TensorCores
# form one "megacore"; a v5e chip has one TensorCore).
POD_DEVICES = {"v4-8": 4, "v4-32": 16, "v5litepod-16": 16}
MESHES = {
    "v4-8": (("data", -1), ("fsdp", 1), ("tensor", 1)),
    "v4-32": (("data", -1), ("fsdp", 2), ("tensor", 1)),
    "v5litepod-16": (("data", -1), ("fsdp", 2), ("tensor", 1)),
}
DEFAULT_POD = "v4-32"


def get_config(arg: str = DEFAULT_POD) -> Config:
    if arg == "tiny":
        return _tiny()
    if arg not in MESHES:
        raise ValueError(f"pod_t5_base_c4: unknown pod {arg!r}; allowed: {', '.join(MESHES)} "
                         "(or tiny)")
    return Config(
        model=ModelConfig(name="encdec", size="B", dtype="bfloat16"),
        objective={"name": "span_corruption", "noise_density": 0.15,
                   "mean_noise_span_length": 3.0},
        # data_dir: the GCS dir holding the prepared dataset; give it at launch
        # (DATA_DIR=gs://... or --set data.data_dir=gs://...), it may change on resume.
        data=DataConfig(name="tfds:c4/en", split="train", batch_size=GLOBAL_BATCH,
                        seq_len=RAW_LENGTH),
        optim=OptimConfig(lr=3e-4, schedule="cosine", warmup_steps=10_000, end_lr_fraction=0.1,
                          weight_decay=0.01, b1=0.9, b2=0.98, clip_norm=1.0),
        mesh=MESHES[arg],
        steps=STEPS,
        log_every=100,
        checkpoint_every=2000,   # bounds what a preemption without notice loses
        keep_checkpoints=2,
    )


def _tiny() -> Config:
    """The same code path (span corruption, encdec, bf16, an fsdp axis) on pycode."""
    return Config(
        model=ModelConfig(name="encdec", size="test", dtype="bfloat16"),
        objective={"name": "span_corruption", "noise_density": 0.15,
                   "mean_noise_span_length": 3.0},
        data=DataConfig(name="pycode", batch_size=8, seq_len=64),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.01, b2=0.98),
        mesh=(("data", -1), ("fsdp", 2), ("tensor", 1)),
        steps=4, log_every=2, checkpoint_every=2,
    )
