"""``LearnerHost``: the learner as a service of the training loop, without Ray: a
``Learner`` with the run folder's checkpoints, theta snapshot and recent metrics rows.

The single-process runner calls it directly; ``metalearn.distributed.actors.LearnerActor``
wraps it as a Ray actor, method for method. See docs/training.md (Faults).
"""

from __future__ import annotations

import collections
import time
import warnings

import numpy as np

from metalearn.core.config import PLANE_NAMES
from metalearn.core.theta import theta_spec
from metalearn.training.checkpoint import CheckpointSaveError, Checkpointer, describe_error
from metalearn.training.config import TrainConfig, trainable_mask
from metalearn.training.export import run_start_theta, save_run_theta
from metalearn.training.learner import Learner
from metalearn.training.messages import LearnerReply, LearnerStatus, Submission
from metalearn.training.metrics import LearnerRows
from metalearn.training.run_dir import RunDir

# Recent rows kept for replies lost with a dead worker; the driver drains them every
# step, so a few thousand is far more than it can fall behind.
RECENT_ROWS = 4096


def merge_weight_indices(spec) -> dict[str, int]:
    """{"merge_w/<plane>": flat index, "merge_w/bias": ...}: the rule's mixing weights, the
    handful of numbers that say which update the rule makes (docs/rule.md)."""
    out = {f"merge_w/{plane}": int(np.argmax(spec.mask([f"merge_w.w:{plane}"])))
           for plane in PLANE_NAMES}
    out["merge_w/bias"] = int(np.argmax(spec.mask(["merge_w.b"])))
    return out


