"""LearnerHost's checkpoints: off the critical path, and a failed save stops the run
cleanly (one line in every reply, no retry, the last good checkpoint intact)."""

import errno
import os
import time

import numpy as np
import pytest

import metalearn.training.learner_host as learner_host
from metalearn.training.checkpoint import Checkpointer
from metalearn.training.export import load_theta
from metalearn.training.learner_host import LearnerHost
from metalearn.training.messages import Submission
from metalearn.training.run_dir import RunDir
from test_checkpoint import failing_json_writes, partial_folders, slow_json_writes
from train_helpers import tiny_config


def make_host(tmp_path, resume=False):
    config = tiny_config(tmp_path, learner={"meta_batch": 1, "max_staleness": 1000,
                                            "checkpoint_minutes": 10.0})
    run = RunDir(tmp_path / "run")
    if not resume:
        run.create(config)
    return LearnerHost(config, run, resume=resume)


def push(host, force_checkpoint=False):
    """One gradient (meta_batch 1: one update); ``force_checkpoint``: the checkpoint
    interval has passed."""
    if force_checkpoint:
        host.last_checkpoint = -1e9
    learner = host.learner
    grad = np.full(learner.num_params, 1e-3, np.float32)
    start = time.perf_counter()
    reply = host.submit(Submission(grad, learner.version, learner.generation, loss=1.0))
    return reply, time.perf_counter() - start


def test_a_periodic_checkpoint_does_not_block_ingest(tmp_path, monkeypatch):
    host = make_host(tmp_path)
    assert host.checkpoint() == 0
    for _ in range(3):
        push(host)
    theta_written = []
    original = learner_host.save_run_theta

    def record(run, theta, rule, step):  # theta_latest only once the orbax step is whole
        theta_written.append((step, RunDir(run.path).checkpoint_steps(), time.perf_counter()))
        return original(run, theta, rule, step)

    monkeypatch.setattr(learner_host, "save_run_theta", record)
    slow_json_writes(monkeypatch, 1.5)
    start = time.perf_counter()
    reply, took = push(host, force_checkpoint=True)
    assert took < 0.75, took  # the 1.5 s write happens in the background
    assert reply.step == 4 and reply.checkpoint is None and reply.fatal == ""
    assert host.checkpointer.in_flight == 4
    # Gradients keep being applied while it is written; the next interval's save is
    # postponed (not waited for) while one is in flight.
    during = []
    while host.checkpointer.in_flight is not None and time.perf_counter() - start < 20:
        reply, took = push(host, force_checkpoint=True)
        during.append(took)
        if reply.checkpoint is not None:
            break
        time.sleep(0.05)
    assert reply.checkpoint == 4  # the first reply after the save completed reports it
    assert len(during) >= 10 and max(during[:-1]) < 0.75, during
    assert host.learner.step == 4 + len(during)
    (step, on_disk, at), = [w for w in theta_written if w[0] == 4]
    assert 4 in on_disk and at - start >= 1.5
    assert reply.received == host.learner.counters["received"] == 4 + len(during)
    final = host.close()
    assert final == host.learner.step and load_theta(host.run.path)[2] == final
    assert RunDir(host.run.path).checkpoint_steps()[-1] == final


