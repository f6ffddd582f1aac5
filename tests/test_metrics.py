"""The metrics of a run: learner rows (written by the learner, exact across restores),
evaluation rows merged into the table, the newest evaluation."""

import math
import os

import pytest

from metalearn.training.metrics import (LearnerRows, MetricsLog, discarded_rows,
                                        read_metric_rows, read_metrics)
from metalearn.training.run_dir import RunDir


def _run(tmp_path) -> RunDir:
    (tmp_path / "run").mkdir()
    return RunDir(tmp_path / "run")


def _learner_rows(run, first, last, flush_s=0.0):
    rows = LearnerRows(run, flush_s=flush_s)
    for step in range(first, last + 1):
        rows.add({"step": step, "meta_loss": 2.0 - 0.1 * step})
    rows.flush()
    return rows


def test_sparse_evaluation_columns_and_the_latest_evaluation(tmp_path):
    run = _run(tmp_path)
    _learner_rows(run, 1, 6)
    log = MetricsLog(run, tensorboard=False)
    for step in range(1, 7):
        log.add({"step": step, "meta_loss": 2.0 - 0.1 * step})
    assert log.merge({"step": 2, "eval/fm/accuracy": 0.40, "eval_s": 1.0})
    assert log.merge({"step": 4, "eval/fm/accuracy@1000": 0.35, "eval/fm/rank90@1000": 3.0,
                      "eval_long_s": 9.0})
    assert log.merge({"step": 5, "eval/fm/accuracy": 0.45, "eval_s": 1.5})
    assert log.merge({"step": 5, "eval/fm/accuracy@1000": 0.30})  # long, after short
    assert not log.merge({"step": 9, "eval/fm/accuracy": 0.5})  # no such row
    assert log.latest_evaluation() == {"eval/fm/accuracy": 0.45, "eval_s": 1.5,
                                       "eval/fm/accuracy@1000": 0.30,
                                       "eval/fm/rank90@1000": 3.0, "eval_long_s": 9.0,
                                       "eval_step": 5}
    # A report at step 3 may not carry what was measured at steps 4 and 5.
    assert log.latest_evaluation(3) == {"eval/fm/accuracy": 0.40, "eval_s": 1.0,
                                        "eval_step": 2}
    assert log.latest_evaluation(1) == {}
    log.write()
    table = read_metrics(run.path).to_pylist()
    assert [r["step"] for r in table] == [1, 2, 3, 4, 5, 6]
    assert [r["eval/fm/accuracy@1000"] for r in table] == [None, None, None, 0.35, 0.30, None]
    assert [r["eval/fm/accuracy"] for r in table] == [None, 0.40, None, None, 0.45, None]
    assert table[3]["meta_loss"] == pytest.approx(1.6)
    # A resumed run knows its last evaluation before it evaluates again.
    resumed = MetricsLog(run, tensorboard=False)
    resumed.load(up_to_step=4)
    assert resumed.latest_evaluation()["eval/fm/accuracy@1000"] == 0.35
    assert resumed.latest_evaluation()["eval/fm/accuracy"] == 0.40
    resumed.truncate(3)
    assert resumed.latest_evaluation() == {"eval/fm/accuracy": 0.40, "eval_s": 1.0,
                                           "eval_step": 2}
    assert not any(math.isnan(v) for v in resumed.latest_evaluation().values())
    # Evaluations of steps 4 and 5 are on record as discarded, not in the table.
    assert sorted(r["step"] for r in discarded_rows(run.path, "evaluations")) == [4, 5, 5]
    assert [r.get("eval/fm/accuracy") for r in read_metric_rows(run.path)] == \
        [None, 0.40, None, None, None, None]


def test_learner_rows_flush_on_their_interval(tmp_path):
    run = _run(tmp_path)
    now = [0.0]
    rows = LearnerRows(run, flush_s=10.0, clock=lambda: now[0])
    rows.add({"step": 1, "meta_loss": 1.0})
    assert not os.path.exists(run.metrics)  # buffered
    now[0] = 10.0
    rows.add({"step": 2, "meta_loss": 1.0})
    assert read_metrics(run.path).column("step").to_pylist() == [1, 2]
    assert rows.flushed_step == 2


def test_restore_discards_rows_beyond_the_checkpoint_with_the_reason(tmp_path):
    run = _run(tmp_path)
    _learner_rows(run, 1, 7)
    rows = LearnerRows(run, flush_s=0.0)
    assert rows.restore(5, reason="learner restored from checkpoint step 5") == []
    assert rows.flushed_step == 5
    for step in (6, 7, 8):  # the same step numbers again, new updates
        rows.add({"step": step, "meta_loss": 0.5})
    rows.flush()
    steps = read_metrics(run.path).column("step").to_pylist()
    assert steps == list(range(1, 9))  # no gap, no duplicate
    lost = discarded_rows(run.path)
    assert [r["step"] for r in lost] == [6, 7]
    assert {r["discarded_reason"] for r in lost} == {"learner restored from checkpoint step 5"}
    assert [r["meta_loss"] for r in read_metric_rows(run.path)][5:] == [0.5, 0.5, 0.5]


def test_restore_reports_steps_that_have_no_row(tmp_path):
    run = _run(tmp_path)
    _learner_rows(run, 1, 3)
    [message] = LearnerRows(run, flush_s=0.0).restore(5, reason="resumed")
    assert message.startswith("2 of the 5 steps up to the checkpoint have no metrics row")


def test_a_run_without_metrics_is_a_clear_error(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no metrics yet"):
        read_metrics(run.path)
