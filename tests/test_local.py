"""The single-process runner: the training loop without Ray, and the same rows as Ray."""

import math
import sys

from metalearn.training.runner import train
from metalearn.training.session import Session
from metalearn.training.metrics import read_metrics
import pytest

from metalearn.cli import main
from metalearn.training.config import config_to_yaml
from metalearn.training.export import load_export, load_theta
from metalearn.training.local import LOCAL
from metalearn.training.metrics import LEARNER_COLUMNS, THETA_COLUMNS, estimator_columns
from metalearn.training.progress import ProgressLine
from metalearn.training.run_dir import RunDir
from train_helpers import tiny_config

# Columns that depend only on the seeds (not on wall-clock time or machine load).
DETERMINISTIC = ["step", "meta_loss", "meta_loss_rolling", "loss_vs_start_rolling",
                 "staleness_mean", "staleness_max", "received", "lr", "unroll_min",
                 "unroll_max", "truncations_std", "grad_norm", "update_norm", "theta_norm",
                 "loss/digits"]


def rows_of(run_dir) -> list[dict]:
    return read_metrics(run_dir).to_pylist()


def one_worker_config(tmp_path, steps):
    return tiny_config(tmp_path, run={"steps": steps, "minutes": 5.0},
                       worker={"num_workers": 1, "batch_size": 8})


def test_local_runner_trains_and_resumes_without_ray(tmp_path):
    config = one_worker_config(tmp_path, steps=3)
    run_dir = tmp_path / "run"
    summary = train(Session.of(config, run_dir), LOCAL)
    assert (summary.start_step, summary.final_step, summary.rows) == (0, 3, 3)
    assert summary.worker_failures == summary.worker_errors == summary.learner_restarts == 0
    rows = rows_of(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["meta_loss"]) and r["received"] == 2 * r["step"] for r in rows)
    assert RunDir(run_dir).checkpoint_steps()[-1] == 3
    assert load_theta(str(run_dir))[2] == 3

    resumed = train(Session.of(one_worker_config(tmp_path, steps=5), run_dir, resume=True), LOCAL)
    assert (resumed.start_step, resumed.final_step) == (3, 5)
    assert [r["step"] for r in rows_of(run_dir)] == [1, 2, 3, 4, 5]


def test_cli_runner_local(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(config_to_yaml(one_worker_config(tmp_path, steps=2)))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run"),
                 "--runner", "local"]) == 0
    assert [r["step"] for r in rows_of(tmp_path / "run")] == [1, 2]
    assert RunDir(tmp_path / "run").read_config().run.runner == "local"


def test_local_and_ray_runners_give_the_same_rows(ray_session, tmp_path):
    """With one worker both runners apply the same gradients in the same order: the
    learner's seeds pick the task streams, so only timing columns may differ."""
    from metalearn.distributed.driver import RAY

    config = one_worker_config(tmp_path, steps=4)
    train(Session.of(config, tmp_path / "local"), LOCAL)
    train(Session.of(config, tmp_path / "ray"), RAY)
    local, remote = rows_of(tmp_path / "local"), rows_of(tmp_path / "ray")
    assert set(local[0]) == set(remote[0])
    assert [r["step"] for r in local] == [r["step"] for r in remote] == [1, 2, 3, 4]
    for mine, theirs in zip(local, remote):
        for column in DETERMINISTIC:
            # Ray's worker compiles with its own XLA flags (one thread): float noise only.
            assert mine[column] == pytest.approx(theirs[column], rel=1e-4, abs=1e-6), column


def test_local_runner_evaluates_held_out_data_in_process(tmp_path, capsys):
    config = tiny_config(tmp_path, evaluator={
        "enabled": True, "every": 2, "datasets": ["two_moons"],
        "width": 8, "depth": 1, "steps": 2, "seeds": 1, "batch_size": 16, "test_size": 40,
        "horizons": [2, 3], "long_every": 3},
        run={"steps": 5, "minutes": 5.0}, worker={"num_workers": 1, "batch_size": 8})
    train(Session.of(config, tmp_path / "run"), LOCAL, callbacks=[ProgressLine(0.0, sys.stderr)])
    rows = rows_of(tmp_path / "run")
    # merged, not appended; step 0 is the start, measured first (a row of its own)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    # short every 2 steps, long every 3; step 5: the final evaluation of the last theta
    evaluated = [r["step"] for r in rows if r.get("eval/two_moons/accuracy") is not None]
    assert evaluated == [0, 2, 4, 5]
    long = [r["step"] for r in rows if r.get("eval/two_moons/accuracy@3") is not None]
    assert long == [0, 3, 5]
    # the best theta by validation: the highest mean over the horizons, kept with it
    scores = {r["step"]: (r["eval/two_moons/accuracy@2"] + r["eval/two_moons/accuracy@3"]) / 2
              for r in rows if r["step"] in long}
    best = load_export(RunDir(tmp_path / "run").best)
    assert best.step == max(scores, key=lambda k: (scores[k], -k))
    assert best.meta["score"] == pytest.approx(max(scores.values()))
    for row in rows:
        if row["step"] in evaluated:
            assert 0.0 <= row["eval/two_moons/accuracy"] <= 1.0
            assert math.isfinite(row["eval/two_moons/meta_loss"]) and row["eval_s"] > 0
        if row["step"] in long:
            for h in (2, 3):
                assert 0.0 <= row[f"eval/two_moons/accuracy@{h}"] <= 1.0
                assert 0 <= row[f"eval/two_moons/rank90@{h}"] <= 8
                assert row[f"eval/two_moons/w_growth@{h}"] > 0
        # every column is the learner's, a loss/<dataset>, a watched theta entry or the
        # evaluator's
        assert set(row) <= {*LEARNER_COLUMNS, *estimator_columns(config.estimator.kind),
                            "loss/digits", *THETA_COLUMNS, *config.evaluator.columns()}
    # The progress line showed the long-horizon result once there was one.
    assert "| tm@3 " in capsys.readouterr().err
    # `metalearn plot` draws a table whose eval columns exist in some rows only.
    assert main(["plot", str(tmp_path / "run")]) == 0
