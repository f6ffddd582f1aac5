"""``metalearn train --runner population``: the training loop with the population engine.

The learner lives in this process, as with ``--runner local``; one ``PopulationEngine``
(``metalearn.training.population_engine``) replaces the workers, and each order is one
call of its compiled program: K learner updates. See docs/training.md, "The population
runner".
"""

from __future__ import annotations

import contextlib
import functools

from metalearn.core.config import ConfigError
from metalearn.training.config import TrainConfig
from metalearn.training.events import append_event
from metalearn.training.continuous_evaluation import InProcessEvaluator
from metalearn.training.local import InProcessLearner, InProcessWorkers, in_process_transport
from metalearn.training.messages import LearnerReply, WorkerResult, error_line
from metalearn.training.population_engine import (PopulationEngine, ProgramStuck,
                                                  use_cpu_devices, wait_program)
from metalearn.training.runner import Runner
from tasks.sampler import MixConfig


class PopulationWorkers(InProcessWorkers):
    """The worker pool of ``--runner population``: one ``PopulationEngine`` in place of
    workers. An order runs one program call (K updates, fewer at the run's last step)
    and the in-process learner absorbs it; the loop fetches the rows between its last
    row and the reply's."""

    def __init__(self, config: TrainConfig, learner: InProcessLearner, mix: MixConfig):
        super().__init__(config, learner, mix)
        self.engine: PopulationEngine | None = None

    def start(self, count: int, seeds) -> int:
        self.engine = PopulationEngine(self.config, seeds(1)[0], mix=self.mix)
        devices = self.engine.devices
        append_event(self.learner.run.path, "population_devices", count=len(devices),
                     devices=[str(d) for d in devices])
        return 1

    def collect(self, timeout_s: float) -> list[WorkerResult]:
        if not self.queue:
            return []
        index, order = self.queue.popleft()
        host = self.learner.host
        if host is None:
            return [WorkerResult(index, reply=LearnerReply(generation="", step=-1,
                                                           version=-1, learner_lost=True))]
        if order.reseed is not None:
            self.engine.reseed(order.reseed)
        learner = host.learner
        try:
            call = self.engine.run(learner.theta, learner.opt_state, host.update_limit())
        except ProgramStuck:
            raise  # the device is blocked by the stuck call: nothing more can run here
        except Exception as err:  # noqa: BLE001 - a failed call is reported, not fatal
            return [WorkerResult(index, error=error_line(err))]
        return [WorkerResult(index, reply=host.absorb(call.theta, call.opt_state,
                                                      call.stats, call.dataset))]


@contextlib.contextmanager
def population_checks(config: TrainConfig):
    """What ``--runner population`` needs before anything runs: ``es_full``, one
    process, and (``worker.devices`` > 1 on CPU) that many CPU devices, asked for before
    JAX starts (the count is fixed then)."""
    if config.estimator.kind != "es_full":
        raise ConfigError(f"--runner population runs estimator.kind 'es_full'; the config "
                          f"has {config.estimator.kind!r}: use --runner local or ray")
    if config.worker.num_workers > 1:
        raise ConfigError(f"--runner population is one process (its program vectorises "
                          f"the tasks); worker.num_workers must be 0 or 1, got "
                          f"{config.worker.num_workers}")
    use_cpu_devices(config.worker.devices)
    yield


POPULATION = Runner("population",
                    functools.partial(in_process_transport, workers=PopulationWorkers),
                    InProcessEvaluator, population_checks, num_workers=1)

__all__ = ["POPULATION", "PopulationEngine", "PopulationWorkers", "ProgramStuck",
           "population_checks", "wait_program"]
