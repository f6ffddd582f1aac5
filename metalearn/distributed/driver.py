"""The Ray runner (``RAY``): the training loop's transport over actors
(``ray_transport``), and Ray started (or joined) around the run.

See docs/architecture.md (Runners) and docs/training.md (How it works).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile

import ray
from ray.exceptions import (ActorUnavailableError, GetTimeoutError, OutOfMemoryError,
                            RayActorError, RayTaskError)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from metalearn.core.config_io import to_dict
from metalearn.distributed.actors import LearnerActor, WorkerActor, thread_env
from metalearn.distributed.evaluator import RayEvaluator
from metalearn.training.config import TrainConfig
from metalearn.training.loop import (LearnerClient, LearnerLost, Transport, WorkerPool,
                                     WorkerStartError)
from metalearn.training.messages import LearnerStatus, WorkerResult, WorkOrder, error_line
from metalearn.training.run_dir import RunDir
from metalearn.training.runner import Runner
from tasks.sampler import MixConfig

_GONE = (RayActorError, ActorUnavailableError)
# How long ``start_workers`` waits for workers to answer before training starts.
START_WAIT_S = 300.0


def default_worker_count(resources: dict, worker) -> int:
    """Workers for ``worker.num_workers: 0``: one per ``gpus_per_worker`` of the cluster's
    GPUs when workers take GPUs (a population worker per device), else one per
    ``cpus_per_worker`` of its CPUs."""
    if worker.gpus_per_worker > 0:
        return max(1, int(float(resources.get("GPU", 0)) // worker.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1)) // worker.cpus_per_worker)


class RayLearner(LearnerClient):
    """The learner as one ``LearnerActor``, pinned to the driver's node (it writes the
    run folder's checkpoints). A call to an actor that is gone raises ``LearnerLost``,
    and the loop replaces the learner from the last checkpoint; ``call("theta",
    wait=False)`` is one object-store copy of theta per version, fetched by each worker
    (or node) once."""

    TIMEOUTS = {"status": 60.0}  # a liveness probe must not hang on a dying actor

    def __init__(self, config: TrainConfig, run: RunDir):
        self.config_dict, self.run = to_dict(config), run
        self.actor = None

    def start(self, resume: bool) -> LearnerStatus:
        node = ray.get_runtime_context().get_node_id()
        self.actor = LearnerActor.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(self.config_dict, self.run.path, resume)
        try:
            return ray.get(self.actor.call.remote("status"))
        except _GONE as err:  # killed or its node lost while starting, or it raised
            raise LearnerLost(f"the learner did not start: {str(err).strip()}") from err

    def stop(self) -> None:
        if self.actor is not None:
            with contextlib.suppress(Exception):  # it is already dead
                ray.kill(self.actor, no_restart=True)

    def call(self, method: str, *args, wait: bool = True):
        ref = self.actor.call.remote(method, *args)
        if not wait:
            return ref
        try:
            return ray.get(ref, timeout=self.TIMEOUTS.get(method))
        except (*_GONE, GetTimeoutError) as err:
            raise LearnerLost(error_line(err)) from None


class RayWorkers(WorkerPool):
    """N ``WorkerActor``s spread over the cluster. ``dispatch`` calls
    ``WorkerActor.compute(order, learner)``, which pushes the gradient straight to the
    learner; ``collect`` takes every call that is ready (one ``ray.wait``): a worker that
    died (crash, kill, node OOM) as ``died`` (Ray restarts it), a truncation that raised
    as ``error``."""

    def __init__(self, config: TrainConfig, learner: RayLearner, mix: MixConfig):
        self.config, self.learner = config, learner
        self.config_dict, self.mix_dict = to_dict(config), to_dict(mix)
        self.workers: list = []
        self.pending: dict = {}  # ObjectRef of a compute call -> worker index

    def start(self, count: int, seeds) -> int:
        w = self.config.worker
        count = count or default_worker_count(ray.cluster_resources(), w)
        # Spread workers over nodes (a lost node takes few of them), except inside a
        # placement group (a Tune trial), whose bundles decide the placement.
        spread = ({} if ray.util.get_current_placement_group() is not None
                  else {"scheduling_strategy": "SPREAD"})
        workers = [WorkerActor.options(
            num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker,
            runtime_env={"env_vars": thread_env(w.cpus_per_worker, w.gpus_per_worker)},
            **spread,
        ).remote(self.config_dict, self.mix_dict, i, seed, w.cpus_per_worker)
            for i, seed in enumerate(seeds(count))]
        failed = self._failed_to_start(workers)
        if failed and (w.on_start_failure == "stop" or len(failed) == len(workers)):
            for worker in workers:
                ray.kill(worker, no_restart=True)
            causes: dict[str, list[int]] = {}
            for index, cause in failed.items():
                causes.setdefault(cause, []).append(index)
            lines = [f"worker{'s' if len(ix) > 1 else ''} {', '.join(map(str, ix))}: {cause}"
                     for cause, ix in causes.items()]
            raise WorkerStartError(f"{len(failed)} of {len(workers)} workers could not "
                                   f"start; " + "; ".join(lines))
        for index in failed:
            ray.kill(workers[index], no_restart=True)
        self.workers = [wk for i, wk in enumerate(workers) if i not in failed]
        return len(self.workers)

    def _failed_to_start(self, workers: list) -> dict[int, str]:
        """Worker index -> why its constructor failed, for the workers that answer within
        ``START_WAIT_S``; a worker still waiting for resources (an autoscaling cluster
        adds nodes) is not a failure and is used once it starts."""
        refs = {worker.info.remote(): index for index, worker in enumerate(workers)}
        ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=START_WAIT_S)
        if waiting:
            print(f"{len(waiting)} of {len(refs)} workers have not started after "
                  f"{START_WAIT_S:.0f} s (waiting for resources: see `ray status`)",
                  file=sys.stderr)
        failed = {}
        for ref in ready:
            try:
                ray.get(ref)
            except (*_GONE, RayTaskError) as err:
                failed[refs[ref]] = error_line(err, 500)
        return failed

    def dispatch(self, index: int, order: WorkOrder) -> None:
        self.pending[self.workers[index].compute.remote(order, self.learner.actor)] = index

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
            except RayActorError as err:
                # Ray restarts a worker that crashed, but not one whose constructor
                # raised: that worker is gone for good.
                results.append(WorkerResult(index, died=True, error=error_line(err, 500),
                                            cannot_start=err.actor_init_failed))
            except (ActorUnavailableError, OutOfMemoryError):
                results.append(WorkerResult(index, died=True))  # Ray restarts it
            except RayTaskError as err:
                results.append(WorkerResult(index, error=error_line(err)))
        return results

    def stop(self) -> int:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        cut = len(self.pending)
        self.pending.clear()
        return cut


def ray_transport(config: TrainConfig, run: RunDir, mix: MixConfig) -> Transport:
    learner = RayLearner(config, run)
    return Transport(learner, RayWorkers(config, learner, mix))


# Objects up to this size travel inline (gRPC) instead of through the shared-memory
# object store: a paper-size gradient (460 KB) then costs the learner ~4x less to
# receive (measured with ``metalearn bench learner``). On a cluster, pass the same
# setting to ``ray start --system-config``; see docs/training.md.
INLINE_OBJECT_BYTES = 1 << 20


def local_system_config() -> dict:
    return {"max_direct_call_object_size": INLINE_OBJECT_BYTES}


def running_local_cluster() -> str | None:
    """The address of the Ray that ``ray start`` last started on this machine, if it
    answers; None otherwise.

    Ray records that address in ``<tmp>/ray/ray_current_cluster`` (what ``ray.init()``
    and ``address="auto"`` read). The file outlives its cluster, and Ray then retries a
    dead address for minutes, so the address is probed first.
    """
    path = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            address = f.read().strip()
        host, _, port = address.rpartition(":")
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except (OSError, ValueError):
        return None
    return address


def init_ray(address: str) -> bool:
    """Connect to Ray by Ray's own conventions; True if this call connected or started it.

    * ``address`` (``--address`` / ``run.address``): that cluster (``auto``: the one
      started on this machine with ``ray start``); ``local``: a new private Ray;
    * else ``RAY_ADDRESS`` from the environment, as ``ray.init()`` reads it;
    * else the cluster started on this machine with ``ray start``, if there is one;
    * else a new local Ray on every core (objects up to 1 MiB inline, no dashboard).
    """
    if ray.is_initialized():
        return False
    if address and address != "local":
        ray.init(address=address)
    elif not address and os.environ.get("RAY_ADDRESS"):
        ray.init()
    elif not address and (running := running_local_cluster()):
        ray.init(address=running)
        print(f"joined the Ray cluster running on this machine ({running}); --address "
              f"local starts a private one", file=sys.stderr)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 _system_config=local_system_config())
    return True


@contextlib.contextmanager
def ray_started(config: TrainConfig):
    """Ray for the run (``init_ray``), shut down (or disconnected) after it if this
    started it."""
    started = init_ray(config.run.address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


RAY = Runner("ray", ray_transport, RayEvaluator, ray_started)

__all__ = ["RAY", "RayLearner", "RayWorkers", "default_worker_count", "init_ray",
           "local_system_config", "ray_started", "ray_transport"]
