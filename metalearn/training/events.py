"""``<run>/events.jsonl``: what happened to a run (docs/training.md, Run folder), one JSON
object per line. Events are small and rare, so each line is appended and fsynced at once:
after any crash the file says what happened up to it (``metalearn chaos`` checks a run
from it), and a last line torn by the crash is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

EVENTS = "events.jsonl"


def append_event(run_path: str, kind: str, **fields) -> dict:
    """Append one event (``kind`` plus ``fields`` and the wall time) and fsync it."""
    event = {"event": kind, "time": round(time.time(), 3), **fields}
    line = json.dumps(event, sort_keys=True, default=str) + "\n"
    with open(os.path.join(run_path, EVENTS), "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return event


def read_jsonl(path: str) -> list[dict]:
    """Every complete line of a JSON-lines log, in order (none if there is no file); a
    last line torn by a crash or a killed process is left out."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_events(run_path: str) -> list[dict]:
    """Every complete event of the run, in order (none if it has no log)."""
    return read_jsonl(os.path.join(run_path, EVENTS))


@dataclasses.dataclass
class Ledger:
    """What became of every work order a session handed out (one truncation each).

    ``dispatched == replied + worker_died + truncation_failed + learner_gone +
    cut_at_stop`` at the end of a session (``balanced``): every order has an outcome.
    A replied order's gradient reached the learner, which accounts for it in its own
    counters (applied, stale, non-finite, old generation, after the stop, or buffered).
    """

    dispatched: int = 0
    replied: int = 0
    worker_died: int = 0  # the worker process died (killed, crashed, node lost)
    truncation_failed: int = 0  # the truncation raised (reported, worker reseeded)
    learner_gone: int = 0  # the push found no learner (it was being replaced)
    cut_at_stop: int = 0  # still computing when the session stopped its workers
    lost_worker: int = 0  # workers that could not restart

    def balanced(self) -> bool:
        return self.dispatched == (self.replied + self.worker_died + self.truncation_failed
                                   + self.learner_gone + self.cut_at_stop)


__all__ = ["EVENTS", "Ledger", "append_event", "read_events", "read_jsonl"]
