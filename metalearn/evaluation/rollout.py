"""The learned rule at work: a fresh base model trained by it on unlabelled data.

``rollout`` is the one loop that does this (``learned_rule_curve`` for ``metalearn eval``
and ``ContinuousEvaluator`` during meta-training both use it): initialise the base
model from the task's seed with the rule's init scales, then one jitted ``inner_step``
per step on a batch drawn from the unlabelled pool. A ``lax.fori_loop`` / ``lax.scan``
over the paper-size rule was 5-7x slower per step on XLA's CPU backend here (2.6 s vs
0.4-0.6 s per step, 4 x 128 model, loaded machine); docs/rule.md has the measurements of rolled loops.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core.base_model import Architecture, BaseParams, features, init_params
from metalearn.core.config import RuleConfig
from metalearn.core.config_io import ConfigError
from metalearn.core.update_rule import inner_step
from metalearn.evaluation.config import check_architecture
from metalearn.evaluation.data import Task
from metalearn.evaluation.diagnostics import weight_growth
from metalearn.evaluation.readout import FeatureFn, evaluate_features

# numpy random streams [task seed, stream] of the pool batches; each caller keeps its own
# so its numbers do not depend on the other's.
CURVE_STREAM = 2  # learned_rule_curve (metalearn eval)
CONTINUOUS_STREAM = 4  # ContinuousEvaluator (held-out evaluation during meta-training)

_inner_step = jax.jit(inner_step, static_argnums=(3, 4))
_features = jax.jit(features, static_argnums=(2, 3))


def architecture(input_size: int, width: int, depth: int, activation: str,
                 output_size: int = 32) -> Architecture:
    """The evaluation base model: input -> ``width`` x ``depth`` -> ``output_size``."""
    check_architecture(width, depth, activation)
    return Architecture.mlp(input_size, [width] * depth, output_size, activation)


def check_rule_fits(rule: RuleConfig, arch: Architecture) -> None:
    if arch.output_size != rule.top_units:
        raise ConfigError(f"the base model's top layer has {arch.output_size} units but the "
                          f"rule's TopD needs rule.top_units = {rule.top_units}")


def base_features(params: BaseParams, arch: Architecture, bn_eps: float) -> FeatureFn:
    """x [N, D] -> the base model's top-layer features [N, 32] (one batch-norm batch)."""
    return lambda x: np.asarray(_features(params, x, arch, bn_eps))


def rollout(theta, rule: RuleConfig, arch: Architecture, pool: np.ndarray, *, seed: int,
            steps: int, batch_size: int, stream: int
            ) -> Iterator[tuple[int, BaseParams]]:
    """Train a fresh base model on ``pool`` with the rule; yields ``(0, initial params)``,
    then ``(k, params after k inner steps)`` for k = 1..``steps``.

    The model is initialised from ``jax.random.key(seed)``; each step's ``batch_size``
    pool rows are drawn from numpy stream ``[seed, stream]``.
    """
    check_rule_fits(rule, arch)
    theta = jax.tree.map(jnp.asarray, theta)
    rng = np.random.default_rng([seed, stream])
    params = init_params(jax.random.key(seed), arch, w_std=rule.init_w_std,
                         b_std=rule.init_b_std)
    yield 0, params
    for step in range(1, steps + 1):
        x = pool[rng.integers(0, len(pool), batch_size)]
        params = _inner_step(theta, params, x, arch.activation, rule)
        yield step, params


def learned_rule_curve(theta, rule: RuleConfig, arch: Architecture, task: Task,
                       eval_points: Sequence[int], *, batch_size: int = 128,
                       ridge: float = 0.1, on_step: Callable[[int], None] | None = None,
                       keep_params: bool = False) -> tuple[list[dict], dict]:
    """Train a fresh base model with the rule; readout accuracies at ``eval_points``.

    Returns (rows with ``step``, ``ridge_accuracy``, ``logreg_accuracy`` and the collapse
    diagnostics ``rank90`` (components for 90% of the variance of the test set's
    top-layer features) and ``w_growth`` (||W^1|| / ||W^1 at step 0||);
    extras: ``params_init`` / ``params_final`` when ``keep_params``).
    """
    check_rule_fits(rule, arch)
    points = sorted(set(int(p) for p in eval_points))
    wanted = set(points)
    rows: list[dict] = []
    extras: dict = {}
    params = params_init = None
    for step, params in rollout(theta, rule, arch, task.x_pool, seed=task.seed,
                                steps=points[-1] if points else 0, batch_size=batch_size,
                                stream=CURVE_STREAM):
        if step == 0:
            params_init = params
            if keep_params:
                extras["params_init"] = jax.tree.map(np.asarray, params)
        if step > 0 and on_step is not None:
            on_step(step)
        if step in wanted:
            acc = evaluate_features(base_features(params, arch, rule.base_bn_eps), task, ridge)
            rows.append({"step": step, **acc,
                         "w_growth": weight_growth(params_init, params)})
    if keep_params:
        extras["params_final"] = jax.tree.map(np.asarray, params)
    return rows, extras


__all__ = ["architecture", "check_rule_fits", "base_features", "rollout",
           "learned_rule_curve", "CURVE_STREAM", "CONTINUOUS_STREAM"]
