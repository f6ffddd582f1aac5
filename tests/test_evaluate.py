"""Evaluation of a rule: data splits, readouts, every activation, wide models, the CLI."""

import json

import jax
import numpy as np
import pytest

from eval_helpers import make_run
from metalearn.cli import main
from metalearn.core.config import ACTIVATIONS, ConfigError
from metalearn.evaluation.config import ContinuousEvalConfig, DataConfig
from metalearn.evaluation.continuous import ContinuousEvaluator
from metalearn.evaluation.data import default_image_size, load_data, make_task
from metalearn.evaluation.readout import eval_points_for, readout_accuracies
from metalearn.evaluation.rollout import architecture, check_rule_fits, learned_rule_curve
from metalearn.evaluation.run import summarise
from metalearn.core.update_rule import init_theta


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(dataset="digits", test_size=300))


def test_split_and_task_are_disjoint_and_balanced(digits):
    task = make_task(digits, seed=3, ways=10, shots=10)
    assert np.all(np.bincount(task.y_train, minlength=10) == 10)
    pool_rows = {r.tobytes() for r in task.x_pool}
    train_rows = {r.tobytes() for r in task.x_train}
    assert train_rows <= pool_rows
    # digits has duplicate images; check by index instead: pool and test come from one
    # permutation, so their sizes add up and no example is in both.
    assert len(digits.x_pool) + len(digits.x_test) <= 1797
    assert digits.x_pool.min() >= 0 and digits.x_pool.max() <= 1
    again = make_task(digits, seed=3, ways=10, shots=10)
    np.testing.assert_array_equal(task.x_train, again.x_train)
    other = make_task(digits, seed=4, ways=10, shots=10)
    assert not np.array_equal(task.x_train, other.x_train)
    sub = make_task(digits, seed=0, ways=4, shots=5)  # class subset, relabelled 0..3
    assert sub.num_classes == 4 and set(np.unique(sub.y_test)) == {0, 1, 2, 3}


def test_readouts_separate_informative_from_useless_features():
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(5), 10), np.repeat(np.arange(5), 40)
    good = lambda y: np.eye(5)[y] * 3 + rng.normal(size=(len(y), 5))  # noqa: E731
    acc = readout_accuracies(good(y_train), y_train, good(y_test), y_test, 5)
    assert acc["ridge_accuracy"] > 0.8 and acc["logreg_accuracy"] > 0.8
    noise = readout_accuracies(rng.normal(size=(50, 8)), y_train, rng.normal(size=(200, 8)),
                               y_test, 5)
    assert noise["ridge_accuracy"] < 0.4 and noise["logreg_accuracy"] < 0.4
    nan = readout_accuracies(np.full((50, 8), np.nan), y_train, good(y_test), y_test, 5)
    assert np.isnan(nan["ridge_accuracy"])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_initial_theta_trains_every_activation(activation, tiny_rule, digits):
    theta = init_theta(jax.random.key(0), tiny_rule)
    arch = architecture(digits.input_size, 16, 1, activation, tiny_rule.top_units)
    task = make_task(digits, seed=0, ways=10, shots=10)
    rows, extras = learned_rule_curve(theta, tiny_rule, arch, task, [0, 2], batch_size=32,
                                      keep_params=True)
    assert [r["step"] for r in rows] == [0, 2]
    for r in rows:
        assert 0.0 <= r["ridge_accuracy"] <= 1.0 and np.isfinite(r["logreg_accuracy"])
        # an 8-unit top layer: between 0 (constant, e.g. a dead step layer) and 8
        assert r["rank90"] in range(0, 9)
    moved = np.abs(extras["params_final"].w[0] - extras["params_init"].w[0]).max()
    assert moved > 0  # the rule changed the model
    assert rows[0]["w_growth"] == 1.0
    assert rows[1]["w_growth"] == pytest.approx(
        np.linalg.norm(extras["params_final"].w[0]) / np.linalg.norm(extras["params_init"].w[0]),
        rel=1e-5)


def test_initial_theta_runs_on_width_1000_plus(tiny_rule, digits):
    theta = init_theta(jax.random.key(0), tiny_rule)
    arch = architecture(digits.input_size, 1024, 1, "relu", tiny_rule.top_units)
    task = make_task(digits, seed=0, ways=10, shots=10)
    rows, extras = learned_rule_curve(theta, tiny_rule, arch, task, [1], batch_size=32,
                                      keep_params=True)
    assert extras["params_final"].w[0].shape == (64, 1024)
    assert np.isfinite(extras["params_final"].w[0]).all()
    assert rows[0]["ridge_accuracy"] > 0.2  # 1024 random features of digits


