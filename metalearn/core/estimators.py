"""Meta-gradient estimators over truncations (docs/estimators.md).

A task's inner run is cut into truncations; each estimator turns one truncation into
an estimate of d(meta-loss)/d(theta) and carries its own per-task state from one
truncation to the next. Four estimators share one interface (``UnrollConfig.estimator``):

``truncated``: backprop through the U steps with phi at the truncation's start held
    constant (``metalearn.core.unroll.MetaGradient``, the paper's estimator). Low
    variance, biased towards what pays off within U steps.
``es``: antithetic evolution strategies over the truncation. K = ``pairs`` perturbations
    eps_k ~ N(0, sigma^2 I) (sigma = ``perturbation_std``); theta + eps_k and
    theta - eps_k both start from the same phi and see the same data:

        g = 1 / (2 K sigma^2) * sum_k eps_k (L(theta + eps_k) - L(theta - eps_k)),

    an unbiased estimate of the gradient of the Gaussian-smoothed truncated loss
    E_eps L(theta + eps). Forwards only; still truncated (phi's history is constant).
``pes``: persistent ES (Vicol et al., ICML 2021). Each of the 2K particles keeps its
    own phi for the whole task, and each pair accumulates its perturbations,
    xi_k <- xi_k + eps_k, so that

        g = 1 / (2 K sigma^2) * sum_k xi_k (L_k^+ - L_k^-)

    is an unbiased estimate of the gradient of the smoothed loss of this truncation
    *through every earlier truncation of the task*: summed over a task's truncations,
    the gradient of the whole inner run, with no truncation bias. Its variance grows
    with the number of truncations behind it (|xi|^2 grows linearly).
``hybrid``: truncated backprop and ES on the same truncation, combined with weights
    inversely proportional to their variances (Metz et al. 2019, "Understanding and
    correcting pathologies in the training of learned optimizers"):

        g = (v_es g_bp + v_bp g_es) / (v_bp + v_es),

    v_* = an exponential moving average of |g_* - mean(g_*)|^2 over the worker's
    truncations (``variance_decay``), kept across tasks; equal weights until each
    component has two samples.

Every estimator also advances an unperturbed phi (the "center" trajectory) whose
per-step meta-objective is the reported loss, so losses are comparable across
estimators. Perturbations touch only the trainable entries of theta (``trainable``,
the complement of ``learner.frozen``): noise on frozen entries would only add variance.

All pieces are jitted per inner step and driven from Python (one compilation serves
every U), and vmapped over a leading task axis when ``num_tasks`` is set (theta is
shared). State and results are immutable NamedTuples; non-finite losses or gradients
are reported in ``Estimate.finite``, never hidden.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from metalearn.core.base_model import BaseParams
from metalearn.core.config import ConfigError, MetaObjectiveConfig, RuleConfig, UnrollConfig
from metalearn.core.rule_layers import matmul_convs
from metalearn.core.theta import theta_spec
from metalearn.core.unroll import MetaGradient, Problem, TruncationBatch, _all_finite


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


def _broadcast(tree, k: int):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (k,) + a.shape), tree)


class GradientEstimator:
    """Base interface: ``init`` a task's state, then one call per truncation.

    ``init(seeds, params, previous=None)``: seeds: an int (or T ints when vmapped) for
    the task's perturbations; params: phi at the task's start (stacked [T, ...] when
    vmapped); previous: the last state of this worker's estimator, from which
    cross-task statistics (the hybrid's variances) carry over.
    ``__call__(theta, state, batch) -> (Estimate, new_state)``.
    """

    name = "base"
    metric_names: tuple[str, ...] = ()  # the keys of ``Estimate.metrics``

    def __init__(self, problem, unroll: UnrollConfig, theta_size: int,
                 num_tasks: int | None = None, trainable: np.ndarray | None = None):
        self.problem = problem
        self.unroll = unroll
        self.num_tasks = num_tasks
        self.theta_size = int(theta_size)
        if trainable is not None and np.shape(trainable) != (self.theta_size,):
            raise ConfigError(f"trainable mask of shape {np.shape(trainable)}; theta has "
                              f"{self.theta_size} parameters")
        self.trainable = None if trainable is None else jnp.asarray(trainable, jnp.float32)
        self.backprop = MetaGradient(problem, unroll, num_tasks)  # also checks shapes
        self._vm = ((lambda f, axes: jax.vmap(f, in_axes=axes)) if num_tasks
                    else (lambda f, axes: f))

    def _keys(self, seeds):
        if self.num_tasks:
            seeds = list(seeds) if isinstance(seeds, Sequence) else [seeds]
            if len(seeds) != self.num_tasks:
                raise ConfigError(f"{len(seeds)} task seeds for an estimator of "
                                  f"num_tasks={self.num_tasks}")
            return jnp.stack([jax.random.PRNGKey(int(s) % (2 ** 31)) for s in seeds])
        if isinstance(seeds, Sequence):
            seeds = seeds[0]
        return jax.random.PRNGKey(int(seeds) % (2 ** 31))

    def init(self, seeds, params: BaseParams, previous: EstimatorState | None = None
             ) -> EstimatorState:
        return EstimatorState(params, self._keys(seeds))

    def validate(self, state: EstimatorState, batch: TruncationBatch) -> None:
        if isinstance(self.problem, Problem):
            self.backprop.validate(state.params, batch)


class TruncatedBackprop(GradientEstimator):
    """The paper's estimator (``MetaGradient``). Metrics: grad_norm."""

    name = "truncated"
    metric_names = ("grad_norm",)

    def __init__(self, problem, unroll, theta_size, num_tasks=None, trainable=None):
        super().__init__(problem, unroll, theta_size, num_tasks, trainable)
        mask = self.trainable

        def masked(grad):  # frozen entries: the learner drops them; keep norms comparable
            flat, unravel = ravel_pytree(grad)
            return unravel(flat * mask) if mask is not None else grad

        self._masked = jax.jit(self._vm(masked, (0 if num_tasks else None,)))

    def __call__(self, theta, state: EstimatorState, batch: TruncationBatch):
        result = self.backprop(theta, state.params, batch)
        grad = self._masked(result.grad) if self.trainable is not None else result.grad
        norm = _tree_norm(grad, self.num_tasks)
        return (Estimate(result.loss, grad, result.step_losses, result.finite,
                         {"grad_norm": norm}),
                state._replace(params=result.params))


def _tree_norm(tree, num_tasks):
    def norm(t):
        return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))
    return jax.vmap(norm)(tree) if num_tasks else norm(tree)


