"""The population engine (metalearn.core.population, metalearn.training.population):
K meta-steps of es_full with the optax update in one program, against FullHorizonES
and the Learner step by step, and the runner on real tasks."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.training.runner import train
from metalearn.training.session import Session
from metalearn.core.config import ConfigError, EstimatorConfig, HorizonConfig
from metalearn.core.full_horizon import FullHorizonES, HorizonData, evaluation_points
from metalearn.core.population import PopulationData, PopulationProgram
from metalearn.training.config import LearnerConfig, CurriculumConfig
from metalearn.training.learner import Learner, make_optimizer
from metalearn.training.messages import Submission
from metalearn.training.metrics import read_metrics
from test_full_horizon import N, PHI0, THETA, Linear, Target
from train_helpers import tiny_config

STEPS, POINTS, PAIRS, SIGMA = 12, 3, 4, 0.1
AT = evaluation_points(STEPS, POINTS)


def program(shaping="none", fitness="mean", learner=LearnerConfig(meta_batch=2),
            trainable=None, tasks_axis="auto"):
    estimator = EstimatorConfig("es_full", perturbation_std=SIGMA, pairs=PAIRS)
    horizon = HorizonConfig(steps=STEPS, points=POINTS, shaping=shaping, fitness=fitness)
    return PopulationProgram(Linear(), THETA, estimator, horizon, make_optimizer(learner), AT,
                             trainable=trainable, tasks_axis=tasks_axis)


def population_data(k, m, seed=0):
    """[K, M] tasks of the linear system: their own targets, phi_0 and keys."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, m, len(AT), N)).astype(np.float32)
    phi0 = np.broadcast_to(np.asarray(PHI0), (k, m, N)) + 0.1 * rng.normal(size=(k, m, N))
    keys = rng.integers(0, 2 ** 32, size=(k, m, 2), dtype=np.uint32)
    return PopulationData(phi0.astype(np.float32), np.zeros((k, m, STEPS, 1, N), np.float32),
                          Target(c), keys)


def task(data, k, m):
    return (data.phi0[k, m], data.inner_x[k, m], Target(data.pairs.c[k, m]), data.keys[k, m])


def eps_of(prog, key):
    """The program's perturbations for one task's key, as numpy [PAIRS, P]."""
    z = jax.random.normal(jnp.asarray(key), (PAIRS, prog.layout.theta_size), jnp.float32)
    return np.asarray(SIGMA * z * prog.layout.mask, np.float32)


@pytest.mark.parametrize("shaping,fitness", [("none", "mean"), ("normalize", "final"),
                                             ("ranks", "mean")])
def test_one_task_estimate_equals_full_horizon_es_with_the_same_perturbations(shaping,
                                                                             fitness):
    prog = program(shaping, fitness)
    data = population_data(1, 1, seed=3)
    phi0, inner, pairs, key = task(data, 0, 0)
    flat = jnp.concatenate([THETA["a"]])
    grad, fit, start, finite, metrics = jax.jit(prog.task_estimate)(flat, phi0, inner,
                                                                     pairs, key)
    reference = FullHorizonES(Linear(), THETA, prog.layout.config,
                              HorizonConfig(steps=STEPS, points=POINTS, shaping=shaping,
                                            fitness=fitness, population="vmap"))
    reference.perturbations = lambda seed, guide=None: eps_of(prog, key)
    estimate, _ = reference(THETA, jnp.asarray(phi0), HorizonData(inner, pairs, AT), 0)
    np.testing.assert_allclose(np.asarray(grad), estimate.grad, rtol=2e-5, atol=1e-6)
    assert np.abs(estimate.grad).max() > 1e-3  # a real signal, not zeros on both sides
    assert bool(finite) and estimate.finite
    np.testing.assert_allclose(float(fit), np.mean(estimate.fitness), rtol=1e-5)
    np.testing.assert_allclose(float(start), estimate.loss_start, rtol=1e-5)
    for name, value in estimate.metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-4)


