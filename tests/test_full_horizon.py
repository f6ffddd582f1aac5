"""Full-horizon estimators against known answers (metalearn.core.full_horizon).

The inner system of the truncated estimators' tests, run whole: phi_{t+1} = lam phi_t +
theta, and the meta-objective at a point is mean_i (phi_i - c_i)^2 for that point's
target c. phi is linear in theta, so the Gaussian-smoothed fitness has the same gradient
as the fitness itself, which ``jax.grad`` gives exactly over the whole run.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core.config import ConfigError, EstimatorConfig, HorizonConfig, UnrollConfig
from metalearn.core.estimators import build_estimator
from metalearn.core.full_horizon import (FullHorizonES, GuideState, HorizonData,
                                         evaluation_points, fitness_of)
from metalearn.core.unroll import TruncationBatch

N = 3
LAM = 0.9
THETA = {"a": jnp.asarray([0.3, -0.2, 0.5])}
PHI0 = jnp.asarray([1.0, -1.0, 0.5])


class Target(NamedTuple):
    c: jax.Array  # [N] at one point; [E, N] stacked over points


@dataclasses.dataclass(frozen=True)
class Linear:
    def advance(self, theta, phi, x):
        return LAM * phi + theta["a"]

    def loss(self, phi, pair):
        return jnp.mean(jnp.square(phi - pair.c))

    def step(self, theta, phi, x, pair):  # what truncated backprop (the surrogate) uses
        new = self.advance(theta, phi, x)
        return new, self.loss(new, pair)


def horizon_data(steps, points, seed=0):
    at = evaluation_points(steps, points)
    c = jax.random.normal(jax.random.PRNGKey(seed), (len(at), N))
    return HorizonData(jnp.zeros((steps, 1, N)), Target(c), at)


def exact_gradient(data, mode="mean"):
    def fitness(theta):
        phi, curve = PHI0, []
        for t in range(1, data.num_steps + 1):
            phi = LAM * phi + theta["a"]
            if t in data.points:
                curve.append(jnp.mean(jnp.square(phi - data.pairs.c[data.points.index(t)])))
        return fitness_of(jnp.stack(curve), mode)
    return np.asarray(jax.grad(fitness)(THETA)["a"], np.float64)


def estimator(name="es_full", pairs=16, sigma=0.1, trainable=None, **horizon):
    # The population in one call per inner step (the loop gives the same numbers; see
    # test_a_vmapped_population_and_a_looped_one_give_the_same_numbers): 30x fewer
    # dispatches for the hundreds of estimates these tests average.
    horizon.setdefault("population", "vmap")
    return FullHorizonES(Linear(), THETA, EstimatorConfig(name, perturbation_std=sigma,
                                                          pairs=pairs),
                         HorizonConfig(**horizon), trainable)


def estimates(est, data, seeds, guide=None):
    return np.stack([est(THETA, PHI0, data, s, guide)[0].grad for s in seeds]).astype(np.float64)


def mean_and_se(samples):
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(len(samples))


@pytest.mark.parametrize("mode", ["mean", "final"])
def test_es_full_is_unbiased_for_the_whole_run_gradient(mode):
    data = horizon_data(40, 4)
    exact = exact_gradient(data, mode)
    est = estimator(fitness=mode, steps=40, points=4)
    mean, se = mean_and_se(estimates(est, data, range(200)))
    assert np.all(np.abs(mean - exact) < 4 * se), (mean, exact, se)
    assert np.all(se < 0.1 * np.abs(exact)), (se, exact)  # the test can see a bias


def test_es_full_variance_stays_flat_with_the_horizon_while_pes_grows():
    def es_full_var(steps):
        data = horizon_data(steps, 1, seed=3)
        samples = estimates(estimator(pairs=1, steps=steps, points=1), data, range(150))
        return float(np.sum(np.var(samples, axis=0, ddof=1)))

    # PES over the same runs cut into truncations of 2 steps, its estimates summed over a
    # task (an unbiased whole-run gradient): the accumulated perturbations grow with it.
    class Step(NamedTuple):
        unused: jax.Array

    @dataclasses.dataclass(frozen=True)
    class Last:  # loss only at the run's end: the same fitness as es_full's above
        steps: int

        def step(self, theta, phi, x, pair):
            new = LAM * phi + theta["a"]
            return new, jnp.mean(jnp.square(new - x[0])) * pair.unused[0]

    def pes_var(steps, tasks=64):
        c = horizon_data(steps, 1, seed=3).pairs.c[0]
        pes = build_estimator(Last(steps), UnrollConfig(),
                              EstimatorConfig("pes", perturbation_std=0.1, pairs=1), N, tasks)
        state = pes.init(list(range(tasks)), jnp.broadcast_to(PHI0, (tasks, N)))
        total = 0.0
        for start in range(0, steps, 2):
            # weight 1 on the run's last step only (each truncation's loss is its mean)
            weight = jnp.asarray([[0.0], [2.0 if start + 2 == steps else 0.0]])
            x = jnp.broadcast_to(c, (tasks, 2, 1, N))
            batch = TruncationBatch(x, Step(jnp.broadcast_to(weight, (tasks, 2, 1))))
            estimate, state = pes(THETA, state, batch)
            total = total + estimate.grad["a"]
        return float(np.sum(np.var(np.asarray(total, np.float64), axis=0, ddof=1)))

    # lam^40 ~ 0.015: both horizons see the same whole-run gradient, 8x the truncations.
    es_ratio = es_full_var(320) / es_full_var(40)
    pes_ratio = pes_var(320) / pes_var(40)
    assert es_ratio < 2.0, es_ratio
    assert pes_ratio > 3.0, pes_ratio


def test_guided_es_estimates_the_guided_direction_and_aims_better():
    data = horizon_data(30, 3, seed=5)
    exact = exact_gradient(data)
    guide = GuideState(np.asarray(exact / np.linalg.norm(exact))[None])
    guided = estimator("guided_es", pairs=2, guide_alpha=0.2, steps=30, points=3)
    samples = estimates(guided, data, range(400), guide)
    mean, se = mean_and_se(samples)
    expected = guided.covariance_scale(guide) @ exact
    assert np.all(np.abs(mean - expected) < 4 * se), (mean, expected, se)

    plain = estimates(estimator("es_full", pairs=2, steps=30, points=3), data, range(400))

    def mean_cos(s):
        return float(np.mean(s @ exact / (np.linalg.norm(s, axis=1) * np.linalg.norm(exact))))

    assert mean_cos(samples) > mean_cos(plain) + 0.2, (mean_cos(samples), mean_cos(plain))


def test_guided_es_keeps_the_last_surrogates_and_reports_their_cosine():
    data = horizon_data(20, 2, seed=1)
    guided = estimator("guided_es", pairs=4, guide_dims=2, steps=20, points=2,
                       surrogate_steps=3)
    guide = None
    for seed in range(3):
        estimate, guide = guided(THETA, PHI0, data, seed, guide)
        assert -1.0 <= estimate.metrics["surrogate_cos"] <= 1.0
    assert guide.surrogates.shape == (2, N)
    np.testing.assert_allclose(np.linalg.norm(guide.surrogates, axis=1), 1.0, rtol=1e-6)


def test_perturbations_and_gradient_stay_on_the_trainable_entries():
    data = horizon_data(10, 2)
    mask = np.asarray([True, False, True])
    est = estimator(trainable=mask, steps=10, points=2)
    eps = est.perturbations(0)
    assert eps.shape == (16, N) and np.all(eps[:, 1] == 0) and np.all(eps[:, [0, 2]] != 0)
    estimate, _ = est(THETA, PHI0, data, 0)
    assert estimate.grad[1] == 0 and estimate.finite
    assert estimate.fitness.shape == (32,) and estimate.curve.shape == (2,)


def test_evaluation_points_and_bad_settings():
    assert evaluation_points(300, 3) == (100, 200, 300)
    assert evaluation_points(5, 5) == (1, 2, 3, 4, 5)
    with pytest.raises(ConfigError, match="horizon.points"):
        HorizonConfig(steps=3, points=5)
    with pytest.raises(ConfigError, match="horizon.fitness"):
        HorizonConfig(fitness="best")
    with pytest.raises(ConfigError, match="not a full-horizon estimator"):
        estimator("pes")
    with pytest.raises(ConfigError, match="trainable subspace is empty"):
        estimator(trainable=np.zeros(N, bool))


def test_a_vmapped_population_and_a_looped_one_give_the_same_numbers():
    data = horizon_data(12, 3, seed=2)
    vmapped, _ = estimator(population="vmap", steps=12, points=3)(THETA, PHI0, data, 4)
    looped, _ = estimator(population="loop", steps=12, points=3)(THETA, PHI0, data, 4)
    np.testing.assert_allclose(vmapped.fitness, looped.fitness, rtol=1e-5)
    np.testing.assert_allclose(vmapped.grad, looped.grad, rtol=1e-4, atol=1e-6)


def test_fitness_shaping_gives_every_task_an_equal_say():
    from metalearn.core.full_horizon import shape_fitness

    easy, hard = np.asarray([1.0, 1.2, 0.8, 1.1]), np.asarray([10.0, 12.0, 8.0, 11.0])
    np.testing.assert_allclose(shape_fitness(easy, "normalize"), shape_fitness(hard, "normalize"))
    np.testing.assert_allclose(shape_fitness(hard, "ranks"), [-1 / 6, 0.5, -0.5, 1 / 6])
    np.testing.assert_array_equal(shape_fitness(np.ones(4), "normalize"), np.zeros(4))
    np.testing.assert_array_equal(shape_fitness(hard, "none"), hard)
    # The shaped estimate still points downhill on the linear system.
    data = horizon_data(20, 2, seed=4)
    exact = exact_gradient(data)
    mean, _ = mean_and_se(estimates(estimator(shaping="normalize", steps=20, points=2),
                                    data, range(100)))
    assert mean @ exact > 0.9 * np.linalg.norm(mean) * np.linalg.norm(exact)
