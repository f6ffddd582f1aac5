"""Tune's logger callbacks for a sweep's ``loggers`` (wandb, mlflow), with names each
tracker accepts. Imported only when a sweep asks for one (both libraries are optional
and slow to import); module-level classes, so Tune can pickle them with its state."""

from __future__ import annotations

import importlib.util
import os

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.utils import flatten_dict

from metalearn.core.config import ConfigError
from metalearn.training.trackers import PROJECT, metric_name


class MlflowNamesCallback(MLflowLoggerCallback):
    """Tune's MLflow callback, with result keys MLflow accepts (``accuracy@100`` would
    raise in MLflow and stop the sweep)."""

    def log_trial_result(self, iteration: int, trial, result: dict):
        clean = {metric_name(k, "mlflow"): v for k, v in flatten_dict(result).items()}
        super().log_trial_result(iteration, trial, clean)


def logger_callbacks(loggers, name: str, out: str) -> list:
    """Tune callbacks for ``loggers``: one wandb run per trial in the group ``name``
    (offline files in ``OUT/wandb`` with WANDB_MODE=offline); one MLflow run per trial
    in the experiment ``name`` at MLFLOW_TRACKING_URI or ``sqlite:///OUT/mlflow.db``."""
    callbacks = []
    for logger in loggers:
        if importlib.util.find_spec(logger) is None:
            raise ConfigError(f"sweep loggers: {logger} is not installed: pip install "
                              f"'metalearn[tracking]'")
        if logger == "wandb":
            callbacks.append(WandbLoggerCallback(
                project=os.environ.get("WANDB_PROJECT", PROJECT), group=name, dir=out))
        elif logger == "mlflow":
            uri = (os.environ.get("MLFLOW_TRACKING_URI")
                   or f"sqlite:///{os.path.join(out, 'mlflow.db')}")
            callbacks.append(MlflowNamesCallback(tracking_uri=uri, experiment_name=name))
    return callbacks


__all__ = ["MlflowNamesCallback", "logger_callbacks"]
