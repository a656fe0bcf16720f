"""Held-out loss: an objective's own loss and metrics on the held-out split, with fixed rngs.

The same ``prepare -> apply -> loss`` as the train step, without the update, over the first
``num_batches`` batches of the held-out split in stored order; batch ``i`` always uses the rng
``fold_in(PRNGKey(seed), i)``, so two checkpoints are compared on identical corruptions.
Reported: the mean of each metric over the batches (``loss`` becomes ``heldout_loss``, token
``accuracy`` becomes ``heldout_accuracy``).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HELDOUT_SPLIT = "test"


def heldout_metrics(experiment, params, *, split: str = HELDOUT_SPLIT, num_batches: int = 8,
                    seed: int = 0, objective_state=None, step: int = 0) -> dict[str, float]:
    """Mean loss and metrics of ``params`` on ``num_batches`` held-out batches."""
    from zoo.train import global_batch, make_batches

    objective = experiment.objective

    from zoo.train import make_loss_fn

    # The train step's own forward (stateful objectives get their teacher and state too).
    loss_fn = make_loss_fn(experiment)
    if objective_state is None:
        objective_state = experiment.init_fn().objective_state if objective.stateful else {}

    @jax.jit
    def evaluate(params, objective_state, batch, rng):
        loss, (metrics, _) = loss_fn(params, objective_state, jnp.int32(step), batch, rng)
        return {"loss": loss, **metrics}

    batches = make_batches(experiment, split, shuffle=False)
    base = jax.random.PRNGKey(seed)
    results = []
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(experiment.config.rules):
        for index in range(num_batches):
            batch = global_batch(experiment, next(batches))
            results.append(evaluate(params, objective_state, batch,
                                    jax.random.fold_in(base, index)))
    fetched = jax.device_get(results)
    names = {"loss": "heldout_loss", "accuracy": "heldout_accuracy"}
    return {names.get(k, f"heldout_{k}"): float(np.mean([r[k] for r in fetched]))
            for k in fetched[0]}


def heldout(config, workdir: str | None = None, *, num_batches: int = 8) -> dict[str, float]:
    """Held-out metrics of ``workdir``'s latest checkpoint (or a random init if None).

    Example::

        zoo.evaluate.heldout(zoo.config.load("experiments/text.py:tiny"), "/tmp/mlm")
        # {'heldout_loss': 2.1, 'heldout_accuracy': 0.47, ..., 'step': 200}
    """
    from zoo.train import attach_tokenizer, build, restore_or_init

    experiment = build(config)
    state, step = restore_or_init(experiment, workdir, purpose="evaluate")
    attach_tokenizer(experiment, workdir)
    return {**heldout_metrics(experiment, state.params, num_batches=num_batches,
                              objective_state=state.objective_state, step=int(step)),
            "step": int(step)}
