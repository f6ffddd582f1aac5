"""What ``metalearn bench learner`` and ``metalearn bench scaling`` measure (their command
line is ``metalearn.cli.bench``; ``measure_learner`` and ``measure_scaling`` return the
reports). See docs/training.md (Benchmarks). JAX loads only inside functions and actor
constructors, after an actor has pinned its cores (docs/architecture.md).
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import time
from typing import Callable

import ray

# actors imports no JAX at module level (it is imported by actor processes too).
from metalearn.distributed.actors import LearnerActor, claim_cpus, thread_env


@contextlib.contextmanager
def _local_ray():
    """A private local Ray around a measurement, unless one is running already."""
    from metalearn.distributed.driver import local_system_config

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 _system_config=local_system_config())
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------
# learner

@ray.remote(num_cpus=0)
class SyntheticWorker:
    """Pushes pre-made random gradients to the learner, as ``WorkerActor.compute`` does
    after a truncation (same call, same ``Submission``), with no meta-gradient compute."""

    def __init__(self, num_params: int, index: int):
        import numpy as np

        from metalearn.training.messages import Submission

        rng = np.random.default_rng(index)
        self.grads = [rng.normal(size=num_params).astype(np.float32) for _ in range(4)]
        self.index = index
        self.count = 0
        self.submission = Submission

    def _submit(self, learner, generation: str, version: int):
        self.count += 1
        return learner.submit.remote(self.submission(
            self.grads[self.count % 4], version, generation, loss=1.0, dataset="synthetic",
            worker=self.index))

    def compute(self, box: list, learner) -> dict:
        """One gradient per driver call (the training path: the driver sees the reply)."""
        return ray.get(self._submit(learner, box[0], box[1]))

    def push_until(self, learner, generation: str, version: int, until_unix: float,
                   in_flight: int = 2) -> int:
        """Push back to back until ``until_unix`` with ``in_flight`` calls outstanding
        (a worker whose truncation takes less than a learner round trip)."""
        pending: collections.deque = collections.deque()
        sent = 0
        while time.time() < until_unix:
            while len(pending) < in_flight:
                pending.append(self._submit(learner, generation, version))
                sent += 1
            version = ray.get(pending.popleft()).version
        ray.get(list(pending))
        return sent


def _in_process_rate(theta, meta_batch: int, seconds: float = 3.0) -> float:
    import numpy as np

    from metalearn.training.config import CurriculumConfig, LearnerConfig
    from metalearn.training.learner import Learner
    from metalearn.training.messages import Submission

    learner = Learner(theta, LearnerConfig(meta_batch=meta_batch), CurriculumConfig())
    grad = np.random.default_rng(0).normal(size=theta.size).astype(np.float32)
    for _ in range(meta_batch):  # compile the update
        learner.submit(Submission(grad, learner.version, learner.generation, 1.0))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        learner.submit(Submission(grad, learner.version, learner.generation, 1.0))
        count += 1
    return count / (time.perf_counter() - start)


def _learner_counts(learner) -> tuple[float, int, int, float]:
    status = ray.get(learner.call.remote("status"))
    return time.perf_counter(), status.counters["received"], status.step, status.busy_s


def _pushed_rate(learner, workers, generation: str, seconds: float) -> dict:
    """Workers push back to back; rates from the learner's own counters over a window
    that starts after a 2 s warm-up and ends before the pushers stop."""
    warm = 2.0
    until = time.time() + warm + seconds + 1.0
    runs = [w.push_until.remote(learner, generation, 0, until) for w in workers]
    time.sleep(warm)
    t0, received0, step0, busy0 = _learner_counts(learner)
    time.sleep(seconds)
    t1, received1, step1, busy1 = _learner_counts(learner)
    ray.get(runs)
    received, elapsed = received1 - received0, t1 - t0
    return {"grads_per_s": received / elapsed, "seconds": elapsed,
            "updates_per_s": (step1 - step0) / elapsed,
            "learner_busy_fraction": (busy1 - busy0) / elapsed,
            "learner_busy_grads_per_s": received / max(busy1 - busy0, 1e-9)}


def _driver_rate(learner, workers, status, seconds: float) -> float:
    """The training driver's loop: one driver-issued call per gradient, replies read
    by the driver, the next call given the newest version."""
    box = [status.generation, status.version]
    pending = {w.compute.remote(box, learner): w for w in workers}
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            worker = pending.pop(ref)
            box = [box[0], max(box[1], ray.get(ref).version)]
            count += 1
            pending[worker.compute.remote(box, learner)] = worker
    rate = count / (time.perf_counter() - start)
    ray.get(list(pending))
    return rate


def measure_learner(*, seconds: float = 15.0, workers: int = 4, meta_batch: int = 256,
                    log: Callable[[str], None] = lambda message: None) -> dict:
    """The ``metalearn bench learner`` report: gradients/s one learner actor ingests from
    ``workers`` synthetic workers over ``seconds`` (pushed, then through the driver loop),
    and the in-process rate. Starts a local Ray unless one is running."""
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from metalearn.core.config import RuleConfig, to_dict
    from metalearn.core.update_rule import init_theta
    from metalearn.training.config import LearnerConfig, TrainConfig

    theta = np.asarray(ravel_pytree(init_theta(jax.random.key(0), RuleConfig()))[0])
    report = {"theta_params": int(theta.size), "meta_batch": meta_batch,
              "synthetic_workers": workers}
    log(f"[1/3] in-process Learner.submit, {theta.size:,} parameters ...")
    report["in_process_grads_per_s"] = _in_process_rate(theta, meta_batch)
    config = TrainConfig(learner=LearnerConfig(meta_batch=meta_batch, checkpoint_minutes=1e6))
    with _local_ray(), tempfile.TemporaryDirectory() as run_dir:
        learner = LearnerActor.options(num_cpus=0).remote(to_dict(config), run_dir, False)
        status = ray.get(learner.call.remote("status"))
        pushers = [SyntheticWorker.remote(theta.size, i) for i in range(workers)]
        ray.get([w.compute.remote([status.generation, 0], learner)
                 for w in pushers])  # all started, the update compiled soon after
        log(f"[2/3] {workers} synthetic workers pushing to the learner actor "
            f"for {seconds:.0f} s ...")
        report.update(_pushed_rate(learner, pushers, status.generation, seconds))
        log(f"[3/3] the same through the driver loop, one call per gradient, for "
            f"{seconds:.0f} s ...")
        status = ray.get(learner.call.remote("status"))
        report["driver_loop_grads_per_s"] = _driver_rate(learner, pushers, status, seconds)
        counters = ray.get(learner.call.remote("status")).counters
        report.update(dropped_stale=counters["dropped_stale"],
                      dropped_nonfinite=counters["dropped_nonfinite"])
        for actor in pushers + [learner]:
            ray.kill(actor)
    report.update(cpus=os.cpu_count(), target_grads_per_s=1000,
                  meets_target=report["grads_per_s"] >= 1000)
    return report


# ---------------------------------------------------------------------------
# scaling

@ray.remote(num_cpus=1)
class ScalingWorker:
    """One pinned, single-threaded worker timing real meta-gradients on a fixed task."""

    def __init__(self, config: dict, mix: dict, task_seed: int, unroll: int):
        self.cores = claim_cpus(1)
        # Imported only now, after claim_cpus pinned this process: XLA sizes its thread
        # pool from the CPU affinity it finds when JAX is first imported.
        import jax
        from jax.flatten_util import ravel_pytree

        from metalearn.core.base_model import init_params
        from metalearn.core.unroll import make_meta_gradient
        from metalearn.core.update_rule import init_theta
        from metalearn.training.config import config_from_dict
        from metalearn.core.config_io import from_dict
        from metalearn.training.worker import enable_compilation_cache
        from tasks.sampler import MixConfig, TaskSampler

        self.config = config_from_dict(config)
        enable_compilation_cache(self.config.worker.compilation_cache)
        sampler = TaskSampler(from_dict(MixConfig, mix), data_dir=self.config.tasks.data_dir)
        self.task = sampler.sample(task_seed)
        rule = self.config.rule
        self.theta = init_theta(jax.random.key(0), rule)
        self.params = init_params(jax.random.key(1), self.task.arch, w_std=rule.init_w_std,
                                  b_std=rule.init_b_std)
        self.estimator = make_meta_gradient(self.task.arch.activation, rule,
                                            self.config.objective, self.config.unroll)
        self.unroll = unroll
        self.ravel = ravel_pytree

    def info(self) -> dict:
        return {"cores": self.cores, "arch": list(self.task.arch.sizes)}

    def truncation(self) -> float:
        import jax

        o = self.config.objective
        start = time.perf_counter()
        batch = self.task.truncation_batch(self.unroll, self.config.worker.batch_size,
                                           o.num_draws, o.samples_per_class)
        result = jax.block_until_ready(self.estimator(self.theta, self.params, batch))
        self.ravel(result.grad)[0].block_until_ready()
        return time.perf_counter() - start

    def run_until(self, start_unix: float, deadline_unix: float) -> float:
        """Truncations per second from ``start_unix`` until the first one that ends
        after ``deadline_unix`` (time.time()), that one included."""
        while time.time() < start_unix:
            time.sleep(0.001)
        count, start = 0, time.time()
        while time.time() < deadline_unix:
            self.truncation()
            count += 1
        return count / (time.time() - start)


def _timed_phase(workers, seconds: float) -> float:
    ray.get([w.truncation.remote() for w in workers])  # warm (compiled already)
    start = time.time() + 1.0  # start together
    rates = ray.get([w.run_until.remote(start, start + seconds) for w in workers])
    return float(sum(rates))


def measure_scaling(config, *, seconds: float = 15.0, rounds: int = 3, unroll: int = 4,
                    log: Callable[[str], None] = lambda message: None) -> dict:
    """The ``metalearn bench scaling`` report: real meta-gradients/s of one and of two
    pinned single-threaded workers on the first task of ``config`` (a TrainConfig), in
    ``rounds`` alternating phases of ``seconds``. Starts a local Ray unless one is
    running; needs 2 CPUs."""
    from metalearn.core.config import to_dict
    from metalearn.training.task_mix import resolve_mix

    mix = to_dict(resolve_mix(config.tasks))  # read here, shipped to the workers as data
    with _local_ray():
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < 2:
            raise RuntimeError(f"the scaling benchmark needs 2 CPUs, Ray has {cpus}")
        options = {"runtime_env": {"env_vars": thread_env(1)}}
        log("[1/2] starting 2 workers, compiling ...")
        first, second = (ScalingWorker.options(**options).remote(to_dict(config), mix, 0, unroll)
                         for _ in range(2))
        ray.get([first.truncation.remote(), second.truncation.remote()])
        info = ray.get(first.info.remote())
        # Alternate 1-worker and 2-worker phases so that load changing on a shared machine
        # falls on both sides of the ratio, not on one.
        log(f"[2/2] {rounds} rounds of 1 worker then 2 workers, {seconds:.0f} s "
            f"each (arch {info['arch']}, U={unroll}) ...")
        rates_1, rates_2 = [], []
        for _ in range(rounds):
            rates_1.append(_timed_phase([first], seconds))
            rates_2.append(_timed_phase([first, second], seconds))
        rate_1, rate_2 = sum(rates_1) / len(rates_1), sum(rates_2) / len(rates_2)
        cores = [ray.get(w.info.remote())["cores"] for w in (first, second)]
        for w in (first, second):
            ray.kill(w)
    return {"grads_per_s_1": rate_1, "grads_per_s_2": rate_2, "speedup": rate_2 / rate_1,
            "unroll": unroll, "arch": info["arch"], "rule": config.rule_preset,
            "cores": cores, "seconds": seconds, "rounds": rounds,
            "round_speedups": [b / a for a, b in zip(rates_1, rates_2)], "target_speedup": 1.8,
            "meets_target": rate_2 / rate_1 >= 1.8}
