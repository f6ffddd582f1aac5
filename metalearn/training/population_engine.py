"""The population engine's host side: tasks in, K learner updates per program call.

See docs/training.md (The population runner) and docs/architecture.md (The population
engine).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core.base_model import init_params
from metalearn.core.config import ConfigError
from metalearn.core.full_horizon import evaluation_points
from metalearn.core.meta_objective import LabelledPair
from metalearn.core.population import PopulationData, PopulationProgram, StepStats
from metalearn.core.theta import theta_spec
from metalearn.core.unroll import Problem
from metalearn.training.config import TrainConfig, trainable_mask
from metalearn.training.learner import make_optimizer
from metalearn.training.task_mix import sample_tasks, stream_rng, task_dataset_name, task_sampler
from tasks.sampler import MixConfig


STUCK_FIRST_S = 1800.0
STUCK_MIN_S = 600.0


class ProgramStuck(RuntimeError):
    """A compiled call that never finished (see ``wait_program``)."""


def wait_program(result, limit_s: float, what: str = "the population program",
                 poll_s: float = 0.05) -> None:
    """Wait for ``result`` (a jax.Array) at most ``limit_s`` seconds.

    On XLA:CPU with this jaxlib (0.10.2) the population program now and then never
    finishes: every thread idles and the result is never ready (docs/training.md). A
    plain ``block_until_ready`` would wait for ever; this raises ``ProgramStuck``
    instead, so the run stops with its last checkpoint and says why."""
    deadline = time.monotonic() + limit_s
    while not result.is_ready():
        if time.monotonic() >= deadline:
            raise ProgramStuck(
                f"{what} did not finish in {limit_s:.0f} s: the compiled program is stuck "
                f"(an intermittent XLA:CPU hang of the population engine, docs/training.md); "
                f"the run stops at its last checkpoint: continue it with metalearn train "
                f"--resume RUN --runner ray")
        time.sleep(poll_s)


def horizon_rule(config: TrainConfig):
    """The rule of the full-horizon search's inner runs: ``rule`` with ``horizon.inner_lr``
    as its inner rate when that is set."""
    inner_lr = config.horizon.inner_lr
    return dataclasses.replace(config.rule, inner_lr=inner_lr) if inner_lr else config.rule


def task_run_data(task, steps: int, points: tuple[int, ...], batch_size: int, objective):
    """One task's whole inner run: (inner_x [S, B, N_0], LabelledPair [E, M, B_l, ...])."""
    inner = task.inner_batch(steps * batch_size).reshape(steps, batch_size, -1)
    pair = task.labelled_pair(len(points) * objective.num_draws, objective.samples_per_class,
                              objective.regression_targets)
    pairs = LabelledPair(*(f.reshape(len(points), objective.num_draws, *f.shape[1:])
                           for f in pair))
    return inner, pairs


class PopulationBatch(NamedTuple):
    """One call's tasks: the program's data and what the rows report about them."""

    data: PopulationData
    arch: Any  # the tasks' base-model Architecture
    dataset: str
    seeds: list  # [K][M] task seeds
    metadata: dict  # the template task's metadata
    build_s: float  # host seconds spent building it


class CallResult(NamedTuple):
    """One program call: theta and optimiser state after it, per-step statistics (numpy)."""

    theta: np.ndarray
    opt_state: Any
    stats: StepStats
    dataset: str


def program_devices(count: int, tasks: int) -> list:
    """The local devices a population program splits ``tasks`` per meta-step over.

    count: ``worker.devices``; 0 takes the most local devices (of JAX's default backend)
    that share ``tasks`` evenly, N exactly N (an error when fewer exist or N does not
    divide ``tasks``). On CPU the devices are the ones JAX was started with: one, unless
    ``use_cpu_devices`` asked for more."""
    local = jax.local_devices()
    if count == 0:
        usable = max(d for d in range(1, len(local) + 1) if tasks % d == 0)
        return local[:usable]
    if count > len(local):
        raise ConfigError(f"worker.devices={count}, but this process has {len(local)} "
                          f"{jax.default_backend()} device(s)")
    if tasks % count:
        raise ConfigError(f"learner.meta_batch={tasks} tasks do not split evenly over "
                          f"worker.devices={count}")
    return local[:count]


