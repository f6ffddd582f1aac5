"""A meta-training worker: tasks from a seeded stream, truncations, flat gradients.

Plain Python, testable without Ray (``metalearn.distributed`` wraps it as an actor). See
docs/training.md (How it works, Task lengths) and docs/architecture.md.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from metalearn.core.base_model import init_params
from metalearn.core.estimators import make_estimator
from metalearn.core.full_horizon import (FULL_HORIZON_ESTIMATORS, FullHorizonES, HorizonData,
                                         evaluation_points)
from metalearn.core.unroll import Problem
from metalearn.core.theta import theta_spec
from metalearn.training.config import TrainConfig, trainable_mask
from metalearn.training.messages import LearnerReply, Submission, WorkOrder
from metalearn.training.schedules import Curriculum
from metalearn.training.population_engine import PopulationEngine, horizon_rule, task_run_data
from metalearn.training.task_mix import sample_tasks, stream_rng, task_dataset_name, task_sampler
from tasks.sampler import MixConfig

DEFAULT_JAX_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "metalearn", "jax")


def enable_compilation_cache(setting: str) -> str | None:
    """Turn on JAX's persistent compilation cache ("" default dir, "none" off)."""
    if setting == "none":
        return None
    path = os.path.expanduser(setting) if setting else DEFAULT_JAX_CACHE
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # The stepwise estimator's pieces compile in well under the 1 s default threshold
    # each, yet there are several per shape: cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def task_metadata(base: dict, arch, seed: int, truncation: int, truncations: int,
                  steps: int, **extra) -> dict:
    """A submission's metadata: its (first) task's own, and where that task's run is."""
    return {**base, "task_seed": seed, "truncation": truncation,
            "task_truncations": truncations, "task_steps": steps, "arch": list(arch.sizes),
            "activation": arch.activation, **extra}


def _stacked(items: list, stack):
    """One task's pytree, or T tasks' leaves stacked on a leading task axis."""
    return items[0] if len(items) == 1 else jax.tree.map(lambda *leaves: stack(leaves), *items)


class _TaskGroup:
    """Tasks in progress (one, or a vmapped worker's T of one shape): their phi (stacked
    on a leading task axis when T > 1) and how many truncations / steps they have run."""

    def __init__(self, tasks: list, seeds: list[int], state, truncations: int):
        self.tasks = tasks
        self.seeds = seeds
        self.state = state  # the estimator's EstimatorState (phi, and its own state)
        self.truncations_planned = truncations  # the task's length, in truncations
        self.loss_start = float("nan")  # meta-objective after the first inner step
        self.truncations_done = 0
        self.steps_done = 0
        self.metadata = tasks[0].metadata()
        self.dataset = task_dataset_name(tasks[0])

    @property
    def arch(self):
        return self.tasks[0].arch


