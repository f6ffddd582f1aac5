"""The central learner of asynchronous meta-training (docs/training.md, docs/architecture.md).

Plain Python, testable without Ray (``LearnerHost`` adds its checkpoints, and
``metalearn.distributed`` wraps that as an actor).
Workers send ``Submission``s: a truncation's meta-gradient as one flat float32 vector
(``jax.flatten_util.ravel_pytree`` order of theta), the theta version it was computed
with, the task's metadata, loss and timings. The learner

* drops a submission computed with an older learner incarnation (``generation``: its
  versions mean nothing here), one staler than ``max_staleness`` versions, or one that
  is not finite (loss or any gradient entry), counting each kind; nothing dropped is
  ever added to the buffer;
* sums accepted gradients into one float64 buffer (a vmapped worker's submission, the
  mean of ``count`` tasks, counts ``count`` times) and, once it holds ``meta_batch`` of
  them, applies their mean with optax (global-norm clip, Adam, piecewise-constant
  learning rate), bumps ``step`` and the theta ``version``, and returns one metrics row;
* owns the curriculum: the U range and the truncations-per-task spread at the current
  step (a ``TruncationSchedule``), which the driver hands to workers with theta;
* owns a numpy RNG (checkpointed) that issues fresh task-stream seeds to workers, so a
  restarted worker, or a resumed run, draws new tasks.

``state()`` / ``load_state()`` give the whole learner as (arrays pytree, JSON dict) for
``metalearn.training.checkpoint``; restoring them reproduces the exact step, optimiser state,
buffer, counters, rolling losses and RNG.
"""

from __future__ import annotations

import collections
import math
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.training.config import CurriculumConfig, LearnerConfig
from metalearn.training.messages import Submission
from metalearn.training.schedules import Curriculum, TruncationSchedule, lr_at


