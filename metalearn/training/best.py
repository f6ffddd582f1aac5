"""The best theta of a run by validation (``BestTheta``, ``<run>/theta_best``), so that
``metalearn export`` hands out the best rule a run found rather than its last.

See docs/training.md ("The best theta") and docs/evaluation.md.
"""

from __future__ import annotations

import math

import numpy as np

from metalearn.core.config import RuleConfig
from metalearn.evaluation.config import ContinuousEvalConfig
from metalearn.training.export import is_export, read_export_meta, save_run_theta
from metalearn.training.run_dir import RunDir


def selection_score(config: ContinuousEvalConfig, row: dict) -> tuple[float, str] | None:
    """(score, what) of an evaluation ``row``: the mean over
    ``config.selection_horizons()`` (the horizons of at least ``select_from`` steps) of
    ``eval/<d>/accuracy@<h>``, for the first long dataset (config order) the row has at
    every such horizon; None when it has none (a short evaluation) or a value is not
    finite."""
    horizons = config.selection_horizons()
    if not config.long_every or not horizons:
        return None
    names = list(config.long_names()) + list(config.datasets)
    for name in names:
        columns = [f"eval/{name}/accuracy@{h}" for h in horizons]
        if all(c in row for c in columns):
            values = [row[c] for c in columns]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                return None
            return float(np.mean(values)), f"eval/{name}/accuracy@{'+'.join(map(str, horizons))}"
    return None


def best_so_far(config: ContinuousEvalConfig, rows: list[dict]
                ) -> tuple[list[tuple[int, float]], str] | None:
    """The exported best's score after each scored row of a run's metrics ``rows``, as
    ``BestTheta`` keeps it (``selection_score``, ``best_margin``): ([(step, best score)],
    the score's column), or None when no row is scored. What ``metalearn plot`` draws."""
    best, points, column = -math.inf, [], None
    for row in sorted(rows, key=lambda r: r.get("step", 0)):
        scored = selection_score(config, row)
        if scored is None:
            continue
        if scored[0] > best + config.best_margin:
            best = scored[0]
        column = column or scored[1]
        points.append((int(row["step"]), best))
    return (points, column) if points else None


class BestTheta:
    """Keeps ``<run>/theta_best``: the theta with the highest validation score so far."""

    def __init__(self, run: RunDir, rule: RuleConfig, config: ContinuousEvalConfig):
        self.run, self.rule, self.config = run, rule, config
        self.score = -math.inf
        self.step: int | None = None
        self.column: str | None = None
        if is_export(run.best):
            meta = read_export_meta(run.best)
            self.score = float(meta.get("score", -math.inf))
            self.step = int(meta["step"])
            self.column = meta.get("score_column")

    @property
    def known(self) -> bool:
        return self.step is not None

    def offer(self, step: int, theta_flat, row: dict) -> bool:
        """Consider the evaluation ``row`` of ``theta_flat`` (flat [P], learner ``step``);
        write it as the new best if its score beats the best so far by more than
        ``evaluator.best_margin``. True if it did."""
        scored = selection_score(self.config, row)
        if scored is None:
            return False
        score, column = scored
        if score <= self.score + self.config.best_margin:
            return False
        name = column.split("/")[1]
        rank = row.get(f"eval/{name}/rank90@{max(self.config.horizons)}")
        save_run_theta(self.run, theta_flat, self.rule, step, to=self.run.best,
                       score=float(score), score_column=column,
                       rank90=float(rank) if isinstance(rank, (int, float)) else None)
        self.score, self.step, self.column = float(score), int(step), column
        return True

    def text(self) -> str:
        """`` best 0.612 @40`` (the best score, a mean over the horizons, and its learner
        step) for the progress line; empty before any score."""
        return f" best {self.score:.3f} @{self.step}" if self.known else ""


__all__ = ["BestTheta", "best_so_far", "selection_score"]
