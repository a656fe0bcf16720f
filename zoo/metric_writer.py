"""Writes scalar metrics as JSON lines and TensorBoard event files (tensorboardX, no TF)."""
from __future__ import annotations

import json
import time

from zoo import storage


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and to TensorBoard under ``tb/``.

    ``workdir`` may be a bucket URI (see ``zoo.storage``): an object there cannot be appended
    to, so records are buffered and the object rewritten at most every ``flush_seconds`` (GCS
    takes about one write per second per object) and on ``close``."""

    def __init__(self, workdir: str, enabled: bool = True, *, flush_seconds: float = 30.0):
        self.enabled = enabled
        self.path = storage.join(workdir, "metrics.jsonl")
        self._buffered = storage.is_remote(workdir)
        self._flush_seconds = flush_seconds
        self._pending: list[str] = []
        self._last_flush = time.monotonic()
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # local: slow import
            self._tb = SummaryWriter(storage.join(workdir, "tb"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in
                                                             scalars.items()}}
        self._pending.append(json.dumps(record) + "\n")
        if not self._buffered or time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))

    def flush(self) -> None:
        if self._pending:
            storage.append_text(self.path, "".join(self._pending))
            self._pending = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
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