@pytest.mark.parametrize("tasks_axis", ["map", "vmap"])
def test_k_meta_steps_equal_the_learner_step_by_step(tasks_axis):
    k, m = 3, 2
    config = LearnerConfig(meta_batch=m, lr_values=(0.05,), lr_boundaries=(), clip_norm=1.0)
    prog = program(learner=config, tasks_axis=tasks_axis)
    assert prog.tasks_axis == tasks_axis
    data = population_data(k, m, seed=1)
    flat = np.asarray(THETA["a"], np.float32)
    learner = Learner(flat, config, CurriculumConfig())
    estimate = jax.jit(prog.task_estimate)
    rows = []
    for step in range(k):
        for j in range(m):
            grad, fit, start, finite, _ = estimate(jnp.asarray(learner.theta),
                                                   *task(data, step, j))
            row = learner.submit(Submission(grad=np.asarray(grad), version=learner.version,
                                            generation=learner.generation, loss=float(fit),
                                            loss_start=float(start)))
        rows.append(row)
    fresh = Learner(flat, config, CurriculumConfig())
    theta, opt_state, stats = prog(jnp.asarray(flat), fresh.opt_state, data)
    np.testing.assert_allclose(np.asarray(theta), learner.theta, rtol=1e-5, atol=1e-7)
    assert not np.allclose(learner.theta, flat)
    assert stats.applied.tolist() == [True] * k and stats.count.tolist() == [m] * k
    absorbed = fresh.absorb(np.asarray(theta), opt_state, jax.tree.map(np.asarray, stats),
                            "linear")
    assert [r["step"] for r in absorbed] == [1, 2, 3] and fresh.step == 3
    for ours, theirs in zip(absorbed, rows):
        for column in ("meta_loss", "meta_loss_rolling", "loss_vs_start_rolling", "grad_norm",
                       "update_norm", "theta_norm", "lr", "received", "grad_var"):
            np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-4, atol=1e-7,
                                       err_msg=column)
    np.testing.assert_allclose(fresh.theta, learner.theta, rtol=1e-5, atol=1e-7)
    # The optimiser state carries over: a second call continues Adam's moments.
    np.testing.assert_equal(int(jax.tree.leaves(opt_state)[0]), k)


def test_limit_and_a_nonfinite_task_leave_theta_as_the_learner_would():
    k, m = 3, 3
    prog = program(learner=LearnerConfig(meta_batch=m))
    data = population_data(k, m, seed=2)
    c = np.array(data.pairs.c)
    c[0, 1] = np.nan  # step 0: one task of three is not finite
    c[1, :] = np.nan  # step 1: none is: no update
    data = data._replace(pairs=Target(c))
    flat = jnp.asarray(THETA["a"])
    opt_state = make_optimizer(LearnerConfig(meta_batch=m)).init(flat)
    theta, _, stats = prog(flat, opt_state, data, limit=2)
    assert stats.applied.tolist() == [True, False, False]  # step 2: past the limit
    assert stats.count.tolist()[:2] == [2, 0]
    assert stats.task_finite[0].tolist() == [True, False, True]
    np.testing.assert_array_equal(np.asarray(stats.theta[1]), np.asarray(stats.theta[0]))
    np.testing.assert_array_equal(np.asarray(theta), np.asarray(stats.theta[0]))
    assert np.isfinite(np.asarray(theta)).all() and not np.allclose(theta, flat)
    learner = Learner(np.asarray(flat), LearnerConfig(meta_batch=m), CurriculumConfig())
    rows = learner.absorb(np.asarray(theta), _, jax.tree.map(np.asarray, stats), "linear")
    assert [r["step"] for r in rows] == [1]
    # Every task of the two steps within the limit was received; 1 + 3 were not finite.
    assert learner.counters["received"] == 2 * m and learner.counters["dropped_nonfinite"] == 4


def test_the_program_refuses_a_truncation_estimator_and_mismatched_runs():
    with pytest.raises(ConfigError, match="es_full"):
        PopulationProgram(Linear(), THETA, EstimatorConfig("truncated"),
                          HorizonConfig(steps=STEPS, points=POINTS),
                          make_optimizer(LearnerConfig()), AT)
    prog = program()
    data = population_data(1, 1)
    short = data._replace(inner_x=data.inner_x[:, :, :5])
    with pytest.raises(ConfigError, match="last evaluation point is 12"):
        prog(jnp.asarray(THETA["a"]), make_optimizer(LearnerConfig()).init(THETA["a"]), short)


def population_config(tmp_path, **run):
    return tiny_config(tmp_path, estimator={"kind": "es_full", "pairs": 2,
                                         "perturbation_std": 0.3},
                       horizon={"steps": 6, "points": 2, "inner_lr": 0.03},
                       learner={"trainable": ["merge_w"], "meta_batch": 2,
                                "checkpoint_minutes": 10.0},
                       worker={"num_workers": 0, "batch_size": 8, "meta_steps": 2},
                       run={"minutes": 5.0, **run})