class _Antithetic(GradientEstimator):
    """Shared machinery of the ES family: noise, stepping particles, combining.

    ``matmul_convs`` (read when the particle step is first traced): the rule's
    convolutions run as batched matmuls over the particles (``rule_layers.matmul_convs``);
    False keeps XLA's grouped convolutions (``metalearn bench estimators`` compares).
    """

    matmul_convs = True

    def __init__(self, problem, unroll, theta_size, num_tasks=None, trainable=None):
        super().__init__(problem, unroll, theta_size, num_tasks, trainable)
        sigma = float(unroll.perturbation_std)
        pairs = int(unroll.pairs)
        trainable_mask = self.trainable
        tasks = 0 if num_tasks else None
        vm = self._vm

        def noise(key, theta):
            flat, _ = ravel_pytree(theta)
            key, sub = jax.random.split(key)
            eps = sigma * jax.random.normal(sub, (pairs,) + flat.shape, flat.dtype)
            if trainable_mask is not None:
                eps = eps * trainable_mask
            return key, eps

        def particles_step(theta, offsets, phis, x, pair):
            # offsets: [K, D] added to theta; phis: [K, ...]; every particle sees x, pair.
            flat, unravel = ravel_pytree(theta)

            def one(offset, phi):
                return problem.step(unravel(flat + offset), phi, x, pair)

            # Per-particle theta: convolutions as batched matmuls, not grouped ones.
            with matmul_convs(self.matmul_convs):
                return jax.vmap(one)(offsets, phis)

        def combine(theta, noise_sum, loss_pos, loss_neg):
            # noise_sum: [K, D] (eps for ES, xi for PES); loss_*: [K] summed over steps.
            _, unravel = ravel_pytree(theta)
            per_pair = noise_sum * ((loss_pos - loss_neg) / (2.0 * sigma ** 2))[:, None]
            flat = jnp.mean(per_pair, axis=0)
            if pairs > 1:  # trace of the covariance of the mean, from the pairs' spread
                spread = jnp.sum(jnp.var(per_pair, axis=0, ddof=1)) / pairs
            else:
                spread = jnp.asarray(jnp.nan, flat.dtype)
            return unravel(flat), flat, spread

        self.pairs = pairs
        self._noise = jax.jit(vm(noise, (tasks, None)))
        self._particles_step = jax.jit(vm(particles_step, (None, tasks, tasks, tasks, tasks)))
        self._combine = jax.jit(vm(combine, (None, tasks, tasks, tasks)))
        self._finite = jax.jit(vm(lambda loss, g: jnp.logical_and(
            jnp.all(jnp.isfinite(loss)), _all_finite(g)), (tasks, tasks)))
        # Particle offsets: [1 + 2K, D] (center, +eps, -eps) or [2K, D] (+eps, -eps).
        self._offsets_center = jax.jit(vm(lambda eps: jnp.concatenate(
            [jnp.zeros_like(eps[:1]), eps, -eps]), (tasks,)))
        self._offsets_pairs = jax.jit(vm(lambda eps: jnp.concatenate([eps, -eps]), (tasks,)))

    def _split_steps(self, batch: TruncationBatch):
        steps = batch.num_steps
        task = (lambda a, t: a[:, t]) if self.num_tasks else (lambda a, t: a[t])
        xs = [task(batch.inner_x, t) for t in range(steps)]
        pairs = [type(batch.pair)(*[task(f, t) for f in batch.pair]) for t in range(steps)]
        return xs, pairs

    def _run(self, theta, offsets, phis, batch):
        """Step every particle through the truncation. Returns (final phis, each
        particle's mean loss over the U steps [.., K], per-step losses of particle 0
        [.., U])."""
        xs, pairs = self._split_steps(batch)
        total, first = None, []
        for x, pair in zip(xs, pairs):
            phis, losses = self._particles_step(theta, offsets, phis, x, pair)
            total = losses if total is None else total + losses
            first.append(losses[..., 0])
        return phis, total / len(xs), jnp.stack(first, axis=-1)

    def _take(self, tree, start, stop):
        if self.num_tasks:
            return jax.tree.map(lambda a: a[:, start:stop], tree)
        return jax.tree.map(lambda a: a[start:stop], tree)

    def _broadcast_phi(self, params, k):
        if self.num_tasks:
            return jax.tree.map(lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], k)
                                                           + a.shape[1:]), params)
        return _broadcast(params, k)


