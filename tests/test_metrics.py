"""The metrics table: evaluation columns merged into some rows, the newest evaluation."""

import math

import pyarrow.parquet as pq

from metalearn.training.metrics import MetricsLog
from metalearn.training.run_dir import RunDir


def test_sparse_evaluation_columns_and_the_latest_evaluation(tmp_path):
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    log = MetricsLog(run, tensorboard=False)
    for step in range(1, 7):
        log.add({"step": step, "meta_loss": 2.0 - 0.1 * step})
    assert log.merge({"step": 2, "eval/fm/accuracy": 0.40, "eval_s": 1.0})
    assert log.merge({"step": 4, "eval/fm/accuracy@1000": 0.35, "eval/fm/rank90@1000": 3.0,
                      "eval_long_s": 9.0})
    assert log.merge({"step": 5, "eval/fm/accuracy": 0.45, "eval_s": 1.5})
    assert not log.merge({"step": 9, "eval/fm/accuracy": 0.5})  # no such row
    assert log.latest_evaluation() == {"eval/fm/accuracy": 0.45, "eval_s": 1.5,
                                       "eval/fm/accuracy@1000": 0.35,
                                       "eval/fm/rank90@1000": 3.0, "eval_long_s": 9.0,
                                       "eval_step": 5}
    # A report at step 3 may not carry what was measured at steps 4 and 5.
    assert log.latest_evaluation(3) == {"eval/fm/accuracy": 0.40, "eval_s": 1.0,
                                        "eval_step": 2}
    assert log.latest_evaluation(1) == {}
    log.write()
    table = pq.read_table(run.metrics).to_pylist()
    assert [r["eval/fm/accuracy@1000"] for r in table] == [None, None, None, 0.35, None, None]
    # A resumed run knows its last evaluation before it evaluates again.
    resumed = MetricsLog(run, tensorboard=False)
    resumed.load(up_to_step=4)
    assert resumed.latest_evaluation()["eval/fm/accuracy@1000"] == 0.35
    assert resumed.latest_evaluation()["eval/fm/accuracy"] == 0.40
    resumed.truncate(3)
    assert resumed.latest_evaluation() == {"eval/fm/accuracy": 0.40, "eval_s": 1.0,
                                           "eval_step": 2}
    assert not any(math.isnan(v) for v in resumed.latest_evaluation().values())
