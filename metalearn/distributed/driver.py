"""The driver of asynchronous meta-training (DESIGN data flow steps 1-4).

It starts (or joins) Ray, starts one learner actor on its own node (the learner writes
the run folder's checkpoints) and N worker actors, and loops over ``ray.wait``:

* a worker pushes each finished truncation's gradient straight to the learner actor
  (one call, worker -> learner; the driver never touches a gradient) and hands the
  learner's small reply back to the driver, which gives it its next truncation with
  the newest ``[generation, version, theta ref]`` and curriculum;
* the replies carry metrics rows (kept for ``metrics.parquet`` and TensorBoard) and
  the theta version; a new version makes the driver ask the learner for theta once
  (one object-store copy shared by every worker). A row whose reply died with its
  worker is fetched from the learner, which keeps recent rows;
* a worker that died is restarted by Ray; the driver gives it a fresh task-stream seed
  from the learner and resubmits. A worker whose truncation raised is reseeded too;
* a learner that died (a worker's push failed, or a driver call did) is replaced by
  one restored from the last checkpoint (a new generation: in-flight gradients for the
  dead one are lost with it or dropped by the new one), and metrics rows beyond the
  restored step are discarded.

The run stops at ``run.steps`` (an absolute learner step) or after ``run.minutes``;
then the learner writes a final checkpoint and ``theta_latest.npz``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
import time
from typing import Callable

from metalearn.core.config import ConfigError, to_dict
from metalearn.training.config import TrainConfig, config_from_dict, config_to_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.parquet"


# ---------------------------------------------------------------------------
# run folders

def is_run_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, CONFIG_FILE))
            and os.path.isdir(os.path.join(path, "checkpoints")))


def read_run_config(path: str) -> TrainConfig:
    import yaml

    if not os.path.isdir(path):
        raise FileNotFoundError(f"run folder not found: {path}")
    if not is_run_dir(path):
        raise ConfigError(f"{path} is not a metalearn run folder (needs {CONFIG_FILE} and "
                          f"checkpoints/)")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        return config_from_dict(yaml.safe_load(f) or {})


def theta_shapes(rule) -> dict:
    """Leaf path -> shape of theta for ``rule`` (no allocation)."""
    import functools

    import jax

    from metalearn.core.update_rule import init_theta

    shapes = jax.eval_shape(functools.partial(init_theta, config=rule), jax.random.key(0))
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def check_resume_compatible(saved: TrainConfig, config: TrainConfig, run_dir: str) -> None:
    """A resumed run must have theta of the same structure and shapes."""
    old, new = theta_shapes(saved.rule), theta_shapes(config.rule)
    if old != new:
        differing = sorted(set(old.items()) ^ set(new.items()))
        first = differing[0][0] if differing else "structure"
        raise ConfigError(
            f"cannot resume {run_dir}: its rule gives theta of {sum(map(math.prod, old.values()))}"
            f" parameters, this config {sum(map(math.prod, new.values()))} (first difference "
            f"at theta{first}); resume with the run's own rule settings")
    if saved.learner.meta_batch != config.learner.meta_batch:
        pass  # allowed: the buffer is a sum plus a count, valid for any meta-batch


# ---------------------------------------------------------------------------
# continuous evaluation

class _ContinuousEvaluation:
    """Drives the evaluator actor from the driver loop, never blocking it.

    Every ``evaluator.every`` learner steps it hands the newest theta (the same object
    ref the workers get) to the actor; a finished evaluation's columns
    (``eval/<dataset>/meta_loss``, ``.../accuracy``, ``.../logreg_accuracy``, ``eval_s``)
    are merged into the metrics row of the step it evaluated. A failing evaluator is
    reported once and switched off: it must never stop meta-training.
    """

    def __init__(self, config: TrainConfig, start_step: int):
        self.every = config.evaluator.every
        self.actor, self.pending, self.last_step = None, None, start_step
        if config.evaluator.enabled:
            from metalearn.distributed.evaluator import start_evaluator
            self.actor = start_evaluator(config.evaluator, config.rule, config.objective,
                                         reserve=False)

    def poll(self, step: int, box: list, metrics: "MetricsLog") -> None:
        import ray

        if self.actor is None:
            return
        if self.pending is not None:
            done, _ = ray.wait([self.pending], timeout=0)
            if not done:
                return
            self._collect(metrics)
        if step - self.last_step >= self.every:
            self.pending = self.actor.evaluate.remote(step, box[2])
            self.last_step = step

    def _collect(self, metrics: "MetricsLog") -> None:
        import ray

        try:
            metrics.merge(ray.get(self.pending))
        except Exception as err:  # noqa: BLE001 - evaluation is optional
            message = str(err).strip().splitlines()[-1][:300]
            print(f"\ncontinuous evaluation failed and is switched off: {message}",
                  file=sys.stderr)
            ray.kill(self.actor, no_restart=True)
            self.actor = None
        self.pending = None

    def finish(self, metrics: "MetricsLog") -> None:
        import ray

        if self.actor is None:
            return
        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=120)
            if ready:
                self._collect(metrics)
        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)


# ---------------------------------------------------------------------------
# metrics

class MetricsLog:
    """Rows of learner steps; ``metrics.parquet`` rewritten atomically; TensorBoard."""

    def __init__(self, run_dir: str, tensorboard: bool):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.rows: list[dict] = []
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def load(self, up_to_step: int) -> None:
        if os.path.exists(self.path):
            import pyarrow.parquet as pq

            rows = pq.read_table(self.path).to_pylist()
            self.rows = [{k: v for k, v in r.items() if v is not None}
                         for r in rows if r["step"] <= up_to_step]

    def merge(self, row: dict) -> bool:
        """Add ``row``'s columns to the existing row of the same step (evaluations)."""
        for existing in reversed(self.rows):
            if existing["step"] == row["step"]:
                existing.update(row)
                if self.writer is not None:
                    for key, value in row.items():
                        if key != "step" and isinstance(value, (int, float)):
                            self.writer.add_scalar(key, value, row["step"])
                return True
        return False

    def truncate(self, up_to_step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= up_to_step]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from metalearn.training.checkpoint import atomic_write_bytes

        if not self.rows:
            return
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        table = pa.table({c: [r.get(c) for r in self.rows] for c in columns})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.write()
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------
# progress line