def test_rule_and_model_mismatch_is_named(tiny_rule, digits):
    with pytest.raises(ConfigError, match="top_units"):
        check_rule_fits(tiny_rule, architecture(64, 16, 2, "relu", 32))


def test_eval_points_and_summary():
    assert eval_points_for(200) == [0, 10, 30, 100, 200]
    assert eval_points_for(1000) == [0, 10, 30, 100, 300, 1000]
    assert eval_points_for(50000) == [0, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 50000]
    assert eval_points_for(2) == [0, 2]
    assert eval_points_for(0) == [0]
    rows = [{"method": "m", "step": 5, "ridge_accuracy": a, "logreg_accuracy": a,
             "rank90": r, "w_growth": g}
            for a, r, g in ((0.5, 2.0, 10.0), (0.7, 5.0, 30.0), (np.nan, np.nan, np.nan))]
    rows.append({"method": "b", "step": 0, "ridge_accuracy": 0.4, "logreg_accuracy": 0.4,
                 "rank90": 7.0})  # a baseline: no w_growth
    entry, baseline = summarise(rows)
    assert entry["accuracy"] == pytest.approx(0.6)
    assert entry["accuracy_se"] == pytest.approx(np.std([0.5, 0.7], ddof=1) / np.sqrt(2))
    assert entry["seeds"] == 3 and entry["diverged"] == 1
    assert entry["rank90"] == 3.5 and entry["w_growth"] == 20.0  # diverged seed skipped
    assert baseline["rank90"] == 7.0 and "w_growth" not in baseline


def test_continuous_evaluator(tiny_rule):
    from jax.flatten_util import ravel_pytree
    config = ContinuousEvalConfig(datasets=("two_moons",), width=16, depth=1, steps=2,
                                  test_size=200)
    evaluator = ContinuousEvaluator(config, tiny_rule)
    flat, _ = ravel_pytree(init_theta(jax.random.key(0), tiny_rule))
    row = evaluator.evaluate(12, np.asarray(flat))
    assert row["step"] == 12
    assert 0.0 < row["eval/two_moons/meta_loss"] < 3.0
    assert 0.5 <= row["eval/two_moons/accuracy"] <= 1.0
    again = evaluator.evaluate(12, init_theta(jax.random.key(0), tiny_rule))  # pytree
    assert again["eval/two_moons/meta_loss"] == pytest.approx(
        row["eval/two_moons/meta_loss"], rel=1e-5)
    other = evaluator.evaluate(13, np.asarray(flat) * 3.0)
    assert other["eval/two_moons/meta_loss"] != row["eval/two_moons/meta_loss"]
    with pytest.raises(ConfigError, match="parameters"):
        evaluator.evaluate(0, np.zeros(5, np.float32))
    with pytest.raises(ConfigError, match="every"):
        ContinuousEvalConfig(every=0)


def test_continuous_evaluator_long_horizons(tiny_rule):
    from jax.flatten_util import ravel_pytree
    # The first dataset is missing here: the first *available* one gets long rollouts.
    config = ContinuousEvalConfig(datasets=("file:/nonexistent/nope.npz", "two_moons"),
                                  width=16, depth=1, steps=2, seeds=2, test_size=200,
                                  horizons=(3, 1), long_every=5)
    evaluator = ContinuousEvaluator(config, tiny_rule)
    flat, _ = ravel_pytree(init_theta(jax.random.key(0), tiny_rule))
    row = evaluator.evaluate(10, np.asarray(flat), short=False, long=True)
    long_columns = {f"eval/two_moons/{m}@{h}" for m in ("accuracy", "rank90", "w_growth")
                    for h in (1, 3)}
    assert set(row) == {"step", "eval_long_s"} | long_columns
    for h in (1, 3):
        assert 0.5 <= row[f"eval/two_moons/accuracy@{h}"] <= 1.0
        assert 0 <= row[f"eval/two_moons/rank90@{h}"] <= 8  # mean over 2 seeds
        assert row[f"eval/two_moons/w_growth@{h}"] > 0
    both = evaluator.evaluate(10, np.asarray(flat), long=True)
    assert "eval/two_moons/meta_loss" in both and long_columns <= set(both)
    # The long rollout's first steps are the short rollout's (same seed and stream).
    short = evaluator.evaluate(10, np.asarray(flat))
    assert not long_columns & set(short)
    assert both["eval/two_moons/accuracy@3"] == row["eval/two_moons/accuracy@3"]


