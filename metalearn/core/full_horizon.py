"""Full-horizon estimators: one perturbation held for a whole inner run (docs/estimators.md).

The truncated estimators (``metalearn.core.estimators``) see U inner steps at a time; a
rule that gains inside a truncation and collapses by step 1,000 looks good to them.
These estimators score each perturbed theta by the meta-objective over the *whole*
inner run of a task, so the signal spans the horizon the rule is judged at:

``es_full`` (ES-Single, Vicol et al. 2023; NRES, Li et al. 2023): K antithetic pairs
    theta +- eps_k, eps_k ~ N(0, sigma^2 I) on the trainable entries, each member held
    for the whole run; every member starts from the same phi_0 and sees the same
    batches and labelled draws (common random numbers). With F the fitness of a member
    (the meta-objective averaged over ``horizon.points`` evenly spaced steps, or at the
    last step only: ``horizon.fitness``),

        g = 1 / (2 K sigma^2) * sum_k eps_k (F(theta + eps_k) - F(theta - eps_k)),

    an unbiased estimate of the gradient of the Gaussian-smoothed whole-run fitness.
    Unlike PES, whose accumulated perturbations grow with the number of truncations,
    its variance does not grow with the horizon.
``guided_es`` (Guided ES, Maheswaranathan et al. 2019): the same, with eps drawn from
    sigma^2 (alpha I + (1 - alpha) n/k U U^T) on the n trainable entries, U an
    orthonormal basis of the last k surrogate gradients: truncated backprop through a
    few inner steps in the middle of the run (biased, but cheap and often well aimed).
    The estimate's mean is (alpha I + (1 - alpha) n/k U U^T) grad F: a descent
    direction that leans towards the surrogate subspace; alpha = 1 is ``es_full``.

The population (2K members) is vmapped in one jitted call per inner step. Only the
theta leaves that hold a trainable entry get a member axis; the rest (the rule's
convolutions, when the trainable subspace is the merge weights) stay shared, so the
members' batched work is plain batched convolutions, not per-member grouped ones.
One compilation serves every run length (the step is jitted; the loop is Python).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from metalearn.core.config import ConfigError, EstimatorConfig, HorizonConfig, UnrollConfig
from metalearn.core.rule_layers import matmul_convs
from metalearn.core.unroll import MetaGradient, TruncationBatch

FULL_HORIZON_ESTIMATORS = ("es_full", "guided_es")
# The keys of ``HorizonEstimate.metrics`` (the learner's ``est/<name>`` columns).
METRIC_NAMES = {"es_full": ("grad_norm", "fitness_mean", "fitness_spread", "pair_var"),
                "guided_es": ("grad_norm", "fitness_mean", "fitness_spread", "pair_var",
                              "surrogate_cos")}


class HorizonData(NamedTuple):
    """One task's whole inner run.

    inner_x: [T, B, N_0] unlabelled batches (step t uses inner_x[t - 1]);
    pairs: LabelledPair with a leading point axis, [E, M, B_l, ...]: the labelled draws
      on which the meta-objective is measured at ``points``;
    points: E increasing steps in 1..T (a Python tuple: static).
    """

    inner_x: Any
    pairs: Any  # LabelledPair (or a test system's NamedTuple of draws)
    points: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        return int(self.inner_x.shape[0])

    def pair(self, index: int):
        """The labelled draws of point ``index`` (the pairs' own NamedTuple type)."""
        return type(self.pairs)(*(f[index] for f in self.pairs))


class HorizonEstimate(NamedTuple):
    """grad: [P] flat estimate of d(smoothed fitness)/d(theta) (zero off the trainable
    entries); fitness: [2K] per member (K "+" members, then their K "-" twins);
    curve: [E] the members' mean meta-objective at each point; loss_start: the
    meta-objective of phi_0 on the first point's draws; finite; metrics: {name: float}."""

    grad: Any
    fitness: Any
    curve: Any
    loss_start: Any
    finite: bool
    metrics: dict


class GuideState(NamedTuple):
    """guided_es: the last k surrogate gradients (rows, [r, P] with r <= k, numpy)."""

    surrogates: np.ndarray


def evaluation_points(steps: int, points: int) -> tuple[int, ...]:
    """``points`` evenly spaced steps ending at ``steps``: 300, 3 -> (100, 200, 300)."""
    if steps < 1 or points < 1:
        raise ConfigError(f"horizon.steps and horizon.points must be positive, got "
                          f"{steps} and {points}")
    return tuple(sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)}))


