"""A meta-training worker: tasks from a seeded stream, truncations, flat gradients.

Plain Python, testable without Ray (``metalearn.distributed`` wraps it as an actor).
A worker

* samples a task from its own stream (``reseed`` starts a fresh stream; the learner
  issues the seeds, so a restarted worker draws new tasks), initialises phi, and draws
  the number of truncations for that task from the learner's current curriculum;
* for each truncation draws U from the curriculum, asks the task for U steps of data
  and runs the core's meta-gradient estimator (one ``MetaGradient`` per activation,
  reused, so every base-model shape compiles once per process; the persistent XLA
  cache lets restarts and sibling workers skip even that);
* returns a ``Submission``: the gradient as one flat float32 numpy vector, the theta
  version (and learner generation) it used, task metadata, loss and timings.

phi carries over between the truncations of a task; a non-finite result ends the task
(the learner drops that gradient and counts it), as does reaching the task's length.
Theta is replaced only through ``set_theta``, which the caller invokes only when the
published version differs from ``theta_key``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from metalearn.learner import Curriculum, Submission
from metalearn.train_config import TrainConfig, resolve_path

DEFAULT_JAX_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "metalearn", "jax")


def enable_compilation_cache(setting: str) -> str | None:
    """Turn on JAX's persistent compilation cache ("" default dir, "none" off)."""
    if setting == "none":
        return None
    import jax

    path = os.path.expanduser(setting) if setting else DEFAULT_JAX_CACHE
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # The stepwise estimator's pieces compile in well under the 1 s default threshold
    # each, yet there are several per shape: cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def make_sampler(config: TrainConfig):
    """The task sampler of ``config.tasks`` (import deferred: tasks may be heavy)."""
    from tasks.sampler import TaskSampler, load_mix

    return TaskSampler(load_mix(mix_dict(config)), data_dir=config.tasks.data_dir)


def mix_dict(config: TrainConfig) -> dict:
    """The task mix of ``config.tasks`` as a dict, with its shape-bounding overrides."""
    import yaml

    path = resolve_path(config.tasks.mix)
    if not os.path.exists(path):
        raise FileNotFoundError(f"task mix file {path} not found")
    with open(path) as f:
        mix = yaml.safe_load(f) or {}
    tasks = config.tasks
    if tasks.architecture:
        mix["architecture"] = {**(mix.get("architecture") or {}), **tasks.architecture}
    if tasks.ways:
        mix["components"] = [c if c.get("fixed") else {**c, "ways": list(tasks.ways)}
                             for c in mix.get("components", [])]
    return mix


def task_dataset_name(task) -> str:
    """Short dataset name of a task, for per-dataset losses."""
    meta = task.metadata()
    for key in ("dataset", "source", "name"):
        value = meta.get(key)
        if isinstance(value, str):
            return value
    value = getattr(task, "dataset", None)
    return value if isinstance(value, str) else getattr(value, "name", "unknown")


class _TaskState:
    """A task in progress: its phi and how many truncations / steps remain."""

    def __init__(self, task, seed: int, params, truncations: int):
        self.task = task
        self.seed = seed
        self.params = params
        self.truncations_left = truncations
        self.truncations_done = 0
        self.steps_done = 0
        self.metadata = task.metadata()
        self.dataset = task_dataset_name(task)


