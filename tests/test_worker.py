"""Worker logic without Ray: seeded task streams, truncations, theta versions."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metalearn.training.config import ArchitectureOverrides
from metalearn.training.learner import Learner
from metalearn.training.messages import Submission
from metalearn.training.schedules import Curriculum
from metalearn.core.update_rule import init_theta
from metalearn.core.config_io import to_dict
from metalearn.training.task_mix import resolve_mix
from metalearn.training.worker import Worker, enable_compilation_cache
from train_helpers import tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("tiny"))
    enable_compilation_cache(config.worker.compilation_cache)  # as worker actors do
    theta = np.asarray(ravel_pytree(init_theta(jax.random.key(0), config.rule))[0])
    return config, theta


def make_worker(config, theta, seed=7, index=0):
    worker = Worker(config, index, seed)
    worker.set_theta("gen", 3, theta)
    return worker


def test_truncations_carry_phi_then_new_task(setup):
    config, theta = setup
    worker = make_worker(config, theta)
    assert not worker.needs_theta("gen", 3) and worker.needs_theta("gen", 4)
    curriculum = Curriculum(2, 2, 2.0, min_truncations=3)
    subs = [worker.run_truncation(curriculum) for _ in range(4)]
    for s in subs:
        assert isinstance(s, Submission) and s.grad.dtype == np.float32
        assert s.grad.shape == theta.shape and np.isfinite(s.grad).all() and s.finite
        assert (s.version, s.generation, s.num_steps, s.dataset) == (3, "gen", 2, "digits")
        assert s.timings["grad_s"] > 0 and s.metadata["arch"] == [64, 8, 8]
    seeds = [s.metadata["task_seed"] for s in subs]
    counts = [s.metadata["truncation"] for s in subs]
    # Truncations of one task share its seed; the count restarts with a new task.
    assert counts[0] == 1 and counts[1] == 2 and seeds[1] == seeds[0]
    # The task's starting loss is its first truncation's first step, kept for the task.
    assert np.isfinite(subs[0].loss_start) and subs[1].loss_start == subs[0].loss_start
    assert subs[-1].loss_start != subs[0].loss_start
    # The second truncation's data was built while the first computed; a new task's not.
    assert [s.timings["prefetched"] for s in subs] == [0.0, 1.0, 1.0, 0.0]
    assert counts[-1] == 1 and seeds[-1] != seeds[0]
    # The learner accepts these gradients and applies them.
    learner = Learner(theta, config.learner, config.curriculum, generation="gen")
    learner.current = learner.current._replace(version=3)
    rows = [learner.submit(s) for s in subs]
    assert rows[1] is not None and rows[1]["step"] == 1
    assert not np.array_equal(learner.theta, theta)


def test_stream_is_seeded_and_reseed_draws_new_tasks(setup):
    config, theta = setup
    curriculum = Curriculum(2, 2, 2.0)
    a = make_worker(config, theta, seed=11).run_truncation(curriculum)
    b = make_worker(config, theta, seed=11).run_truncation(curriculum)
    assert a.metadata["task_seed"] == b.metadata["task_seed"]
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    worker = make_worker(config, theta, seed=11)
    worker.reseed(12)
    c = worker.run_truncation(curriculum)
    assert c.metadata["task_seed"] != a.metadata["task_seed"]


def test_nonfinite_theta_gives_nonfinite_submission_and_new_task(setup):
    config, theta = setup
    worker = make_worker(config, theta)
    bad = theta.copy()
    bad[:] = np.nan
    worker.set_theta("gen", 4, bad)
    first = worker.run_truncation(Curriculum(2, 2, 50.0))
    assert not first.finite
    worker.set_theta("gen", 5, theta)
    second = worker.run_truncation(Curriculum(2, 2, 50.0))
    assert second.finite and second.metadata["truncation"] == 1
    assert second.metadata["task_seed"] != first.metadata["task_seed"]
    learner = Learner(theta, config.learner, config.curriculum, generation="gen")
    learner.current = learner.current._replace(version=4)
    assert learner.submit(first) is None
    assert learner.counters["dropped_nonfinite"] == 1


def test_theta_of_wrong_size_rejected(setup):
    config, theta = setup
    worker = Worker(config, 0, 1)
    with pytest.raises(ValueError, match="parameters"):
        worker.set_theta("gen", 0, theta[:-1])
    with pytest.raises(RuntimeError, match="no theta"):
        Worker(config, 0, 1).run_truncation(Curriculum(2, 2, 1.0))


def test_mix_overrides_bound_shapes(setup):
    config, _ = setup
    import dataclasses
    tasks = dataclasses.replace(config.tasks, ways=(2,), architecture=ArchitectureOverrides(max_width=16))
    mix = to_dict(resolve_mix(tasks))
    assert mix["components"][0]["ways"] == [2]
    assert mix["architecture"]["max_width"] == 16 and mix["architecture"]["min_width"] == 8


def test_vmapped_worker_submits_the_mean_of_its_tasks_gradients(setup, tmp_path):
    import dataclasses

    from metalearn.core.base_model import init_params
    from metalearn.core.unroll import make_meta_gradient

    config, theta = setup
    config = dataclasses.replace(
        config, worker=dataclasses.replace(config.worker, tasks_per_worker=3))
    worker = make_worker(config, theta, seed=5)
    sub = worker.run_truncation(Curriculum(2, 2, 2.0, min_truncations=2))
    assert (sub.count, sub.nonfinite_tasks, sub.finite) == (3, 0, True)
    seeds = sub.metadata["task_seeds"]
    assert len(set(seeds)) == 3 and seeds[0] == sub.metadata["task_seed"]
    # Rebuild the three tasks (same seeds, same first batches) and run them one by one.
    first = worker.sampler.sample(seeds[0])
    tasks = [first] + [worker.sampler.sample(s, like=first) for s in seeds[1:]]
    assert {(t.arch, t.num_classes, t.num_targets) for t in tasks} == {
        (first.arch, first.num_classes, first.num_targets)}
    assert len({tuple(t.classes) for t in tasks}) > 1  # different tasks, one shape
    single = make_meta_gradient(first.arch.activation, config.rule, config.objective,
                                config.unroll)
    theta_tree = worker.theta
    grads, losses = [], []
    for task, seed in zip(tasks, seeds):
        params = init_params(jax.random.key(seed % (2 ** 31)), first.arch,
                             w_std=config.rule.init_w_std, b_std=config.rule.init_b_std)
        o = config.objective
        result = single(theta_tree, params, task.truncation_batch(
            2, config.worker.batch_size, o.num_draws, o.samples_per_class))
        grads.append(np.asarray(ravel_pytree(result.grad)[0]))
        losses.append(float(result.loss))
    np.testing.assert_allclose(sub.metadata["task_losses"], losses, rtol=1e-4)
    np.testing.assert_allclose(sub.loss, np.mean(losses), rtol=1e-4)
    np.testing.assert_allclose(sub.grad, np.mean(grads, axis=0), rtol=2e-3, atol=1e-6)
    # The group carries on together: the next truncation continues the same tasks.
    second = worker.run_truncation(Curriculum(2, 2, 2.0, min_truncations=2))
    assert second.metadata["task_seeds"] == seeds and second.metadata["truncation"] == 2
    # The learner counts it as three gradients of a meta-batch.
    learner = Learner(theta, dataclasses.replace(config.learner, meta_batch=4),
                      config.curriculum, generation="gen")
    learner.current = learner.current._replace(version=3)
    assert learner.submit(sub) is None and learner.counters["received"] == 3
    assert learner.submit(second)["step"] == 1


def test_task_lengths_follow_the_curriculum(setup):
    """Tasks a worker actually runs live round(N(s, s)) truncations (at least the minimum),
    each one exactly as long as drawn: the one task-length model (schedules.Curriculum)."""
    from scipy import stats

    config, theta = setup
    worker = make_worker(config, theta, seed=11)
    curriculum = Curriculum(1, 1, 3.0, min_truncations=1)
    runs: dict[int, list] = {}
    while len(runs) < 80:
        sub = worker.run_truncation(curriculum)
        meta = sub.metadata
        runs.setdefault(meta["task_seed"], []).append(
            (meta["truncation"], meta["task_truncations"], meta["task_steps"]))
    finished = list(runs.values())[:-1]  # the last task may still be running
    lengths = np.array([r[0][1] for r in finished])
    for r in finished:  # each task ran exactly its drawn number of truncations, in order
        assert [t for t, _, _ in r] == list(range(1, r[0][1] + 1))
        assert r[-1][2] == r[0][1]  # U = 1: inner steps = truncations
    drawn = np.array([curriculum.sample_truncations(np.random.default_rng([5, i]))
                      for i in range(4000)])
    assert stats.ks_2samp(lengths, drawn).pvalue > 0.01
    assert abs(lengths.mean() - curriculum.mean_truncations()) < 4 * lengths.std() / np.sqrt(
        lengths.size)
    assert lengths.min() >= 1


@pytest.mark.parametrize("estimator", [pytest.param("es", marks=pytest.mark.slow), "pes",
                                       pytest.param("hybrid", marks=pytest.mark.slow)])
def test_every_estimator_runs_on_a_vmapped_worker(setup, estimator):
    """ES-family estimators on T = 2 tasks of one shape: same tasks, data and center
    loss as truncated backprop on the same stream; their own state lives with the task."""
    import dataclasses

    config, theta = setup
    frozen = ("merge_w.w:hebb",)
    configs = {name: dataclasses.replace(
        config, estimator=dataclasses.replace(config.estimator, kind=name, pairs=2),
        worker=dataclasses.replace(config.worker, tasks_per_worker=2),
        learner=dataclasses.replace(config.learner, frozen=frozen))
        for name in ("truncated", estimator)}
    curriculum = Curriculum(2, 2, 2.0, min_truncations=3)
    runs = {}
    for name, cfg in configs.items():
        worker = make_worker(cfg, theta, seed=11)
        runs[name] = [worker.run_truncation(curriculum) for _ in range(3)]
    keep = ~worker.theta_spec.mask(frozen)
    for ref, sub in zip(runs["truncated"], runs[estimator]):
        assert (sub.count, sub.finite) == (2, True)
        assert sub.metadata["task_seeds"] == ref.metadata["task_seeds"]
        np.testing.assert_allclose(sub.loss, ref.loss, rtol=1e-4)  # the center trajectory
        assert np.isfinite(sub.grad).all() and np.abs(sub.grad[keep]).sum() > 0
        assert np.all(sub.grad[~keep] == 0)  # no perturbation of a frozen entry
        assert sub.estimator_metrics["grad_norm"] > 0
    metrics = [s.estimator_metrics for s in runs[estimator]]
    if estimator == "pes":  # the accumulator grows along the task
        assert metrics[0]["xi_norm"] < metrics[1]["xi_norm"] < metrics[2]["xi_norm"]
    if estimator == "hybrid":
        assert metrics[0]["w_bp"] == 0.5 and 0 <= metrics[2]["w_bp"] <= 1
        assert {"bp_norm", "es_norm", "bp_var", "es_var"} <= set(metrics[2])
    # The learner folds the estimator's metrics and the submissions' spread into its row.
    learner = Learner(theta, dataclasses.replace(config.learner, meta_batch=6),
                      config.curriculum, generation="gen")
    learner.current = learner.current._replace(version=3)
    rows = [learner.submit(s) for s in runs[estimator]]
    row = rows[-1]
    assert row["est/grad_norm"] == pytest.approx(np.mean([m["grad_norm"] for m in metrics]))
    assert row["grad_var"] > 0 and row["grad_snr"] > 0


@pytest.mark.parametrize("estimator", ["es_full", "guided_es"])
def test_full_horizon_worker_scores_whole_tasks_on_the_trainable_subspace(setup, estimator):
    """es_full / guided_es: one order is one whole task; every population member starts
    from the same phi_0 and data; the estimate lives on learner.trainable only."""
    import dataclasses

    from metalearn.core.config import HorizonConfig

    config, theta = setup
    cfg = dataclasses.replace(
        config, estimator=dataclasses.replace(config.estimator, kind=estimator, pairs=2,
                                              perturbation_std=0.3),
        horizon=HorizonConfig(steps=6, inner_lr=0.03, points=3, fitness="final",
                              surrogate_steps=2),
        learner=dataclasses.replace(config.learner, trainable=("merge_w",)))
    worker = make_worker(cfg, theta, seed=5)
    subs = [worker.run_truncation(Curriculum(2, 2, 2.0)) for _ in range(2)]
    keep = worker.theta_spec.mask(["merge_w"])
    assert keep.sum() == 13
    for sub in subs:
        assert (sub.count, sub.finite, sub.num_steps, sub.version) == (1, True, 6, 3)
        assert np.all(sub.grad[~keep] == 0) and np.abs(sub.grad[keep]).sum() > 0
        assert len(sub.metadata["fitness"]) == 4 and sub.metadata["points"] == [2, 4, 6]
        # the loss is the members' mean fitness (their final-point meta-objective)
        assert sub.loss == pytest.approx(np.mean(sub.metadata["fitness"]))
        assert np.isfinite(sub.loss_start) and sub.estimator_metrics["fitness_spread"] > 0
    assert subs[0].metadata["task_seed"] != subs[1].metadata["task_seed"]
    if estimator == "guided_es":  # the surrogate FIFO carries over to the next task
        assert "surrogate_cos" in subs[1].estimator_metrics
        assert worker._guides["relu"].surrogates.shape[0] == 2
    # The learner moves only the trainable subspace.
    learner = Learner(theta, dataclasses.replace(config.learner, meta_batch=2),
                      config.curriculum, generation="gen", trainable=keep)
    learner.current = learner.current._replace(version=3)
    row = [learner.submit(s) for s in subs][-1]
    assert row is not None and row["est/fitness_mean"] > 0
    moved = learner.theta != theta
    assert moved[keep].any() and not moved[~keep].any()