class ES(_Antithetic):
    """Antithetic ES over one truncation; both particles of a pair start from the
    center phi. Metrics: grad_norm, pair_var (trace variance of the estimate from the
    pairs' spread)."""

    name = "es"
    metric_names = ("grad_norm", "pair_var")

    def __call__(self, theta, state: EstimatorState, batch: TruncationBatch):
        self.validate(state, batch)
        key, eps = self._noise(state.key, theta)
        offsets = self._offsets_center(eps)
        k = self.pairs
        phis = self._broadcast_phi(state.params, 1 + 2 * k)
        phis, total, step_losses = self._run(theta, offsets, phis, batch)
        grad, _, spread = self._combine(theta, eps, total[..., 1:1 + k], total[..., 1 + k:])
        loss = total[..., 0]
        finite = jnp.logical_and(self._finite(total, grad), jnp.isfinite(loss))
        center = jax.tree.map(lambda a: a[:, 0] if self.num_tasks else a[0], phis)
        metrics = {"grad_norm": _tree_norm(grad, self.num_tasks), "pair_var": spread}
        return (Estimate(loss, grad, step_losses, finite, metrics),
                state._replace(params=center, key=key))


class PES(_Antithetic):
    """Persistent ES: the 2K particles keep their phi for the whole task and each
    pair accumulates its perturbations. Metrics: grad_norm, pair_var, xi_norm (mean
    |xi_k| / sigma: sqrt(truncations x trainable dims) grows along a task)."""

    name = "pes"
    metric_names = ("grad_norm", "pair_var", "xi_norm")

    def init(self, seeds, params, previous=None):
        lead = (self.num_tasks,) if self.num_tasks else ()
        return EstimatorState(params, self._keys(seeds),
                              particles=self._broadcast_phi(params, 2 * self.pairs),
                              accumulator=jnp.zeros(lead + (self.pairs, self.theta_size),
                                                    jnp.float32))

    def __call__(self, theta, state: EstimatorState, batch: TruncationBatch):
        self.validate(state, batch)
        key, eps = self._noise(state.key, theta)
        accumulator = state.accumulator + eps
        offsets = self._offsets_center(eps)
        k = self.pairs
        both = jax.tree.map(
            lambda c, p: jnp.concatenate([c[:, None] if self.num_tasks else c[None], p],
                                         axis=1 if self.num_tasks else 0),
            state.params, state.particles)
        phis, total, step_losses = self._run(theta, offsets, both, batch)
        grad, _, spread = self._combine(theta, accumulator, total[..., 1:1 + k],
                                        total[..., 1 + k:])
        loss = total[..., 0]
        finite = jnp.logical_and(self._finite(total, grad), jnp.isfinite(loss))
        center = jax.tree.map(lambda a: a[:, 0] if self.num_tasks else a[0], phis)
        particles = self._take(phis, 1, 1 + 2 * k)
        xi = jnp.mean(jnp.linalg.norm(accumulator, axis=-1), axis=-1) / self.unroll.perturbation_std
        metrics = {"grad_norm": _tree_norm(grad, self.num_tasks), "pair_var": spread,
                   "xi_norm": xi}
        return (Estimate(loss, grad, step_losses, finite, metrics),
                state._replace(params=center, key=key, particles=particles,
                               accumulator=accumulator))


