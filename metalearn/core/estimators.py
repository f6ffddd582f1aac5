"""Meta-gradient estimators over truncations: ``truncated``, ``es``, ``pes``, ``hybrid``
(``EstimatorConfig.kind``; what each estimates, its bias, variance and cost:
docs/estimators.md).

Each is a pure per-task function (theta, state, batch, mask) -> (estimate, state) that
runs the whole truncation as one ``lax.scan``; ``GradientEstimator`` pads U to a bucket,
vmaps over tasks and jits it. Every estimator also advances the unperturbed (center)
phi, whose loss is the reported one; perturbations touch only the trainable entries.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from metalearn.core.base_model import BaseParams
from metalearn.core.config import (ConfigError, EstimatorConfig, MetaObjectiveConfig, RuleConfig,
                                   UnrollConfig)
from metalearn.core.rule_layers import matmul_convs
from metalearn.core.theta import theta_spec
from metalearn.core.unroll import (MetaGradient, Problem, TruncationBatch, _all_finite,
                                   check_truncation)


class VarianceStats(NamedTuple):
    """Online (EMA) mean and variance of one gradient estimator (flat, [D])."""

    count: Any  # [] float: samples seen
    mean: Any  # [D] EMA of the estimate
    var: Any  # [] EMA of |g - mean|^2 (the trace of the covariance)


class EstimatorState(NamedTuple):
    """Per-task state of an estimator (leading task axis on every leaf when vmapped).

    params: phi of the unperturbed (center) trajectory;
    key: [2] uint32 PRNG key of the task's perturbations (ES family; else unused);
    particles: PES only: phi of the 2K particles, [2K, ...] (+ first, then -);
    accumulator: PES only: [K, D] the summed perturbations xi of each pair;
    stats: hybrid only: (backprop, ES) VarianceStats, carried across tasks.
    """

    params: BaseParams
    key: Any
    particles: Any = None
    accumulator: Any = None
    stats: Any = None


class Estimate(NamedTuple):
    """One truncation's estimate. loss: mean meta-objective of the center trajectory
    over the U steps; grad: theta pytree; step_losses: [U]; finite: loss and grad all
    finite; metrics: {name: scalar} (see each estimator)."""

    loss: Any
    grad: Any
    step_losses: Any
    finite: Any
    metrics: dict


def ema_update(stats: VarianceStats, g, decay: float) -> VarianceStats:
    """Fold one flat estimate g [D] into the EMA mean and variance (West's update).
    A non-finite g is skipped: the statistics outlive the task, and one diverged
    truncation must not poison them for the rest of the worker's life."""
    diff = g - stats.mean
    first = stats.count < 1  # the first sample sets the mean; no spread yet
    alpha = jnp.where(first, 1.0, 1.0 - decay)
    mean = stats.mean + alpha * diff
    var = jnp.where(first, 0.0, decay * (stats.var + (1.0 - decay) * jnp.sum(diff * diff)))
    updated = VarianceStats(stats.count + 1.0, mean, var)
    ok = jnp.all(jnp.isfinite(g))
    return jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, stats)


def inverse_variance_weight(bp: VarianceStats, es: VarianceStats):
    """Weight of the backprop component: v_es / (v_bp + v_es); 0.5 until both have two
    samples (a variance needs a spread) or if both variances are zero."""
    total = bp.var + es.var
    ready = jnp.logical_and(jnp.minimum(bp.count, es.count) >= 2, total > 0)
    return jnp.where(ready, es.var / jnp.where(total > 0, total, 1.0), 0.5)


def masked_scan(step: Callable, carry, batch: TruncationBatch, mask, remat: bool = False,
                unroll: bool = False):
    """Run ``step(carry, x, pair) -> (carry, out)`` over a truncation's steps.

    batch: one task's [U, ...] data; mask: [U] of 0/1. A step whose mask is 0 (bucket
    padding) is skipped with ``lax.cond``: the carry passes through, its output is
    zeros, and nothing is computed (forwards or backwards) as long as the mask is not
    batched. Returns (final carry, outputs stacked on a leading [U] axis).
    """
    first = jax.tree.map(lambda a: a[0], (batch.inner_x, batch.pair))
    out_shape = jax.eval_shape(lambda c: step(c, *first)[1], carry)

    def skip(c, x, pair):
        return c, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

    def body(c, inputs):
        x, pair, keep = inputs
        return lax.cond(keep > 0, step, skip, c, x, pair)

    if remat:
        body = jax.checkpoint(body)
    return lax.scan(body, carry, (batch.inner_x, batch.pair, mask), unroll=bool(unroll))


