"""`metalearn train` end to end on a local Ray (2 CPUs): runs, resume, faults, bad input."""

import os

import numpy as np
import pytest

from metalearn.training.runner import train
from metalearn.training.session import Session
from metalearn.cli import main
from metalearn.training.loop import Callback
from metalearn.core.config import ConfigError
from metalearn.training.config import config_to_yaml
from metalearn.training.metrics import read_metrics
from train_helpers import tiny_config

REQUIRED = ["step", "meta_loss", "grads_per_s", "staleness_mean", "dropped_stale",
            "dropped_nonfinite", "lr", "unroll_min", "unroll_max", "wall_s"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("config")
    path = directory / "tiny.yaml"
    path.write_text(config_to_yaml(tiny_config(directory)))
    return str(path)


def snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[path] = (os.path.getsize(path), os.path.getmtime(path))
    return out


def steps_of(run_dir) -> list[int]:
    return read_metrics(run_dir).column("step").to_pylist()


def test_train_then_resume_continues_step_count(ray_session, config_file, tmp_path):
    run_dir = str(tmp_path / "run")
    assert main(["train", "--config", config_file, "--out", run_dir, "--steps", "3",
                 "--tensorboard"]) == 0
    table = read_metrics(run_dir)
    assert set(REQUIRED) <= set(table.column_names)
    assert "loss/digits" in table.column_names
    assert table.column("step").to_pylist() == [1, 2, 3]
    assert np.isfinite(table.column("meta_loss").to_numpy()).all()
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.path.isdir(os.path.join(run_dir, "theta_latest"))
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    from metalearn.training.checkpoint import Checkpointer
    from metalearn.training.export import load_theta
    assert Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True).steps()[-1] == 3
    assert load_theta(run_dir)[2] == 3

    assert main(["train", "--resume", run_dir, "--steps", "5"]) == 0
    assert steps_of(run_dir) == [1, 2, 3, 4, 5]
    assert load_theta(run_dir)[2] == 5


def test_continuous_evaluation_writes_meta_test_columns(ray_session, tmp_path):
    from metalearn.distributed.driver import RAY

    config = tiny_config(tmp_path, evaluator={
        "enabled": True, "every": 2, "datasets": ["two_moons"],
        "width": 8, "depth": 1, "steps": 2, "seeds": 1, "batch_size": 16, "test_size": 40,
        "horizons": [3], "long_every": 4},
        run={"steps": 6, "minutes": 6.0})  # slack for a loaded CI machine
    run_dir = str(tmp_path / "run")
    train(Session.of(config, run_dir), RAY)
    table = read_metrics(run_dir).to_pylist()
    # merged, not appended; step 0 is the start, measured first (a row of its own)
    assert sorted(r["step"] for r in table) == [0, 1, 2, 3, 4, 5, 6]
    assert table[0]["step"] == 0 and table[0]["eval/two_moons/accuracy@3"] is not None
    # the best theta by validation is kept, with its score
    from metalearn.training.export import read_export_meta
    from metalearn.training.run_dir import RunDir
    best = read_export_meta(RunDir(run_dir).best)
    scores = [r["eval/two_moons/accuracy@3"] for r in table
              if r.get("eval/two_moons/accuracy@3") is not None]
    assert best["score"] == pytest.approx(max(scores))
    evaluated = [r for r in table if r.get("eval/two_moons/accuracy") is not None]
    assert evaluated, "no evaluation reached the metrics"
    for row in evaluated:
        assert 0.0 <= row["eval/two_moons/accuracy"] <= 1.0
        assert np.isfinite(row["eval/two_moons/meta_loss"])
        assert row["eval_s"] > 0
    # The end of the run measured the last theta, short and long.
    last = max(table, key=lambda r: r["step"])
    assert 0.0 <= last["eval/two_moons/accuracy"] <= 1.0
    assert 0.0 <= last["eval/two_moons/accuracy@3"] <= 1.0
    assert last["eval/two_moons/w_growth@3"] > 0 and last["eval_long_s"] > 0


# In the slow set: the short chaos run (tests/test_chaos.py) kills workers and the
# learner in the default suite and audits the whole run folder.
@pytest.mark.slow
def test_killed_worker_replaced_and_killed_learner_resumes(ray_session, tmp_path):
    from metalearn.distributed.driver import RAY

    config = tiny_config(tmp_path, learner={"meta_batch": 2, "checkpoint_minutes": 1e-5},
                         run={"steps": 6, "minutes": 4.0})
    killed = {}

    class Killer(Callback):
        def on_row(self, loop, row):
            import ray
            if row["step"] == 1 and "worker" not in killed:
                killed["worker"] = row["step"]
                ray.kill(loop.workers.workers[0], no_restart=False)
            if row["step"] == 3 and "learner" not in killed:
                killed["learner"] = row["step"]
                ray.kill(loop.learner.actor, no_restart=True)

    summary = train(Session.of(config, str(tmp_path / "faults")), RAY, callbacks=[Killer()])
    assert killed == {"worker": 1, "learner": 3}
    assert summary.worker_failures >= 1
    assert summary.learner_restarts == 1
    assert summary.final_step == 6
    # The learner checkpoints every update here, so it resumed at step 3 and the step
    # count continued: every step appears once in the metrics.
    assert steps_of(str(tmp_path / "faults")) == [1, 2, 3, 4, 5, 6]


