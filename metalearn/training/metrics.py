"""The metrics of a run: the learner's rows (``LearnerRows``, ``<run>/metrics/``), the
continuous evaluations (``MetricsLog``, ``<run>/evaluations/``) and ``read_metrics``,
which gives them as one table. See docs/training.md (Run folder).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence

import pyarrow as pa

from metalearn.core.config import PLANE_NAMES
from metalearn.core.estimators import ESTIMATOR_CLASSES
from metalearn.core.full_horizon import METRIC_NAMES as FULL_HORIZON_METRICS
from metalearn.training.messages import LEARNER_COLUMNS
from metalearn.training.run_dir import RunDir
from metalearn.training.segments import SegmentedTable, SegmentWarning
from metalearn.training.trackers import open_trackers, safely


# The rule's mixing weights after each update (LearnerHost watches them): which update the
# rule makes, against meta-training time (``metalearn plot``).
THETA_COLUMNS = tuple(f"theta/merge_w/{name}" for name in (*PLANE_NAMES, "bias"))
DISCARD_REASON = "discarded_reason"  # column of the rows in <run>/discarded/


def estimator_columns(estimator: str) -> tuple[str, ...]:
    """The ``est/<name>`` columns rows carry under ``estimator.kind`` = estimator."""
    names = (FULL_HORIZON_METRICS[estimator] if estimator in FULL_HORIZON_METRICS
             else ESTIMATOR_CLASSES[estimator].metric_names)
    return tuple(f"est/{name}" for name in names)


def _clean(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}


def _discard(run: RunDir, kind: str, rows: list[dict], reason: str) -> None:
    if rows:
        SegmentedTable(os.path.join(run.discarded, kind)).append(
            [{**_clean(r), DISCARD_REASON: reason} for r in rows])


def _quarantine(run: RunDir, table: SegmentedTable, kind: str) -> list[str]:
    into = os.path.join(run.discarded, f"unreadable-{kind}")
    return [f"{kind} segment {name} is unreadable; moved to {into}"
            for name in table.quarantine_unreadable(into)]


class LearnerRows:
    """The learner's side: its update rows, appended to ``<run>/metrics/`` in step order.

    ``add`` buffers a row and flushes when ``flush_s`` seconds passed since the last
    flush; the learner host calls ``flush`` before every checkpoint and at the end.
    """

    def __init__(self, run: RunDir, flush_s: float, clock=time.monotonic):
        self.run = run
        self.table = SegmentedTable(run.metrics)
        self.flush_s = flush_s
        self.clock = clock
        self.pending: list[dict] = []
        self.last_flush = clock()
        self.flushed_step = 0  # newest step on disk

    def restore(self, step: int, reason: str) -> list[str]:
        """Make the table hold exactly the rows up to ``step`` (the checkpoint a learner
        was restored from); returns warnings for the user. Rows beyond it go to
        ``<run>/discarded/metrics`` with ``reason``."""
        messages = _quarantine(self.run, self.table, "metrics")
        dropped = self.table.rewrite(lambda r: r["step"] <= step)
        _discard(self.run, "metrics", dropped, reason)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SegmentWarning)
            steps = self.table.read().column("step").to_pylist() if step else []
        self.flushed_step = max(steps, default=0)
        missing = step - len(set(steps))
        if missing > 0:
            messages.append(f"{missing} of the {step} steps up to the checkpoint have no "
                            f"metrics row in {self.run.metrics} (lost before this run "
                            f"version wrote rows before checkpoints)")
        return messages

    def add(self, row: dict) -> None:
        self.pending.append(row)
        if self.clock() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Append the buffered rows as one segment (nothing if none)."""
        if self.pending:
            self.table.append(self.pending)
            self.flushed_step = self.pending[-1]["step"]
            self.pending = []
        self.last_flush = self.clock()


