"""`metalearn sweep`: the smoke sweep end to end, PBT cloning a trial, resume, bad specs.

Each test starts its own 2-CPU Ray (and shuts it down); trials are whole tiny
meta-trainings (tiny rule, 3-way 8x8 digits), one worker each, two at a time.
"""

import json
import dataclasses
import os
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from metalearn.cli import main
from metalearn.core.config import ConfigError

os.environ["RAY_AUTH_MODE"] = "disabled"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SMOKE = os.path.join(ROOT, "experiments", "sweeps", "smoke.yaml")


def write_spec(tmp_path, name, **changes) -> str:
    with open(SMOKE) as f:
        spec = yaml.safe_load(f)
    spec["name"] = name
    for key, value in changes.items():
        if key in ("trial", "set"):  # merged; search and scheduler are replaced
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.long
def test_smoke_sweep_every_trial_reports_then_resume(ray2, tmp_path, capsys):
    # The smoke sweep, shortened: 2 trials (the LR-schedule grid), 8 steps, FIFO.
    spec = write_spec(tmp_path, "smoke_test",
                      search={"learner.lr_values": {"grid": [[3.0e-3, 1.0e-3, 3.0e-4],
                                                             [3.0e-4, 1.0e-4, 3.0e-5]]},
                              "learner.lr_boundaries": [10, 20]},
                      trial={"steps": 8, "report_every": 4}, scheduler={"type": "fifo"})
    out = tmp_path / "out"
    assert main(["sweep", spec, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = pq.read_table(str(out / "results.parquet")).to_pylist()
    assert len(results) == 2
    assert summary["trials"] == 2 and summary["errored"] == 0 and summary["out"] == str(out)
    assert summary["best"]["trial_id"] in {r["trial_id"] for r in results}
    assert {json.loads(r["learner.lr_values"])[0] for r in results} == {3e-3, 3e-4}
    for row in results:
        assert row["status"] == "DONE" and row["final_step"] == 8 and row["reports"] == 2
        assert 0 < row["best_meta_loss_rolling"] < 10
    history = pq.read_table(str(out / "history.parquet")).to_pylist()
    for trial in {r["trial_id"] for r in results}:
        assert [h["step"] for h in history if h["trial_id"] == trial] == [4, 8]
    # Both trials report the LR of their own schedule (step < 10: the first value).
    assert sorted({round(h["lr"], 8) for h in history}) == [3e-4, 3e-3]
    width, height = png_size(out / "meta_loss.png")
    assert width > 400 and height > 300
    markdown = (out / "results.md").read_text()
    assert all(r["trial_id"] in markdown for r in results)
    # Every trial handed Tune checkpoints holding the orbax run folder.
    trial_dirs = [d for d in (out / "tune" / "smoke_test").iterdir() if d.is_dir()]
    assert len(trial_dirs) == 2
    for d in trial_dirs:
        checkpoints = sorted(d.glob("checkpoint_*"))
        assert checkpoints
        assert (checkpoints[-1] / "checkpoints" / "8").is_dir()
        assert json.loads((checkpoints[-1] / "sweep.json").read_text())["step"] == 8
        assert list(d.glob("events.out.tfevents.*"))  # Tune's TensorBoard files, by default

    # --resume of a finished sweep restores Tune's state and rewrites the outputs.
    (out / "results.md").unlink()
    assert main(["sweep", "--resume", str(out)]) == 0
    assert len(pq.read_table(str(out / "results.parquet"))) == 2
    assert (out / "results.md").exists()
    # A new sweep into a used folder is refused without touching it.
    assert main(["sweep", spec, "--out", str(out)]) == 2

    # From sweep to rule: the first-ranked trial's newest checkpoint, exported.
    best = pq.read_table(str(out / "results.parquet")).to_pylist()[0]
    assert best["checkpoint"].startswith(str(out / "tune" / "smoke_test"))
    capsys.readouterr()
    assert main(["export", "--best", str(out), "--out", str(tmp_path / "rule"), "--json"]) == 0
    captured = capsys.readouterr()
    exported = json.loads(captured.out.strip().splitlines()[-1])
    assert exported["step"] == 8 and f"best trial {best['trial_id']}" in captured.err
    assert main(["export", str(out), "--best", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "one of them" in capsys.readouterr().err


# Slow (about a minute of two trials' sessions): the smoke sweep above keeps Tune's
# trials, reports and resume in the default suite.
@pytest.mark.slow
def test_pbt_clones_a_trial_and_changes_its_config_mid_run(ray2, tmp_path):
    # Two trials, very different LRs; at step 4 PBT replaces the worse trial by a clone
    # of the better one's checkpoint, with mutated curriculum / LR values.
    spec = write_spec(
        tmp_path, "pbt_test",
        search={"learner.lr_values": {"grid": [[3.0e-3, 1.0e-3, 3.0e-4],
                                               [1.0e-5, 1.0e-5, 1.0e-5]]},
                "learner.lr_boundaries": [10, 20],
                "curriculum.truncations_std_start": {"uniform": [1.0, 4.0]}},
        # Each trial runs two sessions (before and after the perturbation point); on a
        # heavily loaded machine one can take minutes to start, so the per-session
        # time limit is not what ends them.
        trial={"steps": 8, "report_every": 4, "minutes": 20},
        # The metric is the reported learning rate (maximised), not the noisy meta-loss
        # of a few steps: the 1e-5 trial is then always the worse one at step 4.
        metric="lr", mode="max",
        # Synchronous PBT: each trial pauses at its first report at or past step 4 until
        # both have reported, then the worse one is cloned, whatever the timing.
        # (Asynchronous PBT decides as reports arrive; with two trials an exploit needs
        # the better one's checkpoint registered after the worse one's first report,
        # and trials this short can run past every perturbation point before that.)
        scheduler={"type": "pbt", "perturbation_interval": 4, "quantile_fraction": 0.5,
                   "resample_probability": 0.0, "synch": True,
                   "mutations": {
                       "curriculum.truncations_std_start": {"uniform": [1.0, 4.0]},
                       "learner.lr_values": {"choice": [[3.0e-3, 1.0e-3, 3.0e-4],
                                                        [1.0e-3, 3.0e-4, 1.0e-4],
                                                        [1.0e-5, 1.0e-5, 1.0e-5]]}}})
    out = tmp_path / "out"
    assert main(["sweep", spec, "--out", str(out)]) == 0
    history = pq.read_table(str(out / "history.parquet")).to_pylist()
    trials = {r["trial_id"] for r in history}
    assert len(trials) == 2
    clones = [(i, r) for i, r in enumerate(history)
              if r["restored_from"] and r["restored_from"] != r["trial_id"]]
    assert clones, "no trial was exploited"
    index, first = clones[0]
    trial, donor = first["trial_id"], first["restored_from"]
    assert donor in trials and donor != trial
    donor_steps = {r["step"] for r in history if r["trial_id"] == donor}
    # The clone continued the donor's step count from one of the donor's checkpoints.
    assert first["restored_step"] in donor_steps
    assert first["step"] > first["restored_step"] >= 4
    # ... under a config that changed mid-run (PBT scales the donor's float by 0.8 or 1.2).
    donor_row = next(r for r in history
                     if r["trial_id"] == donor and r["step"] == first["restored_step"])
    old_config, new_config = json.loads(donor_row["config"]), json.loads(first["config"])
    key = "curriculum.truncations_std_start"
    assert old_config[key] != new_config[key]
    # The clone's own reports before the exploit ran the worse (1e-5) schedule.
    before = [r for r in history[:index] if r["trial_id"] == trial]
    # (lr is the float32 value the optax schedule applies, as in test_learner.)
    assert before and all(r["lr"] == pytest.approx(1e-5, rel=1e-6) for r in before)
    # Tune's own PBT log: [target tag, clone tag, iterations, donor config, new config];
    # the new config it recorded is the one the clone reported with.
    policies = [json.loads(line) for line in
                (out / "tune" / "pbt_test" / "pbt_global.txt").read_text().splitlines()]
    assert any(p[5][key] == new_config[key] for p in policies)
    results = {r["trial_id"]: r for r in pq.read_table(str(out / "results.parquet")).to_pylist()}
    assert set(results) == trials
    assert results[trial]["exploits"] >= 1
    assert all(r["final_step"] == 8 and r["status"] == "DONE" for r in results.values())


def test_best_checkpoint_needs_a_finished_sweep_with_checkpoints(tmp_path):
    from metalearn.distributed.sweep import best_checkpoint

    with pytest.raises(FileNotFoundError, match="no results.parquet"):
        best_checkpoint(str(tmp_path))
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist([{"trial_id": "a", "checkpoint": ""},
                                         {"trial_id": "b", "checkpoint": str(tmp_path / "gone")}]),
                   str(tmp_path / "results.parquet"))
    with pytest.raises(FileNotFoundError, match="no trial has a checkpoint"):
        best_checkpoint(str(tmp_path))
    (tmp_path / "c").mkdir()
    pq.write_table(pa.Table.from_pylist([{"trial_id": "a", "checkpoint": ""},
                                         {"trial_id": "b", "checkpoint": str(tmp_path / "c")}]),
                   str(tmp_path / "results.parquet"))
    assert best_checkpoint(str(tmp_path)) == (str(tmp_path / "c"),
                                              {"trial_id": "b", "checkpoint": str(tmp_path / "c")})


def test_bad_spec_is_one_clear_line(tmp_path, capsys):
    spec = write_spec(tmp_path, "bad", search={"learner.meta_bach": 3})
    assert main(["sweep", spec, "--out", str(tmp_path / "o")]) == 2
    assert "learner.meta_bach" in capsys.readouterr().err
    spec = write_spec(tmp_path, "bad2", search={"learner.meta_batch": {"pick": [1, 2]}})
    assert main(["sweep", spec, "--out", str(tmp_path / "o")]) == 2
    assert "search.learner.meta_batch" in capsys.readouterr().err
    # A misspelt scheduler option is refused, not silently ignored.
    spec = write_spec(tmp_path, "bad3", scheduler={
        "type": "pbt", "sync": True,
        "mutations": {"curriculum.truncations_std_start": {"uniform": [1.0, 4.0]}}})
    assert main(["sweep", spec, "--out", str(tmp_path / "o")]) == 2
    assert "scheduler.sync" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["sweep", "--resume", str(tmp_path / "none")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["sweep", "--out", str(tmp_path / "x")]) == 2
    assert "give a SPEC file (or --resume SWEEP_DIR)" in capsys.readouterr().err


def test_metric_must_be_a_reported_column(tmp_path, capsys):
    from metalearn.distributed.sweep_spec import load_spec

    # The smoke sweep runs no evaluator: a held-out metric is refused at load time.
    spec = write_spec(tmp_path, "heldout_off", metric="eval/two_moons/accuracy@1000",
                      mode="max")
    assert main(["sweep", spec, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "metric: 'eval/two_moons/accuracy@1000' is not a column" in err
    assert "evaluator.enabled: true" in err
    # With the evaluator on, a horizon it does not measure is named with what it writes.
    on = {"evaluator.enabled": True, "evaluator.datasets": ["two_moons"],
          "evaluator.horizons": [100, 300], "evaluator.long_every": 50}
    spec = write_spec(tmp_path, "heldout_h", metric="eval/two_moons/accuracy@1000",
                      mode="max", set=on)
    with pytest.raises(ConfigError, match=r"metric: .*eval/two_moons/accuracy@300"):
        load_spec(spec)
    spec = write_spec(tmp_path, "typo", metric="meta_los")
    with pytest.raises(ConfigError, match="metric: 'meta_los' is not a column.*meta_loss"):
        load_spec(spec)
    ok = load_spec(write_spec(tmp_path, "heldout_ok", metric="eval/two_moons/rank90@300",
                              mode="max", set=on))
    assert ok.metric == "eval/two_moons/rank90@300"
    for metric in ("lr", "loss/digits", "worker_failures"):  # training and report columns
        assert load_spec(write_spec(tmp_path, "m", metric=metric)).metric == metric


@pytest.mark.parametrize("name", ["curriculum", "estimators", "lr_schedule", "meta_batch",
                                  "pbt", "rule_size"])
def test_comparing_sweeps_rank_by_held_out_accuracy(name):
    from metalearn.distributed.sweep_spec import load_spec, trial_config

    spec = load_spec(os.path.join(ROOT, "experiments", "sweeps", f"{name}.yaml"))
    # ranked on the validation split, never on the reported test split
    assert spec.metric == "eval/fashion_mnist_val/accuracy@1000" and spec.mode == "max"
    evaluator = trial_config(spec, {}).evaluator
    assert evaluator.enabled and evaluator.long_every > 0 and 1000 in evaluator.horizons


def test_estimator_sweep_gives_every_estimator_the_same_seeds_and_budget():
    from metalearn.core.config import ESTIMATORS
    from metalearn.distributed.sweep_spec import load_spec, trial_config

    spec = load_spec(os.path.join(ROOT, "experiments", "sweeps", "estimators.yaml"))
    trials = [(e, s) for e in ESTIMATORS for s in (0, 1)]
    configs = {t: trial_config(spec, {"estimator.kind": t[0], "learner.seed": t[1]})
               for t in trials}
    assert {c.estimator.kind for c in configs.values()} == set(ESTIMATORS)
    # Only the estimator and the seed differ between trials.
    for (estimator, seed), config in configs.items():
        base = configs[("truncated", seed)]
        assert dataclasses.replace(config, estimator=base.estimator) == base
    assert spec.scheduler.type == "fifo"  # no trial is stopped early


class _Loop:
    """What TrialReporter uses of a TrainingLoop."""

    def __init__(self, metrics, step):
        self.metrics, self.step = metrics, step
        self.worker_failures = self.learner_restarts = 0

    def checkpoint(self):
        return self.step


class _Run:
    def copy_to(self, folder, up_to_step):
        pass


def test_reports_carry_the_newest_evaluation_and_the_final_one(tmp_path, monkeypatch):
    from metalearn.distributed import sweep
    from metalearn.distributed.sweep_spec import load_spec
    from metalearn.training.metrics import MetricsLog
    from metalearn.training.run_dir import RunDir

    metric = "eval/two_moons/accuracy@3"
    spec = load_spec(write_spec(
        tmp_path, "rep", metric=metric, mode="max",
        set={"evaluator.enabled": True, "evaluator.datasets": ["two_moons"],
             "evaluator.horizons": [3], "evaluator.long_every": 2},
        trial={"steps": 6, "report_every": 2}))
    reports = []
    monkeypatch.setattr(sweep.tune, "report",
                        lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(sweep.tune.Checkpoint, "from_directory", staticmethod(lambda d: d))
    (tmp_path / "run").mkdir()
    log = MetricsLog(RunDir(tmp_path / "run"), tensorboard=False)
    reporter = sweep.TrialReporter(spec, _Run(), "t1", 0, {"trial_id": "t1"})
    loop = _Loop(log, 0)
    for step in range(1, 7):
        row = {"step": step, "meta_loss": 1.0}
        log.add(row)
        loop.step = step
        if step == 3:  # the evaluation of step 3 finishes while step 3 is handled
            log.merge({"step": 3, metric: 0.7, "eval_long_s": 1.0})
        reporter.on_row(loop, row)
    # Step 2: not measured yet (NaN, as Tune needs the metric in every report); step 4
    # carries step 3's evaluation; the done report waits for the end of the run.
    assert [r["step"] for r in reports] == [2, 4]
    assert np.isnan(reports[0][metric])
    assert reports[1][metric] == 0.7 and reports[1]["eval_step"] == 3
    log.merge({"step": 6, metric: 0.8})  # the final evaluation (the evaluator's on_end)
    reporter.on_end(loop)
    assert reports[-1]["step"] == 6 and reports[-1]["done"]
    assert reports[-1][metric] == 0.8 and reports[-1]["eval_step"] == 6


def test_a_sweep_ranking_on_missing_data_stops_before_any_trial(ray2, tmp_path, capsys):
    gone = f"file:{tmp_path}/heldout.npz"
    on = {"evaluator.enabled": True, "evaluator.datasets": [gone],
          "evaluator.horizons": [100], "evaluator.long_every": 50}
    spec = write_spec(tmp_path, "missing", metric=f"eval/{gone}/accuracy@100", mode="max",
                      set=on)
    assert main(["sweep", spec, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"metalearn: error: sweep missing needs the source '{gone}'")
    assert "missing on node" in err[-1]
    assert not (tmp_path / "o").exists()  # nothing written, nothing to clean up


def test_optuna_specs_are_checked_when_loaded(tmp_path):
    from metalearn.distributed.sweep_spec import load_spec

    optuna = {"type": "optuna", "sampler": "tpe", "seed": 3}
    # The smoke spec searches grids of lists: Optuna samples single values.
    with pytest.raises(ConfigError, match="search.curriculum.unroll_start: grid enumerates"):
        load_spec(write_spec(tmp_path, "o1", search_alg=optuna))
    lists = {"learner.lr_values": {"choice": [[1e-3, 1e-4, 1e-5], [3e-3, 3e-4, 3e-5]]},
             "learner.lr_boundaries": [10, 20]}
    with pytest.raises(ConfigError, match="not lists"):
        load_spec(write_spec(tmp_path, "o2", search_alg=optuna, search=lists))
    scalar = {"learner.clip_norm": {"loguniform": [0.5, 8.0]},
              "curriculum.unroll_ramp_steps": {"choice": [10, 20]}}
    with pytest.raises(ConfigError, match="scheduler pbt"):
        load_spec(write_spec(tmp_path, "o3", search_alg=optuna, search=scalar,
                             scheduler={"type": "pbt", "mutations": {
                                 "learner.clip_norm": {"uniform": [1.0, 4.0]}}}))
    with pytest.raises(ConfigError, match="search_alg.sampler"):
        load_spec(write_spec(tmp_path, "o4", search_alg={"type": "optuna", "sampler": "tp"},
                             search=scalar))
    spec = load_spec(write_spec(tmp_path, "ok", search_alg=optuna, search=scalar))
    assert spec.search_alg.type == "optuna" and spec.search_alg.seed == 3
    from metalearn.distributed.sweep import search_algorithm
    assert type(search_algorithm(spec)).__name__ == "OptunaSearch"
    assert search_algorithm(load_spec(SMOKE)) is None


@pytest.mark.long
def test_an_optuna_sweep_runs_its_trials(ray2, tmp_path):
    spec = write_spec(tmp_path, "optuna_test", search_alg={"type": "optuna", "seed": 0},
                      search={"learner.clip_norm": {"loguniform": [0.5, 8.0]}},
                      num_samples=2, trial={"steps": 4, "report_every": 4},
                      scheduler={"type": "fifo"})
    out = tmp_path / "out"
    assert main(["sweep", spec, "--out", str(out)]) == 0
    results = pq.read_table(str(out / "results.parquet")).to_pylist()
    assert [r["status"] for r in results] == ["DONE", "DONE"]
    clips = [r["learner.clip_norm"] for r in results]
    assert all(0.5 <= c <= 8.0 for c in clips) and clips[0] != clips[1]
