"""Few-shot ridge-regression meta-objective with a cosine-style loss (docs/rule.md).

Given a class-balanced pair of labelled batches (a: train, b: test), both pass through
the base model in one batch (so they share batch-norm statistics); a ridge regression
with an unpenalised bias column is solved in closed form from a's features to a's
targets, applied to b, each prediction row is normalised, and the loss is the mean
squared distance to b's targets. Averaged over M independent pairs.

Targets are one-hot labels (0/1) concatenated with any augmentation regression
targets, centred by the batch's single scalar mean and scaled so the mean squared row
norm is 1. For perfect features the loss is ~0 (plus the small ridge penalty the
reference adds); for features that carry no label information it is ~2.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core.base_model import Architecture, BaseParams, features
from metalearn.core.config import ConfigError, MetaObjectiveConfig


class LabelledPair(NamedTuple):
    """M draws of a class-balanced (train, test) pair.

    x_train, x_test: [M, B_l, N_0]; y_train, y_test: [M, B_l, K] float targets
    (one-hot labels, optionally followed by regression targets).
    """

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def make_targets(labels: jax.Array, num_classes: int,
                 regression: jax.Array | None = None) -> jax.Array:
    """labels: [..., B] int -> [..., B, num_classes (+ R)] float targets."""
    y = jax.nn.one_hot(labels, num_classes)
    if regression is not None:
        y = jnp.concatenate([y, regression.astype(y.dtype)], axis=-1)
    return y


def _centre_and_scale(y: jax.Array) -> jax.Array:
    """y: [B, K]; subtract the scalar mean, scale to unit mean squared row norm."""
    y = y - jnp.mean(y)
    return y * jax.lax.rsqrt(jnp.mean(jnp.sum(jnp.square(y), axis=1)))


def solve_ridge(feats: jax.Array, targets: jax.Array, ridge: float) -> jax.Array:
    """Closed-form ridge with a bias column that is not penalised.

    feats: [B, F]; targets: [B, K] -> weights [F + 1, K] (last row is the bias).
    """
    a = jnp.concatenate([feats, jnp.ones((feats.shape[0], 1), feats.dtype)], axis=1)
    penalty = jnp.full((a.shape[1],), ridge, feats.dtype).at[-1].set(0.0)
    gram = a.T @ a + jnp.diag(penalty)
    return jnp.linalg.solve(gram, a.T @ targets)


def ridge_loss(feat_train: jax.Array, y_train: jax.Array, feat_test: jax.Array,
               y_test: jax.Array, config: MetaObjectiveConfig) -> jax.Array:
    """Loss of one pair from features. feat_*: [B, F]; y_*: [B, K] raw targets."""
    y_train = _centre_and_scale(y_train)
    y_test = _centre_and_scale(y_test)
    weights = solve_ridge(feat_train, y_train, config.ridge)
    a_test = jnp.concatenate([feat_test, jnp.ones((feat_test.shape[0], 1), feat_test.dtype)],
                             axis=1)
    pred = a_test @ weights
    if config.normalize_predictions:
        pred = pred * jax.lax.rsqrt(jnp.sum(jnp.square(pred), axis=1, keepdims=True) + 1e-12)
    loss = jnp.mean(jnp.sum(jnp.square(pred - y_test), axis=1))
    if config.add_ridge_penalty:
        loss = loss + config.ridge * jnp.sum(jnp.square(weights[:-1])) / feat_train.shape[0]
    return loss


def ridge_accuracy(feat_train, labels_train, feat_test, labels_test, num_classes: int,
                   ridge: float = 0.1) -> jax.Array:
    """Test accuracy of the same ridge readout (argmax of predicted one-hot)."""
    y = _centre_and_scale(jax.nn.one_hot(labels_train, num_classes))
    weights = solve_ridge(feat_train, y, ridge)
    a = jnp.concatenate([feat_test, jnp.ones((feat_test.shape[0], 1), feat_test.dtype)], axis=1)
    return jnp.mean(jnp.argmax(a @ weights, axis=1) == labels_test)


def make_pair(x_train, labels_train, x_test, labels_test, num_classes: int,
              regression_train=None, regression_test=None) -> LabelledPair:
    """Build a LabelledPair from integer labels, checking class balance.

    x_*: [M, B_l, N_0]; labels_*: [M, B_l] ints in [0, num_classes);
    regression_*: optional [M, B_l, R] extra targets (e.g. augmentation parameters).
    """
    for name, labels in (("labels_train", labels_train), ("labels_test", labels_test)):
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ConfigError(f"{name} must be [draws, batch], got shape {labels.shape}")
        if labels.shape[1] < num_classes:
            raise ConfigError(f"{name}: a batch of {labels.shape[1]} examples is too small for "
                              f"{num_classes} classes; the meta-objective needs "
                              f"meta_objective.samples_per_class >= 1 example of every class")
        counts = np.stack([np.bincount(row, minlength=num_classes) for row in labels])
        if counts.shape[1] > num_classes:
            raise ConfigError(f"{name} has labels >= num_classes ({num_classes})")
        if not np.all(counts == counts[:, :1]):
            raise ConfigError(f"{name} is not class-balanced: per-class counts "
                              f"{counts[0].tolist()} (first draw)")
    pair = LabelledPair(jnp.asarray(x_train),
                        make_targets(jnp.asarray(labels_train), num_classes, regression_train),
                        jnp.asarray(x_test),
                        make_targets(jnp.asarray(labels_test), num_classes, regression_test))
    check_pair(pair, num_classes, pair.x_train.shape[-1])
    return pair


def check_pair(pair: LabelledPair, num_classes: int, input_size: int) -> None:
    """Shape checks in Python with errors naming the field."""
    for name in LabelledPair._fields:
        arr = getattr(pair, name)
        if arr.ndim != 3:
            raise ConfigError(f"labelled pair field {name} must be [draws, batch, dim], "
                              f"got shape {tuple(arr.shape)}")
    if pair.x_train.shape[-1] != input_size or pair.x_test.shape[-1] != input_size:
        raise ConfigError(f"labelled pair x has {pair.x_train.shape[-1]} features, the base "
                          f"model expects {input_size}")
    for name in ("train", "test"):
        x, y = getattr(pair, f"x_{name}"), getattr(pair, f"y_{name}")
        if x.shape[:2] != y.shape[:2]:
            raise ConfigError(f"labelled pair x_{name} {tuple(x.shape)} and y_{name} "
                              f"{tuple(y.shape)} disagree on draws/batch")
        if x.shape[1] < num_classes:
            raise ConfigError(f"labelled pair batch of {x.shape[1]} examples is too small "
                              f"for {num_classes} classes (meta_objective.samples_per_class "
                              f"must be >= 1 per class)")
    if pair.y_train.shape[-1] < num_classes:
        raise ConfigError(f"labelled pair targets have {pair.y_train.shape[-1]} columns, "
                          f"fewer than the {num_classes} classes")


def meta_objective(params: BaseParams, pair: LabelledPair, arch: Architecture,
                   config: MetaObjectiveConfig, bn_eps: float = 1e-6) -> jax.Array:
    """Mean over the M draws of the ridge loss of phi's top-layer features."""

    def one_draw(x_train, y_train, x_test, y_test):
        batch = x_train.shape[0]
        feats = features(params, jnp.concatenate([x_train, x_test], axis=0), arch, bn_eps)
        return ridge_loss(feats[:batch], y_train, feats[batch:], y_test, config)

    return jnp.mean(jax.vmap(one_draw)(*pair))
