"""`metalearn bench metrics` runs end to end on a small synthetic run (the figures come
from the full command; no timing is asserted here)."""

from metalearn.cli import main
from metalearn.training.bench import measure_metrics


def test_bench_metrics_reports_both_points_and_reads_every_row_back(capsys):
    report = measure_metrics(steps=2_000, rows_per_flush=10, at=(1_000, 2_000), window=500)
    assert [p["step"] for p in report["points"]] == [1_000, 2_000]
    assert [p["flushes"] for p in report["points"]] == [50, 50]
    assert all(p["median_ms"] > 0 and p["rewrite_whole_ms"] > 0 for p in report["points"])
    # 200 flushes, fanout 16: 12 level-1 segments (192 flushes) and 8 level-0 ones.
    assert report["segments"] == report["files"] == 20
    assert main(["bench", "metrics", "--steps", "1500", "--rows-per-flush", "50"]) == 0
    assert "step   1,500" in capsys.readouterr().out
