"""The held-out table: a learned rule against baselines on several held-out data sets, at
fixed amounts of inner training (docs/results.md).

For each data set, ``run_evaluation`` trains fresh base models with the rule for
max(horizons) inner steps over ``seeds`` paired seeds (every method of a seed sees the
same class subset, labelled draw and test set) and scores the baselines on the same
tasks. ``summarise_table`` keeps the learned rule's accuracy at each horizon, each
baseline's final accuracy, the learned rule's rank90 at each horizon, and the paired
difference learned - random init (mean and standard error over seeds of the per-seed
difference, which removes the seed-to-seed spread both share).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from metalearn.core.config import RuleConfig
from metalearn.core.config_io import ConfigError
from metalearn.evaluation import baselines
from metalearn.evaluation.config import EvalConfig
from metalearn.evaluation.data import default_image_size
from metalearn.evaluation.run import LEARNED, Progress, run_evaluation

RANDOM = "random_init"
VERSUS = "versus"  # a second rule scored at the same horizons and seeds (e.g. the run's start)


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """What the table measures. ``eval`` fixes the base model, readout and baseline
    budgets (its ``data.dataset``, ``steps``, ``seeds`` and ``baselines`` are replaced)."""

    datasets: tuple[str, ...] = ("fashion_mnist", "two_moons")
    horizons: tuple[int, ...] = (100, 1000, 3000)
    seeds: int = 5
    baselines: tuple[str, ...] = ("random_init", "pca", "vae")
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if not self.datasets:
            raise ConfigError("datasets: need at least one data set")
        if not self.horizons or min(self.horizons) < 1:
            raise ConfigError(f"horizons: need inner-step counts >= 1, got {list(self.horizons)}")
        if self.seeds < 2:
            raise ConfigError(f"seeds: need >= 2 for a standard error, got {self.seeds}")
        baselines.check(self.baselines)

    def eval_config(self, dataset: str) -> EvalConfig:
        data = dataclasses.replace(self.eval.data, dataset=dataset,
                                   image_size=default_image_size(dataset,
                                                                 self.eval.data.data_dir))
        return dataclasses.replace(self.eval, data=data, steps=max(self.horizons),
                                   seeds=self.seeds, baselines=tuple(self.baselines),
                                   extra_points=tuple(self.horizons))


def run_table(config: TableConfig, theta, rule: RuleConfig,
              progress: Progress | None = None, versus=None) -> list[dict]:
    """Per-seed rows (``dataset``, ``method``, ``seed``, ``step``, accuracies, diagnostics)
    of every data set, evaluated one after the other. ``versus``: (theta, rule) of a
    second rule scored at the same horizons on the same seeds (method ``versus``)."""
    progress = progress or Progress(False)
    rows: list[dict] = []
    for index, dataset in enumerate(config.datasets):
        progress(f"data set {index + 1}/{len(config.datasets)}: {dataset}", force=True)
        eval_config = config.eval_config(dataset)
        result = run_evaluation(eval_config, theta, rule, progress=progress)
        rows.extend({"dataset": dataset, **row} for row in result.rows)
        if versus is not None:
            progress(f"  the second rule (--versus) on {dataset}", force=True)
            other = run_evaluation(dataclasses.replace(eval_config, baselines=()), *versus,
                                   progress=progress)
            rows.extend({"dataset": dataset, **row, "method": VERSUS} for row in other.rows
                        if row["method"] == LEARNED)
    return rows


def _mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    arr = np.asarray(values, np.float64)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return math.nan, math.nan, 0
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(arr.mean()), se, int(arr.size)


def summarise_table(rows: Sequence[dict], horizons: Sequence[int]) -> list[dict]:
    """One entry per (dataset, method, step): the learned rule at each horizon, each
    baseline at its final step; ``accuracy``/``accuracy_se`` over seeds (ridge readout),
    ``rank90``, and for the learned rule ``vs_random``/``vs_random_se`` (paired)."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        by_method: dict[str, list[dict]] = {}
        for r in mine:
            by_method.setdefault(r["method"], []).append(r)
        random_by_seed = {}
        for r in by_method.get(RANDOM, []):  # the final row of each seed
            if r["seed"] not in random_by_seed or r["step"] > random_by_seed[r["seed"]]["step"]:
                random_by_seed[r["seed"]] = r
        versus = {(r["seed"], r["step"]): r for r in by_method.get(VERSUS, [])}
        for method, members in by_method.items():
            if method in (LEARNED, VERSUS):
                steps = [h for h in horizons if any(r["step"] == h for r in members)]
            else:
                steps = [max(r["step"] for r in members)]
            for step in steps:
                at = [r for r in members if r["step"] == step]
                mean, se, n = _mean_se([r["ridge_accuracy"] for r in at])
                entry = {"dataset": dataset, "method": method, "step": step,
                         "accuracy": mean, "accuracy_se": se, "seeds": n,
                         "rank90": _mean_se([r.get("rank90", math.nan) for r in at])[0]}
                if method == LEARNED and random_by_seed:
                    diffs = [r["ridge_accuracy"] - random_by_seed[r["seed"]]["ridge_accuracy"]
                             for r in at if r["seed"] in random_by_seed]
                    entry["vs_random"], entry["vs_random_se"], _ = _mean_se(diffs)
                if method == LEARNED and versus:
                    diffs = [r["ridge_accuracy"] - versus[(r["seed"], step)]["ridge_accuracy"]
                             for r in at if (r["seed"], step) in versus]
                    entry["vs_versus"], entry["vs_versus_se"], _ = _mean_se(diffs)
                out.append(entry)
    return out


