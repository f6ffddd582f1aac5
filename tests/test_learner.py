"""Learner logic without Ray: staleness, non-finite drops, meta-batching, schedule, state."""

import dataclasses

import numpy as np
import optax
import pytest

from metalearn.training.learner import Learner, lr_schedule, make_optimizer
from metalearn.training.messages import Submission
from metalearn.training.schedules import curriculum_at
from metalearn.training.config import CurriculumConfig, LearnerConfig

P = 50


def make_learner(**overrides) -> Learner:
    config = LearnerConfig(**{"meta_batch": 4, "max_staleness": 2, "loss_window": 8,
                              **overrides})
    theta = np.linspace(-1, 1, P).astype(np.float32)
    return Learner(theta, config, CurriculumConfig(unroll_ramp_steps=10,
                                                   truncations_ramp_steps=10))


def sub(learner, grad=None, version=None, loss=1.0, **kw) -> Submission:
    grad = np.ones(P, np.float32) if grad is None else grad
    return Submission(grad=grad, version=learner.version if version is None else version,
                      generation=kw.pop("generation", learner.generation), loss=loss, **kw)


def test_meta_batch_applies_mean_with_adam():
    learner = make_learner()
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=P).astype(np.float32) for _ in range(4)]
    theta0 = learner.theta.copy()
    rows = [learner.submit(sub(learner, g, loss=i)) for i, g in enumerate(grads)]
    assert rows[:3] == [None, None, None]
    row = rows[3]
    assert row["step"] == 1 and learner.step == 1 and learner.version == 1
    assert row["meta_loss"] == pytest.approx(1.5)
    # Same update as optax applied directly to the mean gradient.
    opt = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(3e-4))
    mean = np.mean(grads, axis=0)
    updates, _ = opt.update(mean, opt.init(theta0), theta0)
    np.testing.assert_allclose(learner.theta, theta0 + np.asarray(updates), rtol=1e-5,
                               atol=1e-7)
    assert row["lr"] == pytest.approx(3e-4)
    assert learner.counters["applied"] == 4


def test_stale_gradient_dropped_and_counted():
    learner = make_learner(meta_batch=1)
    for _ in range(3):
        learner.submit(sub(learner))
    assert learner.version == 3
    theta = learner.theta.copy()
    assert learner.submit(sub(learner, version=0)) is None  # staleness 3 > 2
    assert learner.counters["dropped_stale"] == 1
    np.testing.assert_array_equal(learner.theta, theta)
    row = learner.submit(sub(learner, version=1))  # staleness 2: accepted
    assert row is not None and row["staleness_mean"] == 2 and row["dropped_stale"] == 1


def test_nonfinite_gradient_dropped_and_counted():
    learner = make_learner(meta_batch=2)
    bad = np.ones(P, np.float32)
    bad[7] = np.nan
    assert learner.submit(sub(learner, bad)) is None
    assert learner.submit(sub(learner, loss=float("inf"))) is None
    assert learner.submit(sub(learner, finite=False)) is None
    assert learner.counters["dropped_nonfinite"] == 3
    assert learner.current.batch.count == 0 and not learner.current.batch.grad_sum.any()
    learner.submit(sub(learner))
    row = learner.submit(sub(learner))
    assert row["dropped_nonfinite"] == 3 and np.isfinite(learner.theta).all()


def test_other_generation_dropped():
    learner = make_learner(meta_batch=1)
    assert learner.submit(sub(learner, generation="dead-learner")) is None
    assert learner.counters["dropped_generation"] == 1 and learner.step == 0


def test_schedule_and_curriculum():
    config = LearnerConfig(lr_values=(3e-4, 1e-4, 2e-5), lr_boundaries=(10, 15))
    lr = lr_schedule(config)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 9, 10, 14, 15, 99)],
                               [3e-4, 3e-4, 1e-4, 1e-4, 2e-5, 2e-5], rtol=1e-6)
    # The optimizer applies that schedule: updates scale with the lr.
    opt = make_optimizer(dataclasses.replace(config, clip_norm=1e9))
    state = opt.init(np.zeros(1, np.float32))
    scales = []
    for _ in range(16):
        updates, state = opt.update(np.ones(1, np.float32), state)
        scales.append(-float(updates[0]))
    np.testing.assert_allclose(scales[:10], 3e-4, rtol=1e-3)
    np.testing.assert_allclose(scales[10:15], 1e-4, rtol=1e-3)
    np.testing.assert_allclose(scales[15], 2e-5, rtol=1e-3)
    cur = CurriculumConfig(unroll_start=(2, 4), unroll_end=(8, 15), unroll_ramp_steps=100)
    assert (curriculum_at(cur, 0).unroll_low, curriculum_at(cur, 0).unroll_high) == (2, 4)
    assert (curriculum_at(cur, 50).unroll_low, curriculum_at(cur, 50).unroll_high) == (5, 10)
    assert (curriculum_at(cur, 10 ** 6).unroll_low,
            curriculum_at(cur, 10 ** 6).unroll_high) == (8, 15)
    c = curriculum_at(cur, 0)
    rng = np.random.default_rng(0)
    us = [c.sample_unroll(rng) for _ in range(200)]
    assert set(us) == {2, 3, 4}
    counts = [c.sample_truncations(rng) for _ in range(500)]
    assert min(counts) >= 1 and 19 < np.mean(counts) < 25  # E[max(1, N(20, 20))] = 21.8


