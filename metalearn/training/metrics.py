"""The metrics table of a run: one row per learner step (docs/training.md lists the
columns); continuous-evaluation columns are merged into the row of the step evaluated."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq

from metalearn.training.checkpoint import atomic_write_bytes
from metalearn.training.run_dir import RunDir


class MetricsLog:
    """Rows of learner steps, one per step in step order; the run's metrics table is
    rewritten atomically at each ``write``; optional TensorBoard scalars."""

    def __init__(self, run: RunDir, tensorboard: bool):
        self.path = run.metrics
        self.rows: list[dict] = []
        self.writer = None
        if tensorboard:
            # Optional dependency, loaded only when a run asks for TensorBoard.
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(run.tensorboard)

    def load(self, up_to_step: int) -> None:
        if os.path.exists(self.path):
            rows = pq.read_table(self.path).to_pylist()
            self.rows = [{k: v for k, v in r.items() if v is not None}
                         for r in rows if r["step"] <= up_to_step]

    def merge(self, row: dict) -> bool:
        """Add ``row``'s columns to the existing row of the same step (evaluations)."""
        for existing in reversed(self.rows):
            if existing["step"] == row["step"]:
                existing.update(row)
                self._scalars(row)
                return True
        return False

    def truncate(self, up_to_step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= up_to_step]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._scalars(row)

    def _scalars(self, row: dict) -> None:
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def write(self) -> None:
        if not self.rows:
            return
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        table = pa.table({c: [r.get(c) for r in self.rows] for c in columns})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.write()
        if self.writer is not None:
            self.writer.close()


__all__ = ["MetricsLog"]