def _tree_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _lift(tree):
    return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


def _lower(tree):
    return jax.tree.map(lambda a: a[0], tree)


def _pad_steps(batch: TruncationBatch, size: int):
    """Pad the step axis (axis 1, after the task axis) of every leaf to ``size`` by
    repeating the last step; return (batch, mask [size])."""
    steps = batch.num_steps

    def pad(a):
        a = jnp.asarray(a)
        if size == steps:
            return a
        last = jnp.repeat(a[:, steps - 1:steps], size - steps, axis=1)
        return jnp.concatenate([a, last], axis=1)

    mask = jnp.concatenate([jnp.ones((steps,)), jnp.zeros((size - steps,))])
    return jax.tree.map(pad, batch), mask


class GradientEstimator:
    """Base interface: ``init`` a task's state, then one call per truncation.

    ``init(seeds, params, previous=None)``: seeds: an int (or T ints when vmapped) for
    the task's perturbations; params: phi at the task's start (stacked [T, ...] when
    vmapped); previous: the last state of this worker's estimator, from which
    cross-task statistics (the hybrid's variances) carry over.
    ``__call__(theta, state, batch) -> (Estimate, new_state)``.

    Subclasses write ``_task(theta, state, batch, mask) -> (Estimate, state)`` for one
    task (no task axis; batch padded to a bucket, mask [U_bucket]); this class vmaps it
    over tasks and jits it once. Without ``num_tasks`` a task axis of one is added
    and removed around the same program.
    ``matmul_convs`` (read when the program is traced): the rule's convolutions as
    matmuls (default); False keeps XLA's convolutions (``metalearn bench estimators``).
    """

    name = "base"
    metric_names: tuple[str, ...] = ()  # the keys of ``Estimate.metrics``
    matmul_convs = True
    needs_backprop = False  # truncated backprop is part of the estimate

    def __init__(self, problem, unroll: UnrollConfig, estimator: EstimatorConfig,
                 theta_size: int, num_tasks: int | None = None,
                 trainable: np.ndarray | None = None):
        self.problem = problem
        self.unroll = unroll
        self.config = estimator
        self.num_tasks = num_tasks
        self.theta_size = int(theta_size)
        if trainable is not None and np.shape(trainable) != (self.theta_size,):
            raise ConfigError(f"trainable mask of shape {np.shape(trainable)}; theta has "
                              f"{self.theta_size} parameters")
        self.trainable = None if trainable is None else jnp.asarray(trainable, jnp.float32)
        self.sigma = float(estimator.perturbation_std)
        self.pairs = int(estimator.pairs)

        # Truncated backprop's driver: inside the program (``scan``), or the stepwise
        # ``MetaGradient`` before it (``stepwise``, the CPU default of ``method: auto``:
        # as one program it measured 1.27x slower there and compiles 1.7x longer).
        self.backprop_driver = unroll.resolved_method()
        self._stepwise = (MetaGradient(problem, unroll, num_tasks)
                          if self.needs_backprop and self.backprop_driver == "stepwise"
                          else None)

        def program(theta, state, batch, mask, bp):
            with matmul_convs(self.matmul_convs):
                return jax.vmap(self._task, in_axes=(None, 0, 0, None, 0))(
                    theta, state, batch, mask, bp)

        self._program = jax.jit(program)

    # ---------------------------------------------------------------- task axis

    def _keys(self, seeds):
        if self.num_tasks:
            seeds = list(seeds) if isinstance(seeds, Sequence) else [seeds]
            if len(seeds) != self.num_tasks:
                raise ConfigError(f"{len(seeds)} task seeds for an estimator of "
                                  f"num_tasks={self.num_tasks}")
        else:
            seeds = [seeds[0] if isinstance(seeds, Sequence) else seeds]
        return jnp.stack([jax.random.PRNGKey(int(s) % (2 ** 31)) for s in seeds])

    def init(self, seeds, params: BaseParams, previous: EstimatorState | None = None
             ) -> EstimatorState:
        keys = self._keys(seeds)
        tasks = (lambda t: t) if self.num_tasks else _lift
        state = self._init_tasks(keys, tasks(params),
                                 None if previous is None else tasks(previous))
        return state if self.num_tasks else _lower(state)

    def _init_tasks(self, keys, params, previous) -> EstimatorState:
        """State of T tasks: keys [T, 2], params [T, ...], previous (or None) [T, ...]."""
        return EstimatorState(params, keys)

    def validate(self, state: EstimatorState, batch: TruncationBatch) -> None:
        if isinstance(self.problem, Problem):
            check_truncation(self.problem, state.params, batch, self.num_tasks)

    def __call__(self, theta, state: EstimatorState, batch: TruncationBatch):
        self.validate(state, batch)
        steps = batch.num_steps
        size = self.unroll.bucket(steps)
        bp = None
        if self._stepwise is not None:
            result = self._stepwise(theta, state.params, batch)
            bp = (result.loss, result.grad, result.params,
                  jnp.concatenate([result.step_losses, jnp.zeros(
                      result.step_losses.shape[:-1] + (size - steps,),
                      result.step_losses.dtype)], axis=-1))
            bp = bp if self.num_tasks else _lift(bp)
        if not self.num_tasks:
            state, batch = _lift(state), _lift(batch)
        padded, mask = _pad_steps(batch, size)
        estimate, state = self._program(theta, state, padded, mask, bp)
        estimate = estimate._replace(step_losses=estimate.step_losses[..., :steps])
        if not self.num_tasks:
            estimate, state = _lower(estimate), _lower(state)
        return estimate, state

    # ---------------------------------------------------------------- one task

    def _task(self, theta, state: EstimatorState, batch: TruncationBatch, mask, bp):
        """bp: None, or the stepwise driver's (loss, grad, final phi, step losses) of this
        task when ``needs_backprop``."""
        raise NotImplementedError

    def _backprop(self, theta, params, batch, mask, bp=None):
        """Truncated backprop of one task: (loss, masked grad, final phi, step losses),
        computed here by a scan or taken from the stepwise driver (``bp``)."""
        if bp is not None:
            loss, grad, final, losses = bp
            if self.trainable is not None:
                flat, unravel = ravel_pytree(grad)
                grad = unravel(flat * self.trainable)
            return loss, grad, final, losses
        problem = self.problem

        def loss_fn(theta):
            def step(phi, x, pair):
                return problem.step(theta, phi, x, pair)
            final, losses = masked_scan(step, params, batch, mask, self.unroll.remat,
                                        self.unroll.scan_unroll)
            return jnp.sum(losses) / jnp.sum(mask), (final, losses)

        (loss, (final, losses)), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta)
        if self.trainable is not None:  # frozen entries: the learner drops them anyway
            flat, unravel = ravel_pytree(grad)
            grad = unravel(flat * self.trainable)
        return loss, grad, final, losses

    def _noise(self, key, theta):
        """[K, D] perturbations of the trainable entries, and the advanced key."""
        flat, _ = ravel_pytree(theta)
        key, sub = jax.random.split(key)
        eps = self.sigma * jax.random.normal(sub, (self.pairs,) + flat.shape, flat.dtype)
        if self.trainable is not None:
            eps = eps * self.trainable
        return key, eps

    def _particles(self, theta, offsets, phis, batch, mask):
        """Step every particle (theta + offsets[p] from phis[p]) through the truncation.
        offsets: [P, D]; phis: [P, ...]. Returns (final phis, each particle's mean loss
        over the real steps [P], per-step losses [U, P])."""
        problem = self.problem
        flat, unravel = ravel_pytree(theta)

        def step(phis, x, pair):
            def one(offset, phi):
                return problem.step(unravel(flat + offset), phi, x, pair)
            return jax.vmap(one)(offsets, phis)

        final, losses = masked_scan(step, phis, batch, mask, False, self.unroll.scan_unroll)
        return final, jnp.sum(losses, axis=0) / jnp.sum(mask), losses

    def _combine(self, theta, noise_sum, loss_pos, loss_neg):
        """noise_sum: [K, D] (eps for ES, xi for PES); loss_*: [K] mean over steps.
        Returns (grad tree, flat grad [D], trace variance of the mean from the pairs)."""
        _, unravel = ravel_pytree(theta)
        per_pair = noise_sum * ((loss_pos - loss_neg) / (2.0 * self.sigma ** 2))[:, None]
        flat = jnp.mean(per_pair, axis=0)
        if self.pairs > 1:
            spread = jnp.sum(jnp.var(per_pair, axis=0, ddof=1)) / self.pairs
        else:
            spread = jnp.asarray(jnp.nan, flat.dtype)
        return unravel(flat), flat, spread


