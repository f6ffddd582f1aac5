"""Meta-gradient estimators against known answers (metalearn.core.estimators).

A small unrolled system whose full-horizon gradient is exact: phi_{t+1} = lam * phi_t +
theta, loss_t = f(phi_{t+1} - c_t). phi is linear in theta and in every perturbation,
so with f quadratic the Gaussian-smoothed loss differs from the loss by a constant
(its gradient is the exact full-horizon gradient), and with f = cos the smoothed loss
has a closed form. The estimators run through the same code paths the workers use
(``build_estimator``, vmapped over tasks, driven per inner step).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core.config import ConfigError, EstimatorConfig, UnrollConfig
from metalearn.core.estimators import (VarianceStats, build_estimator, ema_update,
                                       inverse_variance_weight, make_estimator)
from metalearn.core.unroll import TruncationBatch

N = 3
LAM = 0.9
THETA = {"a": jnp.asarray([0.3, -0.2, 0.5])}


class Dummy(NamedTuple):
    unused: jax.Array  # [U, 1]


@dataclasses.dataclass(frozen=True)
class Linear:
    """phi' = lam phi + theta; loss = mean_i f(phi'_i - c_i), c = x[0] (the target)."""

    loss: str = "quadratic"
    omega: float = 2.0

    def f(self, z):
        return jnp.square(z) if self.loss == "quadratic" else jnp.cos(self.omega * z)

    def step(self, theta, phi, x, pair):
        new = LAM * phi + theta["a"]
        return new, jnp.mean(self.f(new - x[0]))


def targets(num_steps, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (num_steps, 1, N))


def batch_of(c, tasks=None):
    x = c if tasks is None else jnp.broadcast_to(c, (tasks,) + c.shape)
    unused = jnp.zeros(x.shape[:-2] + (1,))
    return TruncationBatch(x, Dummy(unused))


def full_objective(theta, problem, c, lengths, phi0):
    """Sum over truncations of each truncation's mean step loss, phi carried through."""
    phi, total, t = phi0, 0.0, 0
    for u in lengths:
        losses = []
        for _ in range(u):
            phi, loss = problem.step(theta, phi, c[t], None)
            losses.append(loss)
            t += 1
        total = total + jnp.mean(jnp.stack(losses))
    return total


def run_task(estimator, c, lengths, phi0, seeds, tasks):
    """Sum of an estimator's per-truncation gradients over one task: [tasks, N]."""
    params = jnp.broadcast_to(phi0, (tasks, N))
    state = estimator.init(seeds, params)
    total, t = 0.0, 0
    for u in lengths:
        estimate, state = estimator(THETA, state, batch_of(c[t:t + u], tasks))
        assert bool(np.all(estimate.finite))
        total = total + estimate.grad["a"]
        t += u
    return np.asarray(total, np.float64)


