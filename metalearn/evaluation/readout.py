"""Readouts: how good a feature extractor's features are for few-shot classification.

A task's labelled draw and its test set go through the features in one batch (they
share batch-norm statistics, as in the meta-objective); two linear readouts are fitted
on the draw and scored on the test set: the meta-objective's closed-form ridge
(``ridge_accuracy``) and an L2 logistic regression on standardised features. Every
method (the learned rule and each baseline) is scored this way at the points of
``eval_points_for`` along its own training.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from metalearn.core.meta_objective import ridge_accuracy
from metalearn.evaluation.data import Task

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
    """Readout accuracies of ``feature_fn`` on the task's labelled draw and test set.

    Train and test examples pass through ``feature_fn`` in one batch (batch norm)."""
    n = len(task.y_train)
    feats = np.asarray(feature_fn(np.concatenate([task.x_train, task.x_test])))
    return readout_accuracies(feats[:n], task.y_train, feats[n:], task.y_test,
                              task.num_classes, ridge)


def eval_points_for(steps: int, num: int = 6) -> list[int]:
    """0, then ``num - 1`` roughly geometric points up to ``steps``."""
    if steps <= 0:
        return [0]
    grid = np.geomspace(max(1, steps / 2 ** (num - 2)), steps, num - 1)
    return sorted({0, *(int(round(g)) for g in grid), steps})


__all__ = ["FeatureFn", "logistic_accuracy", "readout_accuracies", "evaluate_features",
           "eval_points_for"]
