"""``audit_run``: what a run folder proves about the run that made it (``metalearn chaos``),
from its metrics, events log (``metalearn.training.events``), checkpoints and theta alone.

See docs/training.md (Chaos) for the checks and what each proves.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from metalearn.training.events import Ledger, read_events
from metalearn.training.export import load_theta
from metalearn.training.metrics import discarded_rows, read_metrics
from metalearn.training.run_dir import RunDir


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class AuditReport:
    run_dir: str
    checks: list[Check]
    figures: dict

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict:
        return {"run_dir": self.run_dir, "ok": self.ok, "figures": self.figures,
                "checks": [dataclasses.asdict(c) for c in self.checks]}

    def format(self) -> str:
        lines = [f"audit of {self.run_dir}: {'PASS' if self.ok else 'FAIL'}"]
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        lines.append("  figures: " + ", ".join(f"{k} {v}" for k, v in self.figures.items()))
        return "\n".join(lines)


def gradients_rolled_back(events: list[dict]) -> int:
    """Gradients a learner received and the run then lost with it: those after the
    checkpoint a replacement restored (``learner_restart``), and those after the last
    checkpoint of a learner that died at a session's exit (the next session resumes from
    that checkpoint).

    A dead learner's ``received`` is the newest its replies carried: the restart event's
    ``dead_received_seen``, raised by the session end's ``received_seen`` (replies handled
    after the event was written, e.g. later in the same batch).

    Args:
      events: the events log in order (``read_events``).
    """
    sessions: list[list[dict]] = [[]]  # each ends with its session_end (the last may not)
    for e in events:
        sessions[-1].append(e)
        if e["event"] == "session_end":
            sessions.append([])
    total = 0
    for index, session in enumerate(sessions):
        end = next((e for e in session if e["event"] == "session_end"), {})
        seen = {str(k): int(v) for k, v in (end.get("received_seen") or {}).items()}
        for e in session:
            if e["event"] == "learner_restart":
                dead = max(int(e["dead_received_seen"]), seen.get(e["dead_generation"], 0))
                total += max(0, dead - int(e["restored_counters"].get("received", 0)))
        resumed = next((e for e in sessions[index + 1] if e["event"] == "session_start"),
                       {}) if index + 1 < len(sessions) else {}
        if end.get("learner_died_at_exit") and "learner_counters" in resumed:
            total += max(0, seen.get(end["generation"], 0)
                         - int(resumed["learner_counters"].get("received", 0)))
    return total


def _steps(steps: list[int], final: int) -> Check:
    """The metrics hold steps 1..``final`` (the last checkpoint's), each once."""
    duplicates = len(steps) - len(set(steps))
    missing = sorted(set(range(1, final + 1)) - set(steps))
    return Check("steps", steps == list(range(1, final + 1)),
                 f"{len(steps)} rows for steps 1..{final}; {duplicates} duplicates, "
                 f"{len(missing)} missing{' ' + str(missing[:10]) if missing else ''}"
                 f"{'; rows beyond the checkpoint' if steps and steps[-1] > final else ''}")


def _gradients(counters: dict, ledgers: list[Ledger], rolled_back: int, tasks: int,
               batch: int) -> Check:
    """Every gradient received is applied, dropped with a cause or buffered, and the
    drivers' replies match what the learners received (with what was rolled back)."""
    accounted = sum(int(counters.get(k, 0)) for k in (
        "applied", "dropped_stale", "dropped_nonfinite", "dropped_generation", "after_stop"))
    received = int(counters.get("received", 0))
    buffered = received - accounted
    replied = tasks * sum(ledger.replied for ledger in ledgers)
    unsure = tasks * sum(ledger.worker_died + ledger.learner_gone + ledger.cut_at_stop
                         for ledger in ledgers)
    return Check("gradients", bool(0 <= buffered < batch + tasks
                                   and replied <= received + rolled_back <= replied + unsure),
                 f"received {received} = applied {counters.get('applied')} + stale "
                 f"{counters.get('dropped_stale')} + non-finite "
                 f"{counters.get('dropped_nonfinite')} + old generation "
                 f"{counters.get('dropped_generation')} + after stop "
                 f"{counters.get('after_stop')} + buffered {buffered}; drivers' replies "
                 f"{replied} <= received + rolled back {rolled_back} = "
                 f"{received + rolled_back} <= replies + unknown outcomes {unsure}")


def _lost_work(run: RunDir, config, steps: list[int], restarts: list[dict],
               discarded: list[dict]) -> tuple[Check, list[float]]:
    """Each learner kill lost at most one checkpoint interval (plus the longest update
    and 30 s) of training time; also the lost intervals, in seconds."""
    walls = read_metrics(run.path).column("wall_s").to_pylist() if steps else []
    wall_at = dict(zip(steps, walls))
    longest_update = float(max(np.diff(walls), default=0.0)) if len(walls) > 1 else 0.0
    bound = config.learner.checkpoint_minutes * 60.0 + longest_update + 30.0
    lost = []
    for e in restarts:
        # The training time between the checkpoint restored and the dead learner's last
        # update: its rows kept in discarded/, or the last one the driver saw.
        reason = f"learner restored from checkpoint step {e['restored_step']}"
        ends_at = [r["wall_s"] for r in discarded if r.get("discarded_reason") == reason]
        if e.get("last_wall_s_seen") is not None and e["rolled_back_steps"] > 0:
            ends_at.append(float(e["last_wall_s_seen"]))
        start = wall_at.get(e["restored_step"], 0.0 if e["restored_step"] == 0 else None)
        lost.append(max(ends_at) - start if ends_at and start is not None else 0.0)
    return Check("lost_work", all(s <= bound for s in lost),
                 f"{len(restarts)} learner restarts lost "
                 f"{[e['rolled_back_steps'] for e in restarts]} steps over "
                 f"{[round(s, 1) for s in lost]} s (bound {bound:.0f} s: one checkpoint "
                 f"interval + the longest update + 30 s)"), lost


def _figures(final: int, events: list[dict], discarded: int, lost_intervals: list[float],
             ledgers: list[Ledger], counters: dict) -> dict:
    """What the run survived and lost, for the report."""
    restarts = [e for e in events if e["event"] == "learner_restart"]
    return {
        "final_step": final,
        "sessions": sum(e["event"] == "session_start" for e in events),
        "worker_deaths": sum(e["event"] == "worker_died" for e in events),
        "learner_restarts": len(restarts),
        "updates_rolled_back": sum(int(e["rolled_back_steps"]) for e in restarts),
        "rows_discarded": discarded,
        "max_lost_interval_s": round(max(lost_intervals, default=0.0), 1),
        "orders_lost_worker_died": sum(ledger.worker_died for ledger in ledgers),
        "orders_lost_learner_gone": sum(ledger.learner_gone for ledger in ledgers),
        "orders_cut_at_stop": sum(ledger.cut_at_stop for ledger in ledgers),
        "orders_failed": sum(ledger.truncation_failed for ledger in ledgers),
        "gradients_dropped_generation": int(counters.get("dropped_generation", 0)),
        "gradients_dropped_stale": int(counters.get("dropped_stale", 0)),
    }


def audit_run(run_dir: str | os.PathLike) -> AuditReport:
    """Audit the run folder ``run_dir``: the checks ``steps``, ``no_update_twice``,
    ``sessions``, ``orders``, ``gradients``, ``lost_work`` and ``theta_finite``
    (docs/training.md, Chaos, says what each proves), and figures: kills survived,
    updates rolled back, the longest lost interval, orders and gradients lost by cause."""
    run = RunDir(run_dir)
    config = run.read_config()
    checks: list[Check] = []
    add = lambda name, ok, detail: checks.append(Check(name, bool(ok), detail))  # noqa: E731

    steps = read_metrics(run.path).column("step").to_pylist()
    final = max(run.checkpoint_steps(), default=0)
    checks.append(_steps(steps, final))

    events = read_events(run.path)
    starts = [e for e in events if e["event"] == "session_start"]
    ends = [e for e in events if e["event"] == "session_end"]
    restarts = [e for e in events if e["event"] == "learner_restart"]
    sessions_ok = len(starts) == len(ends) and all(
        s["step"] == (ends[i - 1]["step"] if i else 0) for i, s in enumerate(starts))
    add("sessions", sessions_ok and (not ends or ends[-1]["step"] == final),
        f"{len(starts)} sessions started at steps {[s['step'] for s in starts]}, ended at "
        f"{[e['step'] for e in ends]} ({', '.join(e['stop_reason'] for e in ends)})")

    ledgers = [Ledger(**e["ledger"]) for e in ends]
    add("orders", ledgers and all(ledger.balanced() for ledger in ledgers),
        "; ".join(f"session {i}: {ledger.dispatched} dispatched = {ledger.replied} replied + "
                  f"{ledger.worker_died} worker died + {ledger.truncation_failed} failed + "
                  f"{ledger.learner_gone} learner gone + {ledger.cut_at_stop} cut at stop"
                  for i, ledger in enumerate(ledgers)))

    counters = ends[-1]["learner_counters"] if ends else {}
    tasks = config.worker.tasks_per_worker
    batch = config.learner.meta_batch
    applied = int(counters.get("applied", -1))
    add("no_update_twice", applied == batch * final if tasks == 1 else applied >= batch * final,
        f"learner applied {applied} gradients in {final} updates of meta_batch {batch}")

    checks.append(_gradients(counters, ledgers, gradients_rolled_back(events), tasks, batch))
    discarded = discarded_rows(run.path)
    lost_check, lost_intervals = _lost_work(run, config, steps, restarts, discarded)
    checks.append(lost_check)

    theta, _, theta_step = load_theta(run.theta)  # the newest theta, not the best
    finite = all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in jax.tree.leaves(theta))
    add("theta_finite", finite and theta_step == final,
        f"theta_latest at step {theta_step}: {'finite' if finite else 'NOT finite'}")

    return AuditReport(run.path, checks, _figures(final, events, len(discarded),
                                                  lost_intervals, ledgers, counters))


__all__ = ["AuditReport", "Check", "audit_run", "gradients_rolled_back"]
