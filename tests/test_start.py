"""The start of a fresh run: the best of a few initial thetas by validation."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from metalearn.core.config_io import ConfigError
from metalearn.core.theta import theta_spec
from metalearn.core.update_rule import init_theta
from metalearn.training.export import (export_run, is_export, load_export, run_start_theta,
                                       save_run_theta, start_candidate)
from metalearn.training.learner_host import LearnerHost
from metalearn.training.local import LOCAL
from metalearn.training.metrics import read_metrics
from metalearn.training.run_dir import RunDir
from metalearn.training.runner import train
from metalearn.training.session import Session
from metalearn.training.start import choose_start
from train_helpers import tiny_config

COLUMN = "eval/two_moons/accuracy@3"
EVALUATOR = {"enabled": True, "every": 100, "datasets": ["two_moons"], "width": 8,
             "depth": 1, "steps": 2, "seeds": 1, "batch_size": 16, "test_size": 40,
             "horizons": [3], "long_every": 100}


class Scores:
    """An evaluator whose long score of the i-th theta it sees is ``scores[i]``."""

    def __init__(self, scores):
        self.scores, self.thetas = list(scores), []

    def evaluate(self, step, theta, *, short=True, long=False):
        self.thetas.append(np.asarray(theta_spec_of(theta)))
        score = self.scores[len(self.thetas) - 1]
        return {"step": step, "eval/two_moons/accuracy": 0.5,
                **({COLUMN: score} if long else {})}


def theta_spec_of(theta):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(theta)])


def flat(config, theta):
    return theta_spec(config.rule).ravel(theta)


def made(tmp_path, candidates, evaluator=EVALUATOR):
    config = tiny_config(tmp_path, learner={"start_candidates": candidates},
                         evaluator=evaluator)
    run = RunDir(tmp_path / "run")
    run.create(config)
    return config, run


def test_the_best_scored_candidate_is_the_start_of_the_learner_and_of_export_start(tmp_path):
    config, run = made(tmp_path, 3)
    scorer = Scores([0.30, 0.55, 0.40])
    choice = choose_start(config, run, evaluator=lambda: scorer)
    assert choice.meta["candidate"] == 1 and choice.meta["scores"] == [0.30, 0.55, 0.40]
    assert choice.meta["score_column"] == COLUMN and choice.row[COLUMN] == 0.55
    candidates = [flat(config, start_candidate(config, i)) for i in range(3)]
    # candidate 0 is the seed's own draw, the start a one-candidate run has
    np.testing.assert_array_equal(
        candidates[0], flat(config, init_theta(jax.random.key(config.learner.seed), config.rule)))
    assert not np.allclose(candidates[0], candidates[1])
    for index, seen in enumerate(scorer.thetas):  # each candidate scored, in order
        np.testing.assert_array_equal(seen, theta_spec_of(start_candidate(config, index)))
    np.testing.assert_array_equal(choice.theta, candidates[1])
    np.testing.assert_array_equal(flat(config, run_start_theta(config, run)), candidates[1])
    np.testing.assert_array_equal(LearnerHost(config, run, resume=False).learner.theta,
                                  candidates[1])
    save_run_theta(run, candidates[2], config.rule, 5)  # a run's newest theta
    meta = export_run(run.path, str(tmp_path / "start"), start=True)
    assert meta["selected"] == "start" and meta["start"]["candidate"] == 1
    np.testing.assert_array_equal(flat(config, load_export(str(tmp_path / "start")).theta),
                                  candidates[1])
    events = [json.loads(line) for line in open(run.path + "/events.jsonl")]
    assert [e["candidate"] for e in events if e["event"] == "start_chosen"] == [1]
    # chosen once: a second call (an interrupted first session) keeps it
    assert choose_start(config, run, evaluator=lambda: Scores([0.9, 0.1, 0.1])) is None
    np.testing.assert_array_equal(flat(config, run_start_theta(config, run)), candidates[1])


def test_one_candidate_is_the_seeds_own_draw_and_chooses_nothing(tmp_path):
    config, run = made(tmp_path, 1)
    assert choose_start(config, run, evaluator=lambda: Scores([0.1])) is None
    assert not is_export(run.start)
    np.testing.assert_array_equal(flat(config, run_start_theta(config, run)),
                                  flat(config, start_candidate(config, 0)))
    with pytest.raises(ConfigError, match="learner.start_candidates must be >= 1"):
        tiny_config(tmp_path, learner={"start_candidates": 0})


@pytest.mark.parametrize("why", ["error", "nan", "disabled"])
def test_unscored_candidates_fall_back_to_the_seeds_own_draw(tmp_path, capsys, why):
    evaluator = dict(EVALUATOR, enabled=why != "disabled")
    config, run = made(tmp_path, 2, evaluator=evaluator)

    def failing():
        raise FileNotFoundError("fashion_mnist_val: no such file")
    scorer = failing if why == "error" else (lambda: Scores([float("nan")] * 2))
    choice = choose_start(config, run, evaluator=scorer)
    assert choice.meta["candidate"] == 0 and choice.row is None
    assert choice.meta["unscored_because"]
    if why == "error":
        assert "no such file" in choice.meta["unscored_because"]
    np.testing.assert_array_equal(flat(config, run_start_theta(config, run)),
                                  flat(config, start_candidate(config, 0)))
    assert "starting from candidate 1" in capsys.readouterr().err


def test_a_run_starts_from_its_chosen_candidate_and_reports_its_score_once(tmp_path):
    config = tiny_config(tmp_path, learner={"start_candidates": 2}, evaluator=EVALUATOR,
                         run={"steps": 2, "minutes": 5.0},
                         worker={"num_workers": 1, "batch_size": 8})
    calls = []
    import metalearn.evaluation.continuous as continuous
    original = continuous.ContinuousEvaluator.evaluate

    def counted(self, step, theta, **due):
        calls.append(step)
        return original(self, step, theta, **due)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(continuous.ContinuousEvaluator, "evaluate", counted)
        train(Session.of(config, tmp_path / "run"), LOCAL)
    run = RunDir(tmp_path / "run")
    start = load_export(run.start)
    rows = read_metrics(run.path).to_pylist()
    # two candidates scored at step 0, then the final evaluation: the start is not
    # evaluated a third time, its row is the chosen candidate's
    assert calls == [0, 0, 2]
    chosen = start.meta["candidate"]
    assert rows[0]["step"] == 0 and rows[0][COLUMN] == start.meta["scores"][chosen]
    best = load_export(run.best)
    assert best.step in (0, 2)
    if best.step == 0:
        np.testing.assert_array_equal(flat(config, best.theta), flat(config, start.theta))


def test_the_start_row_is_kept_when_the_evaluator_fails_to_start(tmp_path, capsys):
    config = tiny_config(tmp_path, learner={"start_candidates": 2}, evaluator=EVALUATOR,
                         run={"steps": 1, "minutes": 5.0},
                         worker={"num_workers": 1, "batch_size": 8})

    def broken(config):
        raise RuntimeError("no evaluator today")
    train(Session.of(config, tmp_path / "run"), dataclasses.replace(LOCAL, evaluator=broken))
    run = RunDir(tmp_path / "run")
    start = load_export(run.start)
    rows = read_metrics(run.path).to_pylist()
    assert rows[0]["step"] == 0
    assert rows[0][COLUMN] == start.meta["scores"][start.meta["candidate"]]
    assert load_export(run.best).step == 0
    assert "no evaluator today" in capsys.readouterr().err
