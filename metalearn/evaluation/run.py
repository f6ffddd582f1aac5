"""A full evaluation (docs/evaluation.md): the learned rule and the baselines, over seeds.

The protocol, per seed:

1. a dataset is split once (seeded) into an unlabelled *pool* and a labelled *test* set;
   when it has more classes than ``ways``, each seed picks its own class subset
   (``metalearn.evaluation.data``);
2. a fresh base model (input -> width x depth -> 32) is initialised and the learned rule
   trains it on unlabelled batches drawn from the pool (``metalearn.evaluation.rollout``);
3. at the standard horizons along inner training (``eval_points_for``: 0, 10, 30, 100,
   300, 1000, ... inner steps up to ``steps``, and ``steps``), ``shots`` labelled examples per class are
   drawn from the pool (the same draw for every method of that seed) and two linear
   readouts are fitted on the model's 32-d top-layer features
   (``metalearn.evaluation.readout``);
4. accuracy on the test set is averaged over seeds (mean and standard error:
   ``summarise``), with the collapse diagnostics ``rank90`` and ``w_growth``
   (``metalearn.evaluation.diagnostics``) averaged beside it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Sequence

import numpy as np

from metalearn.core.base_model import Architecture
from metalearn.core.config import RuleConfig
from metalearn.evaluation import baselines
from metalearn.evaluation.config import EvalConfig
from metalearn.evaluation.data import EvalData, Task, load_data, make_task
from metalearn.evaluation.readout import eval_points_for
from metalearn.evaluation.rollout import architecture, check_rule_fits, learned_rule_curve

LEARNED = "learned"  # the method name of the learned rule in rows and reports


class Progress:
    """Rate-limited progress lines on stderr (one line per update when not a TTY)."""

    def __init__(self, enabled: bool = True, every_s: float = 5.0, stream=None):
        self.enabled = enabled
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.last = -math.inf
        self.start = time.monotonic()

    def __call__(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        self.stream.write(f"[{now - self.start:6.0f}s] {text}\n")
        self.stream.flush()


@dataclasses.dataclass
class EvalResult:
    """Per-seed rows and what the report draws from."""

    rows: list[dict]  # method, seed, step, ridge_accuracy, logreg_accuracy, rank90,
    #                   w_growth (learned rule only) (+ extras)
    config: EvalConfig
    data: EvalData
    seconds: dict  # method -> wall seconds
    params_init: object = None  # the learned run's base model, seed 0, before training
    params_final: object = None  # ... and after
    arch: Architecture | None = None
    rule: RuleConfig | None = None
    task0: Task | None = None


def run_evaluation(config: EvalConfig, theta, rule: RuleConfig, *,
                   data: EvalData | None = None, progress: Progress | None = None
                   ) -> EvalResult:
    """The learned rule and ``config.baselines`` on ``config.data``, over seeds."""
    progress = progress or Progress(False)
    data = data or load_data(config.data)
    arch = architecture(data.input_size, config.width, config.depth, config.activation,
                        rule.top_units)
    check_rule_fits(rule, arch)
    points = sorted(set(eval_points_for(config.steps))
                    | {p for p in config.extra_points if p <= config.steps})
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    result = EvalResult(rows, config, data, seconds, arch=arch, rule=rule)
    tasks = [make_task(data, seed, config.data.ways, config.data.shots)
             for seed in range(config.seeds)]
    result.task0 = tasks[0]
    started = time.monotonic()
    for task in tasks:
        def on_step(step, seed=task.seed):
            progress(f"learned rule: seed {seed + 1}/{config.seeds}, inner step "
                     f"{step}/{config.steps}")
        curve, extras = learned_rule_curve(theta, rule, arch, task, points,
                                           batch_size=config.batch_size, ridge=config.ridge,
                                           on_step=on_step, keep_params=task.seed == 0)
        if task.seed == 0:
            result.params_init = extras["params_init"]
            result.params_final = extras["params_final"]
        rows.extend({"method": LEARNED, "seed": task.seed, **r} for r in curve)
        progress(f"learned rule: seed {task.seed + 1}/{config.seeds} done, accuracy "
                 f"{curve[-1]['ridge_accuracy']:.3f}", force=True)
    seconds[LEARNED] = time.monotonic() - started
    for name in config.baselines:
        started = time.monotonic()
        for task in tasks:
            progress(f"baseline {name}: seed {task.seed + 1}/{config.seeds}", force=True)
            curve = baselines.run(name, task, arch, config, progress)
            rows.extend({"method": name, "seed": task.seed, **r} for r in curve)
        seconds[name] = time.monotonic() - started
    return result


# Collapse diagnostics averaged per (method, step) where the rows have them: the learned
# rule has both, the baselines ``rank90`` only (metalearn.evaluation.diagnostics).
DIAGNOSTICS = ("rank90", "w_growth")


def _finite_mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, np.float64)
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else float("nan")


def summarise(rows: Sequence[dict], metric: str = "ridge_accuracy") -> list[dict]:
    """Mean and standard error over seeds per (method, step) (+ sweep columns), and the
    mean ``rank90`` / ``w_growth`` (over finite values) of the groups whose rows have them."""
    keys = ("sweep", "sweep_value", "method", "step")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        entry = dict(zip(keys, key))
        values = [r[metric] for r in members]
        for name, vals in (("accuracy", values),
                           ("logreg_accuracy", [r["logreg_accuracy"] for r in members])):
            arr = np.asarray(vals, np.float64)
            finite = arr[np.isfinite(arr)]
            entry[name] = float(finite.mean()) if finite.size else float("nan")
            entry[f"{name}_se"] = (float(finite.std(ddof=1) / math.sqrt(finite.size))
                                   if finite.size > 1 else 0.0)
        for name in DIAGNOSTICS:
            present = [r[name] for r in members if r.get(name) is not None]
            if present:
                entry[name] = _finite_mean(present)
        entry["seeds"] = len(values)
        entry["diverged"] = int(np.sum(~np.isfinite(np.asarray(values, np.float64))))
        out.append({k: v for k, v in entry.items() if v is not None or k in ("step",)})
    return out


def final_accuracies(rows: Sequence[dict]) -> dict:
    """Per method, the summary at its last evaluation point."""
    final: dict[str, dict] = {}
    for entry in summarise(rows):
        method = entry["method"]
        if method not in final or entry["step"] > final[method]["step"]:
            final[method] = entry
    return {m: {"accuracy": e["accuracy"], "accuracy_se": e["accuracy_se"],
                "logreg_accuracy": e["logreg_accuracy"],
                "logreg_accuracy_se": e["logreg_accuracy_se"], "step": e["step"],
                "seeds": e["seeds"], **{d: e[d] for d in DIAGNOSTICS if d in e}}
            for m, e in final.items()}


def curves(rows: Sequence[dict]) -> dict:
    """Per method, its summary at every evaluated step, in step order:
    ``{method: [{step, accuracy, accuracy_se, logreg_accuracy, rank90, w_growth}]}``
    (a diagnostic the method's rows lack is None)."""
    out: dict[str, list[dict]] = {}
    for entry in sorted(summarise(rows), key=lambda e: (e["method"], e["step"])):
        out.setdefault(entry["method"], []).append(
            {"step": entry["step"], "accuracy": entry["accuracy"],
             "accuracy_se": entry["accuracy_se"],
             "logreg_accuracy": entry["logreg_accuracy"],
             **{d: entry.get(d) for d in DIAGNOSTICS}})
    return out


__all__ = ["LEARNED", "DIAGNOSTICS", "Progress", "EvalResult", "run_evaluation",
           "summarise", "final_accuracies", "curves"]