def test_continuous_config_horizon_fields():
    config = ContinuousEvalConfig(datasets=("two_moons", "digits"), horizons=(1000, 100))
    assert config.horizons == (100, 1000) and config.long_every == 200
    assert config.long_names() == ("two_moons",)  # default: the first dataset
    assert "eval/two_moons/rank90@1000" in config.columns()
    assert "eval/digits/accuracy@1000" not in config.columns()
    assert "eval/digits/accuracy" in config.columns()
    off = ContinuousEvalConfig(long_every=0)
    assert off.long_names() == () and not any("@" in c for c in off.columns())
    with pytest.raises(ConfigError, match=r"long_datasets: mnist not in evaluator\.datasets"):
        ContinuousEvalConfig(datasets=("digits",), long_datasets=("mnist",))
    with pytest.raises(ConfigError, match="long_every must be >= 0"):
        ContinuousEvalConfig(long_every=-1)
    with pytest.raises(ConfigError, match="horizons must be positive"):
        ContinuousEvalConfig(horizons=(0, 10))


def test_cli_eval_writes_report_and_json(tmp_path, tiny_rule, capsys):
    make_run(tmp_path / "run", tiny_rule)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e")]) == 0
    out = tmp_path / "report"
    code = main(["eval", str(tmp_path / "e"), "--dataset", "digits", "--steps", "2",
                 "--seeds", "2", "--width", "16", "--depth", "1", "--batch-size", "32",
                 "--baselines", "pca,random_init", "--test-size", "200", "--out", str(out),
                 "--json", "--quiet"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(payload["methods"]) == {"learned", "pca", "random_init"}
    assert payload["methods"]["learned"]["step"] == 2
    assert payload["methods"]["pca"]["accuracy"] > 0.5
    assert payload["inner_lr"] == tiny_rule.inner_lr
    curve = payload["methods"]["learned"]["curve"]
    assert [p["step"] for p in curve] == [0, 2]
    assert [p["lr_steps"] for p in curve] == pytest.approx([0.0, 2 * tiny_rule.inner_lr])
    assert curve[0]["w_growth"] == 1.0 and curve[1]["w_growth"] > 0
    assert all(0 <= p["rank90"] <= 8 and 0 <= p["accuracy"] <= 1 for p in curve)
    assert set(curve[0]) == {"step", "lr_steps", "accuracy", "accuracy_se",
                             "logreg_accuracy", "rank90", "w_growth"}
    assert curve[-1]["accuracy"] == payload["methods"]["learned"]["accuracy"]
    (pca,) = payload["methods"]["pca"]["curve"]
    assert pca["w_growth"] is None and 1 <= pca["rank90"] <= 32
    for name in ("results.parquet", "summary.parquet", "results.md", "accuracy_vs_steps.png",
                 "receptive_fields.png", "representation_pca.png"):
        assert (out / name).stat().st_size > 100, name
    assert "| learned | 2 |" in (out / "results.md").read_text()


def test_cli_sweep_and_errors(tmp_path, tiny_rule, capsys):
    make_run(tmp_path / "run", tiny_rule)
    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e")])
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "e"), "--dataset", "digits", "--vary", "depth",
                 "--values", "1,2", "--steps", "1", "--seeds", "1", "--width", "8",
                 "--batch-size", "16", "--test-size", "100", "--out", str(tmp_path / "s"),
                 "--json", "--quiet"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["sweep"] == "depth" and set(payload["values"]) == {"1", "2"}
    assert [p["step"] for p in payload["values"]["2"]["learned"]["curve"]] == [0, 1]
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 100
    # A run folder is evaluated as `metalearn export` would export it (its newest theta
    # here: the run has no best by validation).
    code = main(["eval", str(tmp_path / "run"), "--dataset", "digits", "--steps", "1",
                 "--seeds", "1", "--width", "8", "--batch-size", "16", "--test-size", "100",
                 "--baselines", "none", "--out", str(tmp_path / "r"), "--json", "--quiet"])
    assert code == 0
    from_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_run["methods"]["learned"]["step"] == 1
    (tmp_path / "plain").mkdir()
    assert main(["eval", str(tmp_path / "plain"), "--quiet"]) == 2
    assert "not a metalearn export" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "e"), "--dataset", "nope", "--quiet"]) == 2


def _eval_args(*argv):
    from metalearn.cli import build_parser
    argv = ["eval", "EXPORT", *argv]
    return build_parser(argv).parse_args(argv)


