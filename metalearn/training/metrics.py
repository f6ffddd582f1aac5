"""The metrics table of a run: one row per learner step (docs/training.md lists the
columns); continuous-evaluation columns are merged into the row of the step evaluated.

Evaluation columns (``eval/...``, ``eval_s``, ``eval_long_s``) appear only in the rows of
evaluated steps, and the long-horizon ones (``eval/<dataset>/accuracy@<h>``...) only in
some of those: a column missing from a row is null in the table. ``latest_evaluation``
carries the newest value of each forward, for the progress line and Tune's reports."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq

from metalearn.core.estimators import ESTIMATOR_CLASSES
from metalearn.training.checkpoint import atomic_write_bytes
from metalearn.training.run_dir import RunDir


EVAL_PREFIX = "eval"  # eval/<dataset>/..., eval_s, eval_long_s
# The learner's columns of every row (training.learner.Learner._update), besides the
# per-dataset ``loss/<dataset>``; a sweep's metric is checked against them.
LEARNER_COLUMNS = (
    "step", "meta_loss", "meta_loss_rolling", "loss_vs_start_rolling", "grads_per_s",
    "staleness_mean", "staleness_max", "dropped_stale", "dropped_nonfinite",
    "dropped_generation", "received", "lr", "unroll_min", "unroll_max", "truncations_std",
    "grad_norm", "update_norm", "theta_norm", "wall_s", "grad_var", "grad_snr")


def estimator_columns(estimator: str) -> tuple[str, ...]:
    """The ``est/<name>`` columns rows carry under ``unroll.estimator`` = estimator."""
    return tuple(f"est/{name}" for name in ESTIMATOR_CLASSES[estimator].metric_names)


class MetricsLog:
    """Rows of learner steps, one per step in step order; the run's metrics table is
    rewritten atomically at each ``write``; optional TensorBoard scalars."""

    def __init__(self, run: RunDir, tensorboard: bool):
        self.path = run.metrics
        self.rows: list[dict] = []
        self.evaluations: list[dict] = []  # merged evaluation rows, in step order
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
            # A resumed run (or a Tune trial restored from a checkpoint) reports its last
            # evaluation until the next one.
            self.evaluations = [ev for ev in ({"step": r["step"], **{
                k: v for k, v in r.items() if k.startswith(EVAL_PREFIX)}} for r in self.rows)
                if len(ev) > 1]

    def merge(self, row: dict) -> bool:
        """Add ``row``'s columns to the existing row of the same step (evaluations)."""
        for existing in reversed(self.rows):
            if existing["step"] == row["step"]:
                existing.update(row)
                self._scalars(row)
                self.evaluations.append(dict(row))
                self.evaluations.sort(key=lambda r: r["step"])
                return True
        return False

    def latest_evaluation(self, up_to_step: int | None = None) -> dict:
        """The newest value of every merged column measured at or before ``up_to_step``
        (all if None), with ``eval_step``, the step of the newest evaluation among them."""
        latest: dict = {}
        for ev in self.evaluations:
            if up_to_step is not None and ev["step"] > up_to_step:
                break
            latest.update({k: v for k, v in ev.items() if k != "step"})
            latest["eval_step"] = ev["step"]
        return latest

    def truncate(self, up_to_step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= up_to_step]
        self.evaluations = [r for r in self.evaluations if r["step"] <= up_to_step]

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


__all__ = ["EVAL_PREFIX", "LEARNER_COLUMNS", "MetricsLog", "estimator_columns"]
