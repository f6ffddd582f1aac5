"""Evaluation of a learned rule on held-out data against baselines (docs/evaluation.md).

Floor above ``metalearn.core`` and ``tasks``; imports nothing else of metalearn.

    config       DataConfig, EvalConfig, ContinuousEvalConfig (typed, frozen)
    data         EvalData, load_data, Task, make_task
    readout      ridge / logistic readouts of features: evaluate_features; the standard
                 horizons (eval_points_for)
    diagnostics  collapse diagnostics: components_for_variance (rank90), weight_growth
    rollout      the base model, and the rule training it: rollout, learned_rule_curve
    run          run_evaluation -> EvalResult; summarise, final_accuracies, Progress
    sweep        what ``metalearn eval`` runs: run_sweep (one config or a sweep)
    continuous   ContinuousEvaluator (held-out evaluation during meta-training)
    baselines    the baselines and their registry, BASELINES
    report       tables and plots: write_report, write_eval_report, plot_meta_training

The names below are imported from their module on first use, so that importing one
module (``config``, in the training config's import chain) does not import JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "EvalConfig": "config",
    "ContinuousEvalConfig": "config",
    "EvalData": "data",
    "Task": "data",
    "load_data": "data",
    "make_task": "data",
    "evaluate_features": "readout",
    "components_for_variance": "diagnostics",
    "weight_growth": "diagnostics",
    "architecture": "rollout",
    "learned_rule_curve": "rollout",
    "run_evaluation": "run",
    "EvalResult": "run",
    "summarise": "run",
    "final_accuracies": "run",
    "run_sweep": "sweep",
    "ContinuousEvaluator": "continuous",
    "BASELINES": "baselines",
    "write_report": "report",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