class Worker:
    """Computes truncated meta-gradients on a stream of sampled tasks."""

    def __init__(self, config: TrainConfig, index: int, stream_seed: int, *,
                 sampler: Any = None):
        import jax  # noqa: F401 - after the caller set affinity / XLA flags

        from metalearn.checkpoint import theta_unravel
        from metalearn.config import ConfigError

        if config.worker.tasks_per_worker != 1:
            raise ConfigError("worker.tasks_per_worker > 1 (vmapped multi-task workers) is "
                              "not implemented yet; use 1")
        self.config = config
        self.index = index
        self.num_params, self._unravel = theta_unravel(config.rule)
        self.sampler = sampler if sampler is not None else make_sampler(config)
        self._estimators: dict[str, Any] = {}
        self._shapes_seen: set = set()
        self.theta = None
        self.theta_key: tuple[str, int] | None = None  # (generation, version)
        self.truncations = 0
        self.reseed(stream_seed)

    # ------------------------------------------------------------------ theta / stream

    def reseed(self, stream_seed: int) -> None:
        """Start a new task stream (drops the task in progress)."""
        self.stream_seed = int(stream_seed)
        self.rng = np.random.default_rng(np.random.SeedSequence([self.stream_seed,
                                                                 self.index]))
        self._task: _TaskState | None = None

    def set_theta(self, generation: str, version: int, theta_flat: np.ndarray) -> None:
        theta_flat = np.asarray(theta_flat, np.float32)
        if theta_flat.shape != (self.num_params,):
            raise ValueError(f"theta of {theta_flat.size} parameters; this worker's rule "
                             f"has {self.num_params}")
        import jax.numpy as jnp

        self.theta = self._unravel(jnp.asarray(theta_flat))
        self.theta_key = (generation, int(version))

    def needs_theta(self, generation: str, version: int) -> bool:
        return self.theta_key != (generation, int(version))

    # ------------------------------------------------------------------ truncations

    def _estimator(self, activation: str):
        estimator = self._estimators.get(activation)
        if estimator is None:
            from metalearn.unroll import make_meta_gradient

            estimator = make_meta_gradient(activation, self.config.rule,
                                           self.config.objective, self.config.unroll)
            self._estimators[activation] = estimator
        return estimator

    def _new_task(self, curriculum: Curriculum) -> _TaskState:
        import jax

        from metalearn.base_model import init_params

        seed = int(self.rng.integers(0, 2 ** 62))
        task = self.sampler.sample(seed)
        rule = self.config.rule
        params = init_params(jax.random.key(seed % (2 ** 31)), task.arch,
                             w_std=rule.init_w_std, b_std=rule.init_b_std)
        return _TaskState(task, seed, params, curriculum.sample_truncations(self.rng))

    def run_truncation(self, curriculum: Curriculum) -> Submission:
        """One truncation of the current task (a new task if none is in progress)."""
        import jax
        from jax.flatten_util import ravel_pytree

        if self.theta is None:
            raise RuntimeError("worker has no theta yet: call set_theta first")
        start = time.perf_counter()
        if self._task is None:
            self._task = self._new_task(curriculum)
        state = self._task
        sampled = time.perf_counter()
        steps = curriculum.sample_unroll(self.rng)
        total_steps = getattr(state.task, "total_steps", None)
        if total_steps:
            steps = max(1, min(steps, int(total_steps) - state.steps_done))
        objective = self.config.objective
        batch = state.task.truncation_batch(steps, self.config.worker.batch_size,
                                            objective.num_draws, objective.samples_per_class)
        data = time.perf_counter()
        arch = state.task.arch
        shape_key = (arch.activation, tuple(arch.sizes))
        new_shape = shape_key not in self._shapes_seen
        self._shapes_seen.add(shape_key)
        result = self._estimator(arch.activation)(self.theta, state.params, batch)
        result = jax.block_until_ready(result)
        grad_done = time.perf_counter()
        grad = np.asarray(ravel_pytree(result.grad)[0], np.float32)
        loss = float(result.loss)
        finite = bool(np.all(np.asarray(result.finite))) and np.isfinite(loss)
        state.params = result.params
        state.steps_done += steps
        state.truncations_done += 1
        state.truncations_left -= 1
        finished = (not finite or state.truncations_left <= 0
                    or (total_steps and state.steps_done >= int(total_steps)))
        if finished:
            self._task = None
        self.truncations += 1
        generation, version = self.theta_key
        metadata = dict(state.metadata)
        metadata.update(task_seed=state.seed, truncation=state.truncations_done,
                        arch=list(arch.sizes), activation=arch.activation)
        end = time.perf_counter()
        return Submission(
            grad=grad, version=version, generation=generation, loss=loss, finite=finite,
            dataset=state.dataset, num_steps=steps, worker=self.index, metadata=metadata,
            timings={"sample_s": sampled - start, "data_s": data - sampled,
                     "grad_s": grad_done - data, "total_s": end - start,
                     "new_shape": float(new_shape)})
