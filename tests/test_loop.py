"""The training loop's protocol, without Ray: lost rows, dead workers and learners,
failing truncations, callbacks, signals (the in-process transport with injected faults)."""

import errno
import functools
import os
import signal

import pytest

from metalearn.training.local import InProcessLearner, InProcessWorkers, in_process_transport
from metalearn.training import learner_host
from metalearn.training.events import read_events
from metalearn.training.loop import (LEARNER_ATTEMPTS, Callback, ImmediateStop, LearnerFailed,
                                     LearnerLost, TrainingLoop)
from metalearn.training.messages import WorkerResult
from metalearn.training.metrics import read_metrics
from metalearn.training.run_dir import RunDir
from train_helpers import tiny_config


class LosesReplies(InProcessWorkers):
    """Drops the reply that carries the row of ``lose_step``, as if its worker died
    after pushing: the learner applied the update but the loop never saw the row."""

    def __init__(self, config, learner, mix, lose_step):
        super().__init__(config, learner, mix)
        self.lose_step, self.lost = lose_step, 0

    def collect(self, timeout_s):
        results = super().collect(timeout_s)
        out = []
        for result in results:
            reply = result.reply
            if reply is not None and reply.row is not None and reply.row["step"] == self.lose_step:
                self.lost += 1
                out.append(WorkerResult(result.index, died=True))
            else:
                out.append(result)
        return out


def make_loop(tmp_path, workers=InProcessWorkers, callbacks=(), **sections):
    config = tiny_config(tmp_path, **{"run": {"steps": 6, "minutes": 5.0},
                                      "worker": {"num_workers": 2, "batch_size": 8},
                                      **sections})
    run = RunDir(tmp_path / "run")
    run.create(config)
    transport = in_process_transport(config, run, workers=workers)
    return TrainingLoop(config, run, transport, callbacks=callbacks), run


def steps_of(run):
    return read_metrics(run.path).column("step").to_pylist()


def test_row_lost_with_a_worker_is_fetched_from_the_learner(tmp_path):
    seen = []

    class Rows(Callback):
        def on_row(self, loop, row):
            seen.append(row["step"])

    config = tiny_config(tmp_path, run={"steps": 5, "minutes": 5.0},
                         worker={"num_workers": 2, "batch_size": 8})
    run = RunDir(tmp_path / "run")
    run.create(config)
    transport = in_process_transport(config, run,
                                     workers=functools.partial(LosesReplies, lose_step=2))
    summary = TrainingLoop(config, run, transport, callbacks=[Rows()]).run()
    assert transport.workers.lost == 1 and summary.worker_failures == 1
    assert seen == [1, 2, 3, 4, 5]  # every row once, in step order
    assert steps_of(run) == [1, 2, 3, 4, 5]


def test_lost_learner_is_replaced_from_its_checkpoint(tmp_path):
    killed = []

    class KillLearner(Callback):
        def on_row(self, loop, row):
            if row["step"] == 3 and not killed:
                killed.append(loop.theta.generation)
                loop.learner.stop()

    loop, run = make_loop(tmp_path, callbacks=[KillLearner()],
                          learner={"meta_batch": 2, "checkpoint_minutes": 1e-5})
    summary = loop.run()
    assert summary.learner_restarts == 1 and summary.final_step == 6
    assert loop.theta.generation != killed[0]  # a new incarnation
    # Every update was checkpointed, so the replacement resumed at step 3: no step
    # is missing or repeated.
    assert steps_of(run) == [1, 2, 3, 4, 5, 6]


class ReplacementsDie(InProcessLearner):
    """The first ``deaths`` replacement learners die while they start (killed, or their
    node lost, before they answer)."""

    def __init__(self, config, run, deaths):
        super().__init__(config, run)
        self.deaths = deaths

    def start(self, resume):
        if resume and self.deaths:
            self.deaths -= 1
            raise LearnerLost("the learner did not start: killed")
        return super().start(resume)


class KillLearnerAt(Callback):
    def __init__(self, step):
        self.step, self.done = step, False

    def on_row(self, loop, row):
        if row["step"] == self.step and not self.done:
            self.done = True
            loop.learner.stop()


def test_a_replacement_that_dies_while_starting_is_started_again(tmp_path, monkeypatch):
    from metalearn.training import loop as loop_module

    monkeypatch.setattr(loop_module, "RESTART_BACKOFF_S", 0.0)
    config = tiny_config(tmp_path, run={"steps": 6, "minutes": 5.0},
                         worker={"num_workers": 2, "batch_size": 8},
                         learner={"meta_batch": 2, "checkpoint_minutes": 1e-5})
    run = RunDir(tmp_path / "run")
    run.create(config)
    transport = in_process_transport(
        config, run, learner=functools.partial(ReplacementsDie, deaths=LEARNER_ATTEMPTS - 1))
    summary = TrainingLoop(config, run, transport, callbacks=[KillLearnerAt(3)]).run()
    assert summary.learner_restarts == 1 and summary.final_step == 6
    assert steps_of(run) == [1, 2, 3, 4, 5, 6]
    failed = [e for e in read_events(run.path) if e["event"] == "learner_start_failed"]
    assert [e["attempt"] for e in failed] == list(range(1, LEARNER_ATTEMPTS))

    # One more death than attempts: the run stops with the cause, its checkpoint intact.
    run2 = RunDir(tmp_path / "run2")
    run2.create(config)
    transport = in_process_transport(
        config, run2, learner=functools.partial(ReplacementsDie, deaths=LEARNER_ATTEMPTS))
    with pytest.raises(LearnerLost, match="did not start: killed"):
        TrainingLoop(config, run2, transport, callbacks=[KillLearnerAt(3)]).run()
    last = run2.checkpoint_steps()[-1]
    assert last >= 1 and steps_of(run2)[:last] == list(range(1, last + 1))