class Progress:
    def __init__(self, every_s: float, stream=sys.stderr):
        self.every_s = every_s
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0
        self.last_key = None

    def show(self, text: str, key=None, force: bool = False) -> None:
        """Show ``text`` at most every ``every_s``; without a terminal, only when ``key``
        (the learner step) changed or 30 s passed, so logs do not repeat lines."""
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        if not self.tty and key == self.last_key and now - self.last < 30.0:
            return
        self.last, self.last_key = now, key
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------
# the training run

@dataclasses.dataclass
class RunSummary:
    run_dir: str
    start_step: int
    final_step: int
    rows: int
    wall_s: float
    worker_failures: int
    worker_errors: int
    learner_restarts: int
    checkpoint_step: int
    dropped_stale: int = 0
    dropped_nonfinite: int = 0
    dropped_generation: int = 0


class Trainer:
    """One ``metalearn train`` session. ``on_reply(trainer, reply)`` is a test hook,
    called after every learner reply (used to kill actors mid-run)."""

    def __init__(self, config: TrainConfig, run_dir: str, *, resume: bool = False,
                 num_workers: int | None = None,
                 on_reply: Callable[["Trainer", dict], None] | None = None):
        self.config = config
        self.run_dir = os.path.abspath(run_dir)
        self.resume = resume
        self.num_workers = num_workers
        self.on_reply = on_reply
        self.worker_failures = 0
        self.worker_errors = 0
        self.learner_restarts = 0
        self.learner = None
        self.workers: list = []

    # -- actors

    def _start_learner(self, resume: bool):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from metalearn.distributed.actors import LearnerActor

        node = ray.get_runtime_context().get_node_id()
        learner = LearnerActor.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(to_dict(self.config), self.run_dir, resume)
        info = ray.get(learner.info.remote())
        for message in info["warnings"]:
            print(f"warning: {message}", file=sys.stderr)
        return learner, info

    def _theta_box(self, info: dict) -> list:
        return [info["generation"], info["version"], self.learner.get_theta.remote()]

    def _worker_count(self) -> int:
        import ray

        if self.num_workers:
            return self.num_workers
        if self.config.worker.num_workers:
            return self.config.worker.num_workers
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // self.config.worker.cpus_per_worker)

    def _start_workers(self, seeds: list[int]) -> list:
        from metalearn.distributed.actors import WorkerActor, thread_env

        import ray

        w = self.config.worker
        config = to_dict(self.config)
        # Spread workers over nodes (a lost node takes few of them), except inside a
        # placement group (a Tune trial), whose bundles decide the placement.
        spread = ({} if ray.util.get_current_placement_group() is not None
                  else {"scheduling_strategy": "SPREAD"})
        return [WorkerActor.options(
            num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker,
            runtime_env={"env_vars": thread_env(w.cpus_per_worker)}, **spread,
        ).remote(config, i, seed, w.cpus_per_worker) for i, seed in enumerate(seeds)]

    # -- main loop

    def run(self) -> RunSummary:
        import ray
        from ray.exceptions import (ActorUnavailableError, OutOfMemoryError, RayActorError,
                                    RayTaskError)

        run = self.config.run
        start = time.monotonic()
        deadline = start + run.minutes * 60.0 if run.minutes > 0 else math.inf
        metrics = MetricsLog(self.run_dir, run.tensorboard)
        progress = Progress(run.progress_every_s)

        self.learner, info = self._start_learner(self.resume)
        start_step = info["step"]
        if self.resume:
            metrics.load(start_step)
            print(f"resumed {self.run_dir} at step {start_step}", file=sys.stderr)
        else:
            ray.get(self.learner.checkpoint.remote())  # step 0: the folder is a run now
        checkpoint_step = start_step
        curriculum = info["curriculum"]
        box = self._theta_box(info)
        count = self._worker_count()
        self.workers = self._start_workers(ray.get(self.learner.new_stream_seeds.remote(count)))
        print(f"training with {count} workers, learner at step {start_step}; run folder "
              f"{self.run_dir}", file=sys.stderr)
        pending: dict = {w.compute.remote(box, curriculum, self.learner): i
                         for i, w in enumerate(self.workers)}
        evaluation = _ContinuousEvaluation(self.config, start_step)
        last_flush = time.monotonic()
        step, successes, last_row = start_step, 0, None
        recorded = start_step  # the newest step whose metrics row is in ``metrics``
        stop = run.steps and step >= run.steps

        def restart_learner():
            nonlocal box, curriculum, step, checkpoint_step, recorded
            self.learner_restarts += 1
            try:
                ray.kill(self.learner, no_restart=True)
            except Exception:  # noqa: BLE001 - it is already dead
                pass
            self.learner, new_info = self._start_learner(True)
            step = checkpoint_step = recorded = new_info["step"]
            metrics.truncate(step)
            curriculum = new_info["curriculum"]
            box = self._theta_box(new_info)
            print(f"\nlearner died; restarted from checkpoint step {step} "
                  f"(generation {new_info['generation']})", file=sys.stderr)

        def learner_alive() -> bool:
            try:
                ray.get(self.learner.info.remote(), timeout=60)
                return True
            except (RayActorError, ActorUnavailableError, ray.exceptions.GetTimeoutError):
                return False

        def add_row(row: dict, reply: dict) -> None:
            nonlocal step, last_row, recorded, stop
            metrics.add(row)
            last_row, step, recorded = row, row["step"], row["step"]
            if self.on_reply is not None:
                self.on_reply(self, {**reply, "row": row, "step": row["step"]})
            if run.steps and step >= run.steps:
                stop = True

        def handle_reply(reply: dict) -> None:
            """A learner reply a worker brought back (its gradient's fate)."""
            nonlocal box, curriculum, checkpoint_step, last_flush
            if reply["generation"] != box[0]:
                return  # a reply of a replaced learner
            row = reply["row"]
            if row is not None and row["step"] <= recorded:
                row = None  # already fetched from the learner (below)
            newest = row["step"] - 1 if row is not None else reply["step"]
            if newest > recorded:
                # Rows that no reply brought here: the worker holding one died, or its
                # reply is later in this batch. The learner keeps them; take them in order.
                try:
                    missing_rows = ray.get(self.learner.rows_after.remote(recorded))
                except (RayActorError, ActorUnavailableError):
                    restart_learner()  # e.g. killed by a hook while handling this batch
                    return
                for missing in missing_rows:
                    if missing["step"] <= newest:
                        add_row(missing, reply)
            if row is not None:
                add_row(row, reply)
            elif self.on_reply is not None:
                self.on_reply(self, reply)
            if "curriculum" in reply:
                curriculum = reply["curriculum"]
            if reply["version"] > box[1]:
                box = [reply["generation"], reply["version"], None]  # theta fetched below
            if "checkpoint" in reply:
                checkpoint_step = reply["checkpoint"]
                metrics.write()
                last_flush = time.monotonic()

        while not stop and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if ready:  # take everything that is ready, not just the first
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            replies = []
            for ref in ready:
                index = pending.pop(ref)
                worker = self.workers[index]
                try:
                    reply = ray.get(ref)  # raises if the worker died or its truncation failed
                    successes += 1
                except (RayActorError, ActorUnavailableError, OutOfMemoryError):
                    # Died (crash, kill, node OOM killer): Ray restarts it.
                    self.worker_failures += 1
                    self._reseed(worker, restart_learner)
                    continue
                except RayTaskError as err:
                    self.worker_errors += 1
                    print(f"\nworker {index}: truncation failed: "
                          f"{str(err).strip().splitlines()[-1][:300]}", file=sys.stderr)
                    if successes == 0 and self.worker_errors > 2 * len(self.workers) + 2:
                        raise RuntimeError(f"every truncation fails; last error: {err}") from None
                    self._reseed(worker, restart_learner)
                    continue
                if reply.get("learner_lost"):
                    # The learner this worker pushed to is gone; replace it once.
                    if reply["generation"] == box[0] and not learner_alive():
                        restart_learner()
                else:
                    replies.append(reply)
            # In learner order, so rows arrive in step order and few need fetching.
            for reply in sorted(replies, key=lambda r: (r["step"], r["row"] is None)):
                handle_reply(reply)
            if box[2] is None:  # a new version: one theta copy shared by every worker
                box[2] = self.learner.get_theta.remote()
            if not stop:
                for index in sorted(set(range(len(self.workers))) - set(pending.values())):
                    pending[self.workers[index].compute.remote(box, curriculum,
                                                               self.learner)] = index
            if last_row is not None:
                elapsed = time.monotonic() - start
                progress.show(
                    f"step {step:6d} | meta-loss {last_row['meta_loss_rolling']:.4f} "
                    f"(vs task start {last_row['loss_vs_start_rolling']:+.4f}) | "
                    f"{last_row['grads_per_s']:6.2f} grads/s | staleness "
                    f"{last_row['staleness_mean']:4.2f} | dropped "
                    f"{last_row['dropped_stale']}/{last_row['dropped_nonfinite']} | "
                    f"U {last_row['unroll_min']}-{last_row['unroll_max']} | "
                    f"{elapsed / 60:5.1f} min", key=step)
            evaluation.poll(step, box, metrics)
            if time.monotonic() - last_flush > run.metrics_flush_s:
                metrics.write()
                last_flush = time.monotonic()
        progress.done()
        evaluation.finish(metrics)

        for worker in self.workers:
            ray.kill(worker, no_restart=True)  # their unsent gradients are not needed
        try:
            # Rows of updates whose replies were still with the workers.
            for row in ray.get(self.learner.rows_after.remote(recorded)):
                metrics.add(row)
            checkpoint_step = ray.get(self.learner.close.remote())
            final = ray.get(self.learner.info.remote())
        except (RayActorError, ActorUnavailableError):
            final = {}
            print("learner died at exit; the last checkpoint stands", file=sys.stderr)
        metrics.truncate(checkpoint_step)
        metrics.close()
        ray.kill(self.learner, no_restart=True)
        return RunSummary(
            run_dir=self.run_dir, start_step=start_step, final_step=checkpoint_step,
            rows=len(metrics.rows), wall_s=time.monotonic() - start,
            worker_failures=self.worker_failures, worker_errors=self.worker_errors,
            learner_restarts=self.learner_restarts, checkpoint_step=checkpoint_step,
            dropped_stale=final.get("dropped_stale", 0),
            dropped_nonfinite=final.get("dropped_nonfinite", 0),
            dropped_generation=final.get("dropped_generation", 0))

    def _reseed(self, worker, restart_learner) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            seed = ray.get(self.learner.new_stream_seeds.remote(1))[0]
        except (RayActorError, ActorUnavailableError):
            restart_learner()
            seed = ray.get(self.learner.new_stream_seeds.remote(1))[0]
        worker.reseed.remote(seed)