def use_cpu_devices(count: int) -> int:
    """Start JAX's CPU backend with ``count`` devices when ``count`` > 1 (0 or 1: leave
    JAX's default, one), so a population program can split its tasks over the cores;
    returns the number of CPU devices in effect. Only before JAX has run anything:
    afterwards the backend keeps what it has. On XLA:CPU (jaxlib 0.10.2) a program split
    over CPU devices now and then aborts in its cross-device mean (one device never
    arrives: docs/training.md), hence one device unless asked."""
    if count > 1:
        try:
            jax.config.update("jax_num_cpu_devices", int(count))
            return int(count)
        except RuntimeError:  # the backend is up already
            pass
    return len(jax.devices("cpu"))


class PopulationEngine:
    """K meta-steps of ``es_full`` per call over M tasks each, from a seeded task stream.

    One program per base-model shape (activation, layer sizes, classes); a shape's first
    call compiles it (``estimate`` returns the seconds that took)."""

    def __init__(self, config: TrainConfig, stream_seed: int, *, mix: MixConfig | None = None,
                 sampler: Any = None, index: int = 0, meta_steps: int | None = None,
                 tasks_per_step: int | None = None, devices=None):
        if config.estimator.kind != "es_full":
            raise ConfigError(f"--runner population runs estimator.kind 'es_full' (the "
                              f"local default); got {config.estimator.kind!r}: use "
                              f"--runner local or ray for it")
        self.config = config
        self.meta_steps = int(meta_steps or config.worker.meta_steps)
        self.tasks_per_step = int(tasks_per_step or config.learner.meta_batch)
        self.index = int(index)
        self.sampler = sampler if sampler is not None else task_sampler(config.tasks, mix)
        self.spec = theta_spec(config.rule)
        self.trainable = trainable_mask(config.rule, config.learner)
        self.keep = (np.ones(self.spec.num_params, np.float32) if self.trainable is None
                     else self.trainable.astype(np.float32))
        self.points = evaluation_points(config.horizon.steps, config.horizon.points)
        self.rule = horizon_rule(config)  # as ``Worker.run_task``'s
        self.optimizer = make_optimizer(config.learner, self.trainable)
        # The devices a meta-step's tasks are split over (one: no split).
        self.devices = list(devices) if devices else program_devices(config.worker.devices,
                                                                     self.tasks_per_step)
        self._programs: dict[str, PopulationProgram] = {}
        self._shapes: set = set()  # (activation, data signature) compiled so far
        self._slowest = 0.0  # seconds of the slowest finished call
        self.reseed(stream_seed)

    # ------------------------------------------------------------------ stream

    def reseed(self, stream_seed: int) -> None:
        self.rng = stream_rng(stream_seed, self.index)
        self._next: PopulationBatch | None = None

    def program(self, arch) -> PopulationProgram:
        """The program of one base-model architecture (its phi_0 is drawn inside)."""
        key = (arch.activation, tuple(arch.sizes))
        program = self._programs.get(key)
        if program is None:
            rule = self.config.rule
            problem = Problem(arch.activation, self.rule, self.config.objective)
            template = self.spec.unravel(jnp.zeros(self.spec.num_params, jnp.float32))
            init_phi = functools.partial(init_params, arch=arch, w_std=rule.init_w_std,
                                         b_std=rule.init_b_std)
            program = PopulationProgram(problem, template, self.config.estimator,
                                        self.config.horizon, self.optimizer, self.points,
                                        keep=self.keep, trainable=self.trainable,
                                        init_phi=init_phi, devices=self.devices)
            self._programs[key] = program
        return program

    def sample(self) -> PopulationBatch:
        """K x M new tasks of one shape (the first one drawn sets it), their data stacked."""
        start = time.perf_counter()
        k, m = self.meta_steps, self.tasks_per_step
        seeds, tasks = sample_tasks(self.sampler, self.rng, k * m)
        first = tasks[0]
        objective = self.config.objective
        batch_size, steps = self.config.worker.batch_size, self.config.horizon.steps
        runs = [task_run_data(task, steps, self.points, batch_size, objective)
                for task in tasks]
        inner, pairs = jax.tree.map(  # each leaf of the K * M runs stacked: [K, M, ...]
            lambda *leaves: np.stack(leaves).reshape((k, m) + np.shape(leaves[0])), *runs)
        # Raw uint32 keys (phi_0's and the perturbations') made with numpy: a JAX op here
        # would queue behind the program still running and serialise the prefetch.
        keys = np.random.default_rng(seeds[0]).integers(0, 2 ** 32, size=(2, k, m, 2),
                                                        dtype=np.uint32)
        data = PopulationData(keys[0], inner, pairs, keys[1])
        return PopulationBatch(data, first.arch, task_dataset_name(first),
                               [seeds[i * m:(i + 1) * m] for i in range(k)],
                               first.metadata(), time.perf_counter() - start)

    # ------------------------------------------------------------------ one meta-batch

    def estimate(self, theta_flat: np.ndarray):
        """One meta-batch's mean estimate at theta, no update (a Ray population worker):
        (MetaBatch as numpy, the batch it came from, compile seconds)."""
        if self.meta_steps != 1:
            raise ValueError("estimate() draws one meta-batch: build the engine with "
                             "meta_steps=1")
        batch = self._next if self._next is not None else self.sample()
        self._next = None
        program = self.program(batch.arch)
        data = jax.tree.map(lambda a: a[0], batch.data)  # [1, M, ...] -> [M, ...]
        key = (batch.arch.activation, tuple(batch.arch.sizes),
               PopulationProgram.signature(data))
        new, compile_s = key not in self._shapes, 0.0
        compile_start = time.perf_counter()
        result = program.estimate(theta_flat, data)
        if new:  # the first call of a shape: compiling dominates it
            wait_program(result.grad, STUCK_FIRST_S)
            compile_s = time.perf_counter() - compile_start
            self._shapes.add(key)
        self._next = self.sample()  # while the device computes
        wait_program(result.grad, self._limit_s(), what=f"{self.tasks_per_step} tasks' estimate")
        if not new:
            self._slowest = max(self._slowest, time.perf_counter() - compile_start)
        return jax.tree.map(np.asarray, result), batch, compile_s

    # ------------------------------------------------------------------ one call

    def _limit_s(self) -> float:
        """How long a call may take before it counts as stuck: 20x the slowest call so
        far (at least 10 minutes); 30 minutes before any call finished."""
        return STUCK_FIRST_S if not self._slowest else max(STUCK_MIN_S, 20 * self._slowest)

    def run(self, theta_flat: np.ndarray, opt_state, limit: int | None = None) -> CallResult:
        """K meta-steps from (theta, opt_state); steps at index >= ``limit`` do nothing."""
        batch = self._next if self._next is not None else self.sample()
        self._next = None
        program = self.program(batch.arch)
        program.compiled(theta_flat, opt_state, batch.data)  # not in the call's time
        dispatched = time.perf_counter()
        theta, opt_state, stats = program(theta_flat, opt_state, batch.data, limit)
        # The device computes; build the next call's tasks meanwhile.
        self._next = self.sample()
        wait_program(theta, self._limit_s(), what=f"{self.meta_steps} meta-steps of "
                     f"{self.tasks_per_step} tasks ({batch.arch.sizes})")
        theta = np.asarray(theta)
        self._slowest = max(self._slowest, time.perf_counter() - dispatched)
        return CallResult(theta, opt_state, jax.tree.map(np.asarray, stats), batch.dataset)


__all__ = ["CallResult", "PopulationBatch", "PopulationEngine", "ProgramStuck", "STUCK_FIRST_S",
           "STUCK_MIN_S", "task_run_data", "wait_program"]