def test_every_truncation_failing_stops_the_run(tmp_path):
    class Broken(InProcessWorkers):
        def start(self, count, seeds):
            started = super().start(count, seeds)
            for worker in self.workers:
                worker.run_truncation = lambda curriculum: 1 / 0
            return started

    loop, run = make_loop(tmp_path, Broken)
    with pytest.raises(RuntimeError, match="every truncation fails; last error: "
                                           "ZeroDivisionError"):
        loop.run()


def test_a_callback_can_stop_the_run(tmp_path):
    class StopAtTwo(Callback):
        def on_row(self, loop, row):
            if row["step"] == 2:
                loop.request_stop()

    loop, run = make_loop(tmp_path, callbacks=[StopAtTwo()])
    summary = loop.run()
    assert summary.final_step == summary.checkpoint_step == 2
    assert steps_of(run) == [1, 2]
    assert run.checkpoint_steps()[-1] == 2


def test_a_full_disk_stops_the_run_cleanly_with_the_last_good_checkpoint(tmp_path,
                                                                         monkeypatch):
    """A checkpoint that cannot be written (here theta_latest, after the orbax step)
    stops the run: no more work, no save retried, one line, the last good checkpoint
    intact, and the run resumes from it."""
    saves = []
    original = learner_host.save_run_theta

    def full_after_two(run, theta, rule, step):
        saves.append(step)
        if len(saves) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", run.theta)
        return original(run, theta, rule, step)

    monkeypatch.setattr(learner_host, "save_run_theta", full_after_two)
    loop, run = make_loop(tmp_path, run={"steps": 40, "minutes": 5.0},
                          learner={"checkpoint_minutes": 1e-6})
    with pytest.raises(LearnerFailed) as failed:
        loop.run()
    message = str(failed.value)
    # The orbax step of the third save is complete; its theta_latest is what failed.
    good = saves[2]
    assert message.startswith(f"checkpoint of step {good} was written but its "
                              f"theta_latest ({run.theta}) failed: [Errno 28] No space "
                              f"left on device"), message
    assert "\n" not in message
    assert message.endswith(f"the last good checkpoint is step {good}")
    assert len(saves) == 3  # never retried
    assert loop.stop_reason == "learner failed" and loop.step < 40
    assert steps_of(run)[:good] == list(range(1, good + 1))
    end = [e for e in read_events(run.path) if e["event"] == "session_end"][-1]
    assert end["stop_reason"] == "learner failed"
    monkeypatch.undo()
    resumed = TrainingLoop(loop.config, run, in_process_transport(loop.config, run),
                           resume=True)
    summary = resumed.run()
    assert summary.start_step == good
    assert steps_of(run) == list(range(1, summary.final_step + 1))


class SignalsAt(Callback):
    """Sends this process ``count`` SIGINTs when the row of ``step`` arrives (the loop
    runs in the main thread, where Python runs signal handlers)."""

    def __init__(self, step: int, count: int):
        self.step, self.count = step, count

    def on_row(self, loop, row):
        if row["step"] == self.step:
            for _ in range(self.count):
                os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_stops_the_run_with_a_final_checkpoint_and_it_resumes(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, for one
    loop, run = make_loop(tmp_path, callbacks=[SignalsAt(step=2, count=1)],
                          run={"steps": 40, "minutes": 5.0})
    summary = loop.run()
    assert summary.signal == "SIGINT" and loop.interrupted
    # What had arrived is applied and checkpointed: the final checkpoint is the last
    # step of the metrics, which hold every step once.
    reached = summary.final_step
    assert 2 <= reached < 40 and summary.checkpoint_step == reached
    assert run.checkpoint_steps()[-1] == reached
    assert steps_of(run) == list(range(1, reached + 1))
    events = [e["event"] for e in read_events(run.path)]
    assert events[0] == "session_start" and "signal" in events and events[-1] == "session_end"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    resumed = TrainingLoop(loop.config, run, in_process_transport(loop.config, run),
                           resume=True)
    after = resumed.run()
    assert after.start_step == reached and after.final_step == 40
    assert steps_of(run) == list(range(1, 41))


def test_a_second_signal_stops_at_once_and_the_run_still_resumes(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    loop, run = make_loop(tmp_path, callbacks=[SignalsAt(step=3, count=2)],
                          run={"steps": 40, "minutes": 5.0},
                          learner={"checkpoint_minutes": 1e-6})
    with pytest.raises(ImmediateStop):
        loop.run()
    assert loop.step < 40
    # No final checkpoint: the newest complete one is at most where the loop stopped,
    # and the metrics hold every step up to it once.
    last = run.checkpoint_steps()[-1]
    assert last <= loop.step
    assert steps_of(run)[:last] == list(range(1, last + 1))
    assert [e["event"] for e in read_events(run.path)][-1] == "immediate_stop"
    assert signal.getsignal(signal.SIGINT) is before
    after = TrainingLoop(loop.config, run, in_process_transport(loop.config, run),
                         resume=True).run()
    # A save that was in flight may complete before the resume reads the checkpoints.
    assert last <= after.start_step <= loop.step and after.final_step == 40
    assert steps_of(run) == list(range(1, 41))
