"""``metalearn chaos``: train on a local multi-node Ray cluster while breaking it on the
schedule of ``ChaosPlan``, then audit the run folder (``metalearn.training.audit``).

See docs/training.md (Chaos).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Callable

import psutil
import ray._private.ray_constants as ray_constants
from ray.cluster_utils import Cluster

from metalearn.core.config_io import ConfigError
from metalearn.training.audit import AuditReport, audit_run
from metalearn.training.events import read_events
from metalearn.training.run_dir import RunDir

KILL_RETRY_S = 2.0  # a scheduled kill that found no live actor is tried again this soon
RESUME_START_MAX_S = 45.0  # the most a resumed session is given to start, beyond its budget


@dataclasses.dataclass(frozen=True)
class ChaosPlan:
    minutes: float = 30.0
    worker_kill_s: float = 30.0
    learner_kill_s: float = 300.0
    node_loss_at: float = 0.4  # fraction of the run's time
    interrupt_at: float = 0.6
    nodes: int = 2
    cpus_per_node: int = 1
    config: str = "smoke"
    checkpoint_minutes: float = 1.0
    seed: int = 0
    overrides: tuple[str, ...] = ()

    def validate(self) -> None:
        if not self.minutes > 0:
            raise ConfigError(f"--minutes must be positive, got {self.minutes}")
        for name in ("worker_kill_s", "learner_kill_s", "checkpoint_minutes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("node_loss_at", "interrupt_at"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a fraction in (0, 1), "
                                  f"got {getattr(self, name)}")
        if self.nodes < 2:
            raise ConfigError(f"--nodes must be >= 2 (one is removed), got {self.nodes}")


def _descendants_titled(roots: list[int], title: str) -> list[psutil.Process]:
    found = []
    for pid in roots:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if cmdline and cmdline[0].startswith(title):
                found.append(child)
    return found


@dataclasses.dataclass
class _Schedule:
    """When each chaos action is next due (``time.monotonic()`` seconds; None: done)."""

    end: float  # the chaos budget: no kills from here on
    worker: float
    learner: float
    node_loss: float | None
    interrupt: float | None

    @classmethod
    def starting(cls, plan: ChaosPlan, started: float) -> _Schedule:
        total_s = plan.minutes * 60.0
        return cls(started + total_s, started + plan.worker_kill_s,
                   started + plan.learner_kill_s, started + plan.node_loss_at * total_s,
                   started + plan.interrupt_at * total_s)

    def shift(self, seconds: float) -> None:
        """Postpone everything still due by ``seconds`` (the clock stood still)."""
        for field in dataclasses.fields(self):
            if (value := getattr(self, field.name)) is not None:
                setattr(self, field.name, value + seconds)


class ChaosRun:
    """One chaos run in ``out``: the run folder ``run``, ``chaos.jsonl`` (every action),
    ``driver-<n>.log`` (each driver session's output) and ``audit.json``
    (docs/training.md, Chaos)."""

    def __init__(self, plan: ChaosPlan, out: str, log: Callable[[str], None] = print):
        plan.validate()
        self.plan = plan
        self.out = os.path.abspath(out)
        self.run_dir = os.path.join(self.out, "run")
        self.log = log
        self.rng = random.Random(plan.seed)
        self.cluster = None
        self.worker_nodes: list = []
        self.sessions = 0
        self.proc: subprocess.Popen | None = None  # the newest driver session
        self.counts = {"worker_kills": 0, "learner_kills": 0, "nodes_removed": 0,
                       "interrupts": 0, "worker_kill_misses": 0}

    # ------------------------------------------------------------------ records

    def _record(self, action: str, **fields) -> None:
        entry = {"action": action, "time": round(time.time(), 3), **fields}
        with open(os.path.join(self.out, "chaos.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.log(f"chaos: {action} " + " ".join(f"{k}={v}" for k, v in fields.items()))

    # ------------------------------------------------------------------ the cluster

    def _start_cluster(self) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        self.worker_nodes = [self.cluster.add_node(num_cpus=self.plan.cpus_per_node)
                             for _ in range(self.plan.nodes)]
        self.cluster.wait_for_nodes()
        self._record("cluster", address=self.cluster.address, nodes=self.plan.nodes)

    def _raylet_pids(self) -> list[int]:
        return [info.process.pid for node in [self.cluster.head_node, *self.worker_nodes]
                for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])]

    # ------------------------------------------------------------------ the driver

    def _driver(self, minutes: float, resume: bool) -> subprocess.Popen:
        self.sessions += 1
        args = [sys.executable, "-m", "metalearn.cli", "train", "--address",
                self.cluster.address, "--minutes", f"{minutes:.3f}"]
        if resume:
            args += ["--resume", self.run_dir]
        else:
            args += ["--config", self.plan.config, "--out", self.run_dir,
                     "--workers", str(self.plan.nodes * self.plan.cpus_per_node),
                     "--set", f"learner.checkpoint_minutes={self.plan.checkpoint_minutes}",
                     "--set", "run.metrics_flush_s=2", "--set", "evaluator.enabled=false"]
            for override in self.plan.overrides:
                args += ["--set", override]
        log = open(os.path.join(self.out, f"driver-{self.sessions}.log"), "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": self.cluster.address}
        proc = self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)
        self._record("driver_start", session=self.sessions, pid=proc.pid, minutes=minutes,
                     resume=resume)
        return proc

    def _wait_training(self, proc: subprocess.Popen, timeout_s: float = 300.0,
                       first_row: bool = False) -> None:
        """Until the session has started training (its ``session_start`` event) and,
        with ``first_row``, the learner has written its first metrics row: the chaos
        clock starts there, so that a cold compilation cache (a fresh machine compiles
        for a minute) is not what the kills interrupt."""
        deadline = time.monotonic() + timeout_s
        starts = lambda: sum(e["event"] == "session_start"  # noqa: E731
                             for e in read_events(self.run_dir))
        metrics = os.path.join(self.run_dir, RunDir.METRICS)
        while time.monotonic() < deadline and proc.poll() is None:
            if (os.path.isdir(self.run_dir) and starts() >= self.sessions
                    and (not first_row or os.path.isdir(metrics) and os.listdir(metrics))):
                return
            time.sleep(1.0)
        raise RuntimeError(f"driver session {self.sessions} did not start training "
                           f"(exit {proc.poll()}); see {self.out}/driver-{self.sessions}.log")

    # ------------------------------------------------------------------ the actions

    def _kill(self, title: str, counter: str) -> bool:
        """SIGKILL one live actor process of this kind; False if there was none."""
        victims = _descendants_titled(self._raylet_pids(), title)
        if not victims:
            self.counts["worker_kill_misses"] += 1
            self._record("kill_missed", target=title)
            return False
        victim = self.rng.choice(victims)
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.Error:
            self.counts["worker_kill_misses"] += 1
            return False
        self.counts[counter] += 1
        self._record("kill", target=title, pid=victim.pid)
        return True

    def _remove_node(self) -> None:
        victim = self.worker_nodes.pop(self.rng.randrange(len(self.worker_nodes)))
        self.cluster.remove_node(victim, allow_graceful=False)
        self.worker_nodes.append(self.cluster.add_node(num_cpus=self.plan.cpus_per_node))
        self.counts["nodes_removed"] += 1
        self._record("node_removed", node=victim.node_id)

    def _interrupt(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGINT)
        self._record("interrupt", pid=proc.pid)
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError("the driver did not stop within 600 s of SIGINT")
        self.counts["interrupts"] += 1
        self._record("driver_exit", session=self.sessions, code=code)
        if code != 130:
            raise RuntimeError(f"the interrupted driver exited {code}, not 130; see "
                               f"{self.out}/driver-{self.sessions}.log")

    # ------------------------------------------------------------------ the run

    def run(self) -> AuditReport:
        os.makedirs(self.out, exist_ok=True)
        if os.path.exists(self.run_dir):
            raise ConfigError(f"{self.run_dir} exists; give chaos a new --out")
        self._start_cluster()
        try:
            code = self._sessions().wait()
            self._record("driver_exit", session=self.sessions, code=code)
            if code != 0:
                raise RuntimeError(f"the last driver session exited {code}; see "
                                   f"{self.out}/driver-{self.sessions}.log")
        finally:
            proc = self.proc  # the newest session's driver, if one started
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=300)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.cluster.shutdown()
        report = audit_run(self.run_dir)
        report.figures.update({f"chaos_{k}": v for k, v in self.counts.items()})
        with open(os.path.join(self.out, "audit.json"), "w") as f:
            json.dump(report.as_dict(), f, indent=1)
        return report

    def _sessions(self) -> subprocess.Popen:
        """Start the first session, act on the plan's schedule (resuming once after the
        interrupt) until the last session ends by itself; returns its driver."""
        plan = self.plan
        # The first session is always interrupted (interrupt_at < 1); its budget also
        # covers the wait for its first row, so that it is still running then.
        first_row_timeout_s = 300.0
        launched = time.monotonic()
        proc = self._driver(plan.minutes + first_row_timeout_s / 60.0, resume=False)
        self._wait_training(proc, timeout_s=first_row_timeout_s, first_row=True)
        due = _Schedule.starting(plan, time.monotonic())
        # A session's budget counts from its launch; the resumed one gets as long again
        # to start as the first took (at most 45 s: the first also compiled), so that its
        # training time is what remains.
        startup_s = min(time.monotonic() - launched, RESUME_START_MAX_S)
        while proc.poll() is None or due.interrupt is not None:
            now = time.monotonic()
            if due.interrupt is not None and now >= due.interrupt:
                self._interrupt(proc)
                due.interrupt = None
                remaining = max(0.5, (due.end - time.monotonic()) / 60.0)
                proc = self._driver(remaining + startup_s / 60.0, resume=True)
                self._wait_training(proc)
                # The clock stops while no session trains (the interrupted one's
                # shutdown, the next one's start: tens of seconds on a busy machine), so
                # the kills planned for training time still happen.
                due.shift(time.monotonic() - now)
                continue
            self._act(due, now)
            time.sleep(0.5)
        return proc

    def _act(self, due: _Schedule, now: float) -> None:
        """The node loss and the kills that are due at ``now``."""
        if due.node_loss is not None and now >= due.node_loss:
            self._remove_node()
            due.node_loss = None
        # No kills after the budget: the last session then ends (its final checkpoint)
        # undisturbed. A learner killed in that shutdown is repaired only by a next
        # resume, which the last session does not have.
        if now >= due.end:
            return
        # A kill that finds no live actor (one restarting, a session starting) is tried
        # again shortly, so that a slow machine gets the planned number.
        for kind, title in (("worker", "ray::WorkerActor"), ("learner", "ray::LearnerActor")):
            if now >= (at := getattr(due, kind)):
                killed = self._kill(title, f"{kind}_kills")
                every_s = getattr(self.plan, f"{kind}_kill_s")
                setattr(due, kind, at + every_s if killed else now + KILL_RETRY_S)


__all__ = ["ChaosPlan", "ChaosRun"]