def test_population_runner_trains_resumes_and_writes_the_learner_columns(tmp_path):
    from metalearn.training.export import load_theta
    from metalearn.training.population import POPULATION
    from metalearn.training.run_dir import RunDir

    run_dir = tmp_path / "run"
    summary = train(Session.of(population_config(tmp_path, steps=3), run_dir), POPULATION)
    assert (summary.start_step, summary.final_step) == (0, 3)  # 2 + 1: the limit holds
    rows = read_metrics(str(run_dir)).to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["received"] for r in rows] == [2, 4, 6]
    for row in rows:
        assert math.isfinite(row["meta_loss"]) and row["grad_norm"] > 0
        assert row["staleness_max"] == 0 and math.isfinite(row["est/fitness_mean"])
        assert row["wall_s"] > 0 and math.isfinite(row["theta/merge_w/bias"])
    assert len({r["theta/merge_w/bias"] for r in rows}) == 3  # theta moved every step
    assert RunDir(run_dir).checkpoint_steps()[-1] == 3
    assert load_theta(str(run_dir))[2] == 3
    resumed = train(Session.of(population_config(tmp_path, steps=5), run_dir, resume=True),
                    POPULATION)
    assert (resumed.start_step, resumed.final_step) == (3, 5)
    assert [r["step"] for r in read_metrics(str(run_dir)).to_pylist()] == [1, 2, 3, 4, 5]


def test_population_runner_refuses_what_it_cannot_run(tmp_path):
    from metalearn.training.population import POPULATION

    config = tiny_config(tmp_path)  # truncated backprop
    with pytest.raises(ConfigError, match="es_full"):
        train(Session.of(config, tmp_path / "run"), POPULATION)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="num_workers"):
        train(Session.of(population_config(tmp_path).__class__(
            **{**population_config(tmp_path).__dict__,
               "worker": population_config(tmp_path).worker.__class__(
                   **{**population_config(tmp_path).worker.__dict__, "num_workers": 2})}),
            tmp_path / "run"), POPULATION)
    assert not (tmp_path / "run").exists()


def test_cli_runner_population_then_export(tmp_path, capsys):
    from metalearn.cli import main
    from metalearn.training.config import config_to_yaml
    from metalearn.training.run_dir import RunDir

    path = tmp_path / "pop.yaml"
    path.write_text(config_to_yaml(population_config(tmp_path, steps=2)))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run"),
                 "--runner", "population", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["final_step"] == 2 and summary["start_step"] == 0
    assert summary["run"] == str(tmp_path / "run") and summary["signal"] is None
    assert [r["step"] for r in read_metrics(str(tmp_path / "run")).to_pylist()] == [1, 2]
    assert RunDir(tmp_path / "run").read_config().run.runner == "population"
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0


def test_population_worker_submits_one_mean_of_its_tasks(tmp_path):
    from metalearn.core.theta import theta_spec
    from metalearn.training.config import trainable_mask
    from metalearn.training.export import run_start_theta
    from metalearn.training.worker import Worker

    config = population_config(tmp_path)
    config = config.__class__(**{**config.__dict__, "worker": config.worker.__class__(
        **{**config.worker.__dict__, "tasks_per_worker": 3})})
    worker = Worker(config, 0, 11)
    assert worker.population is not None
    spec = theta_spec(config.rule)
    flat = spec.ravel(run_start_theta(config))
    learner = Learner(flat, LearnerConfig(meta_batch=3, trainable=("merge_w",)),
                      CurriculumConfig())
    worker.set_theta(learner.generation, 0, flat)
    first = worker.run_truncation(None)
    assert first.count == 3 and first.nonfinite_tasks == 0 and first.finite
    assert len(first.metadata["task_seeds"]) == 3 and first.num_steps == 6
    trainable = trainable_mask(config.rule, config.learner)
    grad = np.asarray(first.grad)
    assert np.abs(grad[trainable]).max() > 0 and not grad[~trainable].any()
    assert first.timings["new_shape"] == 1.0 and first.timings["compile_s"] > 0
    second = worker.run_truncation(None)  # new tasks from the same stream: another estimate
    assert second.metadata["task_seeds"] != first.metadata["task_seeds"]
    assert not np.allclose(second.grad, first.grad)
    # The learner counts a submission of 3 task gradients three times toward its batch.
    assert learner.submit(first) is not None and learner.step == 1
    # A worker reseeded to the same stream draws the same tasks again.
    again = Worker(config, 0, 11)
    again.set_theta("g", 0, flat)
    np.testing.assert_allclose(again.run_truncation(None).grad, first.grad, rtol=1e-5,
                               atol=1e-8)


def test_population_workers_train_in_the_local_runner(tmp_path):
    from metalearn.training.local import LOCAL

    config = population_config(tmp_path, steps=2)
    config = config.__class__(**{**config.__dict__, "worker": config.worker.__class__(
        **{**config.worker.__dict__, "tasks_per_worker": 2, "num_workers": 1})})
    summary = train(Session.of(config, tmp_path / "run"), LOCAL)
    assert summary.final_step == 2
    rows = read_metrics(str(tmp_path / "run")).to_pylist()
    assert [r["received"] for r in rows] == [2, 4]