class Hybrid(_Antithetic):
    """Truncated backprop and ES of the same truncation, weighted by inverse online
    variances. Metrics: grad_norm, bp_norm, es_norm, bp_var, es_var, w_bp."""

    name = "hybrid"
    metric_names = ("grad_norm", "pair_var", "bp_norm", "es_norm", "bp_var", "es_var", "w_bp")

    def __init__(self, problem, unroll, theta_size, num_tasks=None, trainable=None):
        super().__init__(problem, unroll, theta_size, num_tasks, trainable)
        decay = float(unroll.variance_decay)
        tasks = 0 if num_tasks else None
        trainable_mask = self.trainable

        def mix(theta, g_bp, g_es_flat, stats):
            flat_bp, unravel = ravel_pytree(g_bp)
            if trainable_mask is not None:  # frozen entries: the learner drops them anyway
                flat_bp = flat_bp * trainable_mask
            bp_stats = ema_update(stats[0], flat_bp, decay)
            es_stats = ema_update(stats[1], g_es_flat, decay)
            w = inverse_variance_weight(bp_stats, es_stats)
            flat = w * flat_bp + (1.0 - w) * g_es_flat
            metrics = {"bp_norm": jnp.linalg.norm(flat_bp), "es_norm": jnp.linalg.norm(g_es_flat),
                       "bp_var": bp_stats.var, "es_var": es_stats.var, "w_bp": w,
                       "grad_norm": jnp.linalg.norm(flat)}
            return unravel(flat), (bp_stats, es_stats), metrics

        self._mix = jax.jit(self._vm(mix, (None, tasks, tasks, tasks)))

    def init(self, seeds, params, previous=None):
        state = super().init(seeds, params)
        if previous is not None and previous.stats is not None:
            return state._replace(stats=previous.stats)
        lead = (self.num_tasks,) if self.num_tasks else ()
        empty = VarianceStats(jnp.zeros(lead), jnp.zeros(lead + (self.theta_size,)),
                              jnp.zeros(lead))
        return state._replace(stats=(empty, empty))

    def __call__(self, theta, state: EstimatorState, batch: TruncationBatch):
        bp = self.backprop(theta, state.params, batch)  # validates the shapes
        key, eps = self._noise(state.key, theta)
        offsets = self._offsets_pairs(eps)
        k = self.pairs
        phis = self._broadcast_phi(state.params, 2 * k)
        _, total, _ = self._run(theta, offsets, phis, batch)
        _, es_flat, spread = self._combine(theta, eps, total[..., :k], total[..., k:])
        grad, stats, metrics = self._mix(theta, bp.grad, es_flat, state.stats)
        finite = jnp.logical_and(bp.finite, self._finite(total, grad))
        metrics["pair_var"] = spread
        return (Estimate(bp.loss, grad, bp.step_losses, finite, metrics),
                state._replace(params=bp.params, key=key, stats=stats))


ESTIMATOR_CLASSES = {"truncated": TruncatedBackprop, "es": ES, "pes": PES, "hybrid": Hybrid}


def make_estimator(activation: str, rule: RuleConfig = RuleConfig(),
                   objective: MetaObjectiveConfig = MetaObjectiveConfig(),
                   unroll: UnrollConfig = UnrollConfig(), num_tasks: int | None = None,
                   trainable: np.ndarray | None = None) -> GradientEstimator:
    """The estimator ``unroll.estimator`` names, for the rule on one activation.

    trainable: [P] 0/1 mask of the theta entries the learner updates (the complement
    of ``learner.frozen``); perturbations are confined to them.
    """
    return build_estimator(Problem(activation, rule, objective), unroll,
                           theta_spec(rule).num_params, num_tasks, trainable)


def build_estimator(problem, unroll: UnrollConfig, theta_size: int,
                    num_tasks: int | None = None, trainable: np.ndarray | None = None
                    ) -> GradientEstimator:
    """``make_estimator`` for any problem with a ``step(theta, phi, x, pair)`` method
    and a theta of ``theta_size`` parameters."""
    cls = ESTIMATOR_CLASSES.get(unroll.estimator)
    if cls is None:
        raise ConfigError(f"unroll.estimator: unknown estimator {unroll.estimator!r}")
    return cls(problem, unroll, theta_size, num_tasks, trainable)


__all__ = ["ES", "ESTIMATOR_CLASSES", "Estimate", "EstimatorState", "GradientEstimator",
           "Hybrid", "PES", "TruncatedBackprop", "VarianceStats", "build_estimator",
           "ema_update", "inverse_variance_weight", "make_estimator"]