def test_cli_eval_config_file_set_and_flags(tmp_path):
    from metalearn.cli.eval import resolve_config
    from metalearn.evaluation.baselines import NAMES

    plain = resolve_config(_eval_args())  # no file: the command's defaults, as before
    assert (plain.steps, plain.seeds, plain.baselines) == (200, 3, NAMES)
    assert plain.data.dataset == "digits" and plain.data.image_size == 0
    assert resolve_config(_eval_args("--vary", "depth")).baselines == ()
    path = tmp_path / "eval.yaml"
    path.write_text("data:\n  test_size: 150\n  pool_size: 400\nwidth: 8\nsteps: 5\n"
                    "ridge: 3e-1\nbaselines: [pca]\n")
    config = resolve_config(_eval_args("--config", str(path), "--set", "steps=3",
                                       "--set", "data.pool_size=300", "--width", "16"))
    assert config.width == 16  # a flag wins over the file
    assert config.steps == 3 and config.data.pool_size == 300  # --set wins over the file
    assert config.data.test_size == 150 and config.ridge == 0.3 and config.baselines == ("pca",)
    assert config.seeds == 3 and config.depth == 4  # unset: command / EvalConfig defaults
    flagged = resolve_config(_eval_args("--config", str(path), "--set", "steps=3",
                                        "--steps", "1", "--baselines", "none"))
    assert flagged.steps == 1 and flagged.baselines == ()  # flags win over --set too


def test_cli_eval_bad_config_key_names_the_field(tmp_path, tiny_rule, capsys):
    make_run(tmp_path / "run", tiny_rule)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "e"), "--set", "data.wayz=3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key data.wayz" in err and "ways" in err
    assert main(["eval", str(tmp_path / "e"), "--set", "data.ways=many", "--quiet"]) == 2
    assert "data.ways must be an integer" in capsys.readouterr().err
    path = tmp_path / "eval.yaml"
    path.write_text("baselines: [kmeans]\n")
    assert main(["eval", str(tmp_path / "e"), "--config", str(path), "--quiet"]) == 2
    assert "unknown baseline 'kmeans'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "e"), "--config", str(tmp_path / "no.yaml"),
                 "--quiet"]) == 2
    assert "no.yaml" in capsys.readouterr().err


def test_eval_config_errors_name_the_dotted_field():
    from metalearn.core.config_io import from_dict
    from metalearn.evaluation.config import EvalConfig
    with pytest.raises(ConfigError, match=r"^data\.ways must be at least 2"):
        from_dict(EvalConfig, {"data": {"ways": 1}})
    with pytest.raises(ConfigError, match=r"^data\.image_size must be one of"):
        from_dict(EvalConfig, {"data": {"image_size": 5}})
    with pytest.raises(ConfigError, match=r"^unknown config key data\.wayz"):
        from_dict(EvalConfig, {"data": {"wayz": 3}})


def test_evaluation_schedule_short_long_and_final():
    from metalearn.evaluation.config import EvaluationSchedule
    schedule = EvaluationSchedule(ContinuousEvalConfig(every=2, long_every=3))
    schedule.start(10)  # a resumed run: counted from its first step
    due = {step: schedule.due(step) for step in range(11, 17)}
    assert due == {11: None, 12: {"short": True, "long": False},
                   13: {"short": False, "long": True}, 14: {"short": True, "long": False},
                   15: None, 16: {"short": True, "long": True}}
    assert schedule.due(16, final=True) is None  # the last theta is measured already
    assert schedule.due(17, final=True) == {"short": True, "long": True}
    off = EvaluationSchedule(ContinuousEvalConfig(every=2, long_every=0))
    off.start(0)
    assert off.due(5, final=True) == {"short": True, "long": False}


def test_continuous_evaluator_uses_the_eval_commands_resolution(tiny_rule, tmp_path):
    # Validation must select on the protocol that reports: `metalearn eval` and `table`
    # resize images larger than 16 px to 14, so image_size 0 does here too (28 x 28
    # images once reached the rule as 784 inputs here and as 196 in the reports).
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npz"
    np.savez(path, x=rng.integers(0, 256, (300, 28, 28)).astype(np.uint8),
             y=np.repeat(np.arange(10), 30))
    name = f"file:{path}"
    assert default_image_size(name) == 14
    default = ContinuousEvaluator(ContinuousEvalConfig(datasets=(name,), width=16, depth=1,
                                                       steps=1, test_size=50), tiny_rule)
    assert default._datasets[0][1].sizes[0] == 14 * 14
    native = ContinuousEvaluator(ContinuousEvalConfig(datasets=(name,), width=16, depth=1,
                                                      steps=1, test_size=50, image_size=28),
                                 tiny_rule)
    assert native._datasets[0][1].sizes[0] == 28 * 28
