"""Resume keeps provenance: a changed config is refused unless asked for, budget and
placement may change freely, and every session's config is kept in ``RUN/configs/``."""

import hashlib
import os

import pytest

from metalearn.cli import build_parser, main
from metalearn.cli.train import resolve
from metalearn.core.config_io import ConfigError
from metalearn.training.config import config_to_yaml
from metalearn.training.events import append_event
from metalearn.training.run_dir import RunDir
from metalearn.training.session import config_changes, resume_free
from train_helpers import tiny_config


def folder_hashes(folder) -> dict:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = ""
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fake_run(tmp_path, step: int = 3):
    """A run folder as ``RunDir.create`` leaves it, with a (fake) checkpoint at ``step``."""
    config = tiny_config(tmp_path)
    run = RunDir(tmp_path / "run")
    run.create(config)
    os.makedirs(os.path.join(run.checkpoints, str(step), "state"))
    with open(os.path.join(run.checkpoints, str(step), "state", "data"), "wb") as f:
        f.write(b"checkpoint bytes")
    return config, run


def session_of(argv):
    return resolve(build_parser(argv).parse_args(argv))


def test_new_run_keeps_its_config_as_session_000(tmp_path):
    config = tiny_config(tmp_path)
    run = RunDir(tmp_path / "run")
    run.create(config)
    [(number, step, path)] = run.config_history()
    assert (number, step, os.path.basename(path)) == (0, 0, "000-step0.yaml")
    with open(path) as f, open(run.config_path) as g:
        assert f.read() == g.read() == config_to_yaml(config)


def test_changed_config_is_refused_with_the_keys_and_touches_nothing(tmp_path, capsys):
    _, run = fake_run(tmp_path)
    before = folder_hashes(run.path)
    argv = ["train", "--resume", run.path, "--set", "learner.meta_batch=4",
            "--set", "estimator.kind=pes", "--set", "curriculum.unroll_end=[2,3]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metalearn: error: cannot resume"), err
    assert "learner.meta_batch 2 -> 4" in err
    assert "estimator.kind 'truncated' -> 'pes'" in err
    assert "curriculum.unroll_end [2, 2] -> [2, 3]" in err
    assert "--allow-config-change" in err and os.path.join(run.path, "configs") in err
    assert folder_hashes(run.path) == before
    # A --config file that differs from the run's is a change just the same.
    other = tmp_path / "other.yaml"
    other.write_text(config_to_yaml(tiny_config(tmp_path, learner={"clip_norm": 1.0})))
    assert main(["train", "--resume", run.path, "--config", str(other)]) == 2
    assert "learner.clip_norm 5.0 -> 1.0" in capsys.readouterr().err
    assert folder_hashes(run.path) == before


def test_budget_and_placement_change_freely(tmp_path):
    config, run = fake_run(tmp_path)
    before = folder_hashes(run.path)
    session = session_of(["train", "--resume", run.path, "--minutes", "7", "--steps", "9",
                          "--workers", "1", "--runner", "local", "--tensorboard",
                          "--address", "local",
                          "--set", "run.progress_every_s=5", "--set", "run.metrics_flush_s=3",
                          "--set", "worker.compilation_cache=none",
                          "--set", "learner.checkpoint_minutes=0.5",
                          "--set", "learner.keep_checkpoints=5",
                          "--set", "evaluator.enabled=true"])
    assert session.resume and not session.changes
    assert (session.config.run.minutes, session.config.run.steps,
            session.config.worker.num_workers) == (7.0, 9, 1)
    assert folder_hashes(run.path) == before  # resolving writes nothing
    for key in ("run.minutes", "run.address", "worker.num_workers", "evaluator.every",
                "tasks.data_dir"):
        assert resume_free(key)
    for key in ("learner.meta_batch", "worker.batch_size", "worker.seed", "tasks.mix",
                "worker.tasks_per_worker", "rule.kernel", "runner", "learner.seed"):
        assert not resume_free(key)
    assert config_changes(config, config) == []


def test_allowed_change_keeps_both_configs(tmp_path, capsys):
    config, run = fake_run(tmp_path, step=3)
    old = open(run.config_path).read()
    session = session_of(["train", "--resume", run.path, "--set", "learner.meta_batch=4",
                          "--allow-config-change", "--steps", "6"])
    assert "resuming" in capsys.readouterr().err
    assert session.changes == (("learner.meta_batch", 2, 4),)
    session.run.create(session.config)  # what both runners do first
    history = [(n, s, os.path.basename(p)) for n, s, p in run.config_history()]
    assert history == [(0, 0, "000-step0.yaml"), (1, 3, "001-step3.yaml")]
    assert open(run.config_history()[0][2]).read() == old
    new = config_to_yaml(session.config)
    assert open(run.config_history()[1][2]).read() == open(run.config_path).read() == new
    assert "meta_batch: 4" in new
    # The next resume starts from the new config: the same change is no change now.
    os.makedirs(os.path.join(run.checkpoints, "6"))
    session = session_of(["train", "--resume", run.path, "--steps", "8"])
    assert session.config.learner.meta_batch == 4 and not session.changes
    session.run.create(session.config)
    assert [os.path.basename(p) for _, _, p in run.config_history()][-1] == "002-step6.yaml"


def test_run_from_before_the_history_keeps_its_config_first(tmp_path):
    config, run = fake_run(tmp_path)
    for _, _, path in run.config_history():
        os.unlink(path)
    os.rmdir(run.configs)
    old = open(run.config_path).read()
    session = session_of(["train", "--resume", run.path, "--steps", "5"])
    session.run.create(session.config)
    history = [(n, s, os.path.basename(p)) for n, s, p in run.config_history()]
    assert history == [(0, 0, "000-step0.yaml"), (1, 3, "001-step3.yaml")]
    assert open(run.config_history()[0][2]).read() == old


def test_theta_shape_change_is_refused_even_when_allowed(tmp_path):
    _, run = fake_run(tmp_path)
    with pytest.raises(ConfigError, match="parameters"):
        session_of(["train", "--resume", run.path, "--set", "rule.compute_h_size=7",
                    "--allow-config-change"])


def test_copy_keeps_the_sessions_up_to_its_step(tmp_path):
    config, run = fake_run(tmp_path, step=3)
    os.makedirs(os.path.join(run.checkpoints, "8"))
    run.create(config)  # session 001 from step 8
    dest = tmp_path / "copy"
    run.copy_to(str(dest), up_to_step=3)
    assert sorted(os.listdir(dest / "configs")) == ["000-step0.yaml"]
    assert sorted(os.listdir(dest / "checkpoints")) == ["3"]


def test_a_run_stopped_before_its_first_session_starts_again_in_its_folder(tmp_path, capsys):
    # As a run interrupted while it scores its start candidates leaves it: the config
    # and a chosen start, no checkpoint, no session started.
    config = tiny_config(tmp_path)
    run = RunDir(tmp_path / "run")
    run.create(config)
    append_event(run.path, "start_chosen", candidate=1, candidates=3)
    before = folder_hashes(run.path)
    session = session_of(["train", "--resume", run.path, "--minutes", "3"])
    assert not session.resume and session.run.path == run.path
    assert session.config.run.minutes == 3.0
    assert "starting it again in the same folder" in capsys.readouterr().err
    assert folder_hashes(run.path) == before  # resolving writes nothing
    # Once a session has started, a missing checkpoint is a damaged run: refused.
    append_event(run.path, "session_start", step=0, resume=False)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        session_of(["train", "--resume", run.path])
