"""Writes scalar metrics as JSON lines and TensorBoard event files (tensorboardX, no TF)."""
from __future__ import annotations

import json
import time

from zoo import storage


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and to TensorBoard under ``tb/``
    (``workdir`` may be a bucket URI: see ``zoo.storage``)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = storage.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # local: slow import
            self._tb = SummaryWriter(storage.join(workdir, "tb"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in
                                                             scalars.items()}}
        storage.append_text(self.path, json.dumps(record) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of a run, the last one written winning for each step (resumes re-log steps)."""
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    by_step = {}
    for line in storage.read_text(path).splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
