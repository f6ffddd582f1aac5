import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core.base_model import Architecture, init_params
from metalearn.core.config import ConfigError, MetaObjectiveConfig
from metalearn.core.meta_objective import (LabelledPair, make_pair, make_targets, meta_objective,
                                      ridge_accuracy, ridge_loss, solve_ridge)

CLASSES, PER_CLASS = 10, 10


def _labels(seed):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(CLASSES), PER_CLASS))


def test_linearly_encoded_features_give_near_zero_loss():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(CLASSES, 32))  # features = a random linear map of one-hot
    lt, le = _labels(1), _labels(2)
    feats_train = jnp.asarray(np.eye(CLASSES)[lt] @ mixing)
    feats_test = jnp.asarray(np.eye(CLASSES)[le] @ mixing)
    loss = ridge_loss(feats_train, make_targets(lt, CLASSES), feats_test,
                      make_targets(le, CLASSES), MetaObjectiveConfig())
    assert float(loss) < 0.02
    assert float(ridge_accuracy(feats_train, lt, feats_test, le, CLASSES)) == 1.0


def test_random_features_give_chance_loss():
    # Predictions uncorrelated with unit-norm targets: E||p_hat - y||^2 = 1 + 1 = 2.
    losses = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        lt, le = _labels(seed), _labels(seed + 100)
        loss = ridge_loss(jnp.asarray(rng.normal(size=(100, 32))), make_targets(lt, CLASSES),
                          jnp.asarray(rng.normal(size=(100, 32))), make_targets(le, CLASSES),
                          MetaObjectiveConfig(add_ridge_penalty=False))
        losses.append(float(loss))
    assert 1.9 < np.mean(losses) < 2.1, np.mean(losses)


def test_targets_are_centred_and_scaled():
    from metalearn.core.meta_objective import _centre_and_scale
    y = _centre_and_scale(make_targets(jnp.arange(5), 5, jnp.ones((5, 2)) * 3.0))
    assert abs(float(jnp.mean(y))) < 1e-6
    np.testing.assert_allclose(jnp.mean(jnp.sum(y ** 2, axis=1)), 1.0, rtol=1e-5)


def test_ridge_bias_is_not_penalised():
    feats = jnp.zeros((20, 3))
    targets = jnp.full((20, 2), 5.0)
    weights = solve_ridge(feats, targets, ridge=100.0)
    np.testing.assert_allclose(weights[-1], 5.0, rtol=1e-5)  # bias fits the mean exactly


def test_meta_objective_shares_batch_norm_and_averages_draws():
    arch = Architecture((16, 24, 32))
    params = init_params(jax.random.key(0), arch)
    config = MetaObjectiveConfig(num_draws=3, samples_per_class=4)
    x = jax.random.normal(jax.random.key(1), (3, 2, 12, 16))
    labels = jnp.tile(jnp.arange(3), (3, 4))
    pair = make_pair(x[:, 0], labels, x[:, 1], labels, num_classes=3)
    total = meta_objective(params, pair, arch, config)
    singles = [meta_objective(params, LabelledPair(*[f[i:i + 1] for f in pair]), arch, config)
               for i in range(3)]
    np.testing.assert_allclose(total, np.mean(singles), rtol=1e-5)
    assert 0.5 < float(total) < 3.0


def test_batch_too_small_for_classes_is_a_clear_error():
    x = np.zeros((1, 5, 4), np.float32)
    with pytest.raises(ConfigError, match="too small for 10 classes"):
        make_pair(x, np.zeros((1, 5), int), x, np.zeros((1, 5), int), num_classes=10)
    with pytest.raises(ConfigError, match="not class-balanced"):
        make_pair(x, np.array([[0, 0, 0, 1, 2]]), x, np.array([[0, 1, 2, 0, 1]]), num_classes=3)
    with pytest.raises(ConfigError, match="ridge"):
        MetaObjectiveConfig(ridge=0.0)
