"""Workdir files on a local disk or in a bucket (``gs://``, ``s3://``) through ``etils.epath``.

A pod's workers share no disk, so a pod run's workdir is a bucket path that every worker sees:
``zoo pretrain --workdir gs://BUCKET/RUN``. Orbax writes checkpoints there itself; this module
serves the trainer's own small files (config.json, metrics.jsonl, tokenizer.json, probe.json).
Object stores cannot append to or rename an object in place, so on a bucket an "append"
rewrites the object (``MetricWriter`` buffers, so it does that at most every 30 s) and an atomic
write is a single object write (objects are replaced whole).
Bucket paths need ``pip install -e ".[gcs]"`` (gcsfs for epath, google-cloud-storage for
TensorBoard's event files).

Example::

    from zoo import storage
    storage.write_text_atomically(storage.join("gs://bucket/run", "config.json"), "{}")
"""
from __future__ import annotations

import os
import posixpath
import uuid

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://", "az://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_PREFIXES)


def join(directory: str, *names: str) -> str:
    """``os.path.join`` that keeps a bucket URI's ``//``."""
    if is_remote(directory):
        return posixpath.join(str(directory), *names)
    return os.path.join(directory, *names)


def absolute(path: str) -> str:
    """A local path made absolute (orbax wants one); a bucket URI unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
    """Names in a directory ([] if it does not exist)."""
    p = epath.Path(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def write_text_atomically(path: str, text: str) -> None:
    """Readers see the old content or the new, never a part: a temporary file renamed into
    place on a local disk, one object write in a bucket."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"   # per writer: several processes (hosts sharing
                                              # a disk) may write the same file at once
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):          # the write failed (e.g. disk full): leave no debris
            os.remove(tmp)


def append_text(path: str, text: str) -> None:
    """Appends ``text``; in a bucket the object is read and written back whole."""
    if is_remote(path):
        p = epath.Path(path)
        p.write_text((p.read_text() if p.exists() else "") + text)
        return
    with open(path, "a") as f:
        f.write(text)


def remove_tree(path: str) -> None:
    """Deletes a directory and everything under it (best effort)."""
    if is_remote(path):
        try:
            epath.Path(path).rmtree()
        except OSError:
            pass
        return
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def writable_problem(directory: str) -> str | None:
    """Why ``directory`` cannot take new files (created if missing), or None: a probe file is
    written and removed."""
    probe = join(directory, f".write_probe_{uuid.uuid4().hex}")
    try:
        makedirs(directory)
        epath.Path(probe).write_bytes(b"0")
        epath.Path(probe).unlink()
    except OSError as error:
        return error.strerror or str(error)
    return None
