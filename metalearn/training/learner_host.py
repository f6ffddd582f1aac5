"""``LearnerHost``: the learner as a service of the training loop, without Ray.

It owns a ``Learner`` (the optax maths), the run folder's checkpoints and theta
snapshot, and the recent metrics rows:

* at construction it initialises theta from ``learner.seed`` or, when resuming, restores
  the newest readable checkpoint (a restored learner is a new generation: gradients
  computed for the dead one are dropped, docs/training.md);
* ``submit`` takes a worker's ``Submission`` and answers with a ``LearnerReply``; after an
  update it also writes a checkpoint when ``learner.checkpoint_minutes`` have passed;
* ``checkpoint`` saves the whole learner state (orbax) and theta in the export format
  (``RunDir.theta``); ``rows_after`` gives rows whose replies were lost with a worker.

The single-process runner calls it directly; ``metalearn.distributed.actors.LearnerActor``
wraps it as a Ray actor, method for method.
"""

from __future__ import annotations

import collections
import time
import warnings

import jax

from metalearn.core.theta import theta_spec
from metalearn.core.update_rule import init_theta
from metalearn.training.checkpoint import Checkpointer
from metalearn.training.config import TrainConfig
from metalearn.training.export import save_run_theta
from metalearn.training.learner import Learner
from metalearn.training.messages import LearnerReply, LearnerStatus, Submission
from metalearn.training.metrics import LearnerRows
from metalearn.training.run_dir import RunDir

# Recent rows kept for replies lost with a dead worker; the driver drains them every
# step, so a few thousand is far more than it can fall behind.
RECENT_ROWS = 4096


class LearnerHost:
    """A learner with its checkpoints in ``run`` (the one process that writes them)."""

    def __init__(self, config: TrainConfig, run: RunDir, resume: bool):
        self.config = config
        self.run = run
        spec = theta_spec(config.rule)
        flat = spec.ravel(init_theta(jax.random.key(config.learner.seed), config.rule))
        frozen = (theta_spec(config.rule).mask(config.learner.frozen, "learner.frozen")
                  if config.learner.frozen else None)
        self.learner = Learner(flat, config.learner, config.curriculum, frozen_mask=frozen)
        self.learner.stop_step = config.run.steps
        self.checkpointer = Checkpointer(run.checkpoints, keep=config.learner.keep_checkpoints)
        self.restored_step = None
        self.warnings: tuple[str, ...] = ()
        # The learner writes its own metrics rows, always before a checkpoint: rows up
        # to every checkpoint's step are on disk (metalearn.training.metrics).
        self.metric_rows = LearnerRows(run, config.run.metrics_flush_s)
        if resume:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                found = self.checkpointer.restore_latest(self.learner.state_template())
            self.warnings = tuple(str(w.message) for w in caught)
            if found is None:
                raise FileNotFoundError(f"no readable checkpoint in {run.path}")
            step, arrays, meta = found
            self.learner.load_state(arrays, meta)
            self.restored_step = step
            self.warnings += tuple(self.metric_rows.restore(
                step, reason=f"learner restored from checkpoint step {step}"))
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_step = self.learner.step
        self.busy_s = 0.0  # time inside submit (checking, summing, applying, saving)
        self.rows: collections.deque = collections.deque(maxlen=RECENT_ROWS)

    def status(self) -> LearnerStatus:
        learner = self.learner
        return LearnerStatus(
            generation=learner.generation, step=learner.step, version=learner.version,
            curriculum=learner.curriculum(), num_params=learner.num_params,
            counters=dict(learner.counters), meta_loss_rolling=learner.rolling_loss(),
            loss_vs_start_rolling=learner.rolling_gain(), restored_step=self.restored_step,
            warnings=self.warnings, busy_s=self.busy_s)

    def theta(self):
        """The current flat theta [P] float32 (numpy)."""
        return self.learner.theta

    def new_stream_seeds(self, count: int) -> list[int]:
        return self.learner.new_stream_seeds(count)

    def submit(self, submission: Submission) -> LearnerReply:
        start = time.perf_counter()
        learner = self.learner
        row = learner.submit(submission)
        curriculum = checkpoint = None
        if row is not None:
            self.rows.append(row)
            self.metric_rows.add(row)
            curriculum = learner.curriculum()
            minutes = (time.monotonic() - self.last_checkpoint) / 60.0
            if minutes >= self.config.learner.checkpoint_minutes:
                checkpoint = self.checkpoint()
        self.busy_s += time.perf_counter() - start
        return LearnerReply(generation=learner.generation, step=learner.step,
                            version=learner.version, row=row, curriculum=curriculum,
                            checkpoint=checkpoint)

    def rows_after(self, step: int) -> list[dict]:
        """Metrics rows of this learner's updates after ``step``."""
        return [row for row in self.rows if row["step"] > step]

    def checkpoint(self) -> int:
        """Save the full state and theta now (if the step is new); returns the step."""
        step = self.learner.step
        self.metric_rows.flush()  # rows first: a checkpoint never outruns its rows
        if step != self.last_checkpoint_step or not self.checkpointer.steps():
            self.checkpointer.save(step, *self.learner.state())
            save_run_theta(self.run, self.learner.theta, self.config.rule, step)
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_step = step
        return step

    def close(self) -> int:
        step = self.checkpoint()
        self.checkpointer.close()
        return step


__all__ = ["LearnerHost", "RECENT_ROWS"]
