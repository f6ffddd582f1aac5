"""Readouts: how good a feature extractor's features are for few-shot classification.

A task's labelled draw and its test set go through the features in one batch (they
share batch-norm statistics, as in the meta-objective); two linear readouts are fitted
on the draw and scored on the test set: the meta-objective's closed-form ridge
(``ridge_accuracy``) and an L2 logistic regression on standardised features. Every
method (the learned rule and each baseline) is scored this way at the points of
``eval_points_for`` along its own training, and the test set's representation gets its
collapse diagnostic ``rank90`` (``metalearn.evaluation.diagnostics``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from metalearn.core.meta_objective import ridge_accuracy
from metalearn.evaluation.data import Task
from metalearn.evaluation.diagnostics import rank90

FeatureFn = Callable[[np.ndarray], np.ndarray]


def logistic_accuracy(f_train, y_train, f_test, y_test) -> float:
    """Test accuracy of an L2-regularised logistic regression on standardised features."""
    scaler = StandardScaler().fit(f_train)
    clf = LogisticRegression(C=1.0, max_iter=2000)
    clf.fit(scaler.transform(f_train), y_train)
    return float(np.mean(clf.predict(scaler.transform(f_test)) == y_test))


def readout_accuracies(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray,
                       y_test: np.ndarray, num_classes: int, ridge: float = 0.1) -> dict:
    """{"ridge_accuracy", "logreg_accuracy"} of features [N, F]; NaN if non-finite."""
    if not (np.isfinite(f_train).all() and np.isfinite(f_test).all()):
        return {"ridge_accuracy": float("nan"), "logreg_accuracy": float("nan")}
    ridge_acc = float(ridge_accuracy(np.asarray(f_train, np.float32), y_train,
                                     np.asarray(f_test, np.float32), y_test, num_classes, ridge))
    return {"ridge_accuracy": ridge_acc,
            "logreg_accuracy": logistic_accuracy(f_train, y_train, f_test, y_test)}


def evaluate_features(feature_fn: FeatureFn, task: Task, ridge: float = 0.1) -> dict:
    """Readout accuracies of ``feature_fn`` on the task's labelled draw and test set,
    and ``rank90`` of the test set's features [N_test, F] (NaN if non-finite).

    Train and test examples pass through ``feature_fn`` in one batch (batch norm)."""
    n = len(task.y_train)
    feats = np.asarray(feature_fn(np.concatenate([task.x_train, task.x_test])))
    return {**readout_accuracies(feats[:n], task.y_train, feats[n:], task.y_test,
                                 task.num_classes, ridge),
            "rank90": rank90(feats[n:])}


# Log-spaced (1-3-10) inner-step counts at which every evaluation measures: results at a
# fixed horizon then compare across runs and settings (a learned rule that is good at
# 30 steps and collapsed at 1000 shows it in the same columns every time).
STANDARD_HORIZONS = (0, 10, 30, 100, 300, 1000, 3000, 10000, 30000)


def eval_points_for(steps: int) -> list[int]:
    """The ``STANDARD_HORIZONS`` up to ``steps``, and ``steps`` itself (the final point),
    e.g. 200 -> [0, 10, 30, 100, 200]."""
    steps = max(0, int(steps))
    return sorted({*(h for h in STANDARD_HORIZONS if h <= steps), steps})


__all__ = ["FeatureFn", "logistic_accuracy", "readout_accuracies", "evaluate_features",
           "eval_points_for", "STANDARD_HORIZONS"]
