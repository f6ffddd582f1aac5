"""Experiment trackers (wandb, MLflow) in their offline modes: a run's rows reach them,
evaluations that land late included, names adapted, and a resumed run continues its
tracker run."""

import glob
import os

import pytest

from metalearn.cli import build_parser
from metalearn.core.config import ConfigError
from metalearn.training.metrics import MetricsLog
from metalearn.training.run_dir import RunDir
from metalearn.training.trackers import metric_name

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


def test_metric_names_each_tracker_accepts():
    key = "eval/fashion_mnist_val/accuracy@100"
    assert metric_name(key, "mlflow") == "eval/fashion_mnist_val/accuracy_at_100"
    assert metric_name("loss/glyphs(x)", "mlflow") == "loss/glyphs_x_"
    assert metric_name(key, "wandb") == key and metric_name(key, "tensorboard") == key


def test_rows_reach_wandb_offline_and_mlflow_and_a_resume_continues(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.path)
    config = {"learner": {"meta_batch": 4}, "run": {"loggers": ["wandb", "mlflow"]}}
    log = MetricsLog(run, tensorboard=True, loggers=("wandb", "mlflow"),
                     config_values=config)
    for step in (1, 2, 3):
        log.add({"step": step, "meta_loss": 1.0 / step, "unroll_max": 2})
    # An evaluation of step 2, arriving after step 3's row.
    assert log.merge({"step": 2, "eval/digits_val/accuracy@100": 0.61})
    log.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{run.path}/mlflow.db")
    run_id = open(os.path.join(run.path, "mlflow_run_id")).read().strip()
    history = client.get_metric_history(run_id, "meta_loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(1, 1.0), (2, 0.5),
                                                             (3, 0.3333)]
    [late] = client.get_metric_history(run_id, "eval/digits_val/accuracy_at_100")
    assert (late.step, late.value) == (2, 0.61)
    assert client.get_run(run_id).data.params["learner.meta_batch"] == "4"
    assert client.get_run(run_id).info.status == "FINISHED"
    wandb_id = open(os.path.join(run.path, "wandb_id")).read().strip()
    [offline] = glob.glob(os.path.join(run.path, "wandb", f"offline-run-*-{wandb_id}"))
    assert glob.glob(os.path.join(offline, "*.wandb"))  # the run's records, for wandb sync
    assert os.listdir(run.tensorboard)

    # A resumed session logs to the same tracker runs.
    resumed = MetricsLog(run, tensorboard=False, loggers=("wandb", "mlflow"),
                         config_values=config)
    resumed.add({"step": 4, "meta_loss": 0.25})
    resumed.close()
    assert [m.step for m in client.get_metric_history(run_id, "meta_loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert open(os.path.join(run.path, "wandb_id")).read().strip() == wandb_id


def test_an_unreachable_tracker_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")  # a database under a file cannot be made
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/file/mlflow.db")
    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.path)
    with pytest.raises(ConfigError, match="mlflow could not start a run at sqlite:"):
        MetricsLog(run, tensorboard=False, loggers=("mlflow",))


def test_train_takes_loggers_from_the_command_line(tmp_path):
    from metalearn.cli.train import resolve

    argv = ["train", "--out", str(tmp_path / "r"), "--logger", "mlflow", "--logger",
            "wandb", "--logger", "mlflow"]
    assert resolve(build_parser(argv).parse_args(argv)).config.run.loggers == ("mlflow",
                                                                                "wandb")
    with pytest.raises(SystemExit):
        build_parser(["train", "--logger", "neptune"]).parse_args(["train", "--logger",
                                                                    "neptune"])


def test_sweep_loggers_become_tune_callbacks(tmp_path, monkeypatch):
    from metalearn.distributed.tune_loggers import MlflowNamesCallback, logger_callbacks

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    wandb_cb, mlflow_cb = logger_callbacks(("wandb", "mlflow"), "s", str(tmp_path))
    assert type(wandb_cb).__name__ == "WandbLoggerCallback" and wandb_cb.group == "s"
    assert isinstance(mlflow_cb, MlflowNamesCallback)
    assert mlflow_cb.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert mlflow_cb.experiment_name == "s"