def test_state_roundtrip_resumes_exact_step():
    a = make_learner()
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=P).astype(np.float32) for _ in range(30)]
    for i, g in enumerate(grads[:14]):  # 3 updates + 2 buffered
        a.submit(sub(a, g, loss=float(i), dataset=f"d{i % 2}", loss_start=2.0 * i))
    arrays, meta = a.state()
    b = make_learner()
    b.load_state(arrays, meta, keep_generation=True)
    assert (b.step, b.version, b.current.batch.count) == (3, 3, 2)
    assert b.new_stream_seeds(3) == a.new_stream_seeds(3)
    rows_a = [a.submit(sub(a, g, loss=1.0, dataset="d0")) for g in grads[14:]]
    rows_b = [b.submit(sub(b, g, loss=1.0, dataset="d0")) for g in grads[14:]]
    np.testing.assert_array_equal(a.theta, b.theta)
    assert a.step == b.step == 7
    assert a.rolling_gain() == b.rolling_gain() < 0  # the task-relative losses came back
    for ra, rb in zip(rows_a, rows_b):
        assert (ra is None) == (rb is None)
        if ra:
            for k in ra:
                if k not in ("wall_s", "grads_per_s"):
                    assert ra[k] == rb[k], k
    # A restored learner is a new generation by default.
    c = make_learner()
    c.load_state(arrays, meta)
    assert c.generation != a.generation


def test_wrong_shape_rejected():
    learner = make_learner()
    with pytest.raises(ValueError, match="parameters"):
        learner.submit(sub(learner, np.ones(P + 1, np.float32)))


def test_nothing_applied_beyond_stop_step():
    learner = make_learner(meta_batch=1)
    learner.stop_step = 2
    rows = [learner.submit(sub(learner)) for _ in range(4)]
    assert [r is not None for r in rows] == [True, True, False, False]
    assert learner.step == 2 and learner.counters["after_stop"] == 2


def test_weighted_submission_counts_its_tasks():
    import dataclasses
    config = dataclasses.replace(LearnerConfig(), meta_batch=4)
    rng = np.random.default_rng(3)
    theta = rng.normal(size=20).astype(np.float32)
    g1, g2 = (rng.normal(size=20).astype(np.float32) for _ in range(2))
    weighted = Learner(theta, config, CurriculumConfig(), generation="g")
    plain = Learner(theta, config, CurriculumConfig(), generation="g")
    assert weighted.submit(Submission(g1, 0, "g", 1.0, count=3, nonfinite_tasks=1)) is None
    row = weighted.submit(Submission(g2, 0, "g", 2.0))
    for grad, loss in ((g1, 1.0), (g1, 1.0), (g1, 1.0), (g2, 2.0)):
        plain_row = plain.submit(Submission(grad, 0, "g", loss))
    np.testing.assert_allclose(weighted.theta, plain.theta, rtol=1e-6)
    assert row["meta_loss"] == plain_row["meta_loss"] == 1.25
    assert weighted.counters["received"] == 5 and weighted.counters["dropped_nonfinite"] == 1
    assert weighted.counters["applied"] == 4
    assert np.isnan(row["loss_vs_start_rolling"])  # no submission knew its start
    weighted.submit(Submission(g1, 1, "g", 1.0, loss_start=1.5, count=2))
    assert weighted.rolling_gain() == -0.5
    # Dropped submissions drop all of their tasks.
    weighted.submit(Submission(g1, 0, "g", 1.0, count=2))  # stale by one: allowed
    assert weighted.submit(Submission(g1, 0, "other", 1.0, count=2)) is None
    assert weighted.counters["dropped_generation"] == 2


def test_frozen_entries_never_move_and_the_rest_trains():
    frozen = np.zeros(P, bool)
    frozen[[3, 17]] = True
    config = LearnerConfig(meta_batch=1, max_staleness=2, loss_window=8)
    theta0 = np.linspace(-1, 1, P).astype(np.float32)
    learner = Learner(theta0, config, CurriculumConfig(), trainable=~frozen)
    rng = np.random.default_rng(0)
    for _ in range(5):
        learner.submit(sub(learner, rng.normal(size=P).astype(np.float32)))
    assert learner.step == 5
    np.testing.assert_array_equal(learner.theta[frozen], theta0[frozen])
    assert np.all(learner.theta[~frozen] != theta0[~frozen])
