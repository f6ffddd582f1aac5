"""``metalearn bench learner`` and ``metalearn bench scaling``.

``learner``: gradients per second one learner actor ingests and applies with a
paper-size theta (``RuleConfig()``, ~115k parameters), fed by synthetic worker actors
that return pre-made random gradients (no meta-gradient compute), through the same
path as training: worker -> object store -> ``LearnerActor.submit_refs`` batches
gathered with ``ray.wait``. Also reports the in-process rate of ``Learner.submit``
(no Ray). JSON key ``grads_per_s`` is the Ray-path rate; target >= 1000.

``scaling``: real meta-gradients per second of one and then two worker actors, each
pinned to one core with XLA single-threaded, on one fixed task of the training config
(the tasks package; its first sampled task), U fixed. Compilation is excluded (warm-up
truncations first). JSON keys ``grads_per_s_1``, ``grads_per_s_2`` and ``speedup``
(target >= 1.8 on 2 cores).

The last line with ``--json`` is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray


def add_bench_parsers(benches) -> None:
    learner = benches.add_parser("learner", help="gradients/s one learner ingests (Ray)")
    learner.add_argument("--json", action="store_true")
    learner.add_argument("--seconds", type=float, default=15.0)
    learner.add_argument("--workers", type=int, default=4, help="synthetic workers")
    learner.add_argument("--meta-batch", type=int, default=256)
    learner.set_defaults(func=run_learner_bench)
    scaling = benches.add_parser("scaling", help="meta-gradients/s with 1 and 2 workers")
    scaling.add_argument("--json", action="store_true")
    scaling.add_argument("--config", help="training config (default experiments/local.yaml)")
    scaling.add_argument("--seconds", type=float, default=30.0, help="timed phase length")
    scaling.add_argument("--unroll", type=int, default=4, help="U of every truncation")
    scaling.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    scaling.set_defaults(func=run_scaling_bench)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _init_ray() -> bool:
    from metalearn.distributed.driver import local_system_config

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _system_config=local_system_config())
    return True


# ---------------------------------------------------------------------------
# learner

@ray.remote(num_cpus=0)
class SyntheticWorker:
    """Returns pre-made random gradients tagged with the version it was given."""

    def __init__(self, num_params: int, generation: str, seed: int):
        import numpy as np

        from metalearn.learner import Submission

        rng = np.random.default_rng(seed)
        self.grads = [rng.normal(size=num_params).astype(np.float32) for _ in range(4)]
        self.generation = generation
        self.count = 0
        self.submission = Submission

    def compute(self, version: int):
        self.count += 1
        return self.submission(self.grads[self.count % 4], version, self.generation,
                               loss=1.0, dataset="synthetic", worker=0)


def _in_process_rate(theta, meta_batch: int, seconds: float = 3.0) -> float:
    import numpy as np

    from metalearn.learner import Learner, Submission
    from metalearn.train_config import CurriculumConfig, LearnerConfig

    learner = Learner(theta, LearnerConfig(meta_batch=meta_batch), CurriculumConfig())
    grad = np.random.default_rng(0).normal(size=theta.size).astype(np.float32)
    for _ in range(meta_batch):  # compile the update
        learner.submit(Submission(grad, learner.version, learner.generation, 1.0))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        learner.submit(Submission(grad, learner.version, learner.generation, 1.0))
        count += 1
    return count / (time.perf_counter() - start)


def run_learner_bench(args) -> int:
    import tempfile

    import jax
    from jax.flatten_util import ravel_pytree

    from metalearn.config import RuleConfig, to_dict
    from metalearn.distributed.actors import LearnerActor
    from metalearn.train_config import LearnerConfig, TrainConfig
    from metalearn.update_rule import init_theta

    theta = ravel_pytree(init_theta(jax.random.key(0), RuleConfig()))[0]
    import numpy as np
    theta = np.asarray(theta)
    report = {"theta_params": int(theta.size), "meta_batch": args.meta_batch,
              "synthetic_workers": args.workers}
    _log(f"[1/2] in-process Learner.submit, {theta.size:,} parameters ...")
    report["in_process_grads_per_s"] = _in_process_rate(theta, args.meta_batch)
    _log(f"[2/2] learner actor fed by {args.workers} synthetic workers for "
         f"{args.seconds:.0f} s ...")
    started = _init_ray()
    try:
        config = TrainConfig(learner=LearnerConfig(meta_batch=args.meta_batch,
                                                   checkpoint_minutes=1e6))
        with tempfile.TemporaryDirectory() as run_dir:
            learner = LearnerActor.options(num_cpus=0).remote(to_dict(config), run_dir, False)
            info = ray.get(learner.info.remote())
            workers = [SyntheticWorker.remote(theta.size, info["generation"], i)
                       for i in range(args.workers)]
            version = info["version"]
            ray.get([w.compute.remote(version) for w in workers])  # all started
            pending = {w.compute.remote(version): w for w in workers}
            in_flight: list = []
            received, applied_steps = 0, 0
            warm_until = time.perf_counter() + 2.0
            start = None
            while True:
                now = time.perf_counter()
                if start is None and now >= warm_until:
                    start, received, first_step = now, 0, applied_steps
                    busy_start = ray.get(learner.info.remote())["busy_s"]
                if start is not None and now - start >= args.seconds:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for ref in ready:
                    worker = pending.pop(ref)
                    pending[worker.compute.remote(version)] = worker
                if ready:
                    in_flight.append(learner.submit_refs.remote(ready))
                # Keep at most a few learner calls in flight (back-pressure).
                while len(in_flight) > 4 or (in_flight and ray.wait(in_flight, timeout=0)[0]):
                    done, in_flight = ray.wait(in_flight, num_returns=1)
                    for reply in ray.get(done[0]):
                        received += 1
                        version = reply["version"]
                        applied_steps = reply["step"]
            elapsed = time.perf_counter() - start
            summary = ray.get(learner.info.remote())
            busy = summary["busy_s"] - busy_start
            report.update(grads_per_s=received / elapsed, seconds=elapsed,
                          learner_busy_s=busy, learner_busy_grads_per_s=received / busy,
                          updates=applied_steps - first_step,
                          updates_per_s=(applied_steps - first_step) / elapsed,
                          dropped_stale=summary["dropped_stale"])
            for actor in workers + [learner]:
                ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    report["target_grads_per_s"] = 1000
    report["meets_target"] = report["grads_per_s"] >= 1000
    print(f"learner: {report['grads_per_s']:.0f} gradients/s through Ray "
          f"({report['updates_per_s']:.2f} updates/s of {args.meta_batch}); "
          f"{report['learner_busy_grads_per_s']:.0f}/s of learner busy time; in-process "
          f"{report['in_process_grads_per_s']:.0f}/s; theta {theta.size:,} parameters; "
          f"dropped stale {report['dropped_stale']}", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------
# scaling

@ray.remote(num_cpus=1)
class ScalingWorker:
    """One pinned, single-threaded worker timing real meta-gradients on a fixed task."""

    def __init__(self, config: dict, task_seed: int, unroll: int):
        from metalearn.distributed.actors import claim_cpus

        self.cores = claim_cpus(1)
        import jax
        from jax.flatten_util import ravel_pytree

        from metalearn.base_model import init_params
        from metalearn.train_config import config_from_dict
        from metalearn.unroll import make_meta_gradient
        from metalearn.update_rule import init_theta
        from metalearn.worker import enable_compilation_cache, make_sampler

        self.config = config_from_dict(config)
        enable_compilation_cache(self.config.worker.compilation_cache)
        self.task = make_sampler(self.config).sample(task_seed)
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


def run_scaling_bench(args) -> int:
    from metalearn.config import to_dict
    from metalearn.distributed.actors import thread_env
    from metalearn.train_config import load_config

    config = load_config(args.config, args.set)
    started = _init_ray()
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < 2:
            raise RuntimeError(f"the scaling benchmark needs 2 CPUs, Ray has {cpus}")
        options = {"runtime_env": {"env_vars": thread_env(1)}}
        _log("[1/3] starting worker 1, compiling ...")
        first = ScalingWorker.options(**options).remote(to_dict(config), 0, args.unroll)
        ray.get(first.truncation.remote())
        info = ray.get(first.info.remote())
        _log(f"[2/3] 1 worker for {args.seconds:.0f} s (arch {info['arch']}, U={args.unroll}) ...")
        rate_1 = _timed_phase([first], args.seconds)
        second = ScalingWorker.options(**options).remote(to_dict(config), 0, args.unroll)
        ray.get(second.truncation.remote())
        _log(f"[3/3] 2 workers for {args.seconds:.0f} s ...")
        rate_2 = _timed_phase([first, second], args.seconds)
        cores = [ray.get(w.info.remote())["cores"] for w in (first, second)]
        for w in (first, second):
            ray.kill(w)
    finally:
        if started:
            ray.shutdown()
    report = {"grads_per_s_1": rate_1, "grads_per_s_2": rate_2, "speedup": rate_2 / rate_1,
              "unroll": args.unroll, "arch": info["arch"], "rule": config.rule_preset,
              "cores": cores, "seconds": args.seconds, "target_speedup": 1.8,
              "meets_target": rate_2 / rate_1 >= 1.8}
    print(f"scaling: 1 worker {rate_1:.3f} meta-grads/s, 2 workers {rate_2:.3f}/s, speedup "
          f"{report['speedup']:.2f}x (cores {cores}, arch {info['arch']}, U={args.unroll})",
          flush=True)
    if args.json:
        print(json.dumps(report))
    return 0
