"""``zoo compare``: every objective of a modality, same backbone and budget, probed side by side.

Writes ``results.md``, ``results.json`` and ``results.png`` (a bar plot) into the output dir.
Each objective trains in its own sub-workdir, so an interrupted comparison resumes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax

import objectives
from zoo import config as config_lib
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig

log = logging.getLogger(__name__)

SUITES = ("image", "text", "restoration", "retrieval")   # see zoo/restoration.py, zoo/retrieval.py

# Hyperparameters each objective uses in the image suite (its head sized to the micro backbone).
IMAGE_HPARAMS = {
    "mae": {"mask_ratio": 0.75, "norm_pix_loss": False, "decoder_width": 64,
            "decoder_depth": 2, "decoder_heads": 4},
    "simclr": {"proj_dim": 64},
    "byol": {"proj_hidden": 512, "proj_dim": 128},
    # BN head and no colour jitter: on grey digits the reference's jitter makes the teacher's
    # targets at init encode each crop's brightness, which the other crop cannot predict, and
    # DINO collapsed to uniform targets (README, "Image suite").
    "dino": {"out_dim": 1024, "head_hidden": 512, "head_bottleneck": 128, "num_local": 4,
             "use_bn_in_head": True, "color_strength": 0.0},
}
# The same heads shrunk for ``tiny`` runs (smoke tests).
TINY_HPARAMS = {
    "mae": {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
    "simclr": {"proj_dim": 16},
    "byol": {"proj_hidden": 32, "proj_dim": 16},
    "dino": {"out_dim": 64, "head_hidden": 32, "head_bottleneck": 16, "num_local": 2},
}
# Image: 120 steps keep the default `zoo compare` (six objectives, batch 128) near 10 minutes
# on a 2-core CPU (issue 2); `--steps 500` is the fuller comparison in the README (~35 min).
DEFAULT_STEPS = {"image": 120, "text": 300}
# The text suite's shared budget: every objective reads the same packed rows of the pycode
# corpus (batch x seq_len raw tokens per step) with the same width/depth per stack.
TEXT_BATCH, TEXT_SEQ_LEN = 16, 128


def suite_config(suite: str, objective: str, *, steps: int | None = None,
                 tiny: bool = False) -> Config:
    """The shared budget of a suite: same backbone, data, optimizer and steps for everyone."""
    if suite not in SUITES:
        raise ValueError(f"--suite: unknown {suite!r}; allowed: {SUITES}")
    steps = steps or (4 if tiny else DEFAULT_STEPS[suite])
    if suite == "text":
        return config_lib.validate(Config(
            model=ModelConfig(size="test" if tiny else "micro"),
            objective={"name": objective},
            data=DataConfig(name="pycode", batch_size=8 if tiny else TEXT_BATCH,
                            seq_len=64 if tiny else TEXT_SEQ_LEN),
            optim=OptimConfig(lr=1e-3, warmup_steps=min(50, steps // 10), weight_decay=0.01),
            steps=steps, log_every=max(1, min(50, steps // 4)),
            checkpoint_every=steps, keep_checkpoints=1))
    hparams = dict(IMAGE_HPARAMS.get(objective, {}))
    if tiny:
        hparams.update(TINY_HPARAMS.get(objective, {}))
    return config_lib.validate(Config(
        model=ModelConfig(size="test" if tiny else "micro", patch_size=4),
        objective={"name": objective, **hparams},
        data=DataConfig(name="digits", batch_size=16 if tiny else 128),
        optim=OptimConfig(lr=1.5e-3, warmup_steps=min(100, steps // 10), weight_decay=0.05),
        steps=steps, log_every=max(1, min(50, steps // 4)),
        checkpoint_every=steps, keep_checkpoints=1))


def compare(suite: str = "image", out_dir: str = "compare_out", *, steps: int | None = None,
            tiny: bool = False, only: tuple[str, ...] | None = None,
            progress: bool = True) -> dict:
    """Pretrains each objective of ``suite``, probes it and a random-init baseline.

    Example::

        results = zoo.compare("image", "/tmp/cmp", tiny=True)
        results["rows"][0]   # {'objective': 'random-init', 'linear_probe': ..., 'knn': ...}
    """
    from zoo.evaluate import heldout
    from zoo.probe import probe

    if suite not in SUITES:
        raise ValueError(f"--suite: unknown {suite!r}; allowed: {SUITES}")
    if only:
        unknown = [n for n in only if n not in objectives.suite_names(suite)]
        if unknown:
            raise ValueError(f"--only: {unknown[0]!r} is not a {suite} objective; "
                             f"allowed: {objectives.suite_names(suite)}")
    if suite == "restoration":
        from zoo.restoration import compare_restoration
        return compare_restoration(out_dir, steps=steps, tiny=tiny, only=only,
                                   progress=progress)
    if suite == "retrieval":
        from zoo.retrieval import compare_retrieval
        return compare_retrieval(out_dir, steps=steps, tiny=tiny, only=only, progress=progress)
    names = only or objectives.suite_names(suite)
    os.makedirs(out_dir, exist_ok=True)
    configs = {name: suite_config(suite, name, steps=steps, tiny=tiny) for name in names}
    rows = []
    # The baseline is the first objective's backbone at its random init (for text: mlm's
    # encoder when mlm is compared).
    baseline_config = next(iter(configs.values()))
    rows.append({"objective": "random-init", "steps": 0, "final_loss": None,
                 "train_seconds": 0.0, **_scores(probe(baseline_config, None))})
    # Held-out loss and token accuracy are each objective's own task (not comparable across
    # objectives); reported for the text suite.
    evaluate = (lambda cfg, workdir: _heldout(heldout(cfg, workdir))) if suite == "text" \
        else (lambda cfg, workdir: {})
    for name, cfg in configs.items():
        cfg = dataclasses.replace(cfg, progress=progress)
        workdir = os.path.join(out_dir, name)
        summary, seconds = timed_train(cfg, workdir)
        rows.append({"objective": name, "steps": cfg.steps, "final_loss": summary.get("loss"),
                     "train_seconds": seconds, **evaluate(cfg, workdir),
                     **_scores(probe(cfg, workdir))})
    results = {"suite": suite, "dataset": baseline_config.data.name,
               "model": dataclasses.asdict(baseline_config.model), "rows": rows}
    if jax.process_index() == 0:
        write_results(results, out_dir)
    return results


TRAIN_RECORD_FILE = "compare_train.json"


class ComparisonPreempted(Exception):
    """A suite's training run was preempted (SIGTERM): its checkpoint is written and the
    comparison stops; running the same comparison again resumes it (``zoo compare`` exits 0)."""


def _read_record(path: str) -> dict | None:
    """``{"seconds": float, "summary": dict}`` from an earlier call, or None (none, or unreadable:
    a record is a convenience, never a reason to stop a comparison)."""
    try:
        with open(path) as f:
            record = json.load(f)
        return {"seconds": float(record["seconds"]), "summary": dict(record["summary"])}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        log.warning("ignoring the unreadable %s (%s)", path, error)
        return None


def timed_train(cfg, workdir: str) -> tuple[dict, float | None]:
    """Trains (or resumes) ``cfg`` in ``workdir``; returns ``(summary, seconds)``.

    ``seconds`` adds up every call that trained this workdir (kept in ``TRAIN_RECORD_FILE``, also
    when a call is interrupted), so a re-run over a finished workdir reports the time it took to
    train, not the moment it took to notice it was done; None where that time is unknown (trained
    before the record existed, e.g. by ``zoo pretrain``). A preempted run raises
    :class:`ComparisonPreempted` after its checkpoint is written."""
    from zoo.train import _write_json_atomically, completed_checkpoint_steps, train

    path = os.path.join(workdir, TRAIN_RECORD_FILE)
    record = _read_record(path)
    done = completed_checkpoint_steps(workdir)
    if cfg.steps in done:
        summary = train(cfg, workdir)        # nothing left to train: the last logged metrics
        if record and record["summary"].get("step") == cfg.steps:
            return record["summary"], round(record["seconds"], 1)
        return summary, None
    # Seconds of earlier calls: recorded, none (a fresh workdir), or unknown (checkpoints
    # written by something that kept no record).
    earlier = record["seconds"] if record else (None if done else 0.0)
    summary, start = None, time.perf_counter()
    try:
        summary = train(cfg, workdir)
    finally:
        seconds = None if earlier is None else earlier + time.perf_counter() - start
        if jax.process_index() == 0 and seconds is not None:
            kept = summary if summary is not None else (record or {}).get("summary", {})
            plain = {k: v for k, v in kept.items() if isinstance(v, (bool, int, float, str))}
            _write_json_atomically(path, {"seconds": seconds, "summary": plain})
    if summary.get("preempted"):
        raise ComparisonPreempted(f"preempted: {workdir} checkpointed at step {summary['step']}; "
                                  "run the same comparison again to resume")
    return summary, None if seconds is None else round(seconds, 1)


def format_seconds(seconds: float | None) -> str:
    """A results table's "train s" cell: whole seconds, "-" where the time is unknown."""
    return "-" if seconds is None else f"{seconds:.0f}"


