"""The population engine: K whole meta-steps of full-horizon ES in one compiled program.

A meta-step of ``es_full`` (``metalearn.core.full_horizon``) takes M tasks, runs each
task's 2P members (theta +- eps_p on the trainable entries, P = ``estimator.pairs``) for
the whole inner run from one phi_0 on common data, turns the members' fitnesses into a
gradient estimate per task, averages the finite tasks' estimates and applies the
learner's optax update. ``PopulationProgram`` compiles K such meta-steps as one
``lax.scan`` (theta and the optimiser state are the carry), so one host call does K
learner updates: no Python between inner steps, members, tasks or updates.

Per task (shapes: S inner steps, B batch, N_0 inputs, E evaluation points; the problem
gives ``advance(theta, phi, x) -> phi`` and ``loss(phi, pair) -> scalar``):

    eps_p = sigma * z_p * mask,  z_p ~ N(0, I)   (drawn in the program from the task's key)
    F_j   = fitness of member j over its whole run (``horizon.fitness``: the
            meta-objective at the last point, or its mean over the E points)
    g     = 1 / (2 P sigma^2) * sum_p eps_p (F~_p - F~_{P+p})   (F~: ``horizon.shaping``)

and per meta-step, with w_m = 1 for a finite task and 0 otherwise,

    G = sum_m w_m g_m / sum_m w_m,   (theta, opt) <- optax update(G * keep)   if sum w > 0.

The estimate per task is the one ``FullHorizonES`` gives for the same eps (the tests
check it); eps are drawn with ``jax.random`` here instead of numpy on the host.

Only theta leaves with a trainable entry get a member axis (the rule's convolutions stay
shared when the merge weights are what trains), and every rule convolution is traced as
a matmul (``rule_layers.matmul_convs``): a member-axis kernel would otherwise be a
grouped convolution under vmap, and XLA:CPU ran even shared convolutions about 2x slower
inside the loop than their matmul form.

Meta-steps at index >= ``limit`` (an argument, not a shape) change nothing, so a run
that must stop after fewer than K more updates reuses the same compiled program.

With several ``devices`` a meta-step's M tasks are split evenly over them (the task axis
sharded, theta and the optimiser state replicated; XLA adds the cross-device mean), so
one program uses every local accelerator, or every core as a CPU device.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

from metalearn.core.config import ConfigError, EstimatorConfig, HorizonConfig
from metalearn.core.full_horizon import FullHorizonES, fitness_of
from metalearn.core.rule_layers import matmul_convs


class PopulationData(NamedTuple):
    """K meta-steps of M tasks each (leading axes [K, M] on every leaf).

    phi0: the tasks' initial base-model parameters (pytree, leaves [K, M, ...]), or with
      ``PopulationProgram(init_phi=...)`` their [K, M, 2] uint32 PRNG keys;
    inner_x: [K, M, S, B, N_0] unlabelled batches (step t uses inner_x[..., t - 1, :, :]);
    pairs: the labelled draws at the E evaluation points (the problem's pair NamedTuple,
      leaves [K, M, E, ...]);
    keys: [K, M, 2] uint32 PRNG keys, one per task (its members' perturbations).
    """

    phi0: Any
    inner_x: Any
    pairs: Any
    keys: Any


class MetaBatch(NamedTuple):
    """M tasks' mean estimate. grad: [P] mean over the finite tasks, times ``keep``;
    count: finite tasks; loss, loss_start: their means; task_finite: [M]; sq_sum: sum
    over the finite tasks of |g_m * keep|^2; metrics: {name: mean}."""

    grad: Any
    count: Any
    loss: Any
    loss_start: Any
    task_finite: Any
    sq_sum: Any
    metrics: dict


class StepStats(NamedTuple):
    """What each of the K meta-steps did (leading axis [K]).

    ran: the step was within ``limit`` (its tasks count as received);
    applied: the update was applied (some task finite and index < limit);
    count: finite tasks (their mean is the update); loss: mean fitness over the finite
    tasks' members; loss_start: mean meta-objective of their phi_0 at the first point;
    task_finite: [K, M]; grad_norm: |G * keep|; update_norm: |optax update|;
    theta: [K, P] theta after the step; sq_sum: sum over finite tasks of |g_m * keep|^2
    (for the meta-batch's spread); metrics: {name: [K]} the tasks' mean of
    ``FullHorizonES``'s metrics (grad_norm, fitness_mean, fitness_spread, pair_var).
    """

    ran: Any
    applied: Any
    count: Any
    loss: Any
    loss_start: Any
    task_finite: Any
    grad_norm: Any
    update_norm: Any
    theta: Any
    sq_sum: Any
    metrics: dict


def shape_fitness_jnp(fitness, mode: str):
    """``full_horizon.shape_fitness`` traced: [2P] fitnesses -> raw, standardised or
    centred ranks in [-0.5, 0.5]."""
    if mode == "normalize":
        spread = jnp.std(fitness)
        return jnp.where(spread > 0, (fitness - jnp.mean(fitness)) / jnp.where(spread > 0,
                                                                                spread, 1.0),
                         0.0)
    if mode == "ranks":
        size = fitness.shape[0]
        if size < 2:
            return jnp.zeros_like(fitness)
        ranks = jnp.argsort(jnp.argsort(fitness, stable=True), stable=True)
        return ranks.astype(fitness.dtype) / (size - 1) - 0.5
    return fitness


def segments(points: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(start, end)) inner-step ranges between consecutive evaluation points."""
    bounds = (0,) + tuple(points)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class PopulationProgram:
    """K meta-steps of ``es_full`` with the optax update inside one jitted program.

    ``problem``: as ``FullHorizonES``'s; ``theta_template``: theta's pytree (the flat
    layout is its ``ravel_pytree`` order); ``optimizer``: the learner's optax
    transformation over the flat [P] theta; ``keep``: [P] 1.0 where theta trains in the
    learner (its frozen entries get a zero gradient); ``trainable``: [P] bool, where
    perturbations go (None: everywhere); ``points``: the static evaluation points (the
    last one is the run's length).

    ``__call__(theta [P], opt_state, data: PopulationData, limit) -> (theta, opt_state,
    StepStats)``.
    """

    def __init__(self, problem, theta_template, estimator: EstimatorConfig, horizon: HorizonConfig,
                 optimizer: optax.GradientTransformation, points: tuple[int, ...], *,
                 keep: np.ndarray | None = None, trainable: np.ndarray | None = None,
                 init_phi=None, tasks_axis: str = "auto", devices=None):
        if estimator.kind != "es_full":
            raise ConfigError(f"the population engine runs estimator.kind 'es_full'; got "
                              f"{estimator.kind!r} (use --runner local or ray for it)")
        # FullHorizonES holds the flat layout, the trainable mask and which leaves get a
        # member axis; the program reuses them.
        self.layout = FullHorizonES(problem, theta_template, estimator, horizon, trainable)
        self.problem, self.horizon, self.points = problem, horizon, tuple(points)
        self.pairs, self.sigma = int(estimator.pairs), float(estimator.perturbation_std)
        size = self.layout.theta_size
        keep = np.ones(size, np.float32) if keep is None else np.asarray(keep, np.float32)
        if keep.shape != (size,):
            raise ConfigError(f"keep mask of shape {keep.shape}; theta has {size} parameters")
        self.keep = keep
        self.optimizer = optimizer
        # init_phi(key) -> phi: data.phi0 holds PRNG keys and each task's phi_0 is drawn
        # in the program (nothing of the base model crosses from the host).
        self.init_phi = init_phi
        self.matmul, self.unroll = True, 1
        # How the M tasks of a meta-step run: vmapped (accelerators), or one after another
        # (``lax.map``) on XLA:CPU, where vmapped tasks inside the meta-step loop made the
        # program hang now and then (every thread idle, the result never ready) on this
        # machine's jaxlib 0.10.2, and where a task already fills the cores.
        self.tasks_axis = tasks_axis if tasks_axis != "auto" else (
            "map" if jax.default_backend() == "cpu" else "vmap")
        _, self.unravel = ravel_pytree(theta_template)
        devices = list(devices or ())
        self.mesh = Mesh(np.array(devices), ("tasks",)) if len(devices) > 1 else None
        # Not donated: a call that fails must leave the learner's optimiser state intact.
        if self.mesh is None:
            self._program = jax.jit(self._meta_steps)
        else:  # data [K, M, ...] split on M; everything else on every device
            replicated = NamedSharding(self.mesh, Spec())
            self._program = jax.jit(
                self._meta_steps, out_shardings=replicated,
                in_shardings=(replicated, replicated,
                              NamedSharding(self.mesh, Spec(None, "tasks")), replicated))
        self._compiled: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ one task

    def task_estimate(self, theta_flat, phi0, inner_x, pairs, key):
        """One task's estimate: (g [P], mean fitness, loss_start, finite, metrics).

        phi0: pytree; inner_x: [S, B, N_0]; pairs: leaves [E, ...]; key: PRNG key."""
        layout, problem, k = self.layout, self.problem, self.pairs
        if self.init_phi is not None:
            phi0 = self.init_phi(phi0)
        mask = jnp.asarray(layout.mask, theta_flat.dtype)
        eps = self.sigma * jax.random.normal(key, (k, layout.theta_size), theta_flat.dtype)
        eps = eps * mask
        shared, members = layout.member_leaves(self.unravel(theta_flat),
                                               jnp.concatenate([eps, -eps]))
        def advance(phis, x):
            # Matmul-form convolutions whether or not the kernels have a member axis: on
            # XLA:CPU a convolution inside a loop body ran 4x slower (docs/estimators.md).
            with matmul_convs(self.matmul):
                phis = jax.vmap(lambda m, phi: problem.advance(layout.assemble(shared, m),
                                                               phi, x))(members, phis)
            return phis, None

        phis = jax.tree.map(lambda a: jnp.broadcast_to(a, (2 * k,) + a.shape), phi0)
        curves = []
        for index, (start, end) in enumerate(segments(self.points)):
            phis, _ = jax.lax.scan(advance, phis, inner_x[start:end], unroll=self.unroll)
            pair = type(pairs)(*(f[index] for f in pairs))
            curves.append(jax.vmap(lambda phi: problem.loss(phi, pair))(phis))
        curves = jnp.stack(curves, axis=-1)  # [2P, E]
        fitness = fitness_of(curves, self.horizon.fitness)
        shaped = shape_fitness_jnp(fitness, self.horizon.shaping)
        diff = shaped[:k] - shaped[k:]
        per_pair = eps * (diff / (2.0 * self.sigma ** 2))[:, None]  # [P_pairs, P]
        grad = jnp.mean(per_pair, axis=0)
        finite = jnp.all(jnp.isfinite(fitness)) & jnp.all(jnp.isfinite(grad))
        first = type(pairs)(*(f[0] for f in pairs))
        loss_start = problem.loss(phi0, first)
        pair_var = (jnp.sum(jnp.var(per_pair, axis=0, ddof=1)) / k if k > 1
                    else jnp.asarray(jnp.nan, grad.dtype))
        metrics = {"grad_norm": jnp.linalg.norm(grad), "fitness_mean": jnp.mean(fitness),
                   "fitness_spread": jnp.mean(jnp.abs(fitness[:k] - fitness[k:])),
                   "pair_var": pair_var}
        return grad, jnp.mean(fitness), loss_start, finite, metrics

    # ------------------------------------------------------------------ M tasks

    def meta_batch(self, theta, phi0, inner_x, pairs, keys) -> MetaBatch:
        """M tasks' estimates (leading [M] axis on every argument but theta) and their mean
        over the finite ones: one meta-batch, without the update."""
        keep = jnp.asarray(self.keep)

        def run_tasks(tasks):  # leaves [m, ...] -> estimates with a leading [m]
            if self.tasks_axis == "vmap":
                return jax.vmap(self.task_estimate, in_axes=(None, 0, 0, 0, 0))(theta, *tasks)
            # one task after another (XLA:CPU: see ``tasks_axis``)
            return jax.lax.map(lambda task: self.task_estimate(theta, *task), tasks)

        tasks = (phi0, inner_x, pairs, keys)
        if self.mesh is None:
            grads, losses, starts, finite, metrics = run_tasks(tasks)
        else:  # [M] -> [D, M / D], the D axis one per device
            count, size = self.mesh.size, int(np.shape(keys)[0])
            self.check_split(size)
            split = NamedSharding(self.mesh, Spec("tasks"))
            tasks = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
                a.reshape((count, size // count) + a.shape[1:]), split), tasks)
            out = jax.vmap(run_tasks)(tasks)
            grads, losses, starts, finite, metrics = jax.tree.map(
                lambda a: a.reshape((size,) + a.shape[2:]), out)
        weight = finite.astype(theta.dtype)  # [M]
        count = jnp.sum(weight)
        safe = jnp.maximum(count, 1.0)

        def mean(values):  # over the finite tasks (non-finite ones never enter)
            shape = (-1,) + (1,) * (values.ndim - 1)
            values = jnp.where(finite.reshape(shape), values, 0.0)
            return jnp.sum(values * weight.reshape(shape), axis=0) / safe

        trained = jnp.where(finite[:, None], grads, 0.0) * keep
        return MetaBatch(mean(grads) * keep, count.astype(jnp.int32), mean(losses),
                         mean(starts), finite, jnp.sum(weight * jnp.sum(trained * trained, 1)),
                         {name: mean(v) for name, v in metrics.items()})

    # ------------------------------------------------------------------ K meta-steps

    def _meta_steps(self, theta, opt_state, data: PopulationData, limit):
        def meta_step(carry, xs):
            theta, opt_state = carry
            index, phi0, inner_x, pairs, keys = xs
            batch = self.meta_batch(theta, phi0, inner_x, pairs, keys)
            updates, new_opt = self.optimizer.update(batch.grad, opt_state, theta)
            ran = index < limit
            apply = (batch.count > 0) & ran
            new_theta = optax.apply_updates(theta, updates)
            theta = jnp.where(apply, new_theta, theta)
            opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), new_opt,
                                     opt_state)
            stats = StepStats(ran, apply, batch.count, batch.loss, batch.loss_start,
                              batch.task_finite, optax.tree.norm(batch.grad),
                              jnp.where(apply, optax.tree.norm(updates), 0.0), theta,
                              batch.sq_sum, batch.metrics)
            return (theta, opt_state), stats

        steps = jnp.arange(data.inner_x.shape[0])
        (theta, opt_state), stats = jax.lax.scan(
            meta_step, (theta, opt_state),
            (steps, data.phi0, data.inner_x, data.pairs, data.keys),
            )
        return theta, opt_state, stats

    def check_split(self, tasks: int) -> None:
        """Refuse M tasks per meta-step that the devices cannot share evenly."""
        if self.mesh is not None and tasks % self.mesh.size:
            raise ConfigError(f"{tasks} tasks per meta-step do not split evenly over "
                              f"{self.mesh.size} devices (learner.meta_batch must be a "
                              f"multiple of worker.devices)")

    def estimate(self, theta, data: PopulationData) -> MetaBatch:
        """One meta-batch's mean estimate, no update (a Ray population worker's
        submission): ``data`` with a leading [M] axis only (no K)."""
        key = ("estimate",) + self.signature(data)
        self.check_split(int(np.shape(data.keys)[0]))
        program = self._compiled.get(key)
        if program is None:
            shardings = {}
            if self.mesh is not None:
                split = NamedSharding(self.mesh, Spec("tasks"))
                shardings = dict(in_shardings=(NamedSharding(self.mesh, Spec()),) + (split,) * 4,
                                 out_shardings=NamedSharding(self.mesh, Spec()))
            program = self._compiled[key] = jax.jit(self.meta_batch, **shardings)
        return program(jnp.asarray(theta), data.phi0, data.inner_x, data.pairs, data.keys)

    @staticmethod
    def signature(data: PopulationData) -> tuple:
        """The shapes and dtypes of ``data``: one compiled program per signature."""
        return tuple((tuple(np.shape(leaf)), str(leaf.dtype)) for leaf in jax.tree.leaves(data))

    def compiled(self, theta, opt_state, data: PopulationData):
        """(the compiled program for ``data``'s shapes, seconds spent compiling it now:
        0.0 when it was compiled before)."""
        key = self.signature(data)
        program = self._compiled.get(key)
        if program is not None:
            return program, 0.0
        self.check_split(int(np.shape(data.keys)[1]))
        start = time.perf_counter()
        program = self.lower(theta, opt_state, data).compile()
        self._compiled[key] = program
        return program, time.perf_counter() - start

    def __call__(self, theta, opt_state, data: PopulationData, limit: int | None = None):
        """K meta-steps; returns the new (theta, opt_state) and their ``StepStats``."""
        steps = int(np.shape(data.inner_x)[0])
        if int(np.shape(data.inner_x)[2]) != self.points[-1]:
            raise ConfigError(f"the population's inner runs have {np.shape(data.inner_x)[2]} "
                              f"steps; the last evaluation point is {self.points[-1]}")
        limit = steps if limit is None else int(limit)
        program, _ = self.compiled(theta, opt_state, data)
        return program(jnp.asarray(theta), opt_state, data, jnp.asarray(limit, jnp.int32))

    def lower(self, theta, opt_state, data: PopulationData):
        """The program lowered for ``data``'s shapes (cost analysis, compile timing)."""
        return self._program.lower(jnp.asarray(theta), opt_state, data,
                                   jnp.asarray(0, jnp.int32))


__all__ = ["MetaBatch", "PopulationData", "PopulationProgram", "StepStats", "segments", "shape_fitness_jnp"]
