"""``train(session, runner)``: the one entry point of a training run, whichever runner
runs it (docs/architecture.md, Runners)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

from metalearn.training.config import TrainConfig
from metalearn.training.continuous_evaluation import ContinuousEvaluation
from metalearn.training.loop import Callback, RunSummary, TrainingLoop, Transport
from metalearn.training.run_dir import RunDir
from metalearn.training.session import Session
from metalearn.training.start import choose_start
from tasks.sampler import MixConfig


@dataclasses.dataclass(frozen=True)
class Runner:
    """What differs between running the loop in this process and on Ray."""

    name: str  # ``run.runner``
    transport: Callable[[TrainConfig, RunDir, MixConfig], Transport]
    evaluator: Callable[[TrainConfig], Any]  # the continuous evaluator (sync or async)
    # Held around the run: checks, and what it needs running (Ray).
    context: Callable[[TrainConfig], contextlib.AbstractContextManager] = (
        lambda config: contextlib.nullcontext())
    num_workers: int | None = None  # fixed by the runner (None: the config's)


def train(session: Session, runner: Runner, *, num_workers: int | None = None,
          callbacks: Sequence[Callback] = ()) -> RunSummary:
    """Run ``session`` with ``runner``: the run folder (this session's config kept), the
    continuous evaluation when configured, and the loop until its budget or a stop."""
    config, run = session.config, session.run
    with runner.context(config):
        run.create(config)
        # A fresh run's start: the best of learner.start_candidates by validation.
        start = None if session.resume else choose_start(config, run)
        callbacks = list(callbacks)
        if config.evaluator.enabled:
            # First: its final evaluation (on_end) is merged before other callbacks end
            # (a sweep's reporter makes the trial's final report from the same row).
            callbacks.insert(0, ContinuousEvaluation(
                config, lambda: runner.evaluator(config), start=start))
        loop = TrainingLoop(config, run, runner.transport(config, run, session.mix),
                            resume=session.resume,
                            num_workers=runner.num_workers or num_workers,
                            callbacks=callbacks)
        return loop.run()


__all__ = ["Runner", "train"]