def _broadcast(tree, k: int, axis: int = 0):
    """Copies of every leaf on a new axis of size k at ``axis``."""
    return jax.tree.map(lambda a: jnp.repeat(jnp.expand_dims(a, axis), k, axis=axis), tree)


def _finite(losses, grad):
    return jnp.logical_and(jnp.all(jnp.isfinite(losses)), _all_finite(grad))


class TruncatedBackprop(GradientEstimator):
    """The paper's estimator: backprop through the truncation (a scan in the program, or
    the stepwise driver; see ``backprop_driver``). Metrics: grad_norm."""

    name = "truncated"
    metric_names = ("grad_norm",)
    needs_backprop = True

    def _task(self, theta, state, batch, mask, bp):
        loss, grad, final, losses = self._backprop(theta, state.params, batch, mask, bp)
        return (Estimate(loss, grad, losses, _finite(loss, grad), {"grad_norm": _tree_norm(grad)}),
                state._replace(params=final))


class ES(GradientEstimator):
    """Antithetic ES over one truncation: g = 1/(2 K sigma^2) sum_k eps_k (L(theta +
    eps_k) - L(theta - eps_k)), eps_k ~ N(0, sigma^2 I), K = ``pairs``; both particles of
    a pair start from the center phi and see the same data. Metrics: grad_norm, pair_var (trace variance of the estimate from the
    pairs' spread)."""

    name = "es"
    metric_names = ("grad_norm", "pair_var")

    def _task(self, theta, state, batch, mask, bp):
        key, eps = self._noise(state.key, theta)
        k = self.pairs
        offsets = jnp.concatenate([jnp.zeros_like(eps[:1]), eps, -eps])
        phis = _broadcast(state.params, 1 + 2 * k)
        final, total, losses = self._particles(theta, offsets, phis, batch, mask)
        grad, _, spread = self._combine(theta, eps, total[1:1 + k], total[1 + k:])
        metrics = {"grad_norm": _tree_norm(grad), "pair_var": spread}
        return (Estimate(total[0], grad, losses[:, 0], _finite(total, grad), metrics),
                state._replace(params=_lower(final), key=key))


