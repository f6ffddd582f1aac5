"""Report tables and plots, and `metalearn plot` on a run's metrics."""

import json

import pytest

from metalearn.cli import main
from metalearn.evaluation.report import markdown_table, plot_meta_training
from metalearn.training.metrics import MetricsLog, read_metric_rows
from metalearn.training.run_dir import RunDir
from metalearn.training.segments import SegmentedTable


def _png_ok(path):
    data = open(path, "rb").read()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_meta_training_with_eval_columns(tmp_path, capsys):
    steps = list(range(1, 41))
    table = {"step": steps, "meta_loss": [2.0 - 0.02 * s for s in steps],
             "meta_loss_rolling": [2.0 - 0.02 * s for s in steps],
             "loss/glyphs": [2.0 - 0.025 * s for s in steps],
             "loss/digits": [1.9 - 0.01 * s for s in steps],
             "eval/fashion_mnist/meta_loss": [None if s % 10 else 1.9 - 0.005 * s for s in steps],
             "eval/fashion_mnist/accuracy": [None if s % 10 else 0.3 + 0.005 * s for s in steps],
             # long horizons: fewer rows still
             "eval/fashion_mnist/accuracy@1000": [None if s % 20 else 0.2 + 0.005 * s
                                                  for s in steps],
             "eval/fashion_mnist/rank90@1000": [None if s % 20 else 3.0 for s in steps]}
    rows = [{k: v[i] for k, v in table.items() if v[i] is not None}
            for i in range(len(steps))]
    run = RunDir(tmp_path)
    SegmentedTable(run.metrics).append(
        [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows])
    evaluations = MetricsLog(run, tensorboard=False)
    evaluations.last_step = 40
    for row in rows:
        if any(k.startswith("eval/") for k in row):
            evaluations.merge({k: v for k, v in row.items()
                               if k == "step" or k.startswith("eval/")})
    evaluations.write()
    assert read_metric_rows(run.path) == rows
    assert main(["plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith("meta_training.png") and _png_ok(out)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "j.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "plot": str(tmp_path / "j.png"), "rows": len(rows)}
    path = plot_meta_training(rows, str(tmp_path), str(tmp_path / "x.png"))
    assert _png_ok(path)
    best = ([(0, 0.30), (20, 0.35), (40, 0.35)], "eval/fashion_mnist/accuracy@1000")
    assert _png_ok(plot_meta_training(rows, str(tmp_path), str(tmp_path / "b.png"),
                                      best=best))


def test_plot_without_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="has no metrics rows yet"):
        plot_meta_training([], str(tmp_path))
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no metrics yet" in capsys.readouterr().err


def test_markdown_table_reports_final_step_per_method():
    summary = [{"method": "learned", "step": s, "accuracy": a, "accuracy_se": 0.01,
                "logreg_accuracy": a, "logreg_accuracy_se": 0.02, "seeds": 3,
                "rank90": r, "w_growth": g}
               for s, a, r, g in ((0, 0.4, 20.0, 1.0), (100, 0.55, 1.5, 19.25))]
    summary.append({"method": "pca", "step": 0, "accuracy": 0.6, "accuracy_se": 0.02,
                    "logreg_accuracy": 0.6, "logreg_accuracy_se": 0.02, "seeds": 3,
                    "rank90": 12.0})
    text = markdown_table(summary, "t", {"dataset": "digits"})
    assert "| learned | 100 | 0.550 ± 0.010 | 0.550 ± 0.020 | 3 |" in text
    assert "- dataset: digits" in text
    # The per-horizon table: methods x steps, collapse diagnostics beside the accuracy.
    assert "| method | step 0 | step 100 |" in text
    assert ("| learned | 0.400 ± 0.010, r 20.0, W x1.00 | "
            "0.550 ± 0.010, r 1.5, W x19.25 |") in text
    assert "| pca | 0.600 ± 0.020, r 12.0 |  |" in text
    assert "| learned | 100 | 0.550 ± 0.010 | 0.550 ± 0.020 | 1.5 | 19.25 |" in text
