"""The training loop of asynchronous meta-training, as plain Python (docs/architecture.md).

``TrainingLoop`` is the driver: it starts a learner and N workers through a
``Transport``, hands each idle worker a ``WorkOrder`` (the newest theta handle and the
curriculum), and handles what comes back:

* a worker pushes each truncation's ``Submission`` straight to the learner and returns
  the learner's ``LearnerReply``; the driver never touches a gradient;
* a reply's metrics row goes to the run's ``MetricsLog`` in step order; a row whose reply
  died with its worker is fetched from the learner, which keeps recent rows;
* a new theta version makes the loop publish theta once (one copy shared by every worker);
* a worker that died (restarted by the transport) or whose truncation raised gets a
  fresh task-stream seed from the learner; a run whose every truncation fails stops;
* a learner that is lost is replaced by one restored from the last checkpoint (a new
  generation: in-flight gradients for the dead one are lost with it or dropped by the
  new one), and metrics rows beyond the restored step are discarded.

The run stops at ``run.steps`` (an absolute learner step), after ``run.minutes``, or when
a callback calls ``request_stop``; the learner then writes a final checkpoint.

Transports: ``metalearn.training.local.InProcessTransport`` (one process, no Ray: tests,
debugging, one GPU) and ``metalearn.distributed.driver.RayTransport`` (actors). The loop
is the same for both; see docs/architecture.md.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import sys
import time
from typing import Any, Sequence

from metalearn.core.config_io import RunError
from metalearn.training.config import TrainConfig
from metalearn.training.messages import (LearnerReply, LearnerStatus, ThetaHandle,
                                         WorkerResult, WorkOrder)
from metalearn.training.metrics import MetricsLog
from metalearn.training.run_dir import RunDir


class LearnerLost(RuntimeError):
    """A call to the learner failed because the learner is gone."""


class WorkerStartError(RunError):
    """Workers could not start (their constructor failed); the message says why."""


class Transport(abc.ABC):
    """How the loop reaches its learner and workers.

    Learner calls raise ``LearnerLost`` when the learner is gone. ``collect`` returns the
    orders that finished (possibly none within ``timeout_s``), each as a ``WorkerResult``.
    """

    # -- the learner
    @abc.abstractmethod
    def start_learner(self, resume: bool) -> LearnerStatus:
        """Start a learner (restored from the newest checkpoint if ``resume``)."""

    @abc.abstractmethod
    def stop_learner(self) -> None:
        """End the current learner, dead or alive (before a replacement starts)."""

    @abc.abstractmethod
    def learner_status(self) -> LearnerStatus: ...

    @abc.abstractmethod
    def publish_theta(self, handle: ThetaHandle) -> ThetaHandle:
        """``handle`` with a payload workers can read the learner's current theta from."""

    @abc.abstractmethod
    def new_stream_seeds(self, count: int) -> list[int]: ...

    @abc.abstractmethod
    def rows_after(self, step: int) -> list[dict]: ...

    @abc.abstractmethod
    def checkpoint(self) -> int:
        """Checkpoint now; returns the step saved."""

    @abc.abstractmethod
    def close_learner(self) -> tuple[int, LearnerStatus]:
        """Final checkpoint; returns (its step, the learner's last status)."""

    # -- the workers
    @abc.abstractmethod
    def default_worker_count(self) -> int:
        """Workers to start when neither the caller nor the config says."""

    @abc.abstractmethod
    def start_workers(self, seeds: Sequence[int]) -> int:
        """Start one worker per seed; returns how many started (indices 0..n-1).
        Raises ``WorkerStartError`` when ``worker.on_start_failure`` says to stop."""

    @abc.abstractmethod
    def dispatch(self, index: int, order: WorkOrder) -> None: ...

    @abc.abstractmethod
    def collect(self, timeout_s: float) -> list[WorkerResult]: ...

    @abc.abstractmethod
    def reseed(self, index: int, seed: int) -> None: ...

    @abc.abstractmethod
    def stop_workers(self) -> None: ...


class Callback:
    """Hooks into a ``TrainingLoop`` (all optional). ``on_row`` sees every metrics row
    once, in step order; ``on_tick`` runs once per loop iteration; ``on_end`` runs after
    the workers stopped, before the final checkpoint."""

    def on_start(self, loop: "TrainingLoop") -> None: ...

    def on_row(self, loop: "TrainingLoop", row: dict) -> None: ...

    def on_tick(self, loop: "TrainingLoop") -> None: ...

    def on_end(self, loop: "TrainingLoop") -> None: ...


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    start_step: int
    final_step: int
    rows: int
    wall_s: float
    worker_failures: int
    worker_errors: int
    learner_restarts: int
    checkpoint_step: int
    dropped_stale: int = 0
    dropped_nonfinite: int = 0
    dropped_generation: int = 0