def _heldout(result: dict) -> dict:
    """The held-out loss and the accuracy of the objective's own task (token accuracy; for
    token_position, position accuracy)."""
    accuracy = result.get("heldout_accuracy", result.get("heldout_position_accuracy"))
    return {"heldout_loss": result["heldout_loss"], "heldout_accuracy": accuracy}


def _scores(probe_result: dict) -> dict:
    return {"linear_probe": probe_result["linear_probe"], "knn": probe_result["knn"]}


def results_table(results: dict) -> str:
    """A Markdown table of a comparison."""
    if results["suite"] == "restoration":
        from zoo.restoration import restoration_table
        return restoration_table(results)
    if results["suite"] == "retrieval":
        from zoo.retrieval import retrieval_table
        return retrieval_table(results)
    model = results["model"]
    backbone = (f"ViT `{model['size']}` / patch {model['patch_size']}"
                if results["suite"] == "image" else f"backbones of size `{model['size']}`")
    heldout = any("heldout_loss" in row for row in results["rows"])
    extra_head = " held-out loss | held-out token acc |" if heldout else ""
    lines = [f"Suite `{results['suite']}` on `{results['dataset']}`, {backbone}.",
             "",
             f"| objective | steps | final loss |{extra_head} linear probe | k-NN | train s |",
             "|---|---:|---:|" + "---:|" * (2 if heldout else 0) + "---:|---:|---:|"]
    number = lambda value, fmt: "-" if value is None else format(value, fmt)
    for row in results["rows"]:
        extra = (f" {number(row.get('heldout_loss'), '.4f')} | "
                 f"{number(row.get('heldout_accuracy'), '.1%')} |") if heldout else ""
        lines.append(f"| {row['objective']} | {row['steps']} | "
                     f"{number(row['final_loss'], '.4f')} |{extra} "
                     f"{100 * row['linear_probe']:.1f}% | {100 * row['knn']:.1f}% | "
                     f"{format_seconds(row['train_seconds'])} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_table(results))
    plot_results(results, os.path.join(out_dir, "results.png"))


def plot_results(results: dict, path: str) -> None:
    if results["suite"] == "restoration":
        from zoo.restoration import plot_restoration
        return plot_restoration(results, path)
    if results["suite"] == "retrieval":
        from zoo.retrieval import plot_retrieval
        return plot_retrieval(results, path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = results["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 3.5))
    for offset, key, label in ((-0.2, "linear_probe", "linear probe"), (0.2, "knn", "k-NN")):
        values = [100 * r[key] for r in rows]
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, [r["objective"] for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_title(f"zoo compare --suite {results['suite']} ({results['dataset']})")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


from zoo._callable_module import make_module_callable  # noqa: E402

make_module_callable(__name__, "compare")   # zoo.compare(...) after `import zoo.compare`
