"""The best theta of a run by validation (metalearn.training.best) and its export."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from metalearn.core.config_io import ConfigError
from metalearn.core.theta import theta_spec
from metalearn.core.update_rule import init_theta
from metalearn.evaluation.config import ContinuousEvalConfig, EvaluationSchedule
from metalearn.training.best import BestTheta, best_so_far, selection_score
from metalearn.training.export import export_run, load_export, save_run_theta
from metalearn.training.run_dir import RunDir
from train_helpers import tiny_config

EVAL = ContinuousEvalConfig(datasets=("fashion_mnist_val", "two_moons"), horizons=(1000,),
                            long_every=5)
EVAL2 = ContinuousEvalConfig(datasets=("fashion_mnist_val", "two_moons"), horizons=(100, 1000),
                             long_every=5)


def test_selection_score_is_the_mean_over_horizons_of_the_first_long_dataset():
    row = {"eval/two_moons/accuracy@1000": 0.9, "eval/two_moons/accuracy@100": 0.8,
           "eval/fashion_mnist_val/accuracy@1000": 0.5,
           "eval/fashion_mnist_val/accuracy@100": 0.6}
    assert selection_score(EVAL2, row) == (pytest.approx(0.55),
                                          "eval/fashion_mnist_val/accuracy@100+1000")
    # a missing first dataset gives way to the next, as the evaluator does
    moons = {k: v for k, v in row.items() if "two_moons" in k}
    assert selection_score(EVAL2, moons)[0] == pytest.approx(0.85)
    assert selection_score(EVAL, {"eval/fashion_mnist_val/accuracy": 0.5}) is None
    assert selection_score(EVAL2, {**moons, "eval/two_moons/accuracy@100": math.nan}) is None
    no_long = ContinuousEvalConfig(datasets=("digits",), long_every=0)
    assert selection_score(no_long, row) is None


def test_select_from_scores_only_the_long_horizons():
    # Seed 1 of the local default (docs/results.md): a 300-step-equivalent gain, a
    # 1,000-step loss. Scored on all three the later theta wins; on the long two it loses.
    config = ContinuousEvalConfig(datasets=("fashion_mnist_val",), horizons=(30, 100, 300),
                                  long_every=12, select_from=100)
    start = {"eval/fashion_mnist_val/accuracy@30": 0.241,
             "eval/fashion_mnist_val/accuracy@100": 0.168,
             "eval/fashion_mnist_val/accuracy@300": 0.151}
    later = {"eval/fashion_mnist_val/accuracy@30": 0.463,
             "eval/fashion_mnist_val/accuracy@100": 0.162,
             "eval/fashion_mnist_val/accuracy@300": 0.136}
    assert config.selection_horizons() == (100, 300)
    assert selection_score(config, start) == (pytest.approx(0.1595),
                                              "eval/fashion_mnist_val/accuracy@100+300")
    assert selection_score(config, later)[0] < selection_score(config, start)[0]
    every = dataclasses.replace(config, select_from=0)
    assert selection_score(every, later)[0] > selection_score(every, start)[0]
    # Horizons overridden below the minimum: the largest scores alone, never an error.
    short = dataclasses.replace(config, horizons=(3, 10))
    assert short.selection_horizons() == (10,)
    with pytest.raises(ConfigError, match="select_from must be >= 0"):
        ContinuousEvalConfig(select_from=-1)


@pytest.fixture
def run(tmp_path):
    config = tiny_config(tmp_path)
    run = RunDir(tmp_path / "run")
    run.create(config)
    return run, config


def thetas(config, count):
    spec = theta_spec(config.rule)
    base = spec.ravel(init_theta(jax.random.key(0), config.rule))
    return [base + 0.01 * k for k in range(count)]


def test_best_theta_keeps_the_highest_score_and_survives_a_new_session(run):
    run, config = run
    column = "eval/fashion_mnist_val/accuracy@1000"
    t0, t1, t2, t3 = thetas(config, 4)
    best = BestTheta(run, config.rule, EVAL)
    assert not best.known and best.text() == ""
    assert best.offer(0, t0, {"step": 0, column: 0.40, column.replace("accuracy", "rank90"): 20})
    assert not best.offer(5, t1, {"step": 5, column: 0.38})   # worse: the start stays
    assert not best.offer(7, t1, {"step": 7, column: math.nan})
    assert not best.offer(8, t1, {"step": 8, "eval/fashion_mnist_val/accuracy": 0.9})
    assert best.offer(10, t2, {"step": 10, column: 0.45})
    assert (best.step, best.score) == (10, 0.45) and best.text() == " best 0.450 @10"
    again = BestTheta(run, config.rule, EVAL)  # a resumed session reads the folder
    assert (again.step, again.score, again.column) == (10, 0.45, column)
    assert not again.offer(12, t3, {"step": 12, column: 0.45})  # ties keep the earlier
    saved = load_export(run.best)
    np.testing.assert_allclose(theta_spec(config.rule).ravel(saved.theta), t2)
    assert saved.meta["score"] == 0.45 and saved.step == 10


def test_a_gain_within_the_margin_does_not_replace_the_start(run):
    run, config = run
    column = "eval/fashion_mnist_val/accuracy@1000"
    t0, t1, t2 = thetas(config, 3)
    best = BestTheta(run, config.rule, dataclasses.replace(EVAL, best_margin=0.02))
    assert best.offer(0, t0, {"step": 0, column: 0.308})   # the start is always taken
    assert not best.offer(12, t1, {"step": 12, column: 0.323})  # +0.015: within the noise
    assert best.step == 0
    assert best.offer(20, t2, {"step": 20, column: 0.335})  # +0.027
    assert (best.step, best.score) == (20, 0.335)
    with pytest.raises(ConfigError, match="evaluator.best_margin"):
        dataclasses.replace(EVAL, best_margin=-0.1)


def test_best_so_far_follows_the_margin_and_select_from_as_the_run_did():
    # Seed 1 of the 3,000-step-fitness runs (docs/results.md): the 30-step column rises
    # at step 7 but does not score; step 7's score is below step 4's, so step 4 stays.
    config = ContinuousEvalConfig(datasets=("fashion_mnist_val",), horizons=(30, 100, 300),
                                  long_every=4, select_from=100, best_margin=0.02)
    col = "eval/fashion_mnist_val/accuracy@"
    rows = [{"step": 7, col + "30": 0.46, col + "100": 0.474, col + "300": 0.423},
            {"step": 0, col + "30": 0.405, col + "100": 0.412, col + "300": 0.395},
            {"step": 2, "meta_loss": 1.8},  # no evaluation: no point
            {"step": 4, col + "30": 0.48, col + "100": 0.500, col + "300": 0.423},
            {"step": 5, col + "30": 0.1, col + "100": 0.420, col + "300": 0.410}]
    points, column = best_so_far(config, rows)
    assert column == col + "100+300"
    assert [p[0] for p in points] == [0, 4, 5, 7]
    assert [p[1] for p in points] == pytest.approx([0.4035, 0.4615, 0.4615, 0.4615])
    # Step 5's +0.0115 over the start would not pass the margin either.
    assert best_so_far(config, rows[1:2] + rows[4:])[0][1][1] == pytest.approx(0.4035)
    assert best_so_far(config, [{"step": 2, "meta_loss": 1.8}]) is None


def test_export_takes_the_best_theta_unless_asked_for_the_last(run, tmp_path):
    run, config = run
    t0, t1 = thetas(config, 2)
    save_run_theta(run, t1, config.rule, 20)
    meta = export_run(run.path, str(tmp_path / "no_best"))
    assert (meta["selected"], meta["step"]) == ("last", 20)  # no validation score yet
    BestTheta(run, config.rule, EVAL).offer(
        5, t0, {"step": 5, "eval/fashion_mnist_val/accuracy@1000": 0.5})
    meta = export_run(run.path, str(tmp_path / "best"))
    assert (meta["selected"], meta["step"]) == ("best", 5)
    assert meta["validation"]["score"] == 0.5
    np.testing.assert_allclose(theta_spec(config.rule).ravel(
        load_export(str(tmp_path / "best")).theta), t0)
    meta = export_run(run.path, str(tmp_path / "last"), last=True)
    assert (meta["selected"], meta["step"]) == ("last", 20)


def test_a_new_run_measures_its_start_first():
    schedule = EvaluationSchedule(ContinuousEvalConfig(every=10, long_every=50))
    schedule.start(0, measure_now=True)
    assert schedule.due(0) == {"short": True, "long": True}
    assert schedule.due(1) is None and schedule.due(10) == {"short": True, "long": False}
    schedule.start(30)  # a resumed run with a best already: counts from its step
    assert schedule.due(30) is None


def test_export_start_is_the_runs_initial_theta(run, tmp_path):
    from metalearn.training.export import export_run

    run, config = run
    t0, t1 = thetas(config, 2)
    save_run_theta(run, t1, config.rule, 20)
    meta = export_run(run.path, str(tmp_path / "start"), start=True)
    assert (meta["selected"], meta["step"]) == ("start", 0)
    start = theta_spec(config.rule).ravel(load_export(str(tmp_path / "start")).theta)
    np.testing.assert_allclose(start, t0)  # init_theta(learner.seed), as the learner made it
    with pytest.raises(Exception, match="one of --last and --start"):
        export_run(run.path, str(tmp_path / "x"), start=True, last=True)
