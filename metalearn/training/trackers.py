"""Experiment trackers a run's scalars go to besides its own metrics table: TensorBoard
(``run.tensorboard``), and Weights & Biases and MLflow (``run.loggers``, optional
dependencies). See docs/training.md (Experiment trackers).
"""

from __future__ import annotations

import importlib
import os
import re
import secrets
import time
import warnings

from metalearn.core.config import ConfigError
from metalearn.training.run_dir import RunDir

LOGGERS = ("wandb", "mlflow")
PROJECT = "metalearn"  # the wandb project and MLflow experiment unless the env names one


def metric_name(key: str, tracker: str) -> str:
    """``key`` as ``tracker`` accepts it: MLflow allows only letters, digits and
    ``_ - . : / space`` (``accuracy@100`` becomes ``accuracy_at_100``); the others any key."""
    if tracker != "mlflow":
        return key
    return re.sub(r"[^A-Za-z0-9_\-.:/ ]", "_", key.replace("@", "_at_"))


class TensorBoardTracker:
    def __init__(self, run: RunDir):
        # Optional dependency, loaded only when a run asks for TensorBoard.
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(run.tensorboard)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _kept_id(run: RunDir, name: str, new) -> str:
    """The tracker run id kept in ``RUN/<name>`` (made by ``new()`` the first time)."""
    path = os.path.join(run.path, name)
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    value = new()
    with open(path, "w") as f:
        f.write(value + "\n")
    return value


def _require(module: str, logger: str):
    """``importlib.import_module(module)``; ConfigError naming the extra if absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"run.loggers: {logger} needs the {logger} package: pip install "
                          f"'metalearn[tracking]'") from None


class WandbTracker:
    ID_FILE = "wandb_id"

    def __init__(self, run: RunDir, config_values: dict):
        wandb = _require("wandb", "wandb")
        run_id = _kept_id(run, self.ID_FILE, lambda: secrets.token_hex(4))
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT),
                                  name=run.name, id=run_id, resume="allow", dir=run.path,
                                  config=config_values, reinit="create_new")
        except Exception as err:  # wandb raises its own UsageError, CommError, ...
            raise ConfigError(f"run.loggers: wandb could not start a run "
                              f"({str(err).splitlines()[0][:200]}); log in (wandb login, "
                              f"WANDB_API_KEY) or set WANDB_MODE=offline") from None
        # Evaluations arrive after later learner rows: wandb's own step must only grow,
        # so every chart is plotted against the learner step as a metric.
        self.run.define_metric("learner_step")
        self.run.define_metric("*", step_metric="learner_step")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "learner_step": step})

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    ID_FILE = "mlflow_run_id"

    def __init__(self, run: RunDir, config_values: dict):
        MlflowClient = _require("mlflow.tracking", "mlflow").MlflowClient
        self.metric = _require("mlflow.entities", "mlflow").Metric
        uri = (os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{os.path.join(run.path, 'mlflow.db')}")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (experiment.experiment_id if experiment
                             else self.client.create_experiment(name))

            def new() -> str:
                created = self.client.create_run(experiment_id, run_name=run.name,
                                                 tags={"metalearn.run": run.path})
                for key, value in sorted(config_values.items())[:100]:
                    self.client.log_param(created.info.run_id, key[:250], str(value)[:500])
                return created.info.run_id
            self.run_id = _kept_id(run, self.ID_FILE, new)
            self.client.update_run(self.run_id, status="RUNNING")
        except Exception as err:  # MlflowException, a server that does not answer
            raise ConfigError(f"run.loggers: mlflow could not start a run at {uri} "
                              f"({str(err).splitlines()[0][:200]}); check "
                              f"MLFLOW_TRACKING_URI") from None
        self.pending: list = []

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [self.metric(metric_name(k, "mlflow"), float(v), now, step)
                         for k, v in values.items()]

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=self.pending[start:start + 1000])
        self.pending = []

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)


def open_trackers(run: RunDir, tensorboard: bool, loggers=(),
                  config_values: dict | None = None) -> list:
    """The trackers a run's config asks for (TensorBoard first)."""
    trackers = [TensorBoardTracker(run)] if tensorboard else []
    flat = _flat(config_values or {})
    for name in loggers:
        trackers.append({"wandb": WandbTracker, "mlflow": MlflowTracker}[name](run, flat))
    return trackers


def safely(trackers: list, method: str, *args) -> None:
    """Call ``method`` on every tracker; a tracker that fails (a lost server) is
    warned about once and dropped, and training goes on."""
    for tracker in list(trackers):
        try:
            getattr(tracker, method)(*args)
        except Exception as err:  # noqa: BLE001  a tracker must never stop training
            trackers.remove(tracker)
            warnings.warn(f"{type(tracker).__name__} stopped logging: "
                          f"{str(err).splitlines()[0][:200]}", RuntimeWarning, stacklevel=2)


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


__all__ = ["LOGGERS", "MlflowTracker", "TensorBoardTracker", "WandbTracker",
           "metric_name", "open_trackers", "safely"]