def _cell(entry: dict | None) -> str:
    if entry is None or not math.isfinite(entry["accuracy"]):
        return "-"
    return f"{entry['accuracy']:.3f} ± {entry['accuracy_se']:.3f}"


def _label(dataset: str) -> str:
    return os.path.basename(dataset[5:]) if dataset.startswith("file:") else dataset


def _rank_cell(entry: dict | None) -> str:
    return ("-" if entry is None or not math.isfinite(entry["rank90"])
            else f"{entry['rank90']:.1f}")


def markdown_table(summary: Sequence[dict], horizons: Sequence[int],
                   method_order: Sequence[str]) -> str:
    """Accuracy table (rows: data sets; columns: the learned rule at each horizon, then
    each baseline) and a second table of the learned rule's paired gain over random init
    and its rank90 per horizon."""
    index = {(e["dataset"], e["method"], e["step"]): e for e in summary}
    finals = {(e["dataset"], e["method"]): e for e in summary
              if e["method"] not in (LEARNED, VERSUS)}
    datasets = list(dict.fromkeys(e["dataset"] for e in summary))
    others = [m for m in method_order if m not in (LEARNED, VERSUS)]
    head = ([f"learned @{h}" for h in horizons] + others)
    lines = ["| held-out data | " + " | ".join(head) + " |",
             "|---|" + "---:|" * len(head)]
    for d in datasets:
        cells = [_cell(index.get((d, LEARNED, h))) for h in horizons]
        cells += [_cell(finals.get((d, m))) for m in others]
        lines.append(f"| {_label(d)} | " + " | ".join(cells) + " |")
    lines += ["", "Learned minus random init (paired over seeds) and the learned rule's "
              "rank90 (principal components for 90% of the representation's variance):", "",
              "| held-out data | " + " | ".join(f"gain @{h}" for h in horizons) + " | "
              + " | ".join(f"rank90 @{h}" for h in horizons) + " |",
              "|---|" + "---:|" * (2 * len(horizons))]
    for d in datasets:
        gains, ranks = [], []
        for h in horizons:
            e = index.get((d, LEARNED, h))
            gains.append("-" if e is None or "vs_random" not in e
                         else f"{e['vs_random']:+.3f} ± {e['vs_random_se']:.3f}")
            ranks.append(_rank_cell(e))
        lines.append(f"| {_label(d)} | " + " | ".join(gains + ranks) + " |")
    if any(e["method"] == VERSUS for e in summary):
        lines += ["", "The second rule (`--versus`) at the same horizons and seeds, and the "
                  "learned rule minus it (paired over seeds):", "",
                  "| held-out data | " + " | ".join(f"versus @{h}" for h in horizons) + " | "
                  + " | ".join(f"learned - versus @{h}" for h in horizons) + " | "
                  + " | ".join(f"versus rank90 @{h}" for h in horizons) + " |",
                  "|---|" + "---:|" * (3 * len(horizons))]
        for d in datasets:
            cells = [_cell(index.get((d, VERSUS, h))) for h in horizons]
            for h in horizons:
                e = index.get((d, LEARNED, h))
                cells.append("-" if e is None or "vs_versus" not in e
                             else f"{e['vs_versus']:+.3f} ± {e['vs_versus_se']:.3f}")
            for h in horizons:
                cells.append(_rank_cell(index.get((d, VERSUS, h))))
            lines.append(f"| {_label(d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["RANDOM", "TableConfig", "VERSUS", "markdown_table", "run_table", "summarise_table"]
