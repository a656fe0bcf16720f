"""Retrieval evaluation of two-tower models and ``zoo compare --suite retrieval``.

Recall@k on a held-out split: every item of tower A (a code body, a digit image) queries all of
tower B's items (docstrings, captions) by cosine similarity of the embeddings, and the other way
round. A query scores a hit at k when one of its k nearest candidates is EQUIVALENT to its own
pair's candidate: for labelled pairs (digit captions) a candidate with the same label (every
caption template of "seven" describes every seven); otherwise an identical candidate (same tokens
or pixels: some stdlib docstrings repeat, and an identical docstring is as right as the paired
one).

The suite pretrains ``clip`` and ``siglip`` on each paired dataset (``pycode_pairs``: code ->
docstring, held out by file; ``digits_captions``: image -> caption) with one shared budget,
scores a random-init baseline, and writes ``results.md``, ``results.json`` and ``results.png``.

Example::

    results = zoo.compare("retrieval", "/tmp/retrieval", tiny=True)
    results["rows"][1]   # {'dataset': 'pycode_pairs', 'objective': 'clip', 'a_to_b@1': ...}
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import objectives
from zoo import config as config_lib
from zoo.config import Config, DataConfig, ModelConfig, OptimConfig

DATASETS = ("pycode_pairs", "digits_captions")
DEFAULT_STEPS = 300
BATCH, SEQ_LEN = 64, 96
RECALL_AT = (1, 5)
HELDOUT_SPLIT = "test"


def recall_at_k(similarity: np.ndarray, correct: np.ndarray, ks=RECALL_AT) -> dict[int, float]:
    """Recall@k of queries (rows of ``similarity [Q, N]``): the fraction whose top-k candidates
    include one marked True in ``correct [Q, N]``. Ties rank the lower index first."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(correct, order, axis=1)
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def embeddings(experiment, params, pairs: dict[str, np.ndarray],
               batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings of both towers for every pair (fixed-size, padded batches)."""
    objective, graphdef = experiment.objective, experiment.graphdef

    @jax.jit
    def embed(params, batch):
        inputs, _ = objective.prepare(batch, None)
        return objective.embed(nnx.merge(graphdef, params), inputs)

    keys = [k for k in pairs if k != "label"]
    count = len(pairs["text"])
    out_a, out_b = [], []
    for start in range(0, count, batch_size):
        chunk = {k: pairs[k][start:start + batch_size] for k in keys}
        pad = batch_size - len(chunk["text"])
        if pad:
            chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                     for k, v in chunk.items()}
        za, zb = embed(params, {k: jnp.asarray(v) for k, v in chunk.items()})
        out_a.append(np.asarray(za)[:batch_size - pad])
        out_b.append(np.asarray(zb)[:batch_size - pad])
    return np.concatenate(out_a), np.concatenate(out_b)


def retrieval_scores(config: Config, workdir: str | None, *, split: str = HELDOUT_SPLIT,
                     limit: int | None = None) -> dict[str, float]:
    """Recall@1/@5 in both directions (``a_to_b@k``, ``b_to_a@k``) of ``workdir``'s latest
    checkpoint (a random init when None) on ``split`` of the config's paired dataset."""
    from zoo.data import load_pairs, same_item
    from zoo.train import build, restore_or_init

    experiment = build(config, devices=jax.devices()[:1] if jax.process_count() == 1 else None)
    if experiment.objective.modality != "pairs":
        raise ValueError(f"objective.name: retrieval needs a two-tower objective "
                         f"({objectives.suite_names('retrieval')}), got "
                         f"{experiment.objective.name!r}")
    state, _ = restore_or_init(experiment, workdir)
    pairs = load_pairs(config.data.name, split, seq_len=config.data.seq_len,
                       data_dir=config.data.data_dir, limit=limit)
    key_a = "image" if "image" in pairs else "code"
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        za, zb = embeddings(experiment, state.params, pairs)
    similarity = za @ zb.T
    if "label" in pairs:
        same_a = same_b = same_item(pairs["label"])
    else:
        same_a, same_b = same_item(pairs[key_a]), same_item(pairs["text"])
    # Query a_i is answered by b_j when b_j equals b_i (and the other way round).
    a_to_b = recall_at_k(similarity, same_b)
    b_to_a = recall_at_k(similarity.T, same_a)
    return {**{f"a_to_b@{k}": v for k, v in a_to_b.items()},
            **{f"b_to_a@{k}": v for k, v in b_to_a.items()}, "num_pairs": len(za)}


def retrieval_config(objective: str, dataset: str, *, steps: int | None = None,
                     tiny: bool = False) -> Config:
    """The suite's shared budget: towers of size micro (test when tiny), same data, steps."""
    steps = steps or (4 if tiny else DEFAULT_STEPS)
    return config_lib.validate(Config(
        model=ModelConfig(size="test" if tiny else "micro", patch_size=4),
        objective={"name": objective, "embed_dim": 32 if tiny else 128},
        data=DataConfig(name=dataset, batch_size=16 if tiny else BATCH,
                        seq_len=32 if tiny else SEQ_LEN),
        optim=OptimConfig(lr=1e-3, warmup_steps=min(50, steps // 10), weight_decay=0.05),
        steps=steps, log_every=max(1, min(50, steps // 4)), checkpoint_every=steps,
        keep_checkpoints=1))


def compare_retrieval(out_dir: str, *, steps: int | None = None, tiny: bool = False,
                      only: tuple[str, ...] | None = None, progress: bool = True,
                      datasets: tuple[str, ...] = DATASETS) -> dict:
    """Pretrains each retrieval objective on each paired dataset; returns the results dict."""
    from zoo.compare import timed_train, write_results

    names = only or objectives.suite_names("retrieval")
    limit = 256 if tiny else None
    rows = []
    for dataset in datasets:
        baseline = retrieval_config(names[0], dataset, steps=steps, tiny=tiny)
        rows.append({"dataset": dataset, "objective": "random-init", "steps": 0,
                     "final_loss": None, "train_seconds": 0.0,
                     **retrieval_scores(baseline, None, limit=limit)})
        for name in names:
            config = dataclasses.replace(
                retrieval_config(name, dataset, steps=steps, tiny=tiny), progress=progress)
            workdir = os.path.join(out_dir, f"{dataset}_{name}")
            summary, seconds = timed_train(config, workdir)
            rows.append({"dataset": dataset, "objective": name, "steps": config.steps,
                         "final_loss": summary.get("loss"), "train_seconds": seconds,
                         **retrieval_scores(config, workdir, limit=limit)})
    results = {"suite": "retrieval", "dataset": ", ".join(datasets),
               "model": dataclasses.asdict(baseline.model), "rows": rows}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_results(results, out_dir)
    return results


TOWERS = {"pycode_pairs": ("code", "docstring"), "digits_captions": ("image", "caption")}


def retrieval_table(results: dict) -> str:
    """A Markdown table: recall both ways per (dataset, objective), with the training seconds."""
    from zoo.compare import format_seconds
    model = results["model"]
    lines = [f"Suite `retrieval`, towers of size `{model['size']}`; recall on the held-out "
             "split (a retrieved item equivalent to the true one counts: same digit for "
             "captions, identical text for docstrings).", "",
             "| dataset | objective | steps | final loss | A->B R@1 | A->B R@5 | B->A R@1 | "
             "B->A R@5 | pairs | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        a, b = TOWERS.get(row["dataset"], ("A", "B"))
        loss = "-" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
        lines.append(f"| {row['dataset']} ({a}->{b}) | {row['objective']} | {row['steps']} | "
                     f"{loss} | {100 * row['a_to_b@1']:.1f}% | {100 * row['a_to_b@5']:.1f}% | "
                     f"{100 * row['b_to_a@1']:.1f}% | {100 * row['b_to_a@5']:.1f}% | "
                     f"{row['num_pairs']} | {format_seconds(row['train_seconds'])} |")
    return "\n".join(lines) + "\n"


def plot_retrieval(results: dict, path: str) -> None:
    """Grouped bars: recall@1 and @5 of both directions, one panel per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(row["dataset"] for row in results["rows"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8),
                             squeeze=False)
    series = (("a_to_b@1", "A->B R@1"), ("a_to_b@5", "A->B R@5"), ("b_to_a@1", "B->A R@1"),
              ("b_to_a@5", "B->A R@5"))
    for ax, dataset in zip(axes[0], datasets):
        rows = [r for r in results["rows"] if r["dataset"] == dataset]
        x = np.arange(len(rows))
        width = 0.8 / len(series)
        for i, (key, label) in enumerate(series):
            bars = ax.bar(x + (i - 1.5) * width, [100 * r[key] for r in rows], width,
                          label=label)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, [r["objective"] for r in rows])
        a, b = TOWERS.get(dataset, ("A", "B"))
        ax.set_title(f"{dataset} (A={a}, B={b})")
        ax.set_ylabel("held-out recall (%)")
        ax.set_ylim(0, 110)
    axes[0][0].legend(loc="upper left", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
