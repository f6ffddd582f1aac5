"""Orbax checkpoints of the learner: exact resume, crash-cut and unreadable steps."""

import os
import shutil
import warnings

import numpy as np
import pytest

from metalearn.core.theta import theta_spec
from metalearn.training.checkpoint import CheckpointWarning, Checkpointer
from metalearn.training.export import load_theta, save_run_theta
from metalearn.training.run_dir import RunDir
from metalearn.training.learner import Learner, Submission
from metalearn.training.config import CurriculumConfig, LearnerConfig

P = 40


def learner_with_steps(n_grads: int) -> Learner:
    learner = Learner(np.zeros(P, np.float32), LearnerConfig(meta_batch=3),
                      CurriculumConfig())
    rng = np.random.default_rng(0)
    for i in range(n_grads):
        learner.submit(Submission(rng.normal(size=P).astype(np.float32), learner.version,
                                  learner.generation, loss=float(i), dataset="glyphs"))
    return learner


def test_save_restore_exact(tmp_path):
    a = learner_with_steps(7)  # 2 updates, 1 buffered
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=2)
    ckpt.save(a.step, *a.state())
    ckpt.close()
    b = Learner(np.ones(P, np.float32), LearnerConfig(meta_batch=3), CurriculumConfig())
    reader = Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    step, arrays, meta = reader.restore_latest(b.state_template())
    b.load_state(arrays, meta, keep_generation=True)
    assert step == 2 and b.step == 2 and b._count == 1
    np.testing.assert_array_equal(a.theta, b.theta)
    # optax's NamedTuple states keep their types (restored against a target).
    assert type(b.opt_state[1]).__name__ == type(a.opt_state[1]).__name__
    g = np.full(P, 0.5, np.float32)
    for learner in (a, b):
        for _ in range(2):
            learner.submit(Submission(g, learner.version, learner.generation, 1.0))
    np.testing.assert_array_equal(a.theta, b.theta)
    assert a.step == b.step == 3


def test_crash_cut_and_unreadable_checkpoints_fall_back(tmp_path):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(3)
    ckpt = Checkpointer(directory, keep=3)
    ckpt.save(1, *learner.state())
    for _ in range(3):
        learner.submit(Submission(np.ones(P, np.float32), learner.version,
                                  learner.generation, 1.0))
    ckpt.save(2, *learner.state())
    ckpt.close()
    # A save killed mid-way leaves orbax's temporary folder: never a valid step.
    os.makedirs(os.path.join(directory, "3.orbax-checkpoint-tmp-1234", "state"))
    # Step 2 loses its array data (a crash after the rename / disk damage).
    for root, _, files in os.walk(os.path.join(directory, "2", "state")):
        for name in files:
            if not name.endswith("_METADATA"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    reader = Checkpointer(directory, read_only=True)
    assert reader.steps() == [1, 2]
    fresh = Learner(np.zeros(P, np.float32), LearnerConfig(meta_batch=3), CurriculumConfig())
    with pytest.warns(CheckpointWarning, match="falling back"):
        step, arrays, meta = reader.restore_latest(fresh.state_template())
    assert step == 1 and meta["step"] == 1
    shutil.rmtree(os.path.join(directory, "1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        assert Checkpointer(directory, read_only=True).restore_latest(
            fresh.state_template()) is None


def test_run_theta_roundtrip_in_the_export_format(tmp_path, tiny_rule):
    spec = theta_spec(tiny_rule)
    flat = np.arange(spec.num_params, dtype=np.float32)
    run = RunDir(tmp_path / "run")
    save_run_theta(run, flat, tiny_rule, step=12)
    save_run_theta(run, flat, tiny_rule, step=12)  # replaces the previous snapshot
    theta, rule, step = load_theta(run.path)
    assert rule == tiny_rule and step == 12
    np.testing.assert_array_equal(spec.ravel(theta), flat)
    assert sorted(os.listdir(run.path)) == [RunDir.THETA]  # no staging folder left
