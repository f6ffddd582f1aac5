"""The central learner: one pure state (``LearnerState``) updated by one function per
message, and the optax transformation it applies (docs/training.md, The learner).

``Learner`` wraps the pure functions for ``LearnerHost``: it holds the current state and
the run's clock.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.training.config import CurriculumConfig, LearnerConfig
from metalearn.training.messages import LearnerRow, Submission
from metalearn.training.schedules import Curriculum, curriculum_at

COUNTERS = ("received", "applied", "dropped_stale", "dropped_nonfinite",
            "dropped_generation", "after_stop")


def lr_schedule(config: LearnerConfig) -> optax.Schedule:
    """Piecewise constant: ``lr_values[i]`` from update ``lr_boundaries[i - 1]`` on."""
    return optax.join_schedules([optax.constant_schedule(float(v)) for v in config.lr_values],
                                [int(b) for b in config.lr_boundaries])


def freeze(trainable: np.ndarray | None) -> optax.GradientTransformation:
    """Zero the gradient of frozen entries (``trainable``: [P] bool, None: all train), so
    Adam never moves them."""
    if trainable is None:
        return optax.identity()
    keep = np.asarray(trainable, np.float32)
    return optax.stateless(lambda updates, params: jax.tree.map(lambda u: u * keep, updates))


def make_optimizer(config: LearnerConfig,
                   trainable: np.ndarray | None = None) -> optax.GradientTransformation:
    """freeze -> clip_by_global_norm -> Adam -> piecewise-constant learning rate."""
    return optax.chain(
        freeze(trainable),
        optax.clip_by_global_norm(config.clip_norm),
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.scale_by_learning_rate(lr_schedule(config)),
    )


def _window_mean(window: tuple) -> float:
    """The mean of a rolling window (NaN while it is empty)."""
    return float(np.mean(window)) if window else math.nan


def _spread(sq_sum: float, mean_sq: float, n: int) -> tuple[float, float]:
    """(grad_var, grad_snr) of ``n`` >= 2 task gradients (their trainable entries) with
    sum of squared norms ``sq_sum`` and squared norm of their mean ``mean_sq``: the trace
    of their covariance, and |mean|^2 over the variance of the mean (> 1: the update's
    direction is mostly signal, not estimator noise). A row has NaN for both when its
    meta-batch had fewer than two submissions."""
    var = max((sq_sum - n * mean_sq) / (n - 1), 0.0)
    return var, mean_sq / (var / n) if var > 0 else math.inf


def _read_only(theta) -> np.ndarray:
    """A read-only float32 copy: a state's theta is never written, so it is handed to
    workers and checkpoints without copying."""
    theta = np.array(theta, np.float32)
    theta.setflags(write=False)
    return theta


class MetaBatch(NamedTuple):
    """The meta-batch being summed (every weight is a task-gradient count)."""

    grad_sum: np.ndarray  # [P] float64: sum of count x submitted gradient
    count: int = 0
    loss_sum: float = 0.0
    sq_sum: float = 0.0  # sum of count x |trainable part of the gradient|^2
    received: int = 0  # task gradients received since the last update (any outcome)
    staleness: tuple = ()  # one entry per accepted submission
    est: tuple = ()  # ((estimator metric, count-weighted sum, count), ...)


class LearnerState(NamedTuple):
    """Everything a learner is (``Learner.state`` gives it as a checkpoint)."""

    theta: np.ndarray  # [P] float32, read-only
    opt_state: Any  # the optax state of ``make_optimizer``
    batch: MetaBatch
    step: int  # updates applied (the row of update k has step k)
    version: int  # theta version handed to workers
    generation: str  # this incarnation: versions of another one mean nothing here
    counters: dict  # COUNTERS -> task gradients
    losses: tuple  # the last ``loss_window`` task losses
    gains: tuple  # ... and their loss - loss_start
    dataset_losses: dict  # dataset -> its last ``loss_window`` task losses
    rng: dict  # numpy bit-generator state: the seeds of new task streams
    wall_s: float  # wall seconds of the run (all sessions) at the last update


class Learner:
    """Buffers meta-gradients and applies optax updates to a flat theta [P].

    A submission is dropped (and counted) when computed by another learner incarnation,
    staler than ``max_staleness`` versions or not finite; accepted ones are summed, each
    weighted by its task count, and ``meta_batch`` of them make one update and one row."""

    def __init__(self, theta_flat: np.ndarray, config: LearnerConfig,
                 curriculum: CurriculumConfig, *, generation: str | None = None,
                 trainable: np.ndarray | None = None, watch: dict[str, int] | None = None,
                 clock=time.monotonic):
        self.config = config
        self._clock = clock
        self._wall_offset, self._started = 0.0, clock()  # earlier sessions, this one
        self.curriculum_config = curriculum
        theta = _read_only(theta_flat)
        self.num_params = int(theta.size)
        if trainable is not None and np.shape(trainable) != (self.num_params,):
            raise ValueError(f"trainable mask of shape {np.shape(trainable)}, theta "
                             f"{self.num_params}")
        # [P] 1.0 where theta trains: the rows' gradient spread is over those entries.
        self.keep = None if trainable is None else np.asarray(trainable, np.float32)
        # Single theta entries logged in every row as ``theta/<name>``.
        self.watch = dict(watch or {})
        self.optimizer = make_optimizer(config, trainable)
        self.lr = jax.jit(lr_schedule(config))
        self.stop_step = 0  # > 0: apply no update beyond this step

        def apply(theta, opt_state, grad):
            updates, opt_state = self.optimizer.update(grad, opt_state, theta)
            grad = grad if self.keep is None else grad * self.keep
            return (optax.apply_updates(theta, updates), opt_state,
                    optax.tree.norm(grad), optax.tree.norm(updates))

        self._apply = jax.jit(apply, donate_argnums=(1,))
        self.current = LearnerState(
            theta=theta, opt_state=self.optimizer.init(jnp.asarray(theta)),
            batch=self._empty_batch(), step=0, version=0,
            generation=generation or uuid.uuid4().hex[:12],
            counters=dict.fromkeys(COUNTERS, 0), losses=(), gains=(), dataset_losses={},
            rng=np.random.default_rng(config.seed).bit_generator.state, wall_s=0.0)

    # ------------------------------------------------------------------ views

    theta = property(lambda self: self.current.theta)
    opt_state = property(lambda self: self.current.opt_state)
    step = property(lambda self: self.current.step)
    version = property(lambda self: self.current.version)
    generation = property(lambda self: self.current.generation)
    counters = property(lambda self: self.current.counters)

    def wall_s(self) -> float:
        """Wall seconds of the run so far, earlier sessions included."""
        return self._wall_offset + (self._clock() - self._started)

    def curriculum(self) -> Curriculum:
        return curriculum_at(self.curriculum_config, self.current.step)

    def rolling_loss(self) -> float:
        return _window_mean(self.current.losses)

    def rolling_gain(self) -> float:
        """Mean of (loss - loss_start) over the window: < 0 when the rule improves tasks'
        features; free of the tasks' difficulty, unlike the rolling loss."""
        return _window_mean(self.current.gains)

    def new_stream_seeds(self, count: int) -> list[int]:
        """Fresh 63-bit seeds for worker task streams (from the checkpointed RNG)."""
        rng = np.random.default_rng()
        rng.bit_generator.state = self.current.rng
        seeds = [int(s) for s in rng.integers(0, 2 ** 63 - 1, size=count)]
        self.current = self.current._replace(rng=rng.bit_generator.state)
        return seeds

    # ------------------------------------------------------------------ updates

    def submit(self, sub: Submission) -> dict | None:
        """Take one submission; the metrics row if it completed a meta-batch. A
        submission of ``count`` tasks' mean counts (and weighs) ``count``."""
        self.current, row = self.take(self.current, sub, self.wall_s())
        return row

    def take(self, state: LearnerState, sub: Submission,
             wall_s: float) -> tuple[LearnerState, dict | None]:
        """The pure update behind ``submit``: (new state, row or None)."""
        count = int(sub.count)
        if count < 1 and sub.finite:
            raise ValueError(f"submission of worker {sub.worker} averages {count} gradients")
        tasks = count + int(sub.nonfinite_tasks)
        batch = state.batch._replace(received=state.batch.received + tasks)
        state = self._count(state._replace(batch=batch), received=tasks)
        staleness = state.version - int(sub.version)
        grad = np.asarray(sub.grad)
        why = ("after_stop" if self.stop_step and state.step >= self.stop_step
               else "dropped_generation" if sub.generation != state.generation
               else "dropped_stale" if not 0 <= staleness <= self.config.max_staleness
               else None)
        if why is None and grad.shape != (self.num_params,):
            raise ValueError(f"gradient of shape {grad.shape} from worker {sub.worker}; "
                             f"theta has {self.num_params} parameters")
        if why is None and not (sub.finite and math.isfinite(float(sub.loss))
                                and np.isfinite(grad).all()):
            why = "dropped_nonfinite"
        if why is not None:
            return self._count(state, **{why: tasks}), None
        state = self._count(state, dropped_nonfinite=int(sub.nonfinite_tasks))
        grad64 = grad.astype(np.float64)
        trained = grad64 if self.keep is None else grad * self.keep
        est = dict((name, (total, weight)) for name, total, weight in batch.est)
        for name, value in sub.estimator_metrics.items():
            if math.isfinite(float(value)):
                total, weight = est.get(name, (0.0, 0))
                est[name] = (total + count * float(value), weight + count)
        batch = batch._replace(
            grad_sum=batch.grad_sum + (grad64 if count == 1 else count * grad64),
            count=batch.count + count, loss_sum=batch.loss_sum + count * float(sub.loss),
            sq_sum=batch.sq_sum + count * float(np.dot(trained, trained)),
            staleness=batch.staleness + (staleness,),
            est=tuple((name, *value) for name, value in est.items()))
        state = self._record(state._replace(batch=batch), sub.dataset, float(sub.loss),
                             float(sub.loss_start), count)
        if batch.count < self.config.meta_batch:
            return state, None
        return self._update(state, wall_s)

    def absorb(self, theta: np.ndarray, opt_state, stats, dataset: str) -> list[dict]:
        """Take K updates made elsewhere (``metalearn.core.population``: the optax update
        inside a compiled program from this learner's theta and optimiser state); their
        rows, as ``submit`` would have made for the same task gradients.

        ``stats``: ``StepStats`` as numpy ([K] leading axis, [K, M] ``task_finite``); a
        step that was not applied makes no row. The call's time is shared evenly by its
        applied steps."""
        state, wall_s = self.current, self.wall_s()
        applied = np.asarray(stats.applied, bool)
        tasks = np.asarray(stats.task_finite).shape[1]
        per_step = max(wall_s - state.wall_s, 1e-9) / max(int(applied.sum()), 1)
        rows = []
        for k in range(applied.shape[0]):
            if (self.stop_step and state.step >= self.stop_step) or not stats.ran[k]:
                break
            count = int(stats.count[k])
            state = self._count(state, received=tasks, dropped_nonfinite=tasks - count)
            if not applied[k]:
                continue
            loss, grad_norm = float(stats.loss[k]), float(stats.grad_norm[k])
            state = self._record(state, dataset, loss, float(stats.loss_start[k]), count)
            spread = (_spread(float(stats.sq_sum[k]), grad_norm ** 2, count) if count >= 2
                      else (math.nan, math.nan))
            est = {name: float(values[k]) for name, values in stats.metrics.items()
                   if math.isfinite(float(values[k]))}
            wall = state.wall_s + per_step
            rows.append(self._row(state, np.asarray(stats.theta[k]), loss, grad_norm,
                                  float(stats.update_norm[k]), tasks / per_step, (0,),
                                  spread, est, wall))
            state = self._count(state._replace(step=state.step + 1, version=state.version + 1,
                                               wall_s=wall), applied=count)
        self.current = state._replace(theta=_read_only(theta), opt_state=opt_state,
                                    wall_s=wall_s)
        return rows

    def _update(self, state: LearnerState, wall_s: float) -> tuple[LearnerState, dict]:
        batch, n = state.batch, state.batch.count
        grad = jnp.asarray((batch.grad_sum / n).astype(np.float32))
        theta, opt_state, grad_norm, update_norm = self._apply(
            jnp.asarray(state.theta), state.opt_state, grad)
        theta = np.asarray(theta)  # read-only: a view of the device result
        est = {name: total / weight for name, total, weight in batch.est}
        mean = batch.grad_sum / n if self.keep is None else batch.grad_sum / n * self.keep
        spread = (_spread(batch.sq_sum, float(np.dot(mean, mean)), n)  # count-weighted
                  if len(batch.staleness) >= 2 and n >= 2 else (math.nan, math.nan))
        row = self._row(state, theta, batch.loss_sum / n, float(grad_norm), float(update_norm),
                        batch.received / max(wall_s - state.wall_s, 1e-9),
                        batch.staleness, spread, est, wall_s)
        state = state._replace(theta=theta, opt_state=opt_state, batch=self._empty_batch(),
                               step=state.step + 1, version=state.version + 1, wall_s=wall_s)
        return self._count(state, applied=batch.count), row

    # ------------------------------------------------------------------ statistics

    def _empty_batch(self) -> MetaBatch:
        return MetaBatch(np.zeros(self.num_params, np.float64))

    @staticmethod
    def _count(state: LearnerState, **increments: int) -> LearnerState:
        counters = dict(state.counters)
        for name, value in increments.items():
            counters[name] = counters.get(name, 0) + value
        return state._replace(counters=counters)

    def _record(self, state: LearnerState, dataset: str, loss: float, loss_start: float,
                count: int) -> LearnerState:
        """The rolling windows after ``count`` tasks of ``dataset`` with this loss."""
        window = self.config.loss_window
        gains = state.gains
        if math.isfinite(loss_start):
            gains = (gains + (loss - loss_start,) * count)[-window:]
        per_dataset = dict(state.dataset_losses)
        per_dataset[dataset] = (per_dataset.get(dataset, ()) + (loss,) * count)[-window:]
        return state._replace(losses=(state.losses + (loss,) * count)[-window:], gains=gains,
                              dataset_losses=per_dataset)

    def _row(self, state: LearnerState, theta: np.ndarray, meta_loss: float, grad_norm: float,
             update_norm: float, grads_per_s: float, staleness: tuple,
             spread: tuple[float, float], est: dict, wall_s: float) -> dict:
        """The metrics row of the update from ``state.step`` to ``state.step + 1``."""
        curriculum = curriculum_at(self.curriculum_config, state.step)
        counters = state.counters
        extra = {f"loss/{name}": _window_mean(window)
                 for name, window in sorted(state.dataset_losses.items())}
        extra.update({f"theta/{name}": float(theta[index])
                      for name, index in self.watch.items()})
        extra.update({f"est/{name}": value for name, value in sorted(est.items())})
        return LearnerRow(
            step=state.step + 1, meta_loss=meta_loss,
            meta_loss_rolling=_window_mean(state.losses),
            loss_vs_start_rolling=_window_mean(state.gains),
            grads_per_s=grads_per_s, staleness_mean=float(np.mean(staleness)),
            staleness_max=int(np.max(staleness)), dropped_stale=counters["dropped_stale"],
            dropped_nonfinite=counters["dropped_nonfinite"],
            dropped_generation=counters["dropped_generation"], received=counters["received"],
            lr=float(self.lr(state.step)), unroll_min=curriculum.unroll_low,
            unroll_max=curriculum.unroll_high, truncations_std=curriculum.truncations_std,
            grad_norm=grad_norm, update_norm=update_norm,
            theta_norm=float(np.linalg.norm(theta)), wall_s=wall_s, grad_var=spread[0],
            grad_snr=spread[1]).to_dict(extra)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict, dict]:
        """The current state as (arrays: a pytree of numpy arrays, meta: JSON-able)."""
        state = self.current
        batch = {name: getattr(state.batch, name) for name in MetaBatch._fields[1:]}
        return self.state_template(), {
            "step": state.step, "version": state.version, "generation": state.generation,
            "num_params": self.num_params, "batch": batch, "counters": state.counters,
            "losses": state.losses, "gains": state.gains,
            "dataset_losses": state.dataset_losses, "rng": state.rng, "wall_s": self.wall_s()}

    def state_template(self) -> dict:
        """The arrays of ``state()`` (the orbax restore target)."""
        return {"theta": self.current.theta,
                "opt_state": jax.tree.map(np.asarray, self.current.opt_state),
                "grad_sum": self.current.batch.grad_sum}

    def load_state(self, arrays: dict, meta: dict, *, keep_generation: bool = False) -> None:
        """Restore a ``state()``. A restored learner is a new
        generation unless asked otherwise, so gradients computed against the dead
        learner's later versions are dropped rather than applied to another theta."""
        theta = np.asarray(arrays["theta"], np.float32)
        if theta.shape != (self.num_params,):
            raise ValueError(f"checkpoint theta has {theta.size} parameters, this learner "
                             f"{self.num_params}")
        batch = MetaBatch(np.asarray(arrays["grad_sum"], np.float64).copy(), **{
            **meta["batch"], "staleness": tuple(meta["batch"]["staleness"]),
            "est": tuple(tuple(e) for e in meta["batch"]["est"])})
        self.current = LearnerState(
            theta=_read_only(theta), opt_state=jax.tree.map(jnp.asarray, arrays["opt_state"]),
            batch=batch._replace(received=0), step=int(meta["step"]),
            version=int(meta["version"]),
            generation=meta["generation"] if keep_generation else uuid.uuid4().hex[:12],
            counters={k: int(v) for k, v in meta["counters"].items()},
            losses=tuple(meta["losses"]), gains=tuple(meta["gains"]),
            dataset_losses={k: tuple(v) for k, v in meta["dataset_losses"].items()},
            rng=meta["rng"], wall_s=float(meta["wall_s"]))
        self._wall_offset, self._started = float(meta["wall_s"]), self._clock()


__all__ = ["COUNTERS", "Learner", "LearnerState", "MetaBatch", "freeze", "lr_schedule",
           "make_optimizer"]
