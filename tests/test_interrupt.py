"""`metalearn train` stopped by SIGINT or SIGTERM at a random moment: the final
checkpoint and metrics are written, the exit code says which signal, and a resume
continues at the step reached with no gap and no duplicate step in the metrics."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from metalearn.cli import main
from metalearn.training.checkpoint import Checkpointer
from metalearn.training.config import config_to_yaml
from metalearn.training.events import Ledger, read_events
from metalearn.training.metrics import read_metrics
from metalearn.training.run_dir import RunDir
from metalearn.training.segments import SegmentedTable
from train_helpers import tiny_config


def _start(config_file, run_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "metalearn.cli", "train", "--config", config_file,
         "--out", run_dir, "--address", "local", "--workers", "2", "--minutes", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_steps(proc, run: RunDir, steps: int, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.isdir(run.metrics):
            rows = SegmentedTable(run.metrics).read()
            if rows.num_rows >= steps:
                return
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no {steps} steps within {timeout_s} s: {proc.communicate()[1][-3000:]}")


def _steps(run: RunDir) -> list[int]:
    return read_metrics(run.path).column("step").to_pylist()


# Both in the slow set (45 s each): the default suite signals runs in tests/test_loop.py
# (a signal, a second signal) and interrupts a real driver in the short chaos run.
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_at_a_random_moment_stops_cleanly_and_resumes_without_a_gap(
        ray_session, tmp_path, sig):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(config_to_yaml(tiny_config(tmp_path)))
    run = RunDir(tmp_path / "run")
    proc = _start(str(config_file), run.path)
    _wait_for_steps(proc, run, 2)
    delay = random.uniform(0.0, 4.0)  # a random moment: between, or inside, updates
    time.sleep(delay)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=240)
    code = 128 + int(getattr(signal, sig))
    assert proc.returncode == code, f"delay {delay:.2f} s\n{err[-3000:]}"
    assert f"{sig} received: stopping" in err and f"stopped by {sig} at step" in err

    # The final checkpoint is the last step of the metrics, which has every step once.
    reached = Checkpointer(run.checkpoints, read_only=True).steps()[-1]
    assert reached >= 2
    assert _steps(run) == list(range(1, reached + 1)), f"delay {delay:.2f} s"
    assert f"stopped by {sig} at step {reached}" in err
    [start, signalled, end] = [e for e in read_events(run.path)
                               if e["event"] in ("session_start", "signal", "session_end")]
    assert (start["event"], signalled["signal"], end["stop_reason"]) == \
        ("session_start", sig, sig)
    ledger = Ledger(**end["ledger"])
    assert ledger.balanced() and ledger.replied > 0, end["ledger"]
    counters = end["learner_counters"]
    # meta_batch 2, one task a truncation: every step applied exactly two gradients, and
    # every gradient received is applied, dropped with a cause, or in the saved buffer.
    assert counters["applied"] == 2 * reached
    assert counters["received"] - counters["applied"] - counters["dropped_stale"] \
        - counters["dropped_nonfinite"] - counters["dropped_generation"] \
        - counters["after_stop"] in (0, 1)

    # Resume (in this process) and train two more steps: no gap, no duplicate.
    assert main(["train", "--resume", run.path, "--steps", str(reached + 2)]) == 0
    assert _steps(run) == list(range(1, reached + 3))
    assert Checkpointer(run.checkpoints, read_only=True).steps()[-1] == reached + 2
    sessions = [e for e in read_events(run.path) if e["event"] == "session_start"]
    assert [s["step"] for s in sessions] == [0, reached]


# The loop-level test of a second signal (tests/test_loop.py) is in the default suite;
# this one, through a real `metalearn train` process, is slow.
@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_the_run_still_resumes(ray_session, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(config_to_yaml(tiny_config(tmp_path)))
    run = RunDir(tmp_path / "run")
    proc = _start(str(config_file), run.path)
    _wait_for_steps(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    checkpoint = Checkpointer(run.checkpoints, read_only=True).steps()[-1]
    steps = _steps(run)
    assert steps[:checkpoint] == list(range(1, checkpoint + 1))  # all up to the checkpoint
    assert main(["train", "--resume", run.path, "--steps", str(checkpoint + 1)]) == 0
    assert _steps(run) == list(range(1, checkpoint + 2))
