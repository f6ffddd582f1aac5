"""The live progress line of a training run (a loop callback; the CLI adds it)."""

from __future__ import annotations

import sys
import time

from metalearn.core.full_horizon import FULL_HORIZON_ESTIMATORS
from metalearn.training.loop import Callback, TrainingLoop


class Progress:
    """A rate-limited status line: rewritten in place on a terminal, one line a step in logs."""

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
        self.stream.write("\r\033[K" + text if self.tty else text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def short_name(dataset: str) -> str:
    """fashion_mnist -> fm, two_moons -> tm, digits -> digits (a progress-line label)."""
    parts = [p for p in dataset.replace(":", "_").replace("/", "_").split("_") if p]
    return "".join(p[0] for p in parts) if len(parts) > 1 else dataset[:8]


def unroll_text(config, row: dict) -> str:
    """What one worker task runs: ``U 2-4`` (truncations per unroll, the curriculum's
    range) for the truncated estimators, ``T 100`` (inner steps of one whole run) for the
    full-horizon ones, whose curriculum is unused."""
    if config.estimator.kind in FULL_HORIZON_ESTIMATORS:
        return f"T {config.horizon.steps}"
    return f"U {row['unroll_min']}-{row['unroll_max']}"


def long_horizon_text(latest: dict, datasets=()) -> str:
    """`` | fm@1000 0.452 r9`` from the newest evaluation columns ``latest``: accuracy and
    rank90 at the largest horizon measured, for the first of ``datasets`` (config order)
    that has long-horizon columns; empty when there are none yet."""
    found: dict[str, dict[int, float]] = {}
    for column, value in latest.items():
        parts = column.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2].startswith("accuracy@"):
            found.setdefault(parts[1], {})[int(parts[2].split("@")[1])] = value
    order = [d for d in datasets if d in found] + sorted(set(found) - set(datasets))
    if not order:
        return ""
    name = order[0]
    horizon = max(found[name])
    accuracy = found[name][horizon]
    rank = latest.get(f"eval/{name}/rank90@{horizon}")
    rank_text = f" r{rank:.0f}" if isinstance(rank, (int, float)) and rank == rank else ""
    return f" | {short_name(name)}@{horizon} {accuracy:.3f}{rank_text}"


class ProgressLine(Callback):
    """Shows the newest metrics row every ``run.progress_every_s``, with the newest
    long-horizon evaluation (``long_horizon_text``) and the best so far
    (``fmv@1000 0.452 r9 best 0.561 @40``) when the run has one."""

    def __init__(self, every_s: float, stream=sys.stderr):
        self.progress = Progress(every_s, stream)

    def on_tick(self, loop: TrainingLoop) -> None:
        row = loop.last_row
        if row is None:
            return
        evaluator = loop.config.evaluator
        held_out = long_horizon_text(loop.metrics.latest_evaluation(),
                                     evaluator.long_names() or evaluator.datasets)
        held_out += loop.best.text() if held_out else ""
        self.progress.show(
            f"step {loop.step:6d} | meta-loss {row['meta_loss_rolling']:.4f} "
            f"(vs task start {row['loss_vs_start_rolling']:+.4f}) | "
            f"{row['grads_per_s']:6.2f} grads/s | staleness "
            f"{row['staleness_mean']:4.2f} | dropped "
            f"{row['dropped_stale']}/{row['dropped_nonfinite']} | "
            f"{unroll_text(loop.config, row)}{held_out} | "
            f"{loop.elapsed_s() / 60:5.1f} min", key=loop.step)

    def on_end(self, loop: TrainingLoop) -> None:
        self.progress.done()


__all__ = ["Progress", "ProgressLine", "long_horizon_text", "short_name", "unroll_text"]
