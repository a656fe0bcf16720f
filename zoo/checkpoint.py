"""Checkpoints with orbax: train state plus the data iterator's JSON state, atomically committed.

On a local disk orbax writes each step into a temporary directory and renames it when complete;
in a ``gs://`` bucket (no rename there) it writes the step directory in place and marks it
complete with a ``commit_success.txt`` file last. Either way a crash during a save leaves the
previous checkpoint as the latest complete one (``complete_steps``).
"""
from __future__ import annotations

import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from zoo import storage


class NonFiniteParamsError(RuntimeError):
    pass


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only or unwritable directory); the
    previous complete checkpoint is untouched."""


# Free space a save needs beyond the state's own bytes (metadata, the data iterator's JSON).
_SAVE_MARGIN_BYTES = 256 * 1024


def local_state_bytes(state: Any) -> int:
    """Bytes this process writes for ``state``: one copy of each addressable shard."""
    total = 0
    for leaf in jax.tree.leaves(state):
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:
            total += getattr(leaf, "nbytes", 0)
        else:
            total += sum(shard.data.nbytes for shard in shards if shard.replica_id == 0)
    return total


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _stored_fields(state: Any) -> Any:
    """A NamedTuple train state as the dict of its non-None fields: optional parts (e.g. the
    spike window when skipping is off) leave no trace, so a checkpoint written before such a
    field existed restores unchanged, and one written without it restores into the new code."""
    if hasattr(state, "_fields"):
        return {k: v for k, v in state._asdict().items() if v is not None}
    return state


# orbax's completion marker where it cannot rename (its default for gs:// paths).
COMMIT_FILE = "commit_success.txt"


def commits_with_file(directory: str) -> bool:
    return str(directory).startswith("gs://")


def complete_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints under ``directory`` (ascending): the ``N`` dirs
    (renamed into place when complete), in a bucket only those holding ``COMMIT_FILE``."""
    steps = [int(name) for name in storage.listdir(directory) if name.isdigit()]
    if commits_with_file(directory):
        steps = [s for s in steps
                 if storage.exists(storage.join(directory, str(s), COMMIT_FILE))]
    return sorted(steps)


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``directory`` (a local path or a
    bucket URI such as ``gs://bucket/run/checkpoints``)."""

    def __init__(self, directory: str, keep: int = 3, *, create: bool = True):
        self.directory = storage.absolute(directory)
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
        """Saves synchronously; refuses parameters that are not all finite.

        A directory that cannot take the checkpoint (not writable, or less free space than the
        state's bytes) is refused BEFORE writing; a write that fails anyway (the disk filled up
        meanwhile) has its partial files removed. Either way ``CheckpointWriteError`` names the
        directory and the previous complete checkpoint, which stays intact."""
        if not bool(_all_finite(state.params)):
            raise NonFiniteParamsError(f"step {step}: parameters are not finite; "
                                       "refusing to write a checkpoint")
        self._check_writable(step, state)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_stored_fields(state)),
                data=ocp.args.JsonSave(data_state)), force=True)
            self.manager.wait_until_finished()
        except Exception as error:   # tensorstore reports ENOSPC as ValueError(RESOURCE_...)
            self._remove_partial(step)
            reason = str(error).splitlines()[0][:200]
            raise CheckpointWriteError(self._failure(step, reason)) from error

    def _failure(self, step: int, reason: str) -> str:
        latest = self.latest_step()
        kept = (f"the previous checkpoint (step {latest}) is intact" if latest is not None
                else "no earlier checkpoint exists")
        return f"checkpoint: cannot write step {step} to {self.directory}: {reason}; {kept}"

    def _check_writable(self, step: int, state: Any) -> None:
        """Every process checks its own disk; all of them refuse together if any must (a
        process that went on into orbax's save alone would wait there for the others)."""
        reason = self._local_problem(state)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            failed = multihost_utils.process_allgather(np.array([reason is not None]))
            if reason is None and np.asarray(failed).any():
                reason = "another process cannot write its part"
        if reason is not None:
            raise CheckpointWriteError(self._failure(step, reason))

    def _local_problem(self, state: Any) -> str | None:
        problem = storage.writable_problem(self.directory)
        if problem is not None or storage.is_remote(self.directory):
            return problem          # a bucket has no free-space figure to check
        needed = local_state_bytes(state) + _SAVE_MARGIN_BYTES
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            return (f"{free / 2**20:.1f} MiB free, the checkpoint needs about "
                    f"{needed / 2**20:.1f} MiB")
        return None

    def _remove_partial(self, step: int) -> None:
        """Deletes this save's half-written files: ``<step>.orbax-checkpoint-tmp*`` dirs (a
        complete step dir is only ever created by orbax's final rename), or in a bucket the
        ``<step>`` dir if it has no ``COMMIT_FILE`` (a complete one is never touched)."""
        if commits_with_file(self.directory):
            if step not in complete_steps(self.directory):
                path = storage.join(self.directory, str(step))
                if storage.exists(path):
                    storage.remove_tree(path)
            return
        prefix = f"{step}.orbax-checkpoint-tmp"
        for name in storage.listdir(self.directory):
            if name.startswith(prefix):
                storage.remove_tree(storage.join(self.directory, name))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto ``abstract_state``'s shapes and shardings (ShapeDtypeStructs)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_stored_fields(abstract_state)),
            data=ocp.args.JsonRestore()))
        state = restored["state"]
        if hasattr(abstract_state, "_fields"):      # back to the NamedTuple (None fields kept)
            state = type(abstract_state)(**{**abstract_state._asdict(), **state})
        return state, restored["data"]

    def close(self) -> None:
        self.manager.close()
