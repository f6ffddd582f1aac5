"""``metalearn plot RUN_DIR [--out PNG]``: a run's meta-training curves per dataset."""

from __future__ import annotations

import json
import os

from metalearn.core.config_io import ConfigError
from metalearn.evaluation.report import plot_meta_training
from metalearn.training.best import best_so_far
from metalearn.training.metrics import read_metric_rows
from metalearn.training.run_dir import RunDir

PLOT = "meta_training.png"  # default output, beside the run's metrics table


def add_parser(subparsers) -> None:
    """Register ``plot``."""
    p = subparsers.add_parser("plot", help="plot a run's meta-training curves per dataset",
                              description="Draw RUN_DIR's metrics: meta-training loss "
                                          "per dataset and held-out evaluation curves.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help=f"PNG path (default RUN_DIR/{PLOT})")
    p.add_argument("--json", action="store_true",
                   help="last line: one JSON object (the PNG's path, rows plotted)")
    p.set_defaults(func=run_plot)


def run_plot(args) -> int:
    # RunDir owns the run folder's file names (the metrics table's among them).
    rows = read_metric_rows(args.run_dir)  # FileNotFoundError: no metrics yet
    # The exported best as the run chose it (its evaluator's select_from and best_margin).
    try:
        best = best_so_far(RunDir(args.run_dir).read_config().evaluator, rows)
    except (ConfigError, FileNotFoundError):
        best = None  # metrics without a readable run config: no best line
    path = plot_meta_training(rows, args.run_dir, args.out or os.path.join(args.run_dir, PLOT),
                              best=best)
    print(json.dumps({"plot": path, "rows": len(rows)}) if getattr(args, "json", False)
          else path)
    return 0


__all__ = ["add_parser", "run_plot"]