def test_population_runner_measures_the_start_before_its_first_call(tmp_path):
    from metalearn.training.population import POPULATION

    config = population_config(tmp_path, steps=4)
    config = config.__class__(**{**config.__dict__, "evaluator": config.evaluator.__class__(
        **{**config.evaluator.__dict__, "enabled": True, "every": 100, "long_every": 2,
           "datasets": ("two_moons",), "width": 8, "depth": 1, "steps": 2, "seeds": 1,
           "long_seeds": 1, "batch_size": 16, "test_size": 40, "horizons": (2, 3),
           "select_from": 2})})
    train(Session.of(config, tmp_path / "run"), POPULATION)
    rows = read_metrics(str(tmp_path / "run")).to_pylist()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # The start (step 0) is measured although the first call makes two updates at once;
    # then every call's end (2 updates, long_every 2).
    long = [r["step"] for r in rows if r.get("eval/two_moons/accuracy@3") is not None]
    assert long == [0, 2, 4]


def test_a_stuck_program_stops_the_run_with_its_checkpoint_and_says_why(tmp_path,
                                                                         monkeypatch):
    from metalearn.training import population
    from metalearn.training.run_dir import RunDir

    class NeverReady:  # what the XLA:CPU hang looks like from the host
        def is_ready(self):
            return False

    with pytest.raises(population.ProgramStuck, match="did not finish in 0 s"):
        population.wait_program(NeverReady(), 0.0)
    real_run = population.PopulationEngine.run
    calls = []

    def run(self, theta, opt_state, limit=None):
        calls.append(1)
        if len(calls) == 2:  # the second call hangs
            population.wait_program(NeverReady(), 0.0)
        return real_run(self, theta, opt_state, limit)

    monkeypatch.setattr(population.PopulationEngine, "run", run)
    with pytest.raises(population.ProgramStuck, match="--resume RUN --runner ray"):
        train(Session.of(population_config(tmp_path, steps=6), tmp_path / "run"),
              population.POPULATION)
    # The first call's two updates were checkpointed on the way out.
    assert RunDir(tmp_path / "run").checkpoint_steps()[-1] == 2
    assert [r["step"] for r in read_metrics(str(tmp_path / "run")).to_pylist()] == [1, 2]


DEVICES_CHECK = r"""
import sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
sys.path.insert(0, sys.argv[1])
import jax.numpy as jnp
import numpy as np
from metalearn.core.config import ConfigError, EstimatorConfig, HorizonConfig
from metalearn.core.population import PopulationData, PopulationProgram
from metalearn.training.config import LearnerConfig
from metalearn.training.learner import make_optimizer
import test_population as tp

config = LearnerConfig(meta_batch=4, lr_values=(0.05,), lr_boundaries=(), clip_norm=1.0)
unroll = EstimatorConfig("es_full", perturbation_std=tp.SIGMA, pairs=tp.PAIRS)
horizon = HorizonConfig(steps=tp.STEPS, points=tp.POINTS)
flat = np.asarray(tp.THETA["a"], np.float32)
data = tp.population_data(3, 4, seed=5)
out = {}
for name, devices in (("one", None), ("two", jax.devices()[:2])):
    prog = PopulationProgram(tp.Linear(), tp.THETA, unroll, horizon, make_optimizer(config),
                             tp.AT, tasks_axis="map", devices=devices)
    opt = make_optimizer(config).init(jnp.asarray(flat))
    theta, _, stats = prog(flat, opt, data)
    batch = prog.estimate(flat, jax.tree.map(lambda a: a[0], data))
    out[name] = (np.asarray(theta), np.asarray(stats.loss), np.asarray(batch.grad))
    if devices:
        assert len(theta.sharding.device_set) == 2, theta.sharding
        text = prog.lower(flat, opt, data).as_text()
        assert "num_partitions = 2" in text, "the program is not split over 2 devices"
        try:
            prog(flat, opt, tp.population_data(3, 3, seed=5))
        except ConfigError as err:
            assert "do not split evenly over 2 devices" in str(err), err
        else:
            raise AssertionError("3 tasks over 2 devices were accepted")
for one, two in zip(out["one"], out["two"]):
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-7)
assert not np.allclose(out["one"][0], flat)
print("devices ok")
"""


def test_tasks_split_over_two_devices_give_the_one_device_result(tmp_path):
    # A fresh process: the number of CPU devices is fixed when JAX starts.
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", DEVICES_CHECK, here], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "devices ok" in done.stdout
