"""``metalearn bench metrics``: the cost of a metrics flush as a run grows.

A synthetic run appends learner rows with the columns a real run has (``LEARNER_COLUMNS``,
three ``loss/<dataset>``, two ``est/<name>``) through the learner's own writer
(``LearnerRows``), ``rows_per_flush`` rows a flush, up to ``steps`` rows, into a
temporary folder. Each flush is timed, merges included; the report gives the median and
the mean (the amortised cost, merges spread over the flushes) of the flushes in a
window around each checkpoint step (default 1,000 and 100,000), and the cost the old
single-file table (rewritten whole at every flush) had at the same sizes, measured on
the same rows in the same run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from metalearn.training.metrics import LEARNER_COLUMNS, LearnerRows, read_metrics
from metalearn.training.run_dir import RunDir
from metalearn.training.segments import rows_to_table, table_bytes

DATASETS = ("glyphs", "digits", "fashion_mnist")


def synthetic_row(step: int, rng: np.random.Generator) -> dict:
    row = {name: float(rng.normal()) for name in LEARNER_COLUMNS}
    row.update(step=step, staleness_max=int(rng.integers(0, 4)),
               received=int(8 * step), dropped_stale=0, dropped_nonfinite=0,
               dropped_generation=0, unroll_min=2, unroll_max=8)
    row.update({f"loss/{d}": float(rng.normal()) for d in DATASETS})
    row.update({"est/xi_norm": float(rng.normal()), "est/w_bp": float(rng.random())})
    return row


def _rewrite_whole_s(steps: int, repeats: int = 3) -> float:
    """Median time of the old way: rows 1..steps rewritten as one parquet file."""
    rng = np.random.default_rng(0)
    rows = [synthetic_row(step, rng) for step in range(1, steps + 1)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        table_bytes(rows_to_table(rows))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_metrics(steps: int = 100_000, rows_per_flush: int = 10,
                    at: Sequence[int] = (1_000, 100_000), window: int = 5_000,
                    log: Callable[[str], None] = lambda m: None) -> dict:
    """Flush times of a synthetic run of ``steps`` rows (see the module docstring)."""
    at = [a for a in at if a <= steps]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="metalearn-bench-metrics-") as tmp:
        run = RunDir(tmp)
        writer = LearnerRows(run, flush_s=float("inf"))
        flush_times: list[tuple[int, float]] = []  # (step after the flush, seconds)
        started = time.perf_counter()
        for step in range(1, steps + 1):
            row = synthetic_row(step, rng)
            writer.add(row)
            if step % rows_per_flush == 0:
                t0 = time.perf_counter()
                writer.flush()
                flush_times.append((step, time.perf_counter() - t0))
            if step % 20_000 == 0:
                log(f"  {step:,} rows, {time.perf_counter() - started:.0f} s")
        segments = len(writer.table.segments())
        read_start = time.perf_counter()
        assert read_metrics(run.path).column("step").to_pylist() == list(range(1, steps + 1))
        read_s = time.perf_counter() - read_start
        files = len([n for n in os.listdir(run.metrics) if n.endswith(".parquet")])
    # The old single file at the same sizes (rows made again: holding every row of the
    # run in memory would slow the measured flushes through the garbage collector).
    whole = {step: _rewrite_whole_s(step) for step in at}
    points = []
    for step in at:
        # The window ends at ``step``; at step 1,000 that is every flush so far.
        near = [s for t, s in flush_times if step - window < t <= step]
        points.append({"step": step, "flushes": len(near),
                       "median_ms": 1e3 * statistics.median(near),
                       "mean_ms": 1e3 * statistics.fmean(near),
                       "max_ms": 1e3 * max(near),
                       "rewrite_whole_ms": 1e3 * whole[step]})
    report = {"steps": steps, "rows_per_flush": rows_per_flush, "window": window,
              "columns": len(row), "points": points, "segments": segments,
              "files": files, "read_all_s": read_s}
    if len(points) >= 2:
        for key in ("median", "mean", "rewrite_whole"):
            report[f"{key}_ratio"] = points[-1][f"{key}_ms"] / points[0][f"{key}_ms"]
    return report


__all__ = ["measure_metrics", "synthetic_row"]
