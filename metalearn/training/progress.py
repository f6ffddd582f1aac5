"""The live progress line of a training run (a loop callback; the CLI adds it)."""

from __future__ import annotations

import sys
import time

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
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class ProgressLine(Callback):
    """Shows the newest metrics row every ``run.progress_every_s``."""

    def __init__(self, every_s: float, stream=sys.stderr):
        self.progress = Progress(every_s, stream)

    def on_tick(self, loop: TrainingLoop) -> None:
        row = loop.last_row
        if row is None:
            return
        self.progress.show(
            f"step {loop.step:6d} | meta-loss {row['meta_loss_rolling']:.4f} "
            f"(vs task start {row['loss_vs_start_rolling']:+.4f}) | "
            f"{row['grads_per_s']:6.2f} grads/s | staleness "
            f"{row['staleness_mean']:4.2f} | dropped "
            f"{row['dropped_stale']}/{row['dropped_nonfinite']} | "
            f"U {row['unroll_min']}-{row['unroll_max']} | "
            f"{loop.elapsed_s() / 60:5.1f} min", key=loop.step)

    def on_end(self, loop: TrainingLoop) -> None:
        self.progress.done()


__all__ = ["Progress", "ProgressLine"]
