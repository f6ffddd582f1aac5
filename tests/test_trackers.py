"""Experiment trackers (wandb, MLflow) in their offline modes: a run's rows reach them,
evaluations that land late included, names adapted, and a resumed run continues its
tracker run.

The scenarios that start tracker runs execute in a fresh interpreter (``in_subprocess``):
wandb's SDK keeps a service process and threads for the life of the process that used
it, and the suite's long-lived process should not carry them into later tests.
"""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from metalearn.cli import build_parser
from metalearn.core.config import ConfigError
from metalearn.training.metrics import MetricsLog
from metalearn.training.run_dir import RunDir
from metalearn.training.trackers import metric_name

if importlib.util.find_spec("wandb") is None or importlib.util.find_spec("mlflow") is None:
    pytest.skip("wandb and mlflow are not installed (pip install '.[tracking]')",
                allow_module_level=True)


def in_subprocess(scenario: str, tmp_path, **env) -> None:
    """Run ``scenario(tmp_path)`` of this module in a fresh interpreter, with ``env``;
    its assertion errors fail the test with the child's traceback."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import test_trackers as t, pathlib; t.{scenario}(pathlib.Path({str(tmp_path)!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-4000:]


def test_metric_names_each_tracker_accepts():
    key = "eval/fashion_mnist_val/accuracy@100"
    assert metric_name(key, "mlflow") == "eval/fashion_mnist_val/accuracy_at_100"
    assert metric_name("loss/glyphs(x)", "mlflow") == "loss/glyphs_x_"
    assert metric_name(key, "wandb") == key and metric_name(key, "tensorboard") == key


def test_rows_reach_wandb_offline_and_mlflow_and_a_resume_continues(tmp_path):
    in_subprocess("rows_reach_trackers", tmp_path, WANDB_MODE="offline", WANDB_SILENT="true",
                  MLFLOW_TRACKING_URI="")


def rows_reach_trackers(tmp_path):
    from mlflow.tracking import MlflowClient

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


def test_an_unreachable_tracker_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("")  # a database under a file cannot be made
    in_subprocess("unreachable_tracker", tmp_path,
                  MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/file/mlflow.db")


def unreachable_tracker(tmp_path):
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


def test_sweep_loggers_become_tune_callbacks(tmp_path):
    in_subprocess("sweep_callbacks", tmp_path, MLFLOW_TRACKING_URI="")


def sweep_callbacks(tmp_path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from metalearn.distributed.tune_loggers import MlflowNamesCallback, logger_callbacks

    wandb_cb, mlflow_cb = logger_callbacks(("wandb", "mlflow"), "s", str(tmp_path))
    assert type(wandb_cb).__name__ == "WandbLoggerCallback" and wandb_cb.group == "s"
    assert isinstance(mlflow_cb, MlflowNamesCallback)
    assert mlflow_cb.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert mlflow_cb.experiment_name == "s"
    # Tune's results reach MLflow's callback flattened, with names MLflow accepts.
    seen = {}
    MLflowLoggerCallback.log_trial_result = lambda self, i, trial, result: seen.update(result)
    mlflow_cb.log_trial_result(1, None, {"eval/x/accuracy@100": 0.5, "config": {"a@b": 1}})
    assert seen == {"eval/x/accuracy_at_100": 0.5, "config/a_at_b": 1}