class PES(GradientEstimator):
    """Persistent ES (Vicol et al. 2021): the 2K particles keep their phi for the whole
    task and pair k accumulates its perturbations, xi_k <- xi_k + eps_k, so that
    g = 1/(2 K sigma^2) sum_k xi_k (L_k^+ - L_k^-) is unbiased through every earlier
    truncation of the task. Metrics: grad_norm, pair_var, xi_norm (mean
    |xi_k| / sigma: sqrt(truncations x trainable dims) grows along a task)."""

    name = "pes"
    metric_names = ("grad_norm", "pair_var", "xi_norm")

    def _init_tasks(self, keys, params, previous):
        tasks = keys.shape[0]
        return EstimatorState(params, keys, particles=_broadcast(params, 2 * self.pairs, 1),
                              accumulator=jnp.zeros((tasks, self.pairs, self.theta_size),
                                                    jnp.float32))

    def _task(self, theta, state, batch, mask, bp):
        key, eps = self._noise(state.key, theta)
        accumulator = state.accumulator + eps
        k = self.pairs
        offsets = jnp.concatenate([jnp.zeros_like(eps[:1]), eps, -eps])
        phis = jax.tree.map(lambda c, p: jnp.concatenate([c[None], p]), state.params,
                            state.particles)
        final, total, losses = self._particles(theta, offsets, phis, batch, mask)
        grad, _, spread = self._combine(theta, accumulator, total[1:1 + k], total[1 + k:])
        xi = jnp.mean(jnp.linalg.norm(accumulator, axis=-1)) / self.sigma
        metrics = {"grad_norm": _tree_norm(grad), "pair_var": spread, "xi_norm": xi}
        return (Estimate(total[0], grad, losses[:, 0], _finite(total, grad), metrics),
                state._replace(params=_lower(final), key=key,
                               particles=jax.tree.map(lambda a: a[1:], final),
                               accumulator=accumulator))