def make_optimizer(config: LearnerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> Adam -> piecewise-constant learning rate."""
    boundaries = [int(b) for b in config.lr_boundaries]
    values = [float(v) for v in config.lr_values]

    def schedule(count):
        index = jnp.sum(jnp.asarray(boundaries, jnp.int32) <= count) if boundaries else 0
        return jnp.asarray(values, jnp.float32)[index]

    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.scale_by_learning_rate(schedule),
    )


class Learner:
    """Buffers meta-gradients and applies optax updates to a flat theta."""

    def __init__(self, theta_flat: np.ndarray, config: LearnerConfig,
                 curriculum: CurriculumConfig, *, generation: str | None = None,
                 clock=time.monotonic, frozen_mask: np.ndarray | None = None,
                 watch: dict[str, int] | None = None):
        self.config = config
        self.schedule = TruncationSchedule(curriculum)
        self.generation = generation or uuid.uuid4().hex[:12]
        self._clock = clock
        self.optimizer = make_optimizer(config)
        theta = jnp.asarray(np.asarray(theta_flat, np.float32))
        self.theta = np.asarray(theta)
        self.opt_state = self.optimizer.init(theta)
        self.num_params = int(self.theta.size)

        # [P] 1.0 where theta trains, 0.0 where it is frozen (``LearnerConfig.frozen``):
        # a zero gradient gives Adam a zero update, so frozen entries never move.
        keep = (np.ones(self.num_params, np.float32) if frozen_mask is None
                else (~np.asarray(frozen_mask, bool)).astype(np.float32))
        if keep.shape != (self.num_params,):
            raise ValueError(f"frozen_mask has shape {keep.shape}, theta {self.num_params}")
        self.frozen_count = int(self.num_params - keep.sum())
        # Single theta entries logged in every row as ``theta/<name>`` (the merge weights:
        # how the rule itself changes over meta-training).
        self.watch = dict(watch or {})
        self._keep = keep if self.frozen_count else None  # for the submissions' spread
        keep = jnp.asarray(keep)

        def apply(theta, opt_state, grad):
            grad = grad * keep
            updates, opt_state = self.optimizer.update(grad, opt_state, theta)
            return (optax.apply_updates(theta, updates), opt_state,
                    optax.tree.norm(grad), optax.tree.norm(updates))

        self._apply = jax.jit(apply, donate_argnums=(1,))
        self.step = 0
        self.version = 0
        self.stop_step = 0  # > 0: apply no update beyond this step
        self.rng = np.random.default_rng(config.seed)
        self._reset_buffer()
        self.counters = collections.Counter(received=0, applied=0, dropped_stale=0,
                                            dropped_nonfinite=0, dropped_generation=0,
                                            after_stop=0)
        self.losses: collections.deque = collections.deque(maxlen=config.loss_window)
        self.gains: collections.deque = collections.deque(maxlen=config.loss_window)
        self.dataset_losses: dict[str, collections.deque] = {}
        self.wall_offset = 0.0  # wall seconds of earlier sessions (restored)
        self._started = clock()
        self._last_update_time = self._started
        self._received_since_update = 0

    # ------------------------------------------------------------------ public API

    def curriculum(self) -> Curriculum:
        return self.schedule.at(self.step)

    def lr(self) -> float:
        return lr_at(self.config, self.step)

    def wall_s(self) -> float:
        return self.wall_offset + (self._clock() - self._started)

    def new_stream_seeds(self, count: int) -> list[int]:
        """Fresh 63-bit seeds for worker task streams (from the checkpointed RNG)."""
        return [int(s) for s in self.rng.integers(0, 2 ** 63 - 1, size=count)]

    def submit(self, sub: Submission) -> dict | None:
        """Take one submission; returns the metrics row if it completed a meta-batch.

        A submission of ``count`` task gradients (their mean) counts ``count`` toward the
        meta-batch and is weighted by it; every counter counts task gradients.
        """
        count = int(sub.count)
        if count < 1 and sub.finite:
            raise ValueError(f"submission of worker {sub.worker} averages {count} gradients")
        tasks = count + int(sub.nonfinite_tasks)
        self.counters["received"] += tasks
        self._received_since_update += tasks
        if self.stop_step and self.step >= self.stop_step:
            self.counters["after_stop"] += tasks  # the run is over: never applied
            return None
        if sub.generation != self.generation:
            self.counters["dropped_generation"] += tasks
            return None
        staleness = self.version - int(sub.version)
        if staleness < 0 or staleness > self.config.max_staleness:
            # Negative staleness cannot come from this generation; treat it as invalid.
            self.counters["dropped_stale"] += tasks
            return None
        grad = np.asarray(sub.grad)
        if grad.shape != (self.num_params,):
            raise ValueError(f"gradient of shape {grad.shape} from worker {sub.worker}; "
                             f"theta has {self.num_params} parameters")
        loss = float(sub.loss)
        if not (sub.finite and math.isfinite(loss) and np.isfinite(grad).all()):
            self.counters["dropped_nonfinite"] += tasks
            return None
        self.counters["dropped_nonfinite"] += int(sub.nonfinite_tasks)
        if count == 1:
            np.add(self._grad_sum, grad, out=self._grad_sum)
        else:
            self._grad_sum += count * grad.astype(np.float64)
        self._count += count
        self._loss_sum += count * loss
        # Spread of the submissions' gradients (each a worker's estimate): the meta-batch's
        # online variance estimate, whatever the estimator (row: grad_var, grad_snr).
        trained = grad.astype(np.float64) if self._keep is None else grad * self._keep
        self._sq_sum += count * float(np.dot(trained, trained))
        for name, value in sub.estimator_metrics.items():
            value = float(value)
            if math.isfinite(value):
                total, weight = self._est.get(name, (0.0, 0))
                self._est[name] = [total + count * value, weight + count]
        self._staleness.append(staleness)
        self.losses.extend([loss] * count)
        if math.isfinite(float(sub.loss_start)):
            self.gains.extend([loss - float(sub.loss_start)] * count)
        window = self.dataset_losses.get(sub.dataset)
        if window is None:
            window = self.dataset_losses[sub.dataset] = collections.deque(
                maxlen=self.config.loss_window)
        window.extend([loss] * count)
        if self._count >= self.config.meta_batch:
            return self._update()
        return None

    def rolling_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")

    def rolling_gain(self) -> float:
        """Mean of (loss - loss_start) over the window: < 0 when the rule improves
        tasks' features. The task's difficulty cancels, so unlike the rolling loss it is
        comparable across a run whatever tasks were drawn."""
        return float(np.mean(self.gains)) if self.gains else float("nan")

    # ------------------------------------------------------------------ update

    def _reset_buffer(self) -> None:
        self._grad_sum = np.zeros(self.theta.shape, np.float64)
        self._count = 0
        self._loss_sum = 0.0
        self._staleness: list[int] = []
        self._sq_sum = 0.0  # sum of count * |grad|^2 (trainable entries)
        self._est: dict[str, list] = {}  # estimator metric -> [count-weighted sum, count]

    def _update(self) -> dict:
        grad = jnp.asarray((self._grad_sum / self._count).astype(np.float32))
        theta, self.opt_state, grad_norm, update_norm = self._apply(
            jnp.asarray(self.theta), self.opt_state, grad)
        self.theta = np.asarray(theta)
        now = self._clock()
        interval = max(now - self._last_update_time, 1e-9)
        est = {name: total / weight for name, (total, weight) in self._est.items()}
        row = self._row(self._loss_sum / self._count, float(grad_norm), float(update_norm),
                        self.theta, self._received_since_update / interval,
                        self._staleness, self._spread(), est,
                        self.wall_offset + (now - self._started))
        self.counters["applied"] += self._count
        self.step += 1
        self.version += 1
        self._last_update_time = now
        self._received_since_update = 0
        self._reset_buffer()
        return row

    def _row(self, meta_loss: float, grad_norm: float, update_norm: float, theta: np.ndarray,
             grads_per_s: float, staleness: list, spread: dict, est: dict,
             wall_s: float) -> dict:
        """The metrics row of the update from ``self.step`` to ``self.step + 1``."""
        curriculum = self.curriculum()
        row = {
            "step": self.step + 1,
            "meta_loss": meta_loss,
            "meta_loss_rolling": self.rolling_loss(),
            "loss_vs_start_rolling": self.rolling_gain(),
            "grads_per_s": grads_per_s,
            "staleness_mean": float(np.mean(staleness)),
            "staleness_max": int(np.max(staleness)),
            "dropped_stale": self.counters["dropped_stale"],
            "dropped_nonfinite": self.counters["dropped_nonfinite"],
            "dropped_generation": self.counters["dropped_generation"],
            "received": self.counters["received"],
            "lr": self.lr(),
            "unroll_min": curriculum.unroll_low,
            "unroll_max": curriculum.unroll_high,
            "truncations_std": curriculum.truncations_std,
            "grad_norm": grad_norm,
            "update_norm": update_norm,
            "theta_norm": float(np.linalg.norm(theta)),
            "wall_s": wall_s,
        }
        for name, window in sorted(self.dataset_losses.items()):
            row[f"loss/{name}"] = float(np.mean(window))
        for name, index in self.watch.items():
            row[f"theta/{name}"] = float(theta[index])
        row.update(spread)
        for name, value in sorted(est.items()):
            row[f"est/{name}"] = value
        return row

    def absorb(self, theta: np.ndarray, opt_state, stats, dataset: str) -> list[dict]:
        """Take K updates made elsewhere (``metalearn.core.population``: the optax update
        inside a compiled program from this learner's theta and optimiser state) and
        return their metrics rows, as ``submit`` would have for the same task gradients.

        ``stats``: ``StepStats`` as numpy ([K] leading axis, [K, M] ``task_finite``); a
        step that was not applied (no finite task, or past the run's last step) makes no
        row. The call's wall time is shared evenly by its applied steps."""
        now = self._clock()
        applied = np.asarray(stats.applied, bool)
        finite = np.asarray(stats.task_finite, bool)
        tasks = finite.shape[1]
        elapsed = max(now - self._last_update_time, 1e-9)
        per_step = elapsed / max(int(applied.sum()), 1)
        done = 0
        rows = []
        wall_end = self.wall_offset + (now - self._started)
        for k in range(applied.shape[0]):
            if self.stop_step and self.step >= self.stop_step:
                break
            if not stats.ran[k]:
                break
            count = int(stats.count[k])
            self.counters["received"] += tasks
            self.counters["dropped_nonfinite"] += tasks - count
            if not applied[k]:
                continue
            loss, start = float(stats.loss[k]), float(stats.loss_start[k])
            self.losses.extend([loss] * count)
            if math.isfinite(start):
                self.gains.extend([loss - start] * count)
            window = self.dataset_losses.get(dataset)
            if window is None:
                window = self.dataset_losses[dataset] = collections.deque(
                    maxlen=self.config.loss_window)
            window.extend([loss] * count)
            grad_norm = float(stats.grad_norm[k])
            spread = {"grad_var": math.nan, "grad_snr": math.nan}
            if count >= 2:
                var = max((float(stats.sq_sum[k]) - count * grad_norm ** 2) / (count - 1), 0.0)
                spread = {"grad_var": var,
                          "grad_snr": grad_norm ** 2 / (var / count) if var > 0 else math.inf}
            est = {name: float(values[k]) for name, values in stats.metrics.items()
                   if math.isfinite(float(values[k]))}
            done += 1
            rows.append(self._row(loss, grad_norm, float(stats.update_norm[k]),
                                  np.asarray(stats.theta[k]), tasks / per_step, [0], spread,
                                  est, wall_end - (int(applied.sum()) - done) * per_step))
            self.counters["applied"] += count
            self.step += 1
            self.version += 1
        self.theta = np.asarray(theta, np.float32)
        self.opt_state = opt_state
        self._last_update_time = now
        self._received_since_update = 0
        return rows

    # ------------------------------------------------------------------ state

    def _spread(self) -> dict:
        """grad_var: the trace of the covariance of a submitted gradient over this
        meta-batch (each submission weighted by its count; NaN with fewer than two
        submissions), on the trainable entries; grad_snr: |mean|^2 over the variance of
        the mean (> 1: the update's direction is mostly signal, not estimator noise)."""
        n = self._count
        if len(self._staleness) < 2 or n < 2:
            return {"grad_var": math.nan, "grad_snr": math.nan}
        mean = self._grad_sum / n
        if self._keep is not None:
            mean = mean * self._keep
        mean_sq = float(np.dot(mean, mean))
        var = max((self._sq_sum - n * mean_sq) / (n - 1), 0.0)
        return {"grad_var": var, "grad_snr": mean_sq / (var / n) if var > 0 else math.inf}

    def state(self) -> tuple[dict, dict]:
        """(arrays, meta): arrays is a pytree of numpy arrays, meta is JSON-able."""
        arrays = {"theta": self.theta,
                  "opt_state": jax.tree.map(np.asarray, self.opt_state),
                  "grad_sum": self._grad_sum}
        meta = {
            "step": self.step,
            "version": self.version,
            "generation": self.generation,
            "num_params": self.num_params,
            "buffer": {"count": self._count, "loss_sum": self._loss_sum,
                       "staleness": list(self._staleness), "sq_sum": self._sq_sum,
                       "estimator_metrics": {k: list(v) for k, v in self._est.items()}},
            "counters": dict(self.counters),
            "losses": list(self.losses),
            "gains": list(self.gains),
            "dataset_losses": {k: list(v) for k, v in self.dataset_losses.items()},
            "wall_s": self.wall_s(),
            "rng": self.rng.bit_generator.state,
        }
        return arrays, meta

    def state_template(self) -> dict:
        """Arrays pytree with this learner's structure, shapes and dtypes (restore target)."""
        return self.state()[0]

    def load_state(self, arrays: dict, meta: dict, *, keep_generation: bool = False) -> None:
        """Restore a ``state()``. A restored learner is a new generation unless asked
        otherwise, so gradients computed against the dead learner's later versions are
        dropped rather than applied to a theta they were not computed for."""
        theta = np.asarray(arrays["theta"], np.float32)
        if theta.shape != self.theta.shape:
            raise ValueError(f"checkpoint theta has {theta.size} parameters, this learner "
                             f"{self.theta.size}")
        self.theta = theta.copy()
        self.opt_state = jax.tree.map(jnp.asarray, arrays["opt_state"])
        self._grad_sum = np.asarray(arrays["grad_sum"], np.float64).copy()
        self.step = int(meta["step"])
        self.version = int(meta["version"])
        if keep_generation:
            self.generation = meta["generation"]
        buffer = meta["buffer"]
        self._count = int(buffer["count"])
        self._loss_sum = float(buffer["loss_sum"])
        self._staleness = [int(s) for s in buffer["staleness"]]
        # (Checkpoints from before the estimators' metrics lack these two.)
        self._sq_sum = float(buffer.get("sq_sum", 0.0))
        self._est = {k: [float(v[0]), int(v[1])]
                     for k, v in buffer.get("estimator_metrics", {}).items()}
        self.counters = collections.Counter({k: int(v) for k, v in meta["counters"].items()})
        self.losses = collections.deque(meta["losses"], maxlen=self.config.loss_window)
        self.gains = collections.deque(meta.get("gains", []), maxlen=self.config.loss_window)
        self.dataset_losses = {k: collections.deque(v, maxlen=self.config.loss_window)
                               for k, v in meta["dataset_losses"].items()}
        self.wall_offset = float(meta["wall_s"])
        self._started = self._clock()
        self._last_update_time = self._started
        self._received_since_update = 0
        rng_state = meta["rng"]
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = rng_state
