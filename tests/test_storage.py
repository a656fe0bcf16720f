"""Workdirs in a bucket (gs://): the trainer's own files go through zoo.storage.

No network here, so ``gs://`` is served by a fake fsspec filesystem over a temporary folder that,
like GCS, refuses to append to an object. (Orbax writes the checkpoints themselves to buckets
with its own tensorstore drivers; that part is orbax's and is not exercised here: the tests lay
out step dirs as orbax does in a bucket, complete once ``commit_success.txt`` is written.)
"""
from __future__ import annotations

import json
import os

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

import zoo.config
import zoo.train
from zoo import storage
from zoo.checkpoint import Checkpointer, complete_steps
from zoo.metric_writer import MetricWriter, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAE = os.path.join(ROOT, "experiments/mae_digits.py:tiny")


class FakeGCS(LocalFileSystem):
    """``gs://bucket/x`` -> ``<root>/bucket/x``; as on GCS, an object can be written under any
    prefix (no directories to create first) and appending raises."""
    protocol = ("gs", "gcs")
    root = None

    def __init__(self, **kwargs):
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(cls.root, path[len(prefix):]).rstrip("/")
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("GCS objects cannot be appended to")
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def bucket(tmp_path):
    """A fake ``gs://bucket`` over ``tmp_path``; yields (uri, local folder)."""
    from fsspec.registry import _registry
    saved = {name: _registry.get(name) for name in ("gs", "gcs")}
    FakeGCS.root = str(tmp_path)
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    os.makedirs(tmp_path / "bucket")
    yield "gs://bucket", tmp_path / "bucket"
    for name, value in saved.items():
        if value is None:
            _registry.pop(name, None)
        else:
            _registry[name] = value


def test_paths_and_files_in_a_bucket(bucket):
    uri, folder = bucket
    run = storage.join(uri, "run")
    assert run == "gs://bucket/run" and storage.absolute(run) == run
    assert storage.is_remote(run) and not storage.is_remote("/tmp/run")
    assert storage.writable_problem(run) is None           # creates the folder, leaves no probe
    assert storage.isdir(run) and storage.listdir(run) == []
    path = storage.join(run, "config.json")
    storage.write_text_atomically(path, '{"a": 1}')
    storage.write_text_atomically(path, '{"a": 2}')
    assert json.loads((folder / "run/config.json").read_text()) == {"a": 2}
    assert sorted(os.listdir(folder / "run")) == ["config.json"]   # no temporary left behind
    storage.append_text(storage.join(run, "log"), "one\n")     # the fake refuses "a" mode
    storage.append_text(storage.join(run, "log"), "two\n")
    assert storage.read_text(storage.join(run, "log")) == "one\ntwo\n"
    storage.makedirs(storage.join(run, "sub/deeper"))
    assert storage.listdir(run) == ["config.json", "log", "sub"]
    storage.remove_tree(storage.join(run, "sub"))
    assert not storage.exists(storage.join(run, "sub")) and storage.exists(path)


def test_local_paths_keep_their_atomic_rename_and_append(tmp_path):
    path = str(tmp_path / "x.json")
    storage.write_text_atomically(path, "1")
    storage.append_text(path, "2")
    assert open(path).read() == "12" and storage.absolute("rel") == os.path.abspath("rel")
    assert os.listdir(tmp_path) == ["x.json"]


def test_metrics_in_a_bucket(bucket, monkeypatch):
    import tensorboardX
    logdirs = []

    class RecordingWriter:
        def __init__(self, logdir):
            logdirs.append(logdir)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tensorboardX, "SummaryWriter", RecordingWriter)
    uri, folder = bucket
    writer = MetricWriter(storage.join(uri, "run"), flush_seconds=3600)
    for step, loss in ((1, 3.0), (2, 2.0), (2, 1.5)):      # a resume re-logs step 2
        writer.write(step, {"loss": loss})
    assert not (folder / "run/metrics.jsonl").exists()     # buffered: one object write per
    writer.close()                                          # flush_seconds, and at close
    assert logdirs == ["gs://bucket/run/tb"]
    assert [(r["step"], r["loss"]) for r in read_metrics(storage.join(uri, "run"))] == [
        (1, 3.0), (2, 1.5)]
    assert len((folder / "run/metrics.jsonl").read_text().splitlines()) == 3
    writer = MetricWriter(storage.join(uri, "run"), flush_seconds=0)   # flushes every write
    writer.write(3, {"loss": 1.0})
    assert len((folder / "run/metrics.jsonl").read_text().splitlines()) == 4
    writer.close()


def test_workdir_checks_read_a_bucket(bucket):
    uri, folder = bucket
    run = storage.join(uri, "run")
    config = zoo.config.load(MAE)
    zoo.train._write_json_atomically(storage.join(run, "config.json"),
                                     zoo.config.to_dict(config))
    # orbax's layout in a bucket: step dirs written in place, complete once commit_success.txt
    # is there (written last); 5 was cut off half-way.
    for name in ("2", "4", "5"):
        os.makedirs(folder / "run/checkpoints" / name / "state")
    for name in ("2", "4"):
        (folder / "run/checkpoints" / name / "commit_success.txt").write_text("ok")
    assert zoo.train.completed_checkpoint_steps(run) == [2, 4]
    zoo.train.check_workdir(run, config)                     # same config: accepted
    other = zoo.config.load(MAE, ["optim.lr=0.5"])
    with pytest.raises(ValueError, match=r"workdir: 'gs://bucket/run' holds a run of a "
                                         r"different config \(optim.lr"):
        zoo.train.check_workdir(run, other)


def test_checkpointer_housekeeping_in_a_bucket(bucket):
    uri, folder = bucket
    checkpointer = Checkpointer.__new__(Checkpointer)   # orbax's own gs:// I/O is not faked
    checkpointer.directory = storage.absolute(storage.join(uri, "run/checkpoints"))
    assert checkpointer._local_problem(state=None) is None    # writable; no free-space figure
    for name in ("4", "5", "50"):
        os.makedirs(folder / "run/checkpoints" / name / "part")
    for name in ("4", "50"):
        (folder / "run/checkpoints" / name / "commit_success.txt").write_text("ok")
    checkpointer._remove_partial(50)             # complete: never touched
    checkpointer._remove_partial(5)              # no commit file: the failed save's leftovers
    assert sorted(os.listdir(folder / "run/checkpoints")) == ["4", "50"]


def test_local_checkpoints_are_complete_once_renamed(tmp_path):
    for name in ("3", "8", "9.orbax-checkpoint-tmp-77"):
        os.makedirs(tmp_path / name)
    assert complete_steps(str(tmp_path)) == [3, 8]
    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.directory = str(tmp_path)
    checkpointer._remove_partial(9)
    assert sorted(os.listdir(tmp_path)) == ["3", "8"]
