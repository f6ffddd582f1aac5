"""Thin Ray actor wrappers around ``metalearn.training.learner`` and ``metalearn.training.worker``.

Worker actors restart forever (``max_restarts=-1``); a restart reruns ``__init__`` and
the driver then gives the worker a fresh task-stream seed. The learner actor is not
restarted by Ray: the driver replaces it with a new one restored from the last
checkpoint (a new generation), so gradients computed for the dead one are dropped.

Thread limits: XLA's CPU thread pool follows the process's CPU affinity (NOTES-APIS),
so a worker pins itself to ``cpus`` cores before importing JAX. Cores are claimed
through node-local lock files (``fcntl``), released by the OS when the process dies,
so workers on one node never share a core and a restarted worker reclaims one.
BLAS/OpenMP thread counts and XLA flags come in through ``runtime_env`` env vars,
which exist before the process imports anything.
"""

from __future__ import annotations

import collections
import fcntl
import os
import tempfile
import time

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

LOCK_DIR = os.path.join(tempfile.gettempdir(), "metalearn-cpu-locks")
_held_locks: list = []  # keep lock files open for the life of the process


def thread_env(cpus: int) -> dict[str, str]:
    """Env vars that bound a worker's BLAS/OpenMP/XLA threads to its CPU allotment."""
    env = {name: str(cpus) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                         "OPENBLAS_NUM_THREADS")}
    if cpus == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def claim_cpus(count: int) -> list[int]:
    """Pin this process to ``count`` free cores of the node (lock files); [] if none.

    Must run before ``import jax``.
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


@ray.remote(max_restarts=-1, max_task_retries=0)
class WorkerActor:
    """Ray wrapper of ``metalearn.training.worker.Worker``."""

    def __init__(self, config: dict, index: int, stream_seed: int, cpus: int = 1,
                 pin: bool = True):
        self.cores = claim_cpus(cpus) if pin else []
        from metalearn.training.config import config_from_dict
        from metalearn.training.worker import Worker, enable_compilation_cache

        train_config = config_from_dict(config)
        enable_compilation_cache(train_config.worker.compilation_cache)
        self.worker = Worker(train_config, index, stream_seed)
        self.started = time.time()

    def info(self) -> dict:
        return {"index": self.worker.index, "cores": self.cores, "pid": os.getpid(),
                "truncations": self.worker.truncations}

    def reseed(self, stream_seed: int) -> None:
        self.worker.reseed(stream_seed)

    def compute(self, theta_box: list, curriculum, learner) -> dict:
        """One truncation, pushed straight to ``learner``; returns the learner's reply.

        theta_box = [generation, version, ObjectRef of flat theta]; the reference is
        nested so Ray does not fetch theta unless the version changed. The gradient goes
        worker -> learner in one call (inline up to ``max_direct_call_object_size``);
        the driver only sees the small reply. A learner that is gone gives
        ``{"learner_lost": True, "generation": ...}`` instead: the driver replaces it.
        """
        generation, version, theta_ref = theta_box
        if self.worker.needs_theta(generation, version):
            self.worker.set_theta(generation, version, ray.get(theta_ref))
        submission = self.worker.run_truncation(curriculum)
        try:
            return ray.get(learner.submit.remote(submission))
        except (RayActorError, ActorUnavailableError):
            return {"learner_lost": True, "generation": generation, "row": None}


@ray.remote(max_restarts=0)
class LearnerActor:
    """Ray wrapper of ``metalearn.training.learner.Learner`` that also owns the checkpoints."""

    def __init__(self, config: dict, run_dir: str, resume: bool):
        import warnings

        import jax
        from jax.flatten_util import ravel_pytree

        from metalearn.training.checkpoint import CHECKPOINT_DIR, Checkpointer
        from metalearn.training.learner import Learner
        from metalearn.training.config import config_from_dict
        from metalearn.core.update_rule import init_theta

        self.config = config_from_dict(config)
        self.run_dir = run_dir
        theta = init_theta(jax.random.key(self.config.learner.seed), self.config.rule)
        flat = ravel_pytree(theta)[0]
        self.learner = Learner(flat, self.config.learner, self.config.curriculum)
        self.learner.stop_step = self.config.run.steps
        self.checkpointer = Checkpointer(os.path.join(run_dir, CHECKPOINT_DIR),
                                         keep=self.config.learner.keep_checkpoints)
        self.restored_step = None
        self.warnings: list[str] = []
        if resume:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                found = self.checkpointer.restore_latest(self.learner.state_template())
            self.warnings = [str(w.message) for w in caught]
            if found is None:
                raise FileNotFoundError(f"no readable checkpoint in {run_dir}")
            step, arrays, meta = found
            self.learner.load_state(arrays, meta)
            self.restored_step = step
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_step = self.learner.step
        self.busy_s = 0.0  # time inside submit (checking, summing, applying, saving)
        # Recent rows, for replies lost with a dead worker (the driver drains them
        # every step, so a few thousand is far more than it can fall behind).
        self.rows: collections.deque = collections.deque(maxlen=4096)

    def info(self) -> dict:
        return {**self.learner.summary(), "curriculum": self.learner.curriculum(),
                "restored_step": self.restored_step, "warnings": self.warnings,
                "num_params": self.learner.num_params, "busy_s": self.busy_s}

    def get_theta(self):
        return self.learner.theta

    def new_stream_seeds(self, count: int) -> list[int]:
        return self.learner.new_stream_seeds(count)

    def submit(self, submission) -> dict:
        """Take one worker's ``Submission``; the reply tells the worker (and, through
        it, the driver) the newest step, theta version and, after an update, the metrics
        row and curriculum."""
        start = time.perf_counter()
        row = self.learner.submit(submission)
        out = {"row": row, "step": self.learner.step, "version": self.learner.version,
               "generation": self.learner.generation}
        if row is not None:
            self.rows.append(row)
            out["curriculum"] = self.learner.curriculum()
            minutes = (time.monotonic() - self.last_checkpoint) / 60.0
            if minutes >= self.config.learner.checkpoint_minutes:
                out["checkpoint"] = self.checkpoint()
        self.busy_s += time.perf_counter() - start
        return out

    def rows_after(self, step: int) -> list[dict]:
        """Metrics rows of this learner's updates after ``step`` (the driver fetches the
        ones whose reply died with a worker)."""
        return [row for row in self.rows if row["step"] > step]

    def checkpoint(self) -> int:
        """Save the full state now (and theta_latest.npz); returns the step saved."""
        from metalearn.training.checkpoint import save_theta
        from metalearn.core.config import to_dict

        step = self.learner.step
        if step != self.last_checkpoint_step or not self.checkpointer.steps():
            self.checkpointer.save(step, *self.learner.state())
            save_theta(self.run_dir, self.learner.theta, to_dict(self.config.rule), step)
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_step = step
        return step

    def close(self) -> int:
        step = self.checkpoint()
        self.checkpointer.close()
        return step