class LearnerHost:
    """A learner with its checkpoints in ``run`` (the one process that writes them)."""

    def __init__(self, config: TrainConfig, run: RunDir, resume: bool):
        self.config = config
        self.run = run
        spec = theta_spec(config.rule)
        flat = spec.ravel(run_start_theta(config, run))
        self.learner = Learner(flat, config.learner, config.curriculum,
                               trainable=trainable_mask(config.rule, config.learner),
                               watch=merge_weight_indices(spec))
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
                why = f" ({self.warnings[0]})" if self.warnings else ""
                raise FileNotFoundError(f"no readable checkpoint in {run.path}{why}")
            step, arrays, meta = found
            self.learner.load_state(arrays, meta)
            self.restored_step = step
            self.warnings += tuple(self.metric_rows.restore(
                step, reason=f"learner restored from checkpoint step {step}"))
        self.last_checkpoint = time.monotonic()
        # The newest complete checkpoint (None: none yet), and one completed in the
        # background that no reply has reported yet.
        self.last_good_step: int | None = self.checkpointer.last_good_step
        self._unreported: int | None = None
        # Why this learner cannot go on (its checkpoint or metrics rows could not be
        # written), one line; once set nothing more is written.
        self.fatal = ""
        self.busy_s = 0.0  # time inside submit (checking, summing, applying, saving)
        self.rows: collections.deque = collections.deque(maxlen=RECENT_ROWS)

    def status(self) -> LearnerStatus:
        learner = self.learner
        return LearnerStatus(
            generation=learner.generation, step=learner.step, version=learner.version,
            curriculum=learner.curriculum(), num_params=learner.num_params,
            counters=dict(learner.counters), meta_loss_rolling=learner.rolling_loss(),
            loss_vs_start_rolling=learner.rolling_gain(), restored_step=self.restored_step,
            warnings=self.warnings, busy_s=self.busy_s, fatal=self.fatal)

    def theta(self):
        """The current flat theta [P] float32 (numpy, read-only: a worker keeps exactly
        the version it was given)."""
        return self.learner.theta

    def new_stream_seeds(self, count: int) -> list[int]:
        return self.learner.new_stream_seeds(count)

    def submit(self, submission: Submission) -> LearnerReply:
        start = time.perf_counter()
        row = self.learner.submit(submission)
        return self._reply([] if row is None else [row], start)

    def absorb(self, theta, opt_state, stats, dataset: str) -> LearnerReply:
        """K updates made by the population engine from this learner's theta and optimiser
        state (``Learner.absorb``): their rows are written and a checkpoint is started
        when due, as after ``submit``; the reply carries the last row."""
        start = time.perf_counter()
        return self._reply(self.learner.absorb(theta, opt_state, stats, dataset), start)

    def _reply(self, rows: list[dict], start: float) -> LearnerReply:
        """Keep and write ``rows`` (new updates), start a checkpoint when due; the reply."""
        learner = self.learner
        self._collect(wait=False)
        for row in rows:
            self.rows.append(row)
            if not self.fatal:
                self._write_rows(self.metric_rows.add, row)
        if rows:
            self._maybe_save()
        checkpoint, self._unreported = self._unreported, None
        self.busy_s += time.perf_counter() - start
        return LearnerReply(generation=learner.generation, step=learner.step,
                            version=learner.version, row=rows[-1] if rows else None,
                            curriculum=learner.curriculum() if rows else None,
                            checkpoint=checkpoint, fatal=self.fatal,
                            received=int(learner.counters["received"]))

    def update_limit(self) -> int | None:
        """How many more updates the run may make (None: no step limit)."""
        stop = self.learner.stop_step
        return None if not stop else max(stop - self.learner.step, 0)

    def rows_after(self, step: int) -> list[dict]:
        """Metrics rows of this learner's updates after ``step``."""
        return [row for row in self.rows if row["step"] > step]

    def checkpoint(self) -> int:
        """Save the full state and theta now (if the step is new) and wait for both;
        returns the newest complete checkpoint's step (-1: none). After a failure
        (``fatal``) nothing is saved again."""
        self._collect(wait=True)
        if not self.fatal:
            self._write_rows(self.metric_rows.flush)
        if not self.fatal and self.learner.step != self.last_good_step:
            self._start_save()
            self._collect(wait=True)
        self._unreported = None  # the caller has it
        self.last_checkpoint = time.monotonic()
        return -1 if self.last_good_step is None else self.last_good_step

    def close(self) -> int:
        """The final checkpoint (none is tried after a failure) and orbax closed; returns
        the newest complete checkpoint's step (-1: none)."""
        step = self.checkpoint()
        try:
            self.checkpointer.close()
        except CheckpointSaveError as err:  # (the save in flight was collected above)
            self._fail(err)
        return step

    def finish(self) -> tuple[int, LearnerStatus]:
        """``close`` and the learner's last status."""
        return self.close(), self.status()

    # ------------------------------------------------------------------ saving

    def _maybe_save(self) -> None:
        """Start a checkpoint when ``learner.checkpoint_minutes`` have passed (never while
        one is in flight, never after a failure)."""
        minutes = (time.monotonic() - self.last_checkpoint) / 60.0
        if (minutes >= self.config.learner.checkpoint_minutes and not self.fatal
                and self.checkpointer.in_flight is None):
            self._start_save()

    def _start_save(self) -> None:
        """Start saving the learner's state; theta_latest follows once it is complete."""
        learner, run, rule = self.learner, self.run, self.config.rule
        step, theta = learner.step, learner.theta
        self.last_checkpoint = time.monotonic()
        # Rows first: a checkpoint never outruns its metrics rows.
        self._write_rows(self.metric_rows.flush)
        if self.fatal:
            return
        try:
            self.checkpointer.save(step, *learner.state(), wait=False,
                                   then=lambda: save_run_theta(run, theta, rule, step),
                                   then_what=f"its theta_latest ({run.theta})")
        except CheckpointSaveError as err:
            self._fail(err)

    def _collect(self, wait: bool) -> None:
        """Take the outcome of a background save (waiting for it if ``wait``)."""
        try:
            step = self.checkpointer.wait() if wait else self.checkpointer.poll()
        except CheckpointSaveError as err:
            self._fail(err)
            return
        if step is not None:
            self.last_good_step = step
            self._unreported = step

    def _write_rows(self, write, *args) -> None:
        """Write metrics rows; a failure is fatal like a checkpoint's."""
        try:
            write(*args)
        except Exception as err:  # noqa: BLE001 - any failure to write the run stops it
            good = (f"the last good checkpoint is step {self.last_good_step}"
                    if self.last_good_step is not None else "there is no good checkpoint")
            self._fail(CheckpointSaveError(
                f"metrics rows up to step {self.learner.step} could not be written to "
                f"{self.run.metrics}: {describe_error(err, self.run.metrics)}; {good}",
                self.learner.step, self.last_good_step))

    def _fail(self, err: CheckpointSaveError) -> None:
        if not self.fatal:  # the first failure is the cause; nothing is saved after it
            self.fatal = str(err)
        if err.last_good is not None:
            self.last_good_step = err.last_good


__all__ = ["LearnerHost", "RECENT_ROWS"]