def test_bad_inputs_are_clear_and_touch_nothing(config_file, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(config_file).read().replace("meta_batch:", "meta_bach:"))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown config key learner.meta_bach" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    not_run = tmp_path / "not_a_run"
    not_run.mkdir()
    (not_run / "notes.txt").write_text("hello")
    before = snapshot(not_run)
    assert main(["train", "--resume", str(not_run)]) == 2
    assert "not a metalearn run folder" in capsys.readouterr().err
    assert snapshot(not_run) == before

    assert main(["train", "--config", config_file, "--out", str(not_run)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert snapshot(not_run) == before


def test_resume_with_different_rule_shape_refused(config_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(open(config_file).read())
    (run_dir / "events.jsonl").write_text('{"event": "session_start", "step": 0}\n')
    before = snapshot(run_dir)
    assert main(["train", "--resume", str(run_dir), "--set", "rule.compute_h_size=7"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "parameters" in err
    assert snapshot(run_dir) == before
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert snapshot(run_dir) == before
    with pytest.raises(ConfigError):
        from metalearn.cli.train import resolve
        import argparse
        resolve(argparse.Namespace(resume=str(run_dir), config=None, out=None, minutes=None,
                                   steps=None, workers=None, address=None, runner=None,
                                   set=["rule.kernel=5"], tensorboard=False))


def test_bad_task_data_ends_the_run_in_seconds_with_one_line(config_file, tmp_path, capsys):
    import time
    mix = tmp_path / "mix.yaml"
    mix.write_text("components: [{source: 'file:gone.npz', ways: [2]}]\n")
    cases = [
        (["--set", "tasks.mix=tinyy"], "no packaged task mix named 'tinyy'"),
        (["--set", f"tasks.mix={mix}"], "components[0].source: data file"),
        (["--set", f"tasks.data_dir={tmp_path / 'nowhere'}"], "tasks.data_dir:"),
    ]
    for args, message in cases:
        started = time.monotonic()
        out = tmp_path / "run"
        assert main(["train", "--config", config_file, "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert time.monotonic() - started < 10 and not out.exists()


def test_workers_that_cannot_start_stop_the_run_with_the_cause(ray_session, tmp_path):
    """A node that cannot read a ``file:`` source the driver could: each worker's
    constructor fails there; the run stops with the node and the path, not a spin."""
    import dataclasses
    import time

    from metalearn.distributed.driver import RAY
    from metalearn.training.loop import WorkerStartError
    from metalearn.training.task_mix import resolve_mix

    config = tiny_config(tmp_path, run={"steps": 3, "minutes": 3.0})
    good = resolve_mix(config.tasks)
    component = dataclasses.replace(good.components[0], source="file:/nonexistent/x.npz")
    unreadable = dataclasses.replace(good, components=(component,))
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match=r"2 of 2 workers could not start; workers "
                                               r"0, 1: .*on node .*x\.npz"):
        train(Session.of(config, tmp_path / "run", mix=unreadable), RAY)
    assert time.monotonic() - started < 120
    # With on_start_failure: continue and no worker able to start, it stops all the same.
    config = tiny_config(tmp_path, run={"steps": 3, "minutes": 3.0},
                         worker={"num_workers": 2, "batch_size": 8,
                                 "on_start_failure": "continue"})
    with pytest.raises(WorkerStartError, match="2 of 2 workers could not start"):
        train(Session.of(config, tmp_path / "run2", mix=unreadable), RAY)


def test_mix_and_data_dir_flags_set_the_task_section(config_file, tmp_path, capsys):
    from metalearn.cli import build_parser
    from metalearn.cli.train import resolve

    (tmp_path / "tfds").mkdir()
    argv = ["train", "--config", config_file, "--out", str(tmp_path / "r"), "--mix", "tiny",
            "--data-dir", str(tmp_path / "tfds")]
    session = resolve(build_parser(argv).parse_args(argv))
    assert session.config.tasks.mix == "tiny"
    assert session.config.tasks.data_dir == str(tmp_path / "tfds")
    assert main(["train", "--config", config_file, "--out", str(tmp_path / "x"),
                 "--mix", str(tmp_path / "no_such_mix.yaml")]) == 2
    assert "no_such_mix.yaml" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tensorboard_is_on_in_the_packaged_config_and_can_be_turned_off(tmp_path):
    from metalearn.cli import build_parser
    from metalearn.cli.train import resolve
    from metalearn.training.config import load_config

    assert load_config(None).run.tensorboard is True  # the local default
    argv = ["train", "--out", str(tmp_path / "r"), "--no-tensorboard"]
    assert resolve(build_parser(argv).parse_args(argv)).config.run.tensorboard is False