# Objects up to this size travel inline (gRPC) instead of through the shared-memory
# object store: a paper-size gradient (460 KB) then costs the learner ~4x less to
# receive (measured with ``metalearn bench learner``). On a cluster, pass the same
# setting to ``ray start --system-config``; see docs/training.md.
INLINE_OBJECT_BYTES = 1 << 20


def local_system_config() -> dict:
    return {"max_direct_call_object_size": INLINE_OBJECT_BYTES}


def init_ray(address: str) -> bool:
    """Join ``address`` or start a local Ray with every core; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 _system_config=local_system_config())
    return True


def prepare_run_dir(config: TrainConfig, run_dir: str, resume: bool) -> None:
    """Create the run folder and write config.yaml (validation already happened)."""
    from metalearn.training.checkpoint import atomic_write_bytes

    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    atomic_write_bytes(os.path.join(run_dir, CONFIG_FILE), config_to_yaml(config).encode())


def train(config: TrainConfig, run_dir: str, *, resume: bool = False,
          num_workers: int | None = None, on_reply=None) -> RunSummary:
    """Validate, start Ray if needed, run, shut Ray down if we started it."""
    started = init_ray(config.run.address)
    try:
        prepare_run_dir(config, run_dir, resume)
        return Trainer(config, run_dir, resume=resume, num_workers=num_workers,
                       on_reply=on_reply).run()
    finally:
        if started:
            import ray
            ray.shutdown()

