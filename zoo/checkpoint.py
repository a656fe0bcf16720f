"""Checkpoints with orbax: train state plus the data iterator's JSON state, atomically committed.

Orbax writes each step into a temporary directory and renames it when complete, so a crash during
a save leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class NonFiniteParamsError(RuntimeError):
    pass


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``directory``."""

    def __init__(self, directory: str, keep: int = 3, *, create: bool = True):
        self.directory = os.path.abspath(directory)
        # cleanup_tmp_directories: a write killed half-way leaves a ``N.orbax-checkpoint-tmp``
        # dir, never a ``N`` dir; the next writer removes the leftovers.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               read_only=not create,
                                               cleanup_tmp_directories=create,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Saves synchronously; refuses parameters that are not all finite."""
        if not bool(_all_finite(state.params)):
            raise NonFiniteParamsError(f"step {step}: parameters are not finite; "
                                       "refusing to write a checkpoint")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto ``abstract_state``'s shapes and shardings (ShapeDtypeStructs)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def close(self) -> None:
        self.manager.close()