class TrainingLoop:
    """One training session of ``config`` in ``run`` over ``transport``."""

    def __init__(self, config: TrainConfig, run: RunDir, transport: Transport, *,
                 resume: bool = False, num_workers: int | None = None,
                 callbacks: Sequence[Callback] = ()):
        self.config = config
        self.run_dir = run
        self.transport = transport
        self.resume = resume
        self.num_workers = num_workers
        # The metrics table is flushed last in an iteration, after evaluations merged.
        self.callbacks = [*callbacks, MetricsFlush(config.run.metrics_flush_s)]
        self.metrics = MetricsLog(run, config.run.tensorboard)
        self.worker_failures = 0
        self.worker_errors = 0
        self.learner_restarts = 0
        self.successes = 0
        self.worker_count = 0
        self.workers_lost = 0  # workers whose restart failed in their constructor
        self.fatal = ""  # why the run had to stop (raised after the final checkpoint)
        self.stopping = False
        self.started = time.monotonic()
        self.start_step = 0
        self.step = 0  # newest learner step known to the loop
        self.recorded = 0  # newest step whose metrics row is in ``metrics``
        self.checkpoint_step = 0
        self.last_row: dict | None = None
        self.theta: ThetaHandle | None = None  # newest published theta
        self.curriculum = None
        self._stale_theta = False  # a newer version than ``theta`` exists

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Stop handing out work; the run ends after this iteration."""
        self.stopping = True

    def checkpoint(self) -> int:
        """Checkpoint the learner now (replacing it first if it is gone)."""
        try:
            return self.transport.checkpoint()
        except LearnerLost:
            self._restart_learner()
            return self.transport.checkpoint()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunSummary:
        run, transport = self.config.run, self.transport
        self.started = time.monotonic()
        deadline = self.started + run.minutes * 60.0 if run.minutes > 0 else math.inf
        status = self._take_learner(transport.start_learner(self.resume))
        self.start_step = status.step
        if self.resume:
            self.metrics.load(self.start_step)
            print(f"resumed {self.run_dir.path} at step {self.start_step}", file=sys.stderr)
        else:
            transport.checkpoint()  # step 0: the folder is a run now
        count = self.num_workers or self.config.worker.num_workers \
            or transport.default_worker_count()
        started = transport.start_workers(self._stream_seeds(count))
        if started < count:
            print(f"{count - started} of {count} workers could not start "
                  f"(worker.on_start_failure: continue)", file=sys.stderr)
        count = self.worker_count = started
        print(f"training with {count} workers, learner at step {self.start_step}; run "
              f"folder {self.run_dir.path}", file=sys.stderr)
        for callback in self.callbacks:
            callback.on_start(self)
        idle = list(range(count))
        self.stopping = bool(run.steps and self.step >= run.steps)
        while not self.stopping and time.monotonic() < deadline:
            for index in idle:
                transport.dispatch(index, WorkOrder(self.theta, self.curriculum))
            idle = []
            replies = []
            for result in transport.collect(timeout_s=0.5):
                if result.cannot_start:
                    # A restarted worker whose constructor fails: no restart will help.
                    self._lost_worker(result)
                    continue
                idle.append(result.index)
                if result.died:
                    self.worker_failures += 1
                    self._reseed(result.index)
                elif result.error:
                    self.worker_errors += 1
                    print(f"\nworker {result.index}: truncation failed: {result.error}",
                          file=sys.stderr)
                    if self.successes == 0 and self.worker_errors > 2 * count + 2:
                        raise RuntimeError(f"every truncation fails; last error: "
                                           f"{result.error}")
                    self._reseed(result.index)
                elif result.reply.learner_lost:
                    # The learner this worker pushed to is gone; replace it once.
                    if (result.reply.generation == self.theta.generation
                            and not self._learner_alive()):
                        self._restart_learner()
                else:
                    self.successes += 1
                    replies.append(result.reply)
            # In learner order, so rows arrive in step order and few need fetching.
            for reply in sorted(replies, key=lambda r: (r.step, r.row is None)):
                self._handle_reply(reply)
            if self._stale_theta:  # a new version: one theta copy shared by every worker
                try:
                    self.theta = transport.publish_theta(self.theta)
                    self._stale_theta = False
                except LearnerLost:
                    self._restart_learner()
            idle.sort()
            for callback in self.callbacks:
                callback.on_tick(self)
        summary = self._finish()
        if self.fatal:
            raise WorkerStartError(self.fatal)
        return summary

    def _lost_worker(self, result: WorkerResult) -> None:
        self.workers_lost += 1
        message = f"worker {result.index} cannot start: {result.error}"
        if (self.config.worker.on_start_failure == "stop"
                or self.workers_lost >= self.worker_count):
            self.fatal = message
            self.request_stop()
        else:
            print(f"\n{message}; training goes on without it", file=sys.stderr)

    # ------------------------------------------------------------------ replies

    def _handle_reply(self, reply: LearnerReply) -> None:
        if reply.generation != self.theta.generation:
            return  # a reply of a replaced learner
        row = reply.row
        if row is not None and row["step"] <= self.recorded:
            row = None  # already fetched from the learner (below)
        newest = row["step"] - 1 if row is not None else reply.step
        if newest > self.recorded:
            # Rows that no reply brought here: the worker holding one died, or its reply
            # is later in this batch. The learner keeps them; take them in order.
            try:
                missing_rows = self.transport.rows_after(self.recorded)
            except LearnerLost:
                self._restart_learner()  # e.g. killed while this batch was handled
                return
            for missing in missing_rows:
                if missing["step"] <= newest:
                    self._add_row(missing)
        if row is not None:
            self._add_row(row)
        if reply.curriculum is not None:
            self.curriculum = reply.curriculum
        if reply.version > self.theta.version:
            self.theta = ThetaHandle(reply.generation, reply.version)
            self._stale_theta = True
        if reply.checkpoint is not None:
            self.checkpoint_step = reply.checkpoint
            self.metrics.write()

    def _add_row(self, row: dict) -> None:
        self.metrics.add(row)
        self.last_row, self.step, self.recorded = row, row["step"], row["step"]
        for callback in self.callbacks:
            callback.on_row(self, row)
        if self.config.run.steps and self.step >= self.config.run.steps:
            self.stopping = True

    # ------------------------------------------------------------------ the learner

    def _take_learner(self, status: LearnerStatus) -> LearnerStatus:
        for message in status.warnings:
            print(f"warning: {message}", file=sys.stderr)
        self.step = self.recorded = self.checkpoint_step = status.step
        self.curriculum = status.curriculum
        self.theta = self.transport.publish_theta(status.theta)
        self._stale_theta = False
        return status

    def _learner_alive(self) -> bool:
        try:
            self.transport.learner_status()
            return True
        except LearnerLost:
            return False

    def _restart_learner(self) -> None:
        self.learner_restarts += 1
        self.transport.stop_learner()
        status = self._take_learner(self.transport.start_learner(True))
        self.metrics.truncate(status.step)
        print(f"\nlearner died; restarted from checkpoint step {status.step} "
              f"(generation {status.generation})", file=sys.stderr)

    def _stream_seeds(self, count: int) -> list[int]:
        try:
            return self.transport.new_stream_seeds(count)
        except LearnerLost:
            self._restart_learner()
            return self.transport.new_stream_seeds(count)

    def _reseed(self, index: int) -> None:
        self.transport.reseed(index, self._stream_seeds(1)[0])

    # ------------------------------------------------------------------ the end

    def _finish(self) -> RunSummary:
        for callback in self.callbacks:
            callback.on_end(self)
        self.transport.stop_workers()  # their unsent gradients are not needed
        final: dict[str, Any] = {}
        try:
            # Rows of updates whose replies were still with the workers.
            for row in self.transport.rows_after(self.recorded):
                self.metrics.add(row)
            self.checkpoint_step, status = self.transport.close_learner()
            final = status.counters
        except LearnerLost:
            print("learner died at exit; the last checkpoint stands", file=sys.stderr)
        self.metrics.truncate(self.checkpoint_step)
        self.metrics.close()
        self.transport.stop_learner()
        return RunSummary(
            run_dir=self.run_dir.path, start_step=self.start_step,
            final_step=self.checkpoint_step, rows=len(self.metrics.rows),
            wall_s=self.elapsed_s(), worker_failures=self.worker_failures,
            worker_errors=self.worker_errors, learner_restarts=self.learner_restarts,
            checkpoint_step=self.checkpoint_step,
            dropped_stale=final.get("dropped_stale", 0),
            dropped_nonfinite=final.get("dropped_nonfinite", 0),
            dropped_generation=final.get("dropped_generation", 0))


class MetricsFlush(Callback):
    """Writes the metrics table every ``run.metrics_flush_s`` (and at checkpoints)."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.last = time.monotonic()

    def on_tick(self, loop: TrainingLoop) -> None:
        if time.monotonic() - self.last > self.every_s:
            loop.metrics.write()
            self.last = time.monotonic()


__all__ = ["Callback", "LearnerLost", "MetricsFlush", "RunSummary", "Transport",
           "TrainingLoop", "WorkerStartError"]
