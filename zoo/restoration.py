"""``zoo compare --suite restoration``: does degradation-classification pretraining help
all-in-one restoration?

1. Pretrain each restoration objective (``dcpt``, ``mask_dcpt``) on photo crops and measure
   its degradation-type accuracy on held-out photos (its own heads, fixed rngs).
2. Fine-tune the restoration task (``restore``: L1, global residual) from each pretrained
   encoder and from scratch, with the same budget; measure PSNR on held-out degraded crops
   (every test crop, a fixed degradation per crop). The scratch model before fine-tuning is
   the identity, so its PSNR is that of the degraded input itself: the "degraded input" row.
3. Write ``results.md``, ``results.json``, ``results.png`` (PSNR and accuracy bars) and
   ``examples.png`` (degraded / restored by each model / clean).

Example::

    results = zoo.compare("restoration", "/tmp/restore", tiny=True)
    results["rows"][-1]   # {'objective': 'mask_dcpt', 'heldout_psnr': ..., ...}
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

import objectives
from zoo import config as config_lib
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig

DATASET = "photos/32x32"
DEFAULT_STEPS = 500           # pretraining steps per objective
FINETUNE_FRACTION = 0.6       # fine-tuning steps = this x pretraining steps
BATCH = 32
EXAMPLES = 6                  # test crops in examples.png


def restoration_config(objective: str, *, steps: int, tiny: bool = False,
                       init_from: str | None = None) -> Config:
    """The suite's shared budget: ViT micro (test when tiny), patch 4 on 32x32 photo crops."""
    hparams = {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2} if tiny else {}
    return config_lib.validate(Config(
        model=ModelConfig(size="test" if tiny else "micro", patch_size=4),
        objective={"name": objective, **hparams},
        data=DataConfig(name=DATASET, batch_size=8 if tiny else BATCH),
        optim=OptimConfig(lr=1e-3, warmup_steps=min(50, steps // 10), weight_decay=0.05),
        steps=steps, log_every=max(1, min(50, steps // 4)), checkpoint_every=steps,
        keep_checkpoints=1, init_from=init_from))


def compare_restoration(out_dir: str, *, steps: int | None = None, tiny: bool = False,
                        only: tuple[str, ...] | None = None, progress: bool = True) -> dict:
    """Pretrains, fine-tunes and evaluates; returns the results dict (see the module doc)."""
    from zoo.evaluate import heldout
    from zoo.compare import timed_train

    names = only or objectives.suite_names("restoration")
    steps = steps or (4 if tiny else DEFAULT_STEPS)
    finetune_steps = max(2, int(steps * FINETUNE_FRACTION))
    os.makedirs(out_dir, exist_ok=True)
    test_batches = test_size(tiny) // restoration_config("restore", steps=1, tiny=tiny
                                                         ).data.batch_size

    def run(config, workdir):
        return timed_train(dataclasses.replace(config, progress=progress), workdir)

    identity = restoration_config("restore", steps=finetune_steps, tiny=tiny)
    degraded = heldout(identity, None, num_batches=test_batches)
    rows = [{"objective": "degraded input", "pretrain_steps": 0, "finetune_steps": 0,
             "heldout_psnr": degraded["heldout_psnr"], "heldout_l1": degraded["heldout_l1"],
             "degradation_accuracy": None, "train_seconds": 0.0}]
    workdirs = {}
    for init in (None, *names):
        pretrain_row = {"degradation_accuracy": None, "pretrain_steps": 0}
        seconds = 0.0
        if init is not None:
            config = restoration_config(init, steps=steps, tiny=tiny)
            pretrained = os.path.join(out_dir, init)
            _, seconds = run(config, pretrained)
            scores = heldout(config, pretrained, num_batches=test_batches)
            pretrain_row = {"degradation_accuracy": scores["heldout_degradation_accuracy"],
                            "pretrain_steps": steps}
        label = init or "scratch"
        config = restoration_config("restore", steps=finetune_steps, tiny=tiny,
                                    init_from=None if init is None
                                    else os.path.join(out_dir, init))
        workdirs[label] = os.path.join(out_dir, f"finetune_{label}")
        summary, finetune_seconds = run(config, workdirs[label])
        scores = heldout(config, workdirs[label], num_batches=test_batches)
        rows.append({"objective": label, **pretrain_row, "finetune_steps": finetune_steps,
                     "final_loss": summary.get("loss"), "heldout_psnr": scores["heldout_psnr"],
                     "heldout_l1": scores["heldout_l1"],
                     "train_seconds": (None if None in (seconds, finetune_seconds)
                                       else round(seconds + finetune_seconds, 1))})
    results = {"suite": "restoration", "dataset": DATASET,
               "model": dataclasses.asdict(identity.model),
               "kinds": list(objectives.get("restore").kinds), "rows": rows}
    if jax.process_index() == 0:
        from zoo.compare import write_results   # the suites' shared writer (json, md, png)
        write_results(results, out_dir)
        examples_grid(identity, workdirs, os.path.join(out_dir, "examples.png"))
    return results


def test_size(tiny: bool) -> int:
    """Held-out crops evaluated (all of the photos test split; fewer when tiny)."""
    from zoo.data import dataset_spec
    return 16 if tiny else dataset_spec(DATASET).splits["test"]


def restoration_table(results: dict) -> str:
    """A Markdown table: PSNR after fine-tuning per initialisation, pretraining accuracy."""
    from zoo.compare import format_seconds
    model = results["model"]
    lines = [f"Suite `restoration` on `{results['dataset']}` (degradations: "
             f"{', '.join(results['kinds'])}), ViT `{model['size']}` / patch "
             f"{model['patch_size']} + restoration decoder.",
             "",
             "| init | pretrain steps | degradation acc (held-out) | fine-tune steps | "
             "held-out PSNR | held-out L1 | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        accuracy = row.get("degradation_accuracy")
        lines.append(
            f"| {row['objective']} | {row['pretrain_steps']} | "
            f"{'-' if accuracy is None else format(accuracy, '.1%')} | "
            f"{row['finetune_steps']} | {row['heldout_psnr']:.2f} dB | "
            f"{row['heldout_l1']:.4f} | {format_seconds(row['train_seconds'])} |")
    return "\n".join(lines) + "\n"


def plot_restoration(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6),
                                      gridspec_kw={"width_ratios": [3, 2]})
    names = [r["objective"] for r in rows]
    bars = left.bar(names, [r["heldout_psnr"] for r in rows],
                    color=["0.6"] + ["C0"] * (len(rows) - 1))
    left.bar_label(bars, fmt="%.2f", fontsize=8)
    low = min(r["heldout_psnr"] for r in rows)
    left.set_ylim(max(0.0, low - 3), max(r["heldout_psnr"] for r in rows) + 1.5)
    left.set_ylabel("held-out PSNR (dB)")
    left.set_title("restoration after fine-tuning")
    pretrained = [r for r in rows if r.get("degradation_accuracy") is not None]
    bars = right.bar([r["objective"] for r in pretrained],
                     [100 * r["degradation_accuracy"] for r in pretrained], color="C1")
    right.bar_label(bars, fmt="%.1f", fontsize=8)
    chance = 100 / len(results["kinds"])
    right.axhline(chance, color="0.4", ls="--", lw=1, label=f"chance ({chance:.0f}%)")
    right.set_ylim(0, 110)
    right.set_ylabel("degradation-type accuracy (%)")
    right.set_title("pretraining heads, held-out photos")
    right.legend(frameon=False, fontsize=8)
    fig.suptitle(f"zoo compare --suite restoration ({results['dataset']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def examples_grid(config: Config, workdirs: dict[str, str], path: str) -> None:
    """A PNG grid: one column per held-out crop; rows degraded, each model's restoration,
    clean. Degradations use a fixed rng (the first held-out batch's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flax import nnx

    from objectives.base import unpatchify
    from zoo.train import build, global_batch, make_batches, restore_or_init

    experiment = build(config)
    objective = experiment.objective
    batch_np = next(make_batches(experiment, "test", shuffle=False))
    grid = (experiment.data_spec.image_shape[0] // objective.patch_size,
            experiment.data_spec.image_shape[1] // objective.patch_size)
    to_image = lambda patches: np.clip((unpatchify(np.asarray(patches), objective.patch_size,
                                                   grid) + 1) / 2, 0, 1)
    panels = {}
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        batch = global_batch(experiment, batch_np)
        inputs, targets = jax.jit(objective.prepare)(batch, jax.random.fold_in(
            jax.random.PRNGKey(0), 0))
        panels["degraded"] = to_image(jax.device_get(inputs["patches"]))
        for label, workdir in workdirs.items():
            state, _ = restore_or_init(experiment, workdir)
            restored = jax.jit(lambda p, x: objective.apply(
                nnx.merge(experiment.graphdef, p), x)["restored"])(state.params, inputs)
            panels[label] = to_image(jax.device_get(restored))
        panels["clean"] = to_image(jax.device_get(targets["clean"]))
    columns = min(EXAMPLES, len(batch_np["image"]))
    fig, axes = plt.subplots(len(panels), columns, figsize=(1.3 * columns, 1.35 * len(panels)),
                             squeeze=False)
    for r, (label, images) in enumerate(panels.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.imshow(images[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
