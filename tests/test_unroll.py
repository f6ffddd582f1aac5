import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import update_rule as ur
from metalearn.core.base_model import Architecture, init_params
from metalearn.core.config import ConfigError, MetaObjectiveConfig, RuleConfig, UnrollConfig
from metalearn.core.meta_objective import LabelledPair, make_targets
from metalearn.core.unroll import (Problem, TruncationBatch, make_meta_gradient, pad_to_bucket,
                              truncation_loss_scan)

SIZES = (10, 12, 8)

# Unroll tests check estimator algebra, not the rule's structure (test_update_rule does
# that): a rule with the fewest layers compiles fastest, and estimators are shared.
MICRO = RuleConfig.small(top_units=8, top_delta_size=4, top_delta_layers=0,
                         top_unit_mix_layers=1, compute_h_size=6, compute_h_layers=0,
                         delta_dim=3)
OBJECTIVE = MetaObjectiveConfig(num_draws=2, samples_per_class=3)


@functools.lru_cache(maxsize=None)
def _estimator(unroll=UnrollConfig(), num_tasks=None):
    return make_meta_gradient("swish", MICRO, OBJECTIVE, unroll, num_tasks=num_tasks)


def _batch(steps, objective, classes=2, batch=16, seed=0, dtype=jnp.float32, tasks=None):
    lead = (tasks,) if tasks else ()
    keys = jax.random.split(jax.random.key(seed), 3)
    per_pair = classes * objective.samples_per_class
    shape = lead + (steps, objective.num_draws, per_pair, SIZES[0])
    targets = make_targets(jnp.tile(jnp.arange(classes), objective.samples_per_class), classes)
    targets = jnp.broadcast_to(targets, shape[:-1] + (classes,)).astype(dtype)
    pair = LabelledPair(jax.random.normal(keys[0], shape, dtype), targets,
                        jax.random.normal(keys[1], shape, dtype), targets)
    inner = jax.random.normal(keys[2], lead + (steps, batch, SIZES[0]), dtype)
    return TruncationBatch(inner, pair)


def _start(rule, seed=0, tasks=None, dtype=jnp.float32):
    theta = ur.init_theta(jax.random.key(seed), rule)
    arch = Architecture(SIZES, "swish")
    if tasks:
        keys = jax.random.split(jax.random.key(seed + 1), tasks)
        params = jax.vmap(lambda k: init_params(k, arch))(keys)
    else:
        params = init_params(jax.random.key(seed + 1), arch)
    cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
    return cast(theta), cast(params)


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(b)))


def test_meta_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        theta, params = _start(MICRO, dtype=jnp.float64)
        batch = _batch(2, OBJECTIVE, dtype=jnp.float64)
        result = _estimator()(theta, params, batch)
        assert bool(result.finite)
        problem = Problem("swish", MICRO, OBJECTIVE)
        mask = jnp.ones((2,), jnp.float64)
        loss_fn = jax.jit(lambda th: truncation_loss_scan(th, params, batch, mask, problem)[0])
        np.testing.assert_allclose(loss_fn(theta), result.loss, rtol=1e-10)
        rng = np.random.default_rng(0)
        for trial in range(3):
            direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), theta)
            eps = 1e-5
            plus = loss_fn(jax.tree.map(lambda a, d: a + eps * d, theta, direction))
            minus = loss_fn(jax.tree.map(lambda a, d: a - eps * d, theta, direction))
            numeric = float((plus - minus) / (2 * eps))
            analytic = float(sum(jnp.sum(g * d) for g, d in
                                 zip(jax.tree.leaves(result.grad), jax.tree.leaves(direction))))
            assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(numeric)), (trial, numeric,
                                                                             analytic)


def test_estimators_agree():
    theta, params = _start(MICRO)
    batch = _batch(3, OBJECTIVE)
    results = {}
    for name, unroll in {"store": UnrollConfig(residuals="store"),
                         "recompute": UnrollConfig(residuals="recompute"),
                         "scan": UnrollConfig(method="scan", scan_buckets=(4,))}.items():
        results[name] = _estimator(unroll)(theta, params, batch)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(results["store"].grad))
    assert scale > 0
    for name in ("recompute", "scan"):
        assert _max_diff(results[name].grad, results["store"].grad) < 1e-4 * scale, name
        assert _max_diff(results[name].params, results["store"].params) < 1e-5
        np.testing.assert_allclose(results[name].step_losses, results["store"].step_losses,
                                   rtol=1e-5)
    assert results["scan"].step_losses.shape == (3,)  # padding steps are cut off


def test_vmap_over_tasks_equals_separate_calls():
    tasks = 3
    theta, params = _start(MICRO, tasks=tasks)
    batch = _batch(2, OBJECTIVE, tasks=tasks)
    single = _estimator()
    separate = [single(theta, jax.tree.map(lambda a: a[i], params),
                       jax.tree.map(lambda a: a[i], batch)) for i in range(tasks)]
    for unroll in (UnrollConfig(), UnrollConfig(method="scan", scan_buckets=(2,))):
        batched = _estimator(unroll, tasks)(theta, params, batch)
        assert batched.loss.shape == (tasks,) and batched.finite.shape == (tasks,)
        for i, one in enumerate(separate):
            np.testing.assert_allclose(batched.loss[i], one.loss, rtol=1e-5)
            grad_i = jax.tree.map(lambda a: a[i], batched.grad)
            scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(one.grad))
            assert _max_diff(grad_i, one.grad) < 1e-4 * scale


