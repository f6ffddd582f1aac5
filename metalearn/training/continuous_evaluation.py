"""Held-out evaluation during meta-training: one loop callback over a synchronous (this
process) or asynchronous (a Ray actor) evaluator. See docs/evaluation.md (Continuous
evaluation during meta-training).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Protocol

from metalearn.evaluation.config import EvaluationSchedule
from metalearn.evaluation.continuous import ContinuousEvaluator
from metalearn.training.config import TrainConfig
from metalearn.training.loop import Callback, TrainingLoop
from metalearn.training.messages import error_line
from metalearn.training.start import StartChoice


class Evaluator(Protocol):
    """Where the evaluations run. ``submit`` starts one (at most one is under way);
    ``poll`` gives its metrics row once it finished within ``timeout_s`` (None: not
    yet); ``resolve`` turns a theta payload into the numpy vector ``BestTheta`` keeps."""

    def submit(self, step: int, theta: Any, due: dict) -> None: ...

    def poll(self, timeout_s: float) -> dict | None: ...

    def resolve(self, theta: Any) -> Any: ...

    def close(self) -> None: ...


class InProcessEvaluator:
    """A ``ContinuousEvaluator`` in this process: ``submit`` evaluates at once (training
    waits for it)."""

    def __init__(self, config: TrainConfig):
        self.evaluator = ContinuousEvaluator(config.evaluator, config.rule, config.objective)
        self.row: dict | None = None

    def submit(self, step: int, theta: Any, due: dict) -> None:
        self.row = self.evaluator.evaluate(step, theta, **due)

    def poll(self, timeout_s: float) -> dict | None:
        row, self.row = self.row, None
        return row

    def resolve(self, theta: Any) -> Any:
        return theta

    def close(self) -> None:
        pass


class ContinuousEvaluation(Callback):
    """Evaluates the newest theta on ``EvaluationSchedule`` (the start first when the run
    has no validation score yet; short every ``evaluator.every`` learner steps, long
    every ``evaluator.long_every``; at the end the last theta, waiting up to
    ``evaluator.final_timeout_s``, unless the run was interrupted). Each row is merged
    into the metrics row of the step it evaluated and offered to the run's
    ``BestTheta``. An asynchronous evaluator never blocks the loop. A failing evaluator
    is reported once and switched off: it must never stop meta-training."""

    def __init__(self, config: TrainConfig, evaluator: Callable[[], Evaluator], *,
                 start: StartChoice | None = None):
        """evaluator: starts the evaluator. start: the run's chosen start
        (``metalearn.training.start``); when it was scored, its row is the run's step-0
        evaluation and the start is not evaluated again."""
        self.config = config.evaluator
        self.schedule = EvaluationSchedule(config.evaluator)
        self.make_evaluator = evaluator
        self.start = start
        self.evaluator: Evaluator | None = None
        self.pending: tuple[int, Any] | None = None  # (step, theta payload) under way

    def _off(self, err: Exception) -> None:
        print(f"\ncontinuous evaluation failed and is switched off: {error_line(err)}",
              file=sys.stderr)
        self._close()

    def _close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
        self.evaluator, self.pending = None, None

    def _submit(self, loop: TrainingLoop, final: bool) -> None:
        due = self.schedule.due(loop.step, final)
        if due is None:
            return
        try:
            self.evaluator.submit(loop.step, loop.theta.payload, due)
            self.pending = (loop.step, loop.theta.payload)
        except Exception as err:  # noqa: BLE001 - evaluation is optional
            self._off(err)

    def _collect(self, loop: TrainingLoop, timeout_s: float) -> bool:
        """Merge the evaluation under way if it finishes within ``timeout_s``; False if
        it has not."""
        try:
            row = self.evaluator.poll(timeout_s)
            if row is None:
                return False
            loop.metrics.merge(row)
            step, payload = self.pending
            loop.best.offer(step, self.evaluator.resolve(payload), row)
            self.pending = None
        except Exception as err:  # noqa: BLE001 - evaluation is optional
            self._off(err)
        return True

    def on_start(self, loop: TrainingLoop) -> None:
        measure_now = not loop.best.known
        self.schedule.start(loop.start_step, measure_now=measure_now)
        scored = measure_now and self.start is not None and self.start.row is not None
        if scored:
            # Measured when it was chosen: its row is the step-0 evaluation (kept even if
            # the evaluator below fails to start).
            self.schedule.due(loop.step)
            loop.metrics.merge(self.start.row)
            loop.best.offer(loop.step, self.start.theta, self.start.row)
        try:
            self.evaluator = self.make_evaluator()
        except Exception as err:  # noqa: BLE001 - evaluation is optional
            self._off(err)
            return
        if measure_now and not scored:
            # The start, before any order: the population runner's first order already
            # makes several updates, so the first tick would come too late for it.
            self._submit(loop, final=False)

    def on_tick(self, loop: TrainingLoop) -> None:
        if self.evaluator is None:
            return
        if self.pending is not None and not self._collect(loop, 0.0):
            return
        if self.evaluator is not None:
            self._submit(loop, final=False)

    def on_end(self, loop: TrainingLoop) -> None:
        if self.evaluator is None:
            return
        if loop.interrupted:  # a signal or an error: stop now, no final evaluation
            if self.pending is not None:
                self._collect(loop, 0.0)  # one already finished is kept
            self._close()
            return
        deadline = time.monotonic() + self.config.final_timeout_s
        for final in (False, True):  # the evaluation under way, then the last theta's
            if self.pending is None and final:
                self._submit(loop, final=True)
            if self.pending is None:
                continue
            if not self._collect(loop, max(0.0, deadline - time.monotonic())):
                print(f"\nthe final evaluation did not finish within "
                      f"evaluator.final_timeout_s = {self.config.final_timeout_s:g} s",
                      file=sys.stderr)
                break
            if self.evaluator is None:
                break
        self._close()


__all__ = ["ContinuousEvaluation", "Evaluator", "InProcessEvaluator"]
