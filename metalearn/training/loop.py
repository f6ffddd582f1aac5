"""The training loop of asynchronous meta-training, as plain Python: ``TrainingLoop``, the
one driver of every runner, talks to a learner and N workers through a ``Transport``.

See docs/architecture.md (The data path of one gradient, Runners) and docs/training.md
(Stopping, Faults).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

from metalearn.core.config_io import RunError, to_dict
from metalearn.training.config import TrainConfig
from metalearn.training.events import Ledger, append_event
from metalearn.training.messages import (LearnerReply, LearnerStatus, ThetaHandle,
                                         WorkerResult, WorkOrder)
from metalearn.training.best import BestTheta
from metalearn.training.metrics import MetricsLog
from metalearn.training.run_dir import RunDir


T = TypeVar("T")

# After a worker died, its next order waits this long (Ray is restarting the process).
RESTART_BACKOFF_S = 2.0
# A replacement learner that dies while it starts (killed, its node lost) is started
# again, this many times in all; the same learner call is retried as often.
LEARNER_ATTEMPTS = 3


class LearnerLost(RuntimeError):
    """A call to the learner failed because the learner is gone."""


class WorkerStartError(RunError):
    """Workers could not start (their constructor failed); the message says why."""


class LearnerFailed(RunError):
    """The learner cannot go on (e.g. its checkpoint could not be written)."""


class ImmediateStop(KeyboardInterrupt):
    """A second SIGINT/SIGTERM while the run was already stopping: stop at once."""


class StopSignals:
    """SIGINT and SIGTERM as requests to stop (``on_signal(name)``); a second one raises
    ``ImmediateStop``. Installed only in the main thread (signals are delivered there;
    a Tune trial's loop runs elsewhere and is stopped by Tune). ``restore`` puts the
    previous handlers back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal):
        self.on_signal = on_signal
        self.received: list[str] = []
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) > 1:
            raise ImmediateStop(f"second signal ({name}): stopping at once")
        self.on_signal(name)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class LearnerClient(abc.ABC):
    """The loop's handle on its learner: a ``LearnerHost`` in this process or in a Ray
    actor, reached by ``LearnerHost`` method name. Raises ``LearnerLost`` when the
    learner is gone."""

    @abc.abstractmethod
    def start(self, resume: bool) -> LearnerStatus:
        """Start a learner (restored from the newest checkpoint if ``resume``)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """End the current learner, dead or alive (before a replacement starts)."""

    @abc.abstractmethod
    def call(self, method: str, *args, wait: bool = True) -> Any:
        """``LearnerHost.<method>(*args)`` on the current learner. ``wait=False``
        returns what workers read the result from (Ray: an object ref; here: the
        value), so that one copy of a theta version serves every worker."""


class WorkerPool(abc.ABC):
    """The loop's workers. ``collect`` returns the orders that finished (possibly none
    within ``timeout_s``), each as a ``WorkerResult``."""

    @abc.abstractmethod
    def start(self, count: int, seeds: Callable[[int], list[int]]) -> int:
        """Start ``count`` workers (0: as many as the pool's resources hold), worker i
        drawing tasks from ``seeds(n)[i]``; returns how many started (indices 0..n-1).
        Raises ``WorkerStartError`` when ``worker.on_start_failure`` says to stop."""

    @abc.abstractmethod
    def dispatch(self, index: int, order: WorkOrder) -> None:
        """Run ``order`` on worker ``index`` (first reseeding its task stream when
        ``order.reseed`` is set)."""

    @abc.abstractmethod
    def collect(self, timeout_s: float) -> list[WorkerResult]: ...

    @abc.abstractmethod
    def stop(self) -> int:
        """Stop every worker; returns how many orders were still being computed."""


@dataclasses.dataclass
class Transport:
    """How the loop reaches its learner and workers: what differs between Ray and one
    process (``metalearn.distributed.driver``, ``metalearn.training.local``)."""

    learner: LearnerClient
    workers: WorkerPool


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
    # steps | minutes | requested | SIGINT | SIGTERM | learner failed | error
    stop_reason: str = ""

    @property
    def signal(self) -> str | None:
        """The signal that stopped the run, if one did."""
        return self.stop_reason if self.stop_reason.startswith("SIG") else None


class TrainingLoop:
    """One training session of ``config`` in ``run`` over ``transport``."""

    def __init__(self, config: TrainConfig, run: RunDir, transport: Transport, *,
                 resume: bool = False, num_workers: int | None = None,
                 callbacks: Sequence[Callback] = ()):
        self.config = config
        self.run_dir = run
        self.learner, self.workers = transport.learner, transport.workers
        self.resume = resume
        self.num_workers = num_workers
        # The metrics table is flushed last in an iteration, after evaluations merged.
        self.callbacks = [*callbacks, MetricsFlush(config.run.metrics_flush_s)]
        self.metrics = MetricsLog(run, config.run.tensorboard, config.run.loggers,
                                  to_dict(config) if config.run.loggers else None)
        # The best theta by validation, fed by the continuous evaluation's callbacks.
        self.best = BestTheta(run, config.rule, config.evaluator)
        self.learner_restarts = 0
        self.worker_count = 0
        # What became of every order: the one count of replies, deaths and failures.
        self.ledger = Ledger()
        # The one stop value: "" while running, else why the run stops (steps, minutes,
        # requested, SIGINT, SIGTERM, workers lost, learner failed, error: ...).
        self.stop_reason = ""
        # The first failure, raised after the final checkpoint (WorkerStartError, LearnerFailed).
        self.failure: RunError | None = None
        self.started = time.monotonic()
        self.start_step = 0
        self.step = 0  # newest learner step known to the loop
        self.recorded = 0  # newest step whose metrics row is in ``metrics``
        self.checkpoint_step = 0
        self.last_row: dict | None = None
        self.theta: ThetaHandle | None = None  # newest published theta
        self.curriculum = None
        self._stale_theta = False  # a newer version than ``theta`` exists
        self._dead_received: dict[str, int] = {}  # generation -> newest ``received`` seen
        self._not_before: dict[int, float] = {}  # worker -> when it may take an order
        self._reseeds: dict[int, int] = {}  # worker -> its new task stream's seed

    # ------------------------------------------------------------------ control

    def request_stop(self, reason: str = "requested") -> None:
        """Stop handing out work; the run ends after this iteration."""
        self.stop_reason = self.stop_reason or reason

    @property
    def stopping(self) -> bool:
        return bool(self.stop_reason)

    @property
    def interrupted(self) -> bool:
        """Stopping because of a signal, an error or a failed learner (not a budget)."""
        return self.stopping and self.stop_reason not in ("steps", "minutes", "requested")

    @property
    def worker_failures(self) -> int:
        """Worker processes that died and were restarted (not those that could not)."""
        return self.ledger.worker_died - self.ledger.lost_worker

    def _fail(self, error: RunError, reason: str) -> bool:
        """Record a failure (the first is raised at the end) and stop; False if one of
        this kind was recorded already."""
        if isinstance(self.failure, type(error)):
            return False
        self.failure = self.failure or error
        self.request_stop(reason)
        return True

    def _on_signal(self, name: str) -> None:
        self.stop_reason = name
        print(f"\n{name} received: stopping after the learner's final checkpoint "
              f"(send it again to stop at once; the run resumes from its last "
              f"checkpoint either way)", file=sys.stderr, flush=True)
        self._event("signal", signal=name, step=self.step)

    def _event(self, kind: str, **fields) -> None:
        try:
            append_event(self.run_dir.path, kind, **fields)
        except OSError as err:  # a full disk must not hide the real failure
            print(f"\ncould not record event {kind!r} in the run folder: {err}",
                  file=sys.stderr)

    def checkpoint(self) -> int:
        """Checkpoint the learner now (replacing it first if it is gone)."""
        return self._with_learner(lambda: self.learner.call("checkpoint"))

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunSummary:
        """Train until a stop: ``run.steps`` (an absolute learner step), ``run.minutes``,
        ``request_stop``, SIGINT or SIGTERM, or a learner that cannot go on
        (``LearnerReply.fatal``); ``RunSummary.stop_reason`` says which. The final
        checkpoint is written however the loop ends, except after ``ImmediateStop``."""
        signals = StopSignals(self._on_signal)
        try:
            try:
                self._train()
            except ImmediateStop:
                self._event("immediate_stop", step=self.step,
                            ledger=dataclasses.asdict(self.ledger))
                raise
            except BaseException as err:
                self.stop_reason = reason = f"error: {type(err).__name__}: {str(err).strip()[:300]}"
                self._event("error", error=reason, step=self.step)
                try:
                    self._finish()
                except Exception as final_err:  # noqa: BLE001 - report the first error
                    print(f"\nthe final checkpoint after the error failed too: {final_err}",
                          file=sys.stderr)
                raise
            summary = self._finish()
        finally:
            signals.restore()
        if self.failure is not None:
            raise self.failure
        return summary

    def _train(self) -> None:
        deadline = self._start_session()
        idle = list(range(self.worker_count))
        if self.config.run.steps and self.step >= self.config.run.steps:
            self.request_stop("steps")
        while not self.stopping:
            if time.monotonic() >= deadline:
                self.request_stop("minutes")
                break
            idle = self._dispatch(idle)
            replies: list[LearnerReply] = []
            for result in self.workers.collect(timeout_s=0.5):
                self._on_result(result, idle, replies)
            # In learner order, so rows arrive in step order and few need fetching.
            for reply in sorted(replies, key=lambda r: (r.step, r.row is None)):
                self._handle_reply(reply)
            if self._stale_theta:  # a new version: one theta copy shared by every worker
                try:
                    self.theta = self._publish(self.theta)
                    self._stale_theta = False
                except LearnerLost:
                    self._restart_learner()
            idle.sort()
            for callback in self.callbacks:
                callback.on_tick(self)

    def _start_session(self) -> float:
        """Start (or restore) the learner and the workers; returns the deadline."""
        self.started = time.monotonic()
        minutes = self.config.run.minutes
        deadline = self.started + minutes * 60.0 if minutes > 0 else math.inf
        status = self._take_learner(self.learner.start(self.resume))
        self.start_step = status.step
        if self.resume:
            self.metrics.load(self.start_step)
            print(f"resumed {self.run_dir.path} at step {self.start_step}", file=sys.stderr)
        else:
            self.learner.call("checkpoint")  # step 0: the folder is a run now
        count = self.num_workers or self.config.worker.num_workers
        seeds: list[int] = []  # the seeds drawn: as many as the pool asked for

        def draw(n: int) -> list[int]:
            seeds[:] = self._stream_seeds(n)
            return list(seeds)
        started = self.workers.start(count, draw)
        count = len(seeds)
        if started < count:
            print(f"{count - started} of {count} workers could not start "
                  f"(worker.on_start_failure: continue)", file=sys.stderr)
        count = self.worker_count = started
        print(f"training with {count} workers, learner at step {self.start_step}; run "
              f"folder {self.run_dir.path}", file=sys.stderr)
        for callback in self.callbacks:
            callback.on_start(self)
        self._event("session_start", step=self.start_step, resume=self.resume, workers=count,
                    generation=status.generation, learner_counters=status.counters,
                    tasks_per_worker=self.config.worker.tasks_per_worker,
                    checkpoint_minutes=self.config.learner.checkpoint_minutes)
        return deadline

    def _dispatch(self, idle: list[int]) -> list[int]:
        """Hand the newest theta to every idle worker not waiting out a restart; returns
        those still idle."""
        now = time.monotonic()
        deferred = [i for i in idle if self._not_before.get(i, 0.0) > now]
        for index in idle:
            if index not in deferred:
                self.workers.dispatch(index, WorkOrder(self.theta, self.curriculum,
                                                       self._reseeds.pop(index, None)))
                self.ledger.dispatched += 1
        return deferred

    def _on_result(self, result: WorkerResult, idle: list[int],
                   replies: list[LearnerReply]) -> None:
        """Account for one finished order in the ledger; the worker becomes idle (unless
        it cannot start again) and a learner reply joins ``replies``."""
        ledger = self.ledger
        if result.cannot_start:
            # A restarted worker whose constructor fails: no restart will help.
            ledger.worker_died += 1
            self._lost_worker(result)
            return
        idle.append(result.index)
        if result.died:
            ledger.worker_died += 1
            # While Ray restarts it, an order fails at once: wait a moment rather than
            # spin on a worker that is not there yet.
            self._not_before[result.index] = time.monotonic() + RESTART_BACKOFF_S
            self._event("worker_died", worker=result.index, step=self.step,
                        cause=result.error or "process died")
            self._reseed(result.index)
        elif result.error:
            ledger.truncation_failed += 1
            self._event("truncation_failed", worker=result.index, step=self.step,
                        error=result.error)
            print(f"\nworker {result.index}: truncation failed: {result.error}",
                  file=sys.stderr)
            if ledger.replied == 0 and ledger.truncation_failed > 2 * self.worker_count + 2:
                raise RuntimeError(f"every truncation fails; last error: {result.error}")
            self._reseed(result.index)
        elif result.reply.learner_lost:
            # The learner this worker pushed to is gone; replace it once.
            ledger.learner_gone += 1
            if (result.reply.generation == self.theta.generation
                    and not self._learner_alive()):
                self._restart_learner()
        else:
            ledger.replied += 1
            replies.append(result.reply)

    def _lost_worker(self, result: WorkerResult) -> None:
        message = f"worker {result.index} cannot start: {result.error}"
        self.ledger.lost_worker += 1
        self._event("worker_lost", worker=result.index, cause=result.error)
        if (self.config.worker.on_start_failure == "stop"
                or self.ledger.lost_worker >= self.worker_count):
            self._fail(WorkerStartError(message), "workers lost")
        else:
            print(f"\n{message}; training goes on without it", file=sys.stderr)

    # ------------------------------------------------------------------ replies

    def _handle_reply(self, reply: LearnerReply) -> None:
        self._dead_received[reply.generation] = max(
            self._dead_received.get(reply.generation, 0), reply.received)
        if reply.fatal and self._fail(LearnerFailed(reply.fatal), "learner failed"):
            print(f"\nthe learner cannot go on: {reply.fatal}", file=sys.stderr)
            self._event("learner_failed", step=reply.step, error=reply.fatal)
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
                missing_rows = self.learner.call("rows_after", self.recorded)
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
            self.metrics.write()  # evaluations (the learner wrote its rows already)

    def _add_row(self, row: dict) -> None:
        self.metrics.add(row)
        self.last_row, self.step, self.recorded = row, row["step"], row["step"]
        for callback in self.callbacks:
            callback.on_row(self, row)
        if self.config.run.steps and self.step >= self.config.run.steps:
            self.request_stop("steps")

    # ------------------------------------------------------------------ the learner

    def _take_learner(self, status: LearnerStatus) -> LearnerStatus:
        for message in status.warnings:
            print(f"warning: {message}", file=sys.stderr)
        self.step = self.recorded = self.checkpoint_step = status.step
        self.curriculum = status.curriculum
        self.theta = self._publish(status.theta)
        self._stale_theta = False
        return status

    def _publish(self, handle: ThetaHandle) -> ThetaHandle:
        """``handle`` with a payload workers read the learner's current theta from."""
        return ThetaHandle(handle.generation, handle.version,
                           self.learner.call("theta", wait=False))

    def _learner_alive(self) -> bool:
        try:
            self.learner.call("status")
            return True
        except LearnerLost:
            return False

    def _with_learner(self, call: Callable[[], T]) -> T:
        """``call()``, with the learner replaced and the call repeated if it is gone."""
        for _ in range(LEARNER_ATTEMPTS - 1):
            try:
                return call()
            except LearnerLost:
                self._restart_learner()
        return call()

    def _start_replacement(self) -> LearnerStatus:
        """A new learner restored from the newest checkpoint; one that dies while it
        starts is started again (``LEARNER_ATTEMPTS`` in all)."""
        for attempt in range(1, LEARNER_ATTEMPTS + 1):
            self.learner.stop()
            try:
                return self._take_learner(self.learner.start(True))
            except LearnerLost as err:
                if attempt == LEARNER_ATTEMPTS:
                    raise
                self._event("learner_start_failed", attempt=attempt, error=str(err)[:300])
                print(f"\nthe replacement learner died while starting "
                      f"({str(err).splitlines()[0]}); starting another", file=sys.stderr)
                time.sleep(RESTART_BACKOFF_S)
        raise AssertionError("unreachable")

    def _restart_learner(self) -> None:
        self.learner_restarts += 1
        dead, last_step = self.theta.generation, self.step
        last_wall = (self.last_row or {}).get("wall_s")
        status = self._start_replacement()
        self.metrics.truncate(status.step)
        try:  # how long ago the checkpoint restored from was written
            lost_s = time.time() - os.path.getmtime(
                os.path.join(self.run_dir.checkpoints, str(status.step)))
        except OSError:
            lost_s = float("nan")
        self._event("learner_restart", dead_generation=dead, last_step_seen=last_step,
                    last_wall_s_seen=last_wall, checkpoint_age_s=round(lost_s, 2),
                    dead_received_seen=self._dead_received.get(dead, 0),
                    restored_step=status.step, generation=status.generation,
                    restored_counters=status.counters, rolled_back_steps=last_step - status.step)
        print(f"\nlearner died; restarted from checkpoint step {status.step} "
              f"(generation {status.generation})", file=sys.stderr)

    def _stream_seeds(self, count: int) -> list[int]:
        return self._with_learner(lambda: self.learner.call("new_stream_seeds", count))

    def _reseed(self, index: int) -> None:
        """Worker ``index`` draws a new task stream from its next order on."""
        self._reseeds[index] = self._stream_seeds(1)[0]

    # ------------------------------------------------------------------ the end

    def _finish(self) -> RunSummary:
        self.finished = True
        for callback in self.callbacks:
            callback.on_end(self)
        # Their unsent gradients are not needed: what has arrived is applied or buffered,
        # and the buffer is part of the final checkpoint.
        self.ledger.cut_at_stop += self.workers.stop() or 0
        final: dict[str, Any] = {}
        died_at_exit = False
        try:
            # Rows of updates whose replies were still with the workers.
            for row in self.learner.call("rows_after", self.recorded):
                self.metrics.add(row)
                self.recorded = self.step = row["step"]
            self.checkpoint_step, status = self.learner.call("finish")
            final = status.counters
            if getattr(status, "fatal", ""):
                self._fail(LearnerFailed(status.fatal), "learner failed")
        except LearnerLost:
            died_at_exit = True
            print("learner died at exit; the last checkpoint stands", file=sys.stderr)
        self.metrics.truncate(max(self.checkpoint_step, 0))  # -1: not even step 0 saved
        self.metrics.close()
        self.learner.stop()
        self._event("session_end", step=self.checkpoint_step, start_step=self.start_step,
                    stop_reason=self.stop_reason, ledger=dataclasses.asdict(self.ledger),
                    learner_counters=final, generation=self.theta.generation
                    if self.theta else None, learner_restarts=self.learner_restarts,
                    # The newest ``received`` each learner generation replied with,
                    # including replies handled after its restart event was written and
                    # those of a learner that died at exit (the audit's gradient balance).
                    received_seen=dict(self._dead_received),
                    learner_died_at_exit=died_at_exit)
        return RunSummary(
            start_step=self.start_step, final_step=self.checkpoint_step, rows=self.metrics.count,
            wall_s=self.elapsed_s(), worker_failures=self.worker_failures,
            worker_errors=self.ledger.truncation_failed, learner_restarts=self.learner_restarts,
            checkpoint_step=self.checkpoint_step, dropped_stale=final.get("dropped_stale", 0),
            dropped_nonfinite=final.get("dropped_nonfinite", 0), stop_reason=self.stop_reason)


class MetricsFlush(Callback):
    """Writes the metrics table every ``run.metrics_flush_s`` (and at checkpoints)."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.last = time.monotonic()

    def on_tick(self, loop: TrainingLoop) -> None:
        if time.monotonic() - self.last > self.every_s:
            loop.metrics.write()
            self.last = time.monotonic()


__all__ = ["Callback", "LearnerClient", "LearnerLost", "MetricsFlush", "RunSummary",
           "Transport", "TrainingLoop", "WorkerPool", "WorkerStartError"]