def mean_and_se(samples):
    samples = np.asarray(samples, np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(len(samples))


LENGTHS = (2, 2, 2, 2, 2)
PHI0 = jnp.asarray([1.0, -1.0, 0.5])


def test_truncated_backprop_is_biased_and_pes_is_not():
    problem = Linear("quadratic")
    c = targets(sum(LENGTHS))
    exact = np.asarray(jax.grad(full_objective)(THETA, problem, c, LENGTHS, PHI0)["a"])

    tasks = 64
    truncated = build_estimator(problem, UnrollConfig(), EstimatorConfig("truncated"), N, tasks)
    tbptt = run_task(truncated, c, LENGTHS, PHI0, list(range(tasks)), tasks)
    # Deterministic: every task gives the same truncated gradient, far from the truth.
    np.testing.assert_allclose(tbptt, np.broadcast_to(tbptt[0], tbptt.shape), rtol=1e-5)
    bias = np.abs(tbptt[0] - exact)
    assert np.all(bias > 0.3 * np.abs(exact)), (tbptt[0], exact)

    pes = build_estimator(problem, UnrollConfig(),
                          EstimatorConfig("pes", perturbation_std=0.05, pairs=32), N, tasks)
    mean, se = mean_and_se(run_task(pes, c, LENGTHS, PHI0, list(range(tasks)), tasks))
    assert np.all(np.abs(mean - exact) < 4 * se), (mean, exact, se)
    # ... and the comparison has the power to see truncated backprop's bias.
    assert np.all(bias > 8 * se), (bias, se)


def test_es_matches_the_gradient_of_the_smoothed_loss():
    sigma, omega, steps = 0.4, 2.0, 3
    problem = Linear("cos", omega)
    c = targets(steps, seed=1)
    # phi_t = lam^t phi0 + (theta + eps) S_t with S_t = sum_{j<t} lam^j, so phi_t - c ~
    # N(m_t, (sigma S_t)^2) and E cos(omega z) = cos(omega m) exp(-(omega sigma S_t)^2 / 2).
    def smoothed(theta):
        total = 0.0
        for t in range(1, steps + 1):
            s_t = sum(LAM ** j for j in range(t))
            m = LAM ** t * PHI0 + theta["a"] * s_t - c[t - 1, 0]
            total = total + jnp.mean(jnp.cos(omega * m)) * jnp.exp(-(omega * sigma * s_t) ** 2 / 2)
        return total / steps

    def plain(theta):
        return full_objective(theta, problem, c, (steps,), PHI0)

    want = np.asarray(jax.grad(smoothed)(THETA)["a"])
    unsmoothed = np.asarray(jax.grad(plain)(THETA)["a"])
    tasks = 128
    es = build_estimator(problem, UnrollConfig(),
                         EstimatorConfig("es", perturbation_std=sigma, pairs=32), N, tasks)
    mean, se = mean_and_se(run_task(es, c, (steps,), PHI0, list(range(tasks)), tasks))
    assert np.all(np.abs(mean - want) < 4 * se), (mean, want, se)
    # Smoothing matters at this sigma: the plain gradient is many standard errors away.
    assert np.max(np.abs(unsmoothed - want) / se) > 8


def test_pes_restarts_its_accumulator_with_each_task_and_es_has_none():
    problem = Linear("quadratic")
    pes = build_estimator(problem, UnrollConfig(), EstimatorConfig("pes", pairs=2), N)
    state = pes.init(0, PHI0)
    assert state.accumulator.shape == (2, N) and not np.any(state.accumulator)
    assert jax.tree.leaves(state.particles)[0].shape == (4, N)
    c = targets(4)
    estimate, state = pes(THETA, state, batch_of(c[:2]))
    first = np.asarray(state.accumulator)
    estimate, state = pes(THETA, state, batch_of(c[2:]))
    assert np.linalg.norm(state.accumulator) > np.linalg.norm(first) > 0
    assert float(estimate.metrics["xi_norm"]) > 0
    assert not np.any(pes.init(1, PHI0).accumulator)
    es_state = build_estimator(problem, UnrollConfig(), EstimatorConfig("es"), N).init(0, PHI0)
    assert es_state.accumulator is None and es_state.particles is None


def test_every_estimator_reports_the_center_loss_and_advances_phi_alike():
    """The center trajectory (unperturbed theta) is the same whatever the estimator, and
    whichever driver computes truncated backprop (inside the program, or stepwise)."""
    problem = Linear("quadratic")
    c = targets(3)
    results, grads = {}, {}
    for name, method in [("truncated", "stepwise"), ("truncated", "scan"), ("es", "auto"),
                         ("pes", "auto"), ("hybrid", "stepwise"), ("hybrid", "scan")]:
        est = build_estimator(problem, UnrollConfig(method=method),
                              EstimatorConfig(name, pairs=2), N)
        estimate, state = est(THETA, est.init(0, PHI0), batch_of(c))
        results[name, method] = (float(estimate.loss), np.asarray(state.params),
                                 np.asarray(estimate.step_losses))
        grads[name, method] = np.asarray(estimate.grad["a"])
        assert estimate.grad["a"].shape == (N,)
        assert set(estimate.metrics) == set(est.metric_names)  # the documented columns
    ref = results["truncated", "stepwise"]
    for name, (loss, params, steps) in results.items():
        assert loss == pytest.approx(ref[0], rel=1e-5), name
        np.testing.assert_allclose(params, ref[1], rtol=1e-5, err_msg=str(name))
        np.testing.assert_allclose(steps, ref[2], rtol=1e-5, err_msg=str(name))
    for name in ("truncated", "hybrid"):  # same noise and data: the same estimate
        np.testing.assert_allclose(grads[name, "scan"], grads[name, "stepwise"], rtol=1e-5)


def test_perturbations_stay_off_frozen_entries():
    problem = Linear("quadratic")
    keep = np.asarray([1.0, 0.0, 1.0])
    for name in ("es", "pes", "hybrid"):
        est = build_estimator(problem, UnrollConfig(), EstimatorConfig(name, pairs=4), N,
                              trainable=keep)
        estimate, _ = est(THETA, est.init(3, PHI0), batch_of(targets(2)))
        assert float(estimate.grad["a"][1]) == 0.0, name
        assert float(jnp.abs(estimate.grad["a"][0])) > 0, name
    with pytest.raises(ConfigError, match="trainable mask"):
        build_estimator(problem, UnrollConfig(), EstimatorConfig("es"), N,
                        trainable=np.ones(2))


def test_online_variance_and_inverse_variance_weights():
    rng = np.random.default_rng(0)
    dim, decay = 50, 0.98
    stats_a = stats_b = VarianceStats(jnp.zeros(()), jnp.zeros(dim), jnp.zeros(()))
    assert float(inverse_variance_weight(stats_a, stats_b)) == 0.5  # no samples yet
    for _ in range(2000):
        stats_a = ema_update(stats_a, jnp.asarray(1.0 + 0.1 * rng.normal(size=dim)), decay)
        stats_b = ema_update(stats_b, jnp.asarray(1.0 + 0.3 * rng.normal(size=dim)), decay)
    # Trace variances: 50 * 0.01 = 0.5 and 50 * 0.09 = 4.5, within the EMA's noise.
    assert float(stats_a.var) == pytest.approx(0.5, rel=0.25)
    assert float(stats_b.var) == pytest.approx(4.5, rel=0.25)
    np.testing.assert_allclose(np.asarray(stats_a.mean), 1.0, atol=0.1)
    # The lower-variance estimator gets weight v_b / (v_a + v_b) = 0.9.
    assert float(inverse_variance_weight(stats_a, stats_b)) == pytest.approx(0.9, abs=0.03)
    # A non-finite estimate leaves the statistics as they were.
    bad = jnp.full(dim, jnp.nan).at[0].set(1.0)
    kept = ema_update(stats_a, bad, decay)
    for new, old in zip(kept, stats_a):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_hybrid_weights_move_towards_the_lower_variance_component():
    """On the quadratic system backprop is deterministic per truncation and ES is noisy
    in 3 dims: the weight of backprop rises well above the starting 0.5; the stats are
    carried from one task to the next."""
    problem = Linear("quadratic")
    hybrid = build_estimator(problem, UnrollConfig(),
                             EstimatorConfig("hybrid", perturbation_std=0.1, pairs=1), N)
    state = hybrid.init(0, PHI0)
    c = targets(2)
    weights = []
    for i in range(30):
        if i % 5 == 0:
            state = hybrid.init(i, PHI0, previous=state)
        estimate, state = hybrid(THETA, state, batch_of(c))
        weights.append(float(estimate.metrics["w_bp"]))
    assert weights[0] == 0.5
    assert weights[-1] > 0.95
    assert float(state.stats[0].count) == 30


def test_make_estimator_on_the_rule_checks_shapes_and_names():
    from metalearn.core.config import RuleConfig
    with pytest.raises(ConfigError, match="estimator.kind"):
        EstimatorConfig("reinforce")
    with pytest.raises(ConfigError, match="estimator.pairs"):
        EstimatorConfig(pairs=0)
    with pytest.raises(ConfigError, match="estimator.perturbation_std"):
        EstimatorConfig(perturbation_std=-1.0)
    with pytest.raises(ConfigError, match="unroll.method"):
        UnrollConfig(method="adjoint")
    est = make_estimator("relu", RuleConfig.small(), estimator=EstimatorConfig("pes"))
    assert est.name == "pes" and est.theta_size > 1000