class MetricsLog:
    """The driver's side: every row it sees (TensorBoard, callbacks) and the evaluation
    rows, which it appends to ``<run>/evaluations/`` at each ``write``."""

    def __init__(self, run: RunDir, tensorboard: bool, loggers: Sequence[str] = (),
                 config_values: dict | None = None):
        self.run = run
        self.table = SegmentedTable(run.evaluations)
        self.count = 0  # rows seen this session
        self.last_step = 0
        self.evaluations: list[dict] = []  # every evaluation row, in step order
        self.pending: list[dict] = []  # evaluation rows not written yet
        # TensorBoard, wandb, MLflow (metalearn.training.trackers): every scalar seen.
        self.trackers = open_trackers(run, tensorboard, loggers, config_values)

    def load(self, up_to_step: int) -> None:
        """A resumed run: evaluations beyond ``up_to_step`` are discarded, the others
        kept for ``latest_evaluation`` (a resumed run, or a Tune trial restored from a
        checkpoint, reports its last evaluation until the next one)."""
        self.last_step = up_to_step
        for message in _quarantine(self.run, self.table, "evaluations"):
            warnings.warn(message, SegmentWarning, stacklevel=2)
        self.truncate(up_to_step, reason=f"resumed from checkpoint step {up_to_step}")
        self.evaluations = sorted((_clean(r) for r in self.table.read().to_pylist()),
                                  key=lambda r: r["step"])

    def merge(self, row: dict) -> bool:
        """Record an evaluation's columns for the step it evaluated; False (ignored) for
        a step this log has not seen."""
        if row["step"] > self.last_step:
            return False
        self.pending.append(dict(row))
        self.evaluations.append(dict(row))
        self.evaluations.sort(key=lambda r: r["step"])
        self._scalars(row)
        return True

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

    def truncate(self, up_to_step: int, reason: str = "") -> None:
        """Forget evaluations of steps beyond ``up_to_step`` (a learner restored from an
        earlier checkpoint: those thetas are no longer on the run's path)."""
        reason = reason or f"learner restored from checkpoint step {up_to_step}"
        keep = lambda r: r["step"] <= up_to_step  # noqa: E731
        self.pending = [r for r in self.pending if keep(r)]
        self.evaluations = [r for r in self.evaluations if keep(r)]
        _discard(self.run, "evaluations", self.table.rewrite(keep), reason)
        self.last_step = min(self.last_step, up_to_step)

    def add(self, row: dict) -> None:
        self.count += 1
        self.last_step = row["step"]
        self._scalars(row)

    def _scalars(self, row: dict) -> None:
        if self.trackers:
            values = {key: value for key, value in row.items()
                      if key != "step" and isinstance(value, (int, float))}
            safely(self.trackers, "log", values, row["step"])

    def write(self) -> None:
        if self.pending:
            self.table.append(self.pending)
            self.pending = []
        safely(self.trackers, "flush")

    def close(self) -> None:
        self.write()
        safely(self.trackers, "close")
        self.trackers = []


def _run_of(path: str | os.PathLike) -> RunDir:
    """The run folder of ``path``: the folder itself, or its metrics table."""
    path = os.path.abspath(path)  # (no trailing separator)
    return RunDir(os.path.dirname(path) if os.path.basename(path) == RunDir.METRICS else path)


def _coalesce(rows: list[dict]) -> dict[int, dict]:
    """Rows of the same step merged (later values win), by step in step order."""
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(_clean(row))
    return {step: merged[step] for step in sorted(merged)}


def read_metrics(path: str | os.PathLike) -> pa.Table:
    """The metrics table of a run (``path``: the run folder or its metrics folder): one
    row per learner step in step order, evaluation columns joined
    (and a row of its own for an evaluated step the learner has no row for: the start).
    FileNotFoundError if the run has logged none."""
    run = _run_of(path)
    if not os.path.isdir(run.metrics):
        raise FileNotFoundError(f"{run.path} has no metrics yet (no {run.metrics}/): not "
                                f"a training run folder, or the run has not logged a step")
    learner = SegmentedTable(run.metrics).read()
    by_step = _coalesce(SegmentedTable(run.evaluations).read().to_pylist())
    if learner.num_rows == 0 or "step" not in learner.column_names:
        return learner
    learner = learner.sort_by("step")
    # An evaluated step with no learner row (a new run's start, step 0: the first
    # candidate of the best theta) gets a row of its own, learner columns null.
    alone = set(by_step) - set(learner.column("step").to_pylist())
    if alone:
        rows = [{"step": s} for s in alone] + learner.to_pylist()
        learner = pa.Table.from_pylist(sorted(rows, key=lambda r: r["step"]),
                                       schema=learner.schema)
    steps = learner.column("step").to_pylist()
    for column in dict.fromkeys(k for row in by_step.values() for k in row):
        if column not in learner.column_names:
            learner = learner.append_column(
                column, pa.array([by_step.get(s, {}).get(column) for s in steps]))
    return learner


def read_metric_rows(path: str | os.PathLike) -> list[dict]:
    """``read_metrics`` as a list of dicts, each without its null columns."""
    return [_clean(r) for r in read_metrics(path).to_pylist()]


def discarded_rows(path: str | os.PathLike, kind: str = "metrics") -> list[dict]:
    """Rows rolled back in a run (``kind``: metrics or evaluations), each with its
    ``discarded_reason``; empty if none were."""
    run = _run_of(path)
    return [_clean(r) for r in SegmentedTable(os.path.join(run.discarded, kind))
            .read().to_pylist()]


__all__ = ["DISCARD_REASON", "LEARNER_COLUMNS", "THETA_COLUMNS", "LearnerRows", "MetricsLog",
           "discarded_rows", "estimator_columns", "read_metric_rows", "read_metrics"]
