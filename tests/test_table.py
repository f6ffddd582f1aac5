"""The held-out table: summaries with paired gains, markdown, and ``metalearn table``."""

import json

import pytest

from eval_helpers import make_run
from metalearn.cli import main
from metalearn.core.config_io import ConfigError
from metalearn.evaluation.table import TableConfig, markdown_table, summarise_table
from metalearn.training.export import export_run


def _rows():
    rows = []
    for seed, (r0, l100, l1000) in enumerate([(0.40, 0.50, 0.45), (0.30, 0.42, 0.40),
                                              (0.35, 0.44, 0.41)]):
        rows.append({"dataset": "d", "method": "random_init", "seed": seed, "step": 0,
                     "ridge_accuracy": r0, "rank90": 20.0})
        for step, acc in ((0, r0), (100, l100), (1000, l1000)):
            rows.append({"dataset": "d", "method": "learned", "seed": seed, "step": step,
                         "ridge_accuracy": acc, "rank90": 10.0 + seed})
        rows.append({"dataset": "d", "method": "pca", "seed": seed, "step": 0,
                     "ridge_accuracy": 0.6})
    return rows


def test_summary_pairs_seeds_and_keeps_requested_horizons():
    summary = summarise_table(_rows(), (100, 1000))
    learned = {e["step"]: e for e in summary if e["method"] == "learned"}
    assert sorted(learned) == [100, 1000]  # step 0 is not a requested horizon
    # paired differences: 0.10, 0.12, 0.09 at 100 -> mean 0.103, se 0.0088
    assert learned[100]["vs_random"] == pytest.approx(0.31 / 3)
    assert learned[100]["vs_random_se"] == pytest.approx(0.008819, abs=1e-5)
    assert learned[100]["accuracy"] == pytest.approx(1.36 / 3)
    assert learned[1000]["rank90"] == pytest.approx(11.0)
    pca = [e for e in summary if e["method"] == "pca"]
    assert len(pca) == 1 and pca[0]["accuracy"] == pytest.approx(0.6) and "vs_random" not in pca[0]
    text = markdown_table(summary, (100, 1000), ["learned", "random_init", "pca"])
    assert "| d | 0.453 ± 0.024 | 0.420 ± 0.015 | 0.350 ± 0.029 | 0.600 ± 0.000 |" in text
    assert "| d | +0.103 ± 0.009 | +0.070 ± 0.015 | 11.0 | 11.0 |" in text


def test_a_second_rule_is_scored_at_the_same_horizons_and_paired():
    rows = _rows()
    for seed, (v100, v1000) in enumerate([(0.45, 0.40), (0.40, 0.41), (0.40, 0.38)]):
        for step, acc in ((100, v100), (1000, v1000)):
            rows.append({"dataset": "d", "method": "versus", "seed": seed, "step": step,
                         "ridge_accuracy": acc, "rank90": 20.0})
    summary = summarise_table(rows, (100, 1000))
    learned = {e["step"]: e for e in summary if e["method"] == "learned"}
    versus = {e["step"]: e for e in summary if e["method"] == "versus"}
    assert sorted(versus) == [100, 1000] and "vs_versus" not in versus[100]
    # learned - versus at 100: 0.05, 0.02, 0.04
    assert learned[100]["vs_versus"] == pytest.approx(0.11 / 3)
    assert learned[1000]["vs_versus"] == pytest.approx((0.05 - 0.01 + 0.03) / 3)
    text = markdown_table(summary, (100, 1000), ["learned", "random_init", "pca"])
    assert "| d | 0.417 ± 0.017 | 0.397 ± 0.009 | +0.037 ± 0.009 | +0.023 ± 0.018 | 20.0 | 20.0 |" \
        in text
    assert "versus" not in text.split("\n")[0]  # not a baseline column


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="horizons"):
        TableConfig(horizons=(0, 10))
    with pytest.raises(ConfigError, match="seeds"):
        TableConfig(seeds=1)
    with pytest.raises(ConfigError, match="unknown baseline 'nope'"):
        TableConfig(baselines=("nope",))


def test_cli_table(tmp_path, tiny_rule, capsys):
    make_run(tmp_path / "run", tiny_rule, step=5)
    export_run(str(tmp_path / "run"), str(tmp_path / "export"))
    out = tmp_path / "table"
    assert main(["table", str(tmp_path / "export"), "--datasets", "two_moons",
                 "--horizons", "2,3", "--seeds", "2", "--baselines", "random_init",
                 "--depth", "1", "--width", "16", "--out", str(out), "--json",
                 "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    learned = [e for e in payload["summary"] if e["method"] == "learned"]
    assert [e["step"] for e in learned] == [2, 3] and all(e["seeds"] == 2 for e in learned)
    assert all("vs_random" in e for e in learned) and payload["inner_lr"] == tiny_rule.inner_lr
    text = (out / "heldout.md").read_text()
    assert "| two_moons |" in text and "metalearn table" in text
    assert (out / "rows.parquet").stat().st_size > 0
    # --versus: a second rule at the same horizons and seeds, paired (the same rule here,
    # so every paired difference is exactly 0)
    assert main(["table", str(tmp_path / "export"), "--datasets", "two_moons",
                 "--horizons", "2,3", "--seeds", "2", "--baselines", "random_init",
                 "--depth", "1", "--width", "16", "--out", str(out), "--json", "--quiet",
                 "--versus", str(tmp_path / "export")]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [e["vs_versus"] for e in payload["summary"] if e["method"] == "learned"] == [0, 0]
    assert "learned - versus @2" in (out / "heldout.md").read_text()
    assert main(["table", str(tmp_path / "export"), "--datasets", "nope"]) == 2
    assert main(["table", str(tmp_path / "export"), "--horizons", "a,b"]) == 2