class Worker:
    """Computes truncated meta-gradients on a stream of sampled tasks.

    With ``worker.tasks_per_worker`` = T > 1 the worker runs T tasks of one shape at once
    (the template task's component, classes count, architecture and length; see
    ``TaskSampler.sample(like=...)``) through one vmapped estimator, and submits the mean
    of their finite gradients with ``count`` = how many there were. A group of tasks
    starts and ends together.
    """

    def __init__(self, config: TrainConfig, index: int, stream_seed: int, *,
                 mix: MixConfig | None = None, sampler: Any = None):
        self.config = config
        self.index = index
        self.tasks_per_worker = config.worker.tasks_per_worker
        self.theta_spec = theta_spec(config.rule)
        self.sampler = sampler if sampler is not None else task_sampler(config.tasks, mix)
        self._estimators: dict[str, Any] = {}
        self._last_state: dict[str, Any] = {}  # per activation: for cross-task statistics
        trainable = trainable_mask(config.rule, config.learner)
        self.trainable = None if trainable is None else trainable.astype(np.float32)
        self._shapes_seen: set = set()
        self.full_horizon = config.estimator.kind in FULL_HORIZON_ESTIMATORS
        # es_full with T > 1 tasks: a population worker (the population engine's compiled
        # estimate over T tasks' whole runs, one submission of their mean).
        self.population = None
        if config.estimator.kind == "es_full" and self.tasks_per_worker > 1:
            self.population = PopulationEngine(config, stream_seed, sampler=self.sampler,
                                               index=index, meta_steps=1,
                                               tasks_per_step=self.tasks_per_worker)
        self._guides: dict[str, Any] = {}  # guided_es: surrogate FIFO per activation
        self.theta = None
        self.theta_key: tuple[str, int] | None = None  # (generation, version)
        self.truncations = 0
        self.reseed(stream_seed)

    # ------------------------------------------------------------------ theta / stream

    def reseed(self, stream_seed: int) -> None:
        """Start a new task stream (drops the tasks in progress)."""
        self.rng = stream_rng(stream_seed, self.index)
        self._task: _TaskGroup | None = None
        self._prefetched = None  # (task group, U, batch) of its next truncation
        if self.population is not None:
            self.population.reseed(stream_seed)

    def set_theta(self, generation: str, version: int, theta_flat: np.ndarray) -> None:
        theta_flat = np.asarray(theta_flat, np.float32)
        if theta_flat.shape != (self.theta_spec.num_params,):
            raise ValueError(f"theta of {theta_flat.size} parameters; this worker's rule "
                             f"has {self.theta_spec.num_params}")
        self.theta = self.theta_spec.unravel(jnp.asarray(theta_flat))
        self.theta_key = (generation, int(version))

    def needs_theta(self, generation: str, version: int) -> bool:
        return self.theta_key != (generation, int(version))

    # ------------------------------------------------------------------ truncations

    def _estimator(self, activation: str):
        """The activation's estimator, built on first use: a ``FullHorizonES`` or the
        truncated kind of ``make_estimator``."""
        estimator = self._estimators.get(activation)
        if estimator is None and self.full_horizon:
            problem = Problem(activation, horizon_rule(self.config), self.config.objective)
            estimator = FullHorizonES(problem, self.theta, self.config.estimator,
                                      self.config.horizon,
                                      None if self.trainable is None else self.trainable > 0)
        elif estimator is None:
            tasks = self.tasks_per_worker if self.tasks_per_worker > 1 else None
            estimator = make_estimator(activation, self.config.rule, self.config.objective,
                                       self.config.unroll, self.config.estimator,
                                       num_tasks=tasks, trainable=self.trainable)
        self._estimators[activation] = estimator
        return estimator

    def _init_phi(self, seed: int, arch):
        rule = self.config.rule
        return init_params(jax.random.key(seed % (2 ** 31)), arch, w_std=rule.init_w_std,
                           b_std=rule.init_b_std)

    def _new_shape(self, arch) -> bool:
        """Whether ``arch`` is a shape this worker has not run before (a compilation)."""
        key = (arch.activation, tuple(arch.sizes))
        new = key not in self._shapes_seen
        self._shapes_seen.add(key)
        return new

    def _submission(self, **fields) -> Submission:
        """One more truncation done: its submission, with the theta version it used."""
        self.truncations += 1
        generation, version = self.theta_key
        return Submission(version=version, generation=generation, worker=self.index, **fields)

    def _new_tasks(self, curriculum: Curriculum) -> _TaskGroup:
        seeds, tasks = sample_tasks(self.sampler, self.rng, self.tasks_per_worker)
        first = tasks[0]
        stacked = _stacked([self._init_phi(s, first.arch) for s in seeds], jnp.stack)
        activation = first.arch.activation
        state = self._estimator(activation).init(
            seeds if len(seeds) > 1 else seeds[0], stacked,
            previous=self._last_state.get(activation))
        return _TaskGroup(tasks, seeds, state, curriculum.sample_truncations(self.rng))

    def _batch(self, group: _TaskGroup, steps: int):
        objective = self.config.objective
        return _stacked([task.truncation_batch(steps, self.config.worker.batch_size,
                                               objective.num_draws, objective.samples_per_class,
                                               objective.regression_targets)
                         for task in group.tasks], np.stack)

    def run_truncation(self, curriculum: Curriculum) -> Submission:
        """One truncation of the current task(s) (new ones if none is in progress); with a
        full-horizon estimator, one whole task (``run_task``)."""
        if self.theta is None:
            raise RuntimeError("worker has no theta yet: call set_theta first")
        if self.population is not None:
            return self.run_population()
        if self.full_horizon:
            return self.run_task()
        start = time.perf_counter()
        if self._task is None:
            self._task = self._new_tasks(curriculum)
        state = self._task
        sampled = time.perf_counter()
        prefetched = self._prefetched is not None and self._prefetched[0] is state
        if prefetched:
            _, steps, batch = self._prefetched
        else:
            steps = curriculum.sample_unroll(self.rng)
            batch = self._batch(state, steps)
        self._prefetched = None
        data = time.perf_counter()
        new_shape = self._new_shape(state.arch)
        result, new_state = self._estimator(state.arch.activation)(self.theta, state.state, batch)
        # JAX dispatches asynchronously (the scan estimator is one call): build the next
        # truncation's data while the device computes, if this task goes on. On GPU the
        # host-side batches of T tasks are a third of a truncation otherwise. The draws
        # come in the same order as without prefetching.
        if state.truncations_done + 1 < state.truncations_planned:
            next_steps = curriculum.sample_unroll(self.rng)
            self._prefetched = (state, next_steps, self._batch(state, next_steps))
        prefetch_done = time.perf_counter()
        result = jax.block_until_ready(result)
        grad_done = time.perf_counter()
        losses, finite, keep, grad = self._mean_over_tasks(result, len(state.tasks))
        loss = float(losses[keep].mean())
        count = int(keep.sum())
        nonfinite = len(state.tasks) - count
        self._advance(state, result, new_state, steps, finite)
        metrics = {name: float(np.mean(np.asarray(value, np.float64)[keep]
                                       if np.ndim(value) else value))
                   for name, value in result.metrics.items()}
        end = time.perf_counter()
        return self._submission(
            grad=grad, loss=loss, finite=bool(finite.any()), count=count,
            nonfinite_tasks=nonfinite, loss_start=state.loss_start, estimator_metrics=metrics,
            dataset=state.dataset, num_steps=steps, metadata=self._metadata(state, losses),
            timings={"sample_s": sampled - start, "data_s": data - sampled,
                     "prefetch_s": prefetch_done - data, "grad_s": grad_done - data,
                     "total_s": end - start, "new_shape": float(new_shape),
                     "prefetched": float(prefetched)})

    def _advance(self, state, result, new_state, steps: int, finite: np.ndarray) -> None:
        """The task group after a truncation of ``steps`` steps: its phi, its counts, its
        start loss (after the first), and the end of it (its last truncation, or a
        non-finite task: that task's phi is lost, and the group moves together)."""
        if state.truncations_done == 0:
            first = np.atleast_2d(np.asarray(result.step_losses, np.float64))[:, 0]
            state.loss_start = float(first[finite].mean()) if finite.any() else math.nan
        state.state = new_state
        self._last_state[state.arch.activation] = new_state
        state.steps_done += steps
        state.truncations_done += 1
        if not finite.all() or state.truncations_done >= state.truncations_planned:
            self._task = None

    @staticmethod
    def _mean_over_tasks(result, tasks: int):
        """A truncation's [T] losses, [T] finite flags, [T] tasks kept, and the mean
        [P] float32 gradient of the kept ones: the finite tasks, or, if none is, all
        of them (the learner then drops the submission whole and counts every task)."""
        losses = np.atleast_1d(np.asarray(result.loss, np.float64))
        finite = np.atleast_1d(np.asarray(result.finite)) & np.isfinite(losses)
        if tasks == 1:  # one row per task: [T, P] flat gradients
            grads = np.asarray(ravel_pytree(result.grad)[0], np.float32)[None]
        else:
            grads = np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(result.grad), np.float32)
        keep = finite if finite.any() else np.ones_like(finite)
        return losses, finite, keep, grads[keep].mean(axis=0, dtype=np.float64).astype(
            np.float32)

    @staticmethod
    def _metadata(state, losses: np.ndarray) -> dict:
        """The submission's task metadata after this truncation ([T] ``losses``)."""
        several = {} if len(state.tasks) == 1 else dict(task_seeds=state.seeds,
                                                        task_losses=losses.tolist())
        return task_metadata(state.metadata, state.arch, state.seeds[0], state.truncations_done,
                             state.truncations_planned, state.steps_done, **several)

    # ------------------------------------------------------------------ whole tasks

    def run_task(self) -> Submission:
        """One task's whole inner run under the full-horizon estimator: its 2K population
        members each trained for ``horizon.steps`` steps from the same phi_0 on the same
        data; the submission is the estimate over the whole run (count 1)."""
        start = time.perf_counter()
        horizon = self.config.horizon
        (seed,), (task,) = sample_tasks(self.sampler, self.rng, 1)
        arch = task.arch
        phi0 = self._init_phi(seed, arch)
        at = evaluation_points(horizon.steps, horizon.points)
        data = HorizonData(*task_run_data(task, horizon.steps, at, self.config.worker.batch_size,
                                          self.config.objective), at)
        sampled = time.perf_counter()
        new_shape = self._new_shape(arch)
        estimator = self._estimator(arch.activation)
        estimate, guide = estimator(self.theta, phi0, data, seed,
                                    self._guides.get(arch.activation))
        if guide is not None:
            self._guides[arch.activation] = guide
        done = time.perf_counter()
        metadata = task_metadata(task.metadata(), arch, seed, 1, 1, horizon.steps,
                                 fitness=estimate.fitness.tolist(),
                                 curve=estimate.curve.tolist(), points=list(data.points))
        return self._submission(
            grad=np.asarray(estimate.grad, np.float32), loss=float(np.mean(estimate.fitness)),
            finite=estimate.finite, count=1, nonfinite_tasks=0, loss_start=estimate.loss_start,
            estimator_metrics=estimate.metrics, dataset=task_dataset_name(task),
            num_steps=horizon.steps, metadata=metadata,
            timings={"sample_s": 0.0, "data_s": sampled - start, "prefetch_s": 0.0,
                     "grad_s": done - sampled, "total_s": done - start,
                     "new_shape": float(new_shape), "prefetched": 0.0})

    def run_population(self) -> Submission:
        """T new tasks' whole runs through the population engine's compiled estimate: one
        submission of the finite tasks' mean estimate, ``count`` = how many."""
        start = time.perf_counter()
        flat = self.theta_spec.ravel(self.theta)
        estimate, batch, compile_s = self.population.estimate(flat)
        done = time.perf_counter()
        count = int(estimate.count)
        tasks = int(np.size(estimate.task_finite))
        steps, seeds = self.config.horizon.steps, batch.seeds[0]
        metrics = {name: float(v) for name, v in estimate.metrics.items()
                   if math.isfinite(float(v))}
        return self._submission(
            grad=np.asarray(estimate.grad, np.float32),
            loss=float(estimate.loss) if count else math.nan,
            finite=count > 0, count=count if count else tasks,
            nonfinite_tasks=tasks - count if count else 0,
            loss_start=float(estimate.loss_start) if count else math.nan,
            estimator_metrics=metrics, dataset=batch.dataset, num_steps=steps,
            metadata=task_metadata(batch.metadata, batch.arch, seeds[0], 1, 1, steps,
                                   task_seeds=seeds),
            timings={"sample_s": 0.0, "data_s": batch.build_s, "prefetch_s": 0.0,
                     "grad_s": done - start, "total_s": done - start,
                     "compile_s": compile_s, "new_shape": float(compile_s > 0),
                     "prefetched": 0.0})

    # ------------------------------------------------------------------ one order

    def work(self, order: WorkOrder, fetch_theta: Callable[[Any], np.ndarray],
             push: Callable[[Submission], LearnerReply]) -> LearnerReply:
        """Carry out one ``WorkOrder``: take its theta if it is new to this worker (only
        then is ``fetch_theta(order.theta.payload)`` called), run one truncation and
        ``push`` the submission to the learner; returns the learner's reply."""
        if order.reseed is not None:
            self.reseed(order.reseed)
        handle = order.theta
        if self.needs_theta(handle.generation, handle.version):
            self.set_theta(handle.generation, handle.version, fetch_theta(handle.payload))
        return push(self.run_truncation(order.curriculum))
