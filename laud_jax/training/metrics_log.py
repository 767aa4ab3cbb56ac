"""Metrics sinks: WORKDIR/metrics.jsonl and TensorBoard event files (process 0 only).

A run resumes from its last checkpoint, so what a killed run logged after that step is
logged again: opening the log drops those records from both sinks first, and readers see
one value per step.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_event_records(path: str) -> list[bytes]:
    """The serialized records of a TensorBoard event file; a record cut off by a kill is left out."""
    with open(path, "rb") as f:
        data = f.read()
    records, pos = [], 0
    while pos + 12 <= len(data):  # length (8 bytes), its crc (4), data, the data's crc (4)
        (length,) = struct.unpack("Q", data[pos : pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            break
        records.append(data[pos + 12 : pos + 12 + length])
        pos = end
    return records


def _drop_metrics_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut off by a kill
            pass
    if kept != lines:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _drop_events_after(directory: str, step: int) -> None:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import RecordWriter

    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        records = read_event_records(path)
        kept = [r for r in records if Event.FromString(r).step <= step]
        if len(kept) == len(records) and sum(len(r) + 16 for r in records) == os.path.getsize(path):
            continue
        tmp = os.path.join(directory, f".rewrite{os.getpid()}")  # not an event file name meanwhile
        writer = RecordWriter(tmp)
        for record in kept:
            writer.write(record)
        writer.close()
        os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON line per record and mirrors scalars to TensorBoard.

    Records of steps after `resume_step` that an earlier run left are dropped on opening.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            _drop_metrics_after(self.path, resume_step)
            _drop_events_after(os.path.join(workdir, TENSORBOARD_DIR), resume_step)
            self._writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: float(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", float(value), int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