def fitness_of(curves, mode: str):
    """Per-member fitness from their [.., E] meta-objective curves."""
    return curves[..., -1] if mode == "final" else jnp.mean(curves, axis=-1)


def shape_fitness(fitness: np.ndarray, mode: str) -> np.ndarray:
    """A task's [2K] member fitnesses as the estimate uses them (``HorizonConfig.shaping``):
    raw, standardised over the members, or centred ranks in [-0.5, 0.5]."""
    fitness = np.asarray(fitness, np.float64)
    if mode == "normalize":
        spread = fitness.std()
        return (fitness - fitness.mean()) / spread if spread > 0 else np.zeros_like(fitness)
    if mode == "ranks":
        if fitness.size < 2:
            return np.zeros_like(fitness)
        ranks = np.empty(fitness.size)
        ranks[np.argsort(fitness, kind="stable")] = np.arange(fitness.size)
        return ranks / (fitness.size - 1) - 0.5
    return fitness


class FullHorizonES:
    """``es_full`` / ``guided_es`` over a problem with ``advance(theta, phi, x) -> phi``,
    ``loss(phi, pair) -> scalar`` and (for the surrogate) ``step(theta, phi, x, pair)``.

    ``__call__(theta, phi0, data, seed, guide=None) -> (HorizonEstimate, guide)``; theta
    is a pytree shaped like ``theta_template``; ``trainable`` [P] bool (None: all).
    """

    def __init__(self, problem, theta_template, estimator: EstimatorConfig,
                 horizon: HorizonConfig, trainable: np.ndarray | None = None):
        if estimator.kind not in FULL_HORIZON_ESTIMATORS:
            raise ConfigError(f"estimator.kind {estimator.kind!r} is not a full-horizon "
                              f"estimator ({', '.join(FULL_HORIZON_ESTIMATORS)})")
        self.problem, self.horizon, self.config = problem, horizon, estimator
        self.name = estimator.kind
        self.guided = estimator.kind == "guided_es"
        self.sigma = float(estimator.perturbation_std)
        self.pairs = int(estimator.pairs)
        flat, self._unravel = ravel_pytree(theta_template)
        self.theta_size = int(flat.size)
        mask = (np.ones(self.theta_size, bool) if trainable is None
                else np.asarray(trainable, bool).reshape(-1))
        if mask.shape != (self.theta_size,):
            raise ConfigError(f"trainable mask of shape {mask.shape}; theta has "
                              f"{self.theta_size} parameters")
        if not mask.any():
            raise ConfigError("the trainable subspace is empty")
        self.mask = mask
        self.dims = int(mask.sum())
        leaves, self._treedef = jax.tree.flatten(theta_template)
        bounds = np.cumsum([0] + [int(np.size(leaf)) for leaf in leaves])
        self._slices = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self._shapes = [tuple(np.shape(leaf)) for leaf in leaves]
        # Leaves with a trainable entry get a member axis; the others are shared.
        self._member = [bool(mask[a:b].any()) for a, b in self._slices]
        self._surrogate = (MetaGradient(problem, UnrollConfig(method="stepwise"))
                           if self.guided else None)

        assemble = self.assemble
        # A convolution kernel ([kernel, C_in, C_out]) with a member axis would be a
        # grouped convolution under vmap: trace the rule's convolutions as matmuls then.
        self.member_convs = member_convs = any(
            m and len(shape) == 3 for m, shape in zip(self._member, self._shapes))

        def advance(shared, members, phis, x):
            # shared: leaves without a member axis; members: [2K, ...] leaves; phis: [2K, ...]
            with matmul_convs(member_convs):
                return jax.vmap(lambda m, phi: problem.advance(assemble(shared, m), phi, x))(
                    members, phis)

        def losses(phis, pair):
            return jax.vmap(lambda phi: problem.loss(phi, pair))(phis)

        self.population = horizon.resolved_population()
        self._advance = jax.jit(advance)
        self._losses = jax.jit(losses)
        self._loss = jax.jit(problem.loss)
        self._advance_one = jax.jit(problem.advance)

    # ------------------------------------------------------------------ noise

    def _basis(self, guide: GuideState | None) -> np.ndarray | None:
        """[P, r] orthonormal basis of the surrogates on the trainable entries (None: none)."""
        if guide is None or guide.surrogates.shape[0] == 0:
            return None
        rows = guide.surrogates[:, self.mask].astype(np.float64)
        q, r = np.linalg.qr(rows.T)
        keep = np.abs(np.diag(r)) > 1e-12 * max(1.0, float(np.abs(r).max()))
        if not keep.any():
            return None
        basis = np.zeros((self.theta_size, int(keep.sum())))
        basis[self.mask] = q[:, keep]
        return basis

    def perturbations(self, seed: int, guide: GuideState | None = None) -> np.ndarray:
        """[K, P] eps: sigma * (sqrt(alpha) z + sqrt((1 - alpha) n / k) U w) on the trainable
        entries (z ~ N(0, I_n), w ~ N(0, I_k)); alpha = 1 without surrogates. Drawn on the
        host from ``seed`` (a few thousand numbers per task)."""
        rng = np.random.default_rng([int(seed) % (2 ** 63), 7])
        eps = np.zeros((self.pairs, self.theta_size))
        basis = self._basis(guide) if self.guided else None
        alpha = 1.0 if basis is None else float(self.horizon.guide_alpha)
        eps[:, self.mask] = np.sqrt(alpha) * rng.standard_normal((self.pairs, self.dims))
        if basis is not None and alpha < 1.0:
            k = basis.shape[1]
            w = rng.standard_normal((self.pairs, k))
            eps += np.sqrt((1.0 - alpha) * self.dims / k) * (w @ basis.T)
        return (self.sigma * eps).astype(np.float32)

    def covariance_scale(self, guide: GuideState | None = None) -> np.ndarray:
        """[P, P] the sampling covariance over sigma^2 (tests: E[g] = this @ grad F)."""
        basis = self._basis(guide) if self.guided else None
        diag = np.diag(self.mask.astype(np.float64))
        if basis is None:
            return diag
        alpha, k = float(self.horizon.guide_alpha), basis.shape[1]
        return alpha * diag + (1.0 - alpha) * self.dims / k * basis @ basis.T

    # ------------------------------------------------------------------ one task

    def member_leaves(self, theta, offsets):
        """(shared leaves, member leaves [J, ...]): theta + offsets[j] for the leaves with a
        trainable entry, the other leaves once. offsets: [J, P] (numpy or traced)."""
        leaves = jax.tree.leaves(theta)
        shared, members = [], []
        for leaf, (a, b), shape, member in zip(leaves, self._slices, self._shapes,
                                               self._member):
            leaf = jnp.asarray(leaf)
            if member:
                delta = jnp.asarray(offsets)[:, a:b].reshape((offsets.shape[0],) + shape)
                members.append(leaf[None] + delta.astype(leaf.dtype))
            else:
                shared.append(leaf)
        return shared, members

    def assemble(self, shared, members):
        """One theta pytree from ``member_leaves``' two lists (one member's leaves)."""
        it_s, it_m = iter(shared), iter(members)
        return self._treedef.unflatten([next(it_m) if m else next(it_s)
                                        for m in self._member])

    def _members(self, theta, eps: np.ndarray):
        """(shared leaves, member leaves [2K, ...]) for offsets (+eps, -eps)."""
        return self.member_leaves(theta, np.concatenate([eps, -eps]))

    def __call__(self, theta, phi0, data: HorizonData, seed: int,
                 guide: GuideState | None = None) -> tuple[HorizonEstimate, GuideState | None]:
        if data.points[-1] != data.num_steps:
            raise ConfigError(f"the last evaluation point ({data.points[-1]}) must be the run's "
                              f"last step ({data.num_steps})")
        eps = self.perturbations(seed, guide)
        loss_start = self._loss(phi0, data.pair(0))
        midpoint = data.num_steps // 2
        if self.population == "vmap":
            curves, phi_mid = self._run_vmapped(theta, eps, phi0, data, midpoint)
        else:
            curves, phi_mid = self._run_looped(theta, eps, phi0, data, midpoint)
        fitness = np.asarray(fitness_of(curves, self.horizon.fitness), np.float64)
        k = self.pairs
        shaped = shape_fitness(fitness, self.horizon.shaping)
        diff = shaped[:k] - shaped[k:]
        per_pair = eps.astype(np.float64) * (diff / (2.0 * self.sigma ** 2))[:, None]
        grad = per_pair.mean(axis=0)
        finite = bool(np.isfinite(fitness).all() and np.isfinite(grad).all())
        metrics = {"grad_norm": float(np.linalg.norm(grad)),
                   "fitness_mean": float(np.mean(fitness)),
                   "fitness_spread": float(np.mean(np.abs(fitness[:k] - fitness[k:]))),
                   "pair_var": (float(np.sum(np.var(per_pair, axis=0, ddof=1)) / k)
                                if k > 1 else float("nan"))}
        if self.guided:
            guide, cosine = self._update_guide(theta, phi_mid, data, midpoint, guide, grad)
            metrics["surrogate_cos"] = cosine
        estimate = HorizonEstimate(grad.astype(np.float32), fitness,
                                   np.asarray(jnp.mean(curves, axis=0), np.float64),
                                   float(loss_start), finite, metrics)
        return estimate, guide

    def _run_vmapped(self, theta, eps, phi0, data: HorizonData, midpoint: int):
        """All 2K members in one jitted call per step. Returns ([2K, E] curves, the first
        member's phi at ``midpoint``)."""
        shared, members = self._members(theta, eps)
        size = 2 * self.pairs
        phis = jax.tree.map(lambda a: jnp.broadcast_to(a, (size,) + a.shape), phi0)
        curves, point, phi_mid = [], 0, phi0
        for t in range(1, data.num_steps + 1):
            phis = self._advance(shared, members, phis, data.inner_x[t - 1])
            if t == midpoint:
                phi_mid = jax.tree.map(lambda a: a[0], phis)
            if t == data.points[point]:
                curves.append(self._losses(phis, data.pair(point)))
                point += 1
        return jnp.stack(curves, axis=-1), phi_mid

    def _run_looped(self, theta, eps, phi0, data: HorizonData, midpoint: int):
        """One member at a time, one jitted call per step (the same numbers as
        ``_run_vmapped``; faster on CPU)."""
        flat, unravel = ravel_pytree(theta)
        offsets = np.concatenate([eps, -eps])
        pairs = [data.pair(e) for e in range(len(data.points))]
        curves, phi_mid = [], phi0
        for m, offset in enumerate(offsets):
            member = unravel(flat + jnp.asarray(offset, flat.dtype))
            phi, curve, point = phi0, [], 0
            for t in range(1, data.num_steps + 1):
                phi = self._advance_one(member, phi, data.inner_x[t - 1])
                if m == 0 and t == midpoint:
                    phi_mid = phi
                if t == data.points[point]:
                    curve.append(self._loss(phi, pairs[point]))
                    point += 1
            curves.append(jnp.stack(curve))
        return jnp.stack(curves), phi_mid

    def _update_guide(self, theta, phi, data: HorizonData, start: int,
                      guide: GuideState | None, es_grad: np.ndarray):
        """Truncated backprop through ``horizon.surrogate_steps`` inner steps from phi (a
        member's state at mid-run) with the centre theta; pushed into the FIFO."""
        steps = max(1, min(int(self.horizon.surrogate_steps), data.num_steps - start))
        nearest = int(np.argmin([abs(p - start) for p in data.points]))
        pair = data.pair(nearest)
        batch = TruncationBatch(
            jnp.asarray(data.inner_x[start:start + steps]),
            type(pair)(*(jnp.broadcast_to(f, (steps,) + jnp.shape(f)) for f in pair)))
        result = self._surrogate(theta, phi, batch)
        surrogate = np.asarray(ravel_pytree(result.grad)[0], np.float64) * self.mask
        rows = np.zeros((0, self.theta_size)) if guide is None else guide.surrogates
        cosine = float("nan")
        norm = np.linalg.norm(surrogate)
        if bool(result.finite) and norm > 0:
            es_norm = np.linalg.norm(es_grad)
            if es_norm > 0:
                cosine = float(surrogate @ es_grad / (norm * es_norm))
            rows = np.concatenate([rows, surrogate[None] / norm])[-int(self.horizon.guide_dims):]
        return GuideState(rows), cosine


def make_full_horizon(problem, theta_template, estimator: EstimatorConfig,
                      horizon: HorizonConfig, trainable: np.ndarray | None = None
                      ) -> FullHorizonES:
    return FullHorizonES(problem, theta_template, estimator, horizon, trainable)


__all__ = ["FULL_HORIZON_ESTIMATORS", "METRIC_NAMES", "FullHorizonES", "GuideState", "HorizonData",
           "HorizonEstimate", "evaluation_points", "fitness_of", "make_full_horizon",
           "shape_fitness"]
