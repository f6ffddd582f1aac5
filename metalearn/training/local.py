"""The single-process runner: the training loop with an in-process learner and workers.

``in_process_transport`` gives the loop a ``LearnerHost`` (``InProcessLearner``) and
``Worker`` objects (``InProcessWorkers``) of this process. ``collect`` runs the oldest
dispatched order to the end (truncation, push, reply), so workers take turns and the run is
deterministic for given seeds: with one worker it applies the same gradients in the same
order as the Ray runner. It is what tests use to exercise the protocol without Ray, what a
debugger can step through, and the fastest path on one GPU (no actor, no object store).

    metalearn train --runner local      # same config, same run folder
"""

from __future__ import annotations

import collections

from metalearn.training.config import TrainConfig
from metalearn.training.continuous_evaluation import InProcessEvaluator
from metalearn.training.learner_host import LearnerHost
from metalearn.training.loop import LearnerClient, LearnerLost, Transport, WorkerPool
from metalearn.training.messages import (LearnerReply, LearnerStatus, Submission, WorkerResult,
                                         WorkOrder, error_line)
from metalearn.training.run_dir import RunDir
from metalearn.training.runner import Runner
from metalearn.training.task_mix import resolve_mix
from metalearn.training.worker import Worker, enable_compilation_cache
from tasks.sampler import MixConfig


class InProcessLearner(LearnerClient):
    """A ``LearnerHost`` in this process."""

    def __init__(self, config: TrainConfig, run: RunDir):
        self.config, self.run = config, run
        self.host: LearnerHost | None = None

    def start(self, resume: bool) -> LearnerStatus:
        self.host = LearnerHost(self.config, self.run, resume)
        return self.host.status()

    def stop(self) -> None:
        self.host = None

    def call(self, method: str, *args, wait: bool = True):
        if self.host is None:
            raise LearnerLost("the learner was stopped")
        return getattr(self.host, method)(*args)

    def push(self, submission: Submission, generation: str) -> LearnerReply:
        """A worker's push: the learner's reply, or ``learner_lost`` when it is gone
        (stopped: a test's "dead learner")."""
        if self.host is None:
            return LearnerReply(generation=generation, step=-1, version=-1,
                                learner_lost=True)
        return self.host.submit(submission)


class InProcessWorkers(WorkerPool):
    """``Worker`` objects of this process; ``collect`` runs the oldest order to its end."""

    def __init__(self, config: TrainConfig, learner: InProcessLearner, mix: MixConfig):
        self.config, self.learner, self.mix = config, learner, mix
        self.workers: list[Worker] = []
        self.queue: collections.deque = collections.deque()  # (index, order)

    def start(self, count: int, seeds) -> int:
        # One process computes one truncation at a time: one worker unless asked. A
        # constructor that fails raises here, which stops the run.
        self.workers = [Worker(self.config, index, seed, mix=self.mix)
                        for index, seed in enumerate(seeds(count or 1))]
        return len(self.workers)

    def dispatch(self, index: int, order: WorkOrder) -> None:
        self.queue.append((index, order))

    def collect(self, timeout_s: float) -> list[WorkerResult]:
        if not self.queue:
            return []
        index, order = self.queue.popleft()
        try:
            reply = self.workers[index].work(
                order, fetch_theta=lambda payload: payload,
                push=lambda sub: self.learner.push(sub, order.theta.generation))
        except Exception as err:  # noqa: BLE001 - a failed truncation is reported, not fatal
            return [WorkerResult(index, error=error_line(err))]
        return [WorkerResult(index, reply=reply)]

    def stop(self) -> int:
        cut = len(self.queue)
        self.queue.clear()
        return cut


def in_process_transport(config: TrainConfig, run: RunDir, mix: MixConfig | None = None,
                         workers: type[InProcessWorkers] = InProcessWorkers,
                         learner: type[InProcessLearner] = InProcessLearner) -> Transport:
    """Learner and workers as objects of this process; orders run one at a time (tests
    pass their own ``workers`` and ``learner``; ``mix`` None: the config's)."""
    enable_compilation_cache(config.worker.compilation_cache)
    client = learner(config, run)
    return Transport(client, workers(config, client,
                                     resolve_mix(config.tasks) if mix is None else mix))


LOCAL = Runner("local", in_process_transport, InProcessEvaluator)

__all__ = ["InProcessLearner", "InProcessWorkers", "LOCAL", "in_process_transport"]
