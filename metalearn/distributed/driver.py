"""The Ray runner: the training loop's transport over actors (docs/architecture.md).

``RayTransport`` implements ``metalearn.training.loop.Transport`` with one
``LearnerActor`` pinned to the driver's node (it writes the run folder's checkpoints) and
N ``WorkerActor``s spread over the cluster:

* ``dispatch`` calls ``WorkerActor.compute(order, learner)``: the worker pushes its
  gradient straight to the learner actor and returns the learner's small reply;
* ``collect`` is one ``ray.wait`` over the pending calls, taking everything ready;
  a worker that died (crash, kill, node OOM) is reported as ``died`` (Ray restarts it);
  a truncation that raised as ``error``;
* ``publish_theta`` puts one object-store copy of theta per version, shared by every
  worker (``ray.put`` by the learner: ``get_theta`` returns its numpy vector);
* learner calls that fail because the actor is gone raise ``LearnerLost``; the loop then
  replaces the learner with one restored from the last checkpoint.

``train`` starts (or joins) Ray, runs the loop, and shuts Ray down if it started it.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import ray
from ray.exceptions import (ActorUnavailableError, GetTimeoutError, OutOfMemoryError,
                            RayActorError, RayTaskError)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from metalearn.core.config_io import to_dict
from metalearn.distributed.actors import LearnerActor, WorkerActor, thread_env
from metalearn.distributed.evaluator import start_evaluator
from metalearn.training.config import TrainConfig
from metalearn.training.loop import (Callback, LearnerLost, RunSummary, TrainingLoop,
                                     Transport)
from metalearn.training.messages import LearnerStatus, ThetaHandle, WorkerResult, WorkOrder
from metalearn.training.run_dir import RunDir

_GONE = (RayActorError, ActorUnavailableError)


class RayTransport(Transport):
    """Learner and workers as Ray actors (see the module docstring)."""

    def __init__(self, config: TrainConfig, run: RunDir):
        self.config = config
        self.run = run
        self.config_dict = to_dict(config)
        self.learner = None
        self.workers: list = []
        self.pending: dict = {}  # ObjectRef of a compute call -> worker index

    def _get(self, ref, timeout: float | None = None):
        try:
            return ray.get(ref, timeout=timeout)
        except (*_GONE, GetTimeoutError) as err:
            raise LearnerLost(str(err).strip().splitlines()[-1][:300]) from None

    # -- the learner

    def start_learner(self, resume: bool) -> LearnerStatus:
        node = ray.get_runtime_context().get_node_id()
        self.learner = LearnerActor.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(self.config_dict, self.run.path, resume)
        return ray.get(self.learner.status.remote())

    def stop_learner(self) -> None:
        if self.learner is not None:
            try:
                ray.kill(self.learner, no_restart=True)
            except Exception:  # noqa: BLE001 - it is already dead
                pass

    def learner_status(self) -> LearnerStatus:
        return self._get(self.learner.status.remote(), timeout=60)

    def publish_theta(self, handle: ThetaHandle) -> ThetaHandle:
        # The learner's return value lives in the object store: one copy per version,
        # fetched by each worker (or node) once.
        return ThetaHandle(handle.generation, handle.version, self.learner.get_theta.remote())

    def new_stream_seeds(self, count: int) -> list[int]:
        return self._get(self.learner.new_stream_seeds.remote(count))

    def rows_after(self, step: int) -> list[dict]:
        return self._get(self.learner.rows_after.remote(step))

    def checkpoint(self) -> int:
        return self._get(self.learner.checkpoint.remote())

    def close_learner(self) -> tuple[int, LearnerStatus]:
        return self._get(self.learner.close.remote())

    # -- the workers

    def default_worker_count(self) -> int:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // self.config.worker.cpus_per_worker)

    def start_workers(self, seeds: Sequence[int]) -> None:
        w = self.config.worker
        # Spread workers over nodes (a lost node takes few of them), except inside a
        # placement group (a Tune trial), whose bundles decide the placement.
        spread = ({} if ray.util.get_current_placement_group() is not None
                  else {"scheduling_strategy": "SPREAD"})
        self.workers = [WorkerActor.options(
            num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker,
            runtime_env={"env_vars": thread_env(w.cpus_per_worker)}, **spread,
        ).remote(self.config_dict, i, seed, w.cpus_per_worker) for i, seed in enumerate(seeds)]

    def dispatch(self, index: int, order: WorkOrder) -> None:
        self.pending[self.workers[index].compute.remote(order, self.learner)] = index

    def collect(self, timeout_s: float) -> list[WorkerResult]:
        pending = list(self.pending)
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if ready:  # take everything that is ready, not just the first
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        results = []
        for ref in ready:
            index = self.pending.pop(ref)
            try:
                results.append(WorkerResult(index, reply=ray.get(ref)))
            except (*_GONE, OutOfMemoryError):
                results.append(WorkerResult(index, died=True))  # Ray restarts it
            except RayTaskError as err:
                results.append(WorkerResult(
                    index, error=str(err).strip().splitlines()[-1][:300]))
        return results

    def reseed(self, index: int, seed: int) -> None:
        self.workers[index].reseed.remote(seed)

    def stop_workers(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.pending.clear()


class RayContinuousEvaluation(Callback):
    """Drives the evaluator actor from the training loop, never blocking it.

    Every ``evaluator.every`` learner steps it hands the newest theta (the same object
    ref the workers get) to the actor; a finished evaluation's columns
    (``eval/<dataset>/meta_loss``, ``.../accuracy``, ``.../logreg_accuracy``, ``eval_s``)
    are merged into the metrics row of the step it evaluated. A failing evaluator is
    reported once and switched off: it must never stop meta-training.
    """

    def __init__(self, config):
        self.config = config
        self.every = config.evaluator.every
        self.actor, self.pending, self.last_step = None, None, 0

    def on_start(self, loop) -> None:
        self.last_step = loop.start_step
        self.actor = start_evaluator(self.config.evaluator, self.config.rule,
                                     self.config.objective, reserve=False)

    def on_tick(self, loop) -> None:
        if self.actor is None:
            return
        if self.pending is not None:
            done, _ = ray.wait([self.pending], timeout=0)
            if not done:
                return
            self._collect(loop)
        if loop.step - self.last_step >= self.every:
            self.pending = self.actor.evaluate.remote(loop.step, loop.theta.payload)
            self.last_step = loop.step

    def _collect(self, loop) -> None:
        try:
            loop.metrics.merge(ray.get(self.pending))
        except Exception as err:  # noqa: BLE001 - evaluation is optional
            message = str(err).strip().splitlines()[-1][:300]
            print(f"\ncontinuous evaluation failed and is switched off: {message}",
                  file=sys.stderr)
            ray.kill(self.actor, no_restart=True)
            self.actor = None
        self.pending = None

    def on_end(self, loop) -> None:
        if self.actor is None:
            return
        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=120)
            if ready:
                self._collect(loop)
        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)


# Objects up to this size travel inline (gRPC) instead of through the shared-memory
# object store: a paper-size gradient (460 KB) then costs the learner ~4x less to
# receive (measured with ``metalearn bench learner``). On a cluster, pass the same
# setting to ``ray start --system-config``; see docs/training.md.
INLINE_OBJECT_BYTES = 1 << 20


def local_system_config() -> dict:
    return {"max_direct_call_object_size": INLINE_OBJECT_BYTES}


def init_ray(address: str) -> bool:
    """Join ``address`` or start a local Ray with every core; True if we started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 _system_config=local_system_config())
    return True


def ray_loop(config: TrainConfig, run: RunDir, *, resume: bool = False,
             num_workers: int | None = None,
             callbacks: Sequence[Callback] = ()) -> TrainingLoop:
    """The training loop over Ray actors, with the evaluator actor when configured
    (Ray must be initialised; the run folder must exist)."""
    callbacks = list(callbacks)
    if config.evaluator.enabled:
        callbacks.append(RayContinuousEvaluation(config))
    return TrainingLoop(config, run, RayTransport(config, run), resume=resume,
                        num_workers=num_workers, callbacks=callbacks)


def train(config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          num_workers: int | None = None, callbacks: Sequence[Callback] = ()) -> RunSummary:
    """Start Ray if needed, run the loop over actors, shut Ray down if we started it."""
    started = init_ray(config.run.address)
    try:
        run = RunDir(run_dir)
        run.create(config)
        return ray_loop(config, run, resume=resume, num_workers=num_workers,
                        callbacks=callbacks).run()
    finally:
        if started:
            ray.shutdown()


__all__ = ["RayTransport", "init_ray", "local_system_config", "ray_loop", "train"]
