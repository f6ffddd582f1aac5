"""Thin Ray actor wrappers around ``metalearn.training.learner_host`` and
``metalearn.training.worker``, and the CPU pinning of actor processes.

See docs/training.md (How it works: Actors; Faults).
"""

from __future__ import annotations

import fcntl
import os
import tempfile

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

LOCK_DIR = os.path.join(tempfile.gettempdir(), "metalearn-cpu-locks")
_held_locks: list = []  # keep lock files open for the life of the process


def thread_env(cpus: int, gpus: float = 0.0) -> dict[str, str]:
    """Env vars that bound a worker's BLAS/OpenMP/XLA threads to its CPU allotment; with
    a GPU share, JAX allocates device memory as it needs it rather than 75% up front (so
    workers sharing a device, and the evaluator, fit). Given as ``runtime_env`` env vars,
    they exist before the process imports anything."""
    env = {name: str(cpus) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                         "OPENBLAS_NUM_THREADS")}
    if cpus == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    if gpus > 0:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def claim_cpus(count: int) -> list[int]:
    """Pin this process to ``count`` free cores of the node (lock files); [] if none.

    Must run before ``import jax``: XLA's CPU thread pool follows the process's CPU
    affinity (measured: OMP_NUM_THREADS and threadpoolctl do not bound it). The locks are
    node-local ``fcntl`` lock files, released by the OS when the process dies, so workers
    on one node never share a core and a restarted worker reclaims one.
    """
    available = sorted(os.sched_getaffinity(0))
    if count >= len(available):
        return available
    os.makedirs(LOCK_DIR, exist_ok=True)
    claimed = []
    for core in available:
        handle = open(os.path.join(LOCK_DIR, f"cpu{core}.lock"), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _held_locks.append(handle)
        claimed.append(core)
        if len(claimed) == count:
            break
    if len(claimed) < count:  # oversubscribed node: share rather than fail
        for handle in _held_locks:
            handle.close()
        _held_locks.clear()
        return []
    os.sched_setaffinity(0, claimed)
    return claimed


# The actors import the training floor inside ``__init__``, not at module top: a worker
# process must pin its cores (``claim_cpus``) before anything imports JAX, and Ray
# imports this module in every actor process before ``__init__`` runs.

@ray.remote(max_restarts=-1, max_task_retries=0)
class WorkerActor:
    """Ray wrapper of ``metalearn.training.worker.Worker``. It restarts forever
    (``max_restarts=-1``): a restart reruns ``__init__``, and the driver then gives the
    worker a fresh task-stream seed."""

    def __init__(self, config: dict, mix: dict, index: int, stream_seed: int, cpus: int = 1):
        """``mix``: the task mix the driver resolved (``to_dict(MixConfig)``): this node
        reads no config file. A failure here names the node, since a node may lack what
        the submitter's machine has (a ``file:`` source, a data dir, a package)."""
        self.cores = claim_cpus(cpus)
        try:
            from metalearn.core.config_io import from_dict
            from metalearn.training.config import config_from_dict
            from metalearn.training.worker import Worker, enable_compilation_cache
            from tasks.sampler import MixConfig

            train_config = config_from_dict(config)
            enable_compilation_cache(train_config.worker.compilation_cache)
            self.worker = Worker(train_config, index, stream_seed,
                                 mix=from_dict(MixConfig, mix))
        except Exception as err:
            node = ray.util.get_node_ip_address()
            raise RuntimeError(f"on node {node}: {type(err).__name__}: "
                               f"{str(err).strip()[:500]}") from err

    def info(self) -> dict:
        return {"index": self.worker.index, "cores": self.cores, "pid": os.getpid(),
                "truncations": self.worker.truncations}

    def compute(self, order, learner):
        """One ``WorkOrder``: the gradient goes worker -> learner in one call (inline up
        to ``max_direct_call_object_size``); the driver sees only the learner's small
        ``LearnerReply``. The theta payload is an object ref nested in the order, so Ray
        fetches theta only when the version is new to this worker. A learner that is gone
        gives a reply with ``learner_lost``: the driver replaces it."""
        from metalearn.training.messages import LearnerReply
        from metalearn.training.population_engine import ProgramStuck

        def push(submission):
            try:
                return ray.get(learner.submit.remote(submission))
            except (RayActorError, ActorUnavailableError):
                return LearnerReply(generation=order.theta.generation, step=-1, version=-1,
                                    learner_lost=True)

        try:
            return self.worker.work(order, fetch_theta=ray.get, push=push)
        except ProgramStuck:
            # The stuck computation holds this process's device for good: end the
            # process, so that Ray restarts the worker (max_restarts=-1) with a fresh one
            # and the driver draws it a new task stream.
            os._exit(70)


@ray.remote(max_restarts=0)
class LearnerActor:
    """Ray wrapper of ``metalearn.training.learner_host.LearnerHost``. Ray does not restart
    it: the driver replaces it with a new one restored from the last checkpoint (a new
    generation), so gradients computed for the dead one are dropped."""

    def __init__(self, config: dict, run_dir: str, resume: bool):
        from metalearn.training.config import config_from_dict
        from metalearn.training.learner_host import LearnerHost
        from metalearn.training.run_dir import RunDir

        self.host = LearnerHost(config_from_dict(config), RunDir(run_dir), resume)

    def call(self, method: str, *args):
        """``LearnerHost.<method>(*args)``: the driver's calls (``RayLearner.call``)."""
        return getattr(self.host, method)(*args)

    def submit(self, submission):
        """A worker's push (the hot path: one call per truncation)."""
        return self.host.submit(submission)