class Hybrid(GradientEstimator):
    """Truncated backprop and ES of the same truncation (Metz et al. 2019),
    g = (v_es g_bp + v_bp g_es) / (v_bp + v_es), v_* an EMA of |g_* - mean(g_*)|^2 over
    the worker's truncations (``variance_decay``; equal weights until each has two
    samples). Metrics: grad_norm, pair_var, bp_norm, es_norm, bp_var, es_var, w_bp."""

    name = "hybrid"
    metric_names = ("grad_norm", "pair_var", "bp_norm", "es_norm", "bp_var", "es_var", "w_bp")
    needs_backprop = True

    def _init_tasks(self, keys, params, previous):
        state = EstimatorState(params, keys)
        if previous is not None and previous.stats is not None:
            return state._replace(stats=previous.stats)
        tasks = keys.shape[0]
        empty = VarianceStats(jnp.zeros(tasks), jnp.zeros((tasks, self.theta_size)),
                              jnp.zeros(tasks))
        return state._replace(stats=(empty, empty))

    def _task(self, theta, state, batch, mask, bp):
        loss, g_bp, final, losses = self._backprop(theta, state.params, batch, mask, bp)
        key, eps = self._noise(state.key, theta)
        k = self.pairs
        phis = _broadcast(state.params, 2 * k)
        _, total, _ = self._particles(theta, jnp.concatenate([eps, -eps]), phis, batch, mask)
        _, es_flat, spread = self._combine(theta, eps, total[:k], total[k:])
        flat_bp, unravel = ravel_pytree(g_bp)  # already masked to the trainable entries
        decay = float(self.config.variance_decay)
        bp_stats = ema_update(state.stats[0], flat_bp, decay)
        es_stats = ema_update(state.stats[1], es_flat, decay)
        w = inverse_variance_weight(bp_stats, es_stats)
        flat = w * flat_bp + (1.0 - w) * es_flat
        grad = unravel(flat)
        metrics = {"grad_norm": jnp.linalg.norm(flat), "pair_var": spread,
                   "bp_norm": jnp.linalg.norm(flat_bp), "es_norm": jnp.linalg.norm(es_flat),
                   "bp_var": bp_stats.var, "es_var": es_stats.var, "w_bp": w}
        finite = jnp.logical_and(_finite(loss, g_bp), _finite(total, grad))
        return (Estimate(loss, grad, losses, finite, metrics),
                state._replace(params=final, key=key, stats=(bp_stats, es_stats)))


ESTIMATOR_CLASSES = {"truncated": TruncatedBackprop, "es": ES, "pes": PES, "hybrid": Hybrid}


def make_estimator(activation: str, rule: RuleConfig = RuleConfig(),
                   objective: MetaObjectiveConfig = MetaObjectiveConfig(),
                   unroll: UnrollConfig = UnrollConfig(),
                   estimator: EstimatorConfig = EstimatorConfig(), num_tasks: int | None = None,
                   trainable: np.ndarray | None = None) -> GradientEstimator:
    """The estimator ``estimator.kind`` names, for the rule on one activation.

    trainable: [P] 0/1 mask of the theta entries the learner updates (the complement
    of ``learner.frozen``); perturbations are confined to them.
    """
    return build_estimator(Problem(activation, rule, objective), unroll, estimator,
                           theta_spec(rule).num_params, num_tasks, trainable)


def build_estimator(problem, unroll: UnrollConfig, estimator: EstimatorConfig,
                    theta_size: int, num_tasks: int | None = None,
                    trainable: np.ndarray | None = None) -> GradientEstimator:
    """``make_estimator`` for any problem with a ``step(theta, phi, x, pair)`` method
    and a theta of ``theta_size`` parameters."""
    cls = ESTIMATOR_CLASSES.get(estimator.kind)
    if cls is None:
        raise ConfigError(f"estimator.kind: {estimator.kind!r} is not a truncation "
                          f"estimator ({', '.join(ESTIMATOR_CLASSES)})")
    return cls(problem, unroll, estimator, theta_size, num_tasks, trainable)


__all__ = ["ES", "ESTIMATOR_CLASSES", "Estimate", "EstimatorState", "GradientEstimator",
           "Hybrid", "PES", "TruncatedBackprop", "VarianceStats", "build_estimator",
           "ema_update", "inverse_variance_weight", "make_estimator", "masked_scan"]