def test_varying_unroll_length_does_not_recompile():
    theta, params = _start(MICRO)
    stepwise = make_meta_gradient("swish", MICRO, OBJECTIVE, UnrollConfig())
    stepwise(theta, params, _batch(2, OBJECTIVE))
    sizes = (stepwise._fwd_store._cache_size(), stepwise._pull._cache_size())
    for steps in (3, 5):
        result = stepwise(theta, params, _batch(steps, OBJECTIVE, seed=steps))
        assert result.step_losses.shape == (steps,)
    assert (stepwise._fwd_store._cache_size(), stepwise._pull._cache_size()) == sizes == (1, 1)

    scan = make_meta_gradient("swish", MICRO, OBJECTIVE,
                              UnrollConfig(method="scan", scan_buckets=(4,)))
    for steps in (2, 3, 4):
        scan(theta, params, _batch(steps, OBJECTIVE))
    assert scan._scan._cache_size() == 1  # one bucket, one compilation


def test_padding_to_a_bucket_does_not_change_the_result():
    theta, params = _start(MICRO)
    batch = _batch(3, OBJECTIVE)
    padded, mask = pad_to_bucket(batch, 5)
    assert padded.inner_x.shape[0] == 5 and mask.tolist() == [1, 1, 1, 0, 0]
    problem = Problem("swish", MICRO, OBJECTIVE)
    exact = truncation_loss_scan(theta, params, batch, jnp.ones(3), problem)
    bucketed = truncation_loss_scan(theta, params, padded, mask, problem)
    np.testing.assert_allclose(exact[0], bucketed[0], rtol=1e-6)
    assert _max_diff(exact[1][0], bucketed[1][0]) < 1e-7


def test_non_finite_results_are_reported():
    theta, params = _start(MICRO)
    theta["merge_w"]["w"] = theta["merge_w"]["w"].at[3].set(jnp.nan)
    result = _estimator()(theta, params, _batch(2, OBJECTIVE))
    assert not bool(result.finite)
    assert not np.isfinite(float(result.loss))  # reported as is, not zeroed


def test_bad_truncation_inputs_name_the_field():
    theta, params = _start(MICRO)
    estimator = _estimator()
    batch = _batch(2, OBJECTIVE)
    with pytest.raises(ConfigError, match="inner_x"):
        estimator(theta, params, batch._replace(inner_x=batch.inner_x[0]))
    with pytest.raises(ConfigError, match="features"):
        estimator(theta, params, batch._replace(inner_x=batch.inner_x[..., :4]))
    short = LabelledPair(*[f[:1] for f in batch.pair])
    with pytest.raises(ConfigError, match="pair.x_train has 1 steps"):
        estimator(theta, params, batch._replace(pair=short))
    with pytest.raises(ConfigError, match="unroll.method"):
        UnrollConfig(method="magic")


def test_one_program_estimator_equals_the_stepwise_driver_on_the_rule():
    """The truncated estimator (one compiled scan per bucket, padded steps skipped, tasks
    vmapped) gives the stepwise reference's loss, gradient and final phi, task by task;
    a U that fills its bucket exactly reuses the same program."""
    from metalearn.core.estimators import make_estimator

    arch = Architecture(SIZES, "swish")
    theta = ur.init_theta(jax.random.key(0), MICRO)
    keys = jax.random.split(jax.random.key(1), 2)
    phis = [init_params(k, arch) for k in keys]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *phis)
    estimator = make_estimator("swish", MICRO, OBJECTIVE,
                               UnrollConfig(method="scan",
                                            scan_buckets=(4,)),
                               num_tasks=2)
    assert estimator.backprop_driver == "scan" and estimator._stepwise is None
    reference = _estimator()
    for steps in (3, 4):
        batch = _batch(steps, OBJECTIVE, tasks=2, seed=steps)
        estimate, state = estimator(theta, estimator.init([0, 1], stacked), batch)
        assert estimate.step_losses.shape == (2, steps)
        for t in range(2):
            one = jax.tree.map(lambda a: a[t], batch)
            want = reference(theta, phis[t], one)
            assert float(estimate.loss[t]) == pytest.approx(float(want.loss), rel=1e-5)
            np.testing.assert_allclose(
                np.asarray(jax.flatten_util.ravel_pytree(
                    jax.tree.map(lambda a: a[t], estimate.grad))[0]),
                np.asarray(jax.flatten_util.ravel_pytree(want.grad)[0]), rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(np.asarray(state.params.w[-1][t]),
                                       np.asarray(want.params.w[-1]), rtol=1e-5, atol=1e-6)
    assert estimator._program._cache_size() == 1