@pytest.mark.parametrize("where", ["background", "synchronous"])
def test_a_full_disk_is_fatal_once_and_close_keeps_the_last_good_step(tmp_path, monkeypatch,
                                                                        where):
    host = make_host(tmp_path)
    host.checkpoint()
    for _ in range(3):
        push(host)
    assert host.checkpoint() == 3
    push(host)
    attempts = []
    original_save = Checkpointer.save

    def counted(self, step, *args, **kwargs):
        attempts.append(step)
        return original_save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", counted)
    if where == "background":
        refused = failing_json_writes(monkeypatch, errno.ENOSPC)
    else:
        refused = [host.run.checkpoints]

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", refused[0])

        monkeypatch.setattr(host.checkpointer.manager, "save", full)
    replies = [push(host, force_checkpoint=True)[0]]  # step 5: the save starts
    deadline = time.monotonic() + 20
    while not replies[-1].fatal and time.monotonic() < deadline:
        replies.append(push(host, force_checkpoint=True)[0])
    for _ in range(3):  # every later reply says so; no save is tried again
        replies.append(push(host, force_checkpoint=True)[0])
    expected = (f"checkpoint of step 5 failed: [Errno 28] No space left on device "
                f"({refused[0]}); the last good checkpoint is step 3")
    assert attempts == [5]
    assert replies[-1].fatal == expected and "\n" not in expected
    assert all(r.fatal == expected for r in replies if r.fatal)
    assert all(r.checkpoint is None for r in replies)
    assert [r.received for r in replies] == list(range(5, 5 + len(replies)))
    status = host.status()
    assert status.fatal == expected and status.step == 5 + len(replies) - 1
    assert host.checkpoint() == 3 and host.close() == 3 and attempts == [5]
    assert RunDir(host.run.path).checkpoint_steps() == [0, 3]
    assert not partial_folders(host.run.checkpoints)
    assert load_theta(host.run.path)[2] == 3  # theta_latest follows the good checkpoint
    monkeypatch.undo()
    resumed = make_host(tmp_path, resume=True)
    assert resumed.restored_step == 3 and resumed.learner.step == 3
    assert resumed.warnings == () and resumed.fatal == ""
    resumed.close()


def test_metrics_rows_that_cannot_be_written_are_fatal_too(tmp_path, monkeypatch):
    host = make_host(tmp_path)
    host.checkpoint()
    push(host)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", host.run.metrics)

    monkeypatch.setattr(host.metric_rows, "flush", full)
    reply, _ = push(host, force_checkpoint=True)  # rows first: then no checkpoint
    assert reply.fatal == (f"metrics rows up to step 2 could not be written to "
                           f"{host.run.metrics}: [Errno 28] No space left on device "
                           f"({host.run.metrics}); the last good checkpoint is step 0")
    assert host.close() == 0 and RunDir(host.run.path).checkpoint_steps() == [0]


def test_resume_moves_a_corrupt_newest_checkpoint_aside(tmp_path):
    host = make_host(tmp_path)
    host.checkpoint()
    push(host)
    push(host)
    assert host.close() == 2
    meta = os.path.join(host.run.checkpoints, "2", "meta", "metadata")
    with open(meta, "w") as f:
        f.write("{garbled")
    resumed = make_host(tmp_path, resume=True)
    assert resumed.restored_step == 0
    [warning] = resumed.warnings[:1]
    assert "checkpoints/2 is unreadable (JSONDecodeError" in warning
    assert "falling back to step 0; moved to" in warning
    assert RunDir(host.run.path).checkpoint_steps() == [0]
    push(resumed)
    push(resumed)
    assert resumed.close() == 2  # step 2 again; the corrupt copy is still there
    names = os.listdir(host.run.checkpoints)
    assert sorted(n for n in names if n.isdigit()) == ["0", "2"]
    assert len([n for n in names if n.startswith("corrupt-2-")]) == 1


def test_a_theta_latest_that_cannot_be_written_is_fatal_after_a_good_checkpoint(
        tmp_path, monkeypatch):
    host = make_host(tmp_path)
    host.checkpoint()
    push(host)

    def full(run, theta, rule, step):
        raise OSError(errno.ENOSPC, "No space left on device", run.theta)

    monkeypatch.setattr(learner_host, "save_run_theta", full)
    reply, _ = push(host, force_checkpoint=True)
    deadline = time.monotonic() + 20
    while not reply.fatal and time.monotonic() < deadline:
        reply, _ = push(host)
    assert reply.fatal == (f"checkpoint of step 2 was written but its theta_latest "
                           f"({host.run.theta}) failed: [Errno 28] No space left on device "
                           f"({host.run.theta}); the last good checkpoint is step 2")
    assert host.close() == 2 and RunDir(host.run.path).checkpoint_steps() == [0, 2]
    assert load_theta(host.run.path)[2] == 0  # the previous theta_latest, whole
