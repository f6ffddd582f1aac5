"""Orbax checkpoints of the learner: exact resume, crash-cut and unreadable steps,
asynchronous saves, disk-full and permission errors, corruption vs the environment."""

import errno
import glob
import os
import shutil
import subprocess
import time
import uuid
import warnings

import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from metalearn.core.theta import theta_spec
from metalearn.training.checkpoint import (CheckpointReadError, CheckpointSaveError,
                                           CheckpointWarning, Checkpointer, is_corruption,
                                           is_environmental)
from metalearn.training.export import load_theta, save_run_theta
from metalearn.training.run_dir import RunDir
from metalearn.training.learner import Learner, Submission
from metalearn.training.config import CurriculumConfig, LearnerConfig

P = 40


def learner_with_steps(n_grads: int) -> Learner:
    learner = Learner(np.zeros(P, np.float32), LearnerConfig(meta_batch=3),
                      CurriculumConfig())
    rng = np.random.default_rng(0)
    for i in range(n_grads):
        learner.submit(Submission(rng.normal(size=P).astype(np.float32), learner.version,
                                  learner.generation, loss=float(i), dataset="glyphs"))
    return learner


def test_save_restore_exact(tmp_path):
    a = learner_with_steps(7)  # 2 updates, 1 buffered
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=2)
    ckpt.save(a.step, *a.state())
    ckpt.close()
    b = Learner(np.ones(P, np.float32), LearnerConfig(meta_batch=3), CurriculumConfig())
    reader = Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    step, arrays, meta = reader.restore_latest(b.state_template())
    b.load_state(arrays, meta, keep_generation=True)
    assert step == 2 and b.step == 2 and b.current.batch.count == 1
    np.testing.assert_array_equal(a.theta, b.theta)
    # optax's NamedTuple states keep their types (restored against a target).
    assert type(b.opt_state[1]).__name__ == type(a.opt_state[1]).__name__
    g = np.full(P, 0.5, np.float32)
    for learner in (a, b):
        for _ in range(2):
            learner.submit(Submission(g, learner.version, learner.generation, 1.0))
    np.testing.assert_array_equal(a.theta, b.theta)
    assert a.step == b.step == 3


def test_crash_cut_and_unreadable_checkpoints_fall_back(tmp_path):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(3)
    ckpt = Checkpointer(directory, keep=3)
    ckpt.save(1, *learner.state())
    for _ in range(3):
        learner.submit(Submission(np.ones(P, np.float32), learner.version,
                                  learner.generation, 1.0))
    ckpt.save(2, *learner.state())
    ckpt.close()
    # A save killed mid-way leaves orbax's temporary folder: never a valid step.
    os.makedirs(os.path.join(directory, "3.orbax-checkpoint-tmp-1234", "state"))
    # Step 2 loses its array data (a crash after the rename / disk damage).
    for root, _, files in os.walk(os.path.join(directory, "2", "state")):
        for name in files:
            if not name.endswith("_METADATA"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    reader = Checkpointer(directory, read_only=True)
    assert reader.steps() == [1, 2]
    fresh = Learner(np.zeros(P, np.float32), LearnerConfig(meta_batch=3), CurriculumConfig())
    with pytest.warns(CheckpointWarning, match="falling back"):
        step, arrays, meta = reader.restore_latest(fresh.state_template())
    assert step == 1 and meta["step"] == 1
    shutil.rmtree(os.path.join(directory, "1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        assert Checkpointer(directory, read_only=True).restore_latest(
            fresh.state_template()) is None


def test_run_theta_roundtrip_in_the_export_format(tmp_path, tiny_rule):
    spec = theta_spec(tiny_rule)
    flat = np.arange(spec.num_params, dtype=np.float32)
    run = RunDir(tmp_path / "run")
    save_run_theta(run, flat, tiny_rule, step=12)
    save_run_theta(run, flat, tiny_rule, step=12)  # replaces the previous snapshot
    theta, rule, step = load_theta(run.path)
    assert rule == tiny_rule and step == 12
    np.testing.assert_array_equal(spec.ravel(theta), flat)
    assert sorted(os.listdir(run.path)) == [RunDir.THETA]  # no staging folder left


# --------------------------------------------------------------------- helpers

JSON_HANDLER = json_checkpoint_handler.JsonCheckpointHandler


def slow_json_writes(monkeypatch, seconds: float) -> None:
    """Every orbax JSON write (a checkpoint's meta item) takes ``seconds`` longer; it runs
    in orbax's background thread."""
    original = JSON_HANDLER._save_fn

    async def slow(self, x, directory):
        time.sleep(seconds)
        await original(self, x, directory)

    monkeypatch.setattr(JSON_HANDLER, "_save_fn", slow)


def failing_json_writes(monkeypatch, code: int) -> list:
    """Every orbax JSON write raises ``OSError(code)`` (in orbax's background thread);
    returns the list of paths it refused."""
    refused = []

    async def fail(self, x, directory):
        path = str(directory / self._filename)
        refused.append(path)
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(JSON_HANDLER, "_save_fn", fail)
    return refused


def partial_folders(directory: str) -> list[str]:
    return glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*"))


def files_of(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# --------------------------------------------------------------------- saving


def test_async_save_returns_at_once_and_writes_what_was_given(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(7)  # 2 updates, 1 gradient buffered
    ckpt = Checkpointer(directory, keep=3)
    slow_json_writes(monkeypatch, 1.0)
    arrays, meta = learner.state()
    before = {k: np.array(v) for k, v in arrays.items() if k != "opt_state"}
    completed_at = []
    start = time.perf_counter()
    assert ckpt.save(2, arrays, meta, wait=False,
                     then=lambda: completed_at.append((time.perf_counter(),
                                                       ckpt.manager.all_steps()))) is None
    returned = time.perf_counter() - start
    assert returned < 0.5, returned  # the 1 s write is in the background
    assert ckpt.in_flight == 2 and ckpt.steps() == [] and ckpt.poll() is None
    # The learner goes on updating (in place) while orbax writes.
    for _ in range(4):
        learner.submit(Submission(np.ones(P, np.float32), learner.version,
                                  learner.generation, 1.0))
    assert learner.step == 3
    assert ckpt.wait() == 2
    waited = time.perf_counter() - start
    assert waited >= 1.0 and ckpt.in_flight is None and ckpt.steps() == [2]
    # ``then`` ran once the step was complete (after the write, not at ``save``).
    (done_at, steps_then), = completed_at
    assert done_at - start >= 1.0 and 2 in steps_then
    assert os.path.isdir(os.path.join(directory, "2")) and not partial_folders(directory)
    ckpt.close()
    fresh = Learner(np.ones(P, np.float32), LearnerConfig(meta_batch=3), CurriculumConfig())
    step, restored, meta = Checkpointer(directory, read_only=True).restore_latest(
        fresh.state_template())
    assert step == 2 and meta["step"] == 2 and meta["batch"]["count"] == 1
    for key, value in before.items():  # what was given at save, not the later updates
        np.testing.assert_array_equal(restored[key], value)
    assert not np.array_equal(restored["theta"], learner.theta)


@pytest.mark.parametrize("keep", [1, 2])
def test_disk_full_in_the_background_is_one_error_and_the_last_good_step_stays(
        tmp_path, monkeypatch, keep):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(7)
    ckpt = Checkpointer(directory, keep=keep)
    ckpt.save(2, *learner.state())
    good = files_of(os.path.join(directory, "2"))
    refused = failing_json_writes(monkeypatch, errno.ENOSPC)
    then = []
    ckpt.save(3, *learner.state(), wait=False, then=lambda: then.append(3))  # no raise
    with pytest.raises(CheckpointSaveError) as caught:
        ckpt.wait()
    message = str(caught.value)
    assert message == (f"checkpoint of step 3 failed: [Errno 28] No space left on device "
                       f"({refused[0]}); the last good checkpoint is step 2")
    assert (caught.value.step, caught.value.last_good) == (3, 2)
    assert then == [] and ckpt.last_good_step == 2
    assert ckpt.wait() is None  # reported once
    # Step 2 was not deleted even with keep=1 (orbax removes old steps only after a
    # successful save) and the failed step's temporary folder is gone.
    assert ckpt.steps() == [2] and sorted(os.listdir(directory)) == ["2"]
    assert files_of(os.path.join(directory, "2")) == good
    ckpt.close()  # does not raise the failure again
    monkeypatch.undo()
    found = Checkpointer(directory, read_only=True).restore_latest(learner.state_template())
    assert found[0] == 2


def test_a_synchronous_permission_error_is_the_same_one_line(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(3)
    ckpt = Checkpointer(directory, keep=2)
    ckpt.save(1, *learner.state())

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", directory)

    monkeypatch.setattr(ckpt.manager, "save", refuse)
    with pytest.raises(CheckpointSaveError, match=r"^checkpoint of step 2 failed: \[Errno 13\] "
                       r"Permission denied \(.*checkpoints\); the last good checkpoint is "
                       r"step 1$"):
        ckpt.save(2, *learner.state(), wait=False)
    assert ckpt.in_flight is None and ckpt.steps() == [1]
    ckpt.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (needs root and a kernel that allows it; skipped otherwise)."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=20)


def fill(path: str) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_real_disk_full_and_read_only_file_system(small_tmpfs):
    directory = str(small_tmpfs / "checkpoints")
    learner = Learner(np.zeros(200_000, np.float32), LearnerConfig(meta_batch=1),
                      CurriculumConfig())  # ~4 MB of state: the 3 MiB disk holds one save
    learner.submit(Submission(np.ones(200_000, np.float32), learner.version,
                              learner.generation, 1.0))
    learner.submit(Submission(np.ones(200_000, np.float32), learner.version,
                              learner.generation, 1.0))
    ckpt = Checkpointer(directory, keep=1)
    arrays, meta = learner.state()
    arrays = {"theta": arrays["theta"]}  # 800 kB: one step fits, two do not
    ckpt.save(2, arrays, meta)
    fill(str(small_tmpfs / "filler"))
    with pytest.raises(CheckpointSaveError) as caught:
        ckpt.save(3, {"theta": arrays["theta"] + 1}, {**meta, "step": 3})
    assert str(caught.value).startswith("checkpoint of step 3 failed: [Errno 28] No space "
                                        "left on device (")
    assert str(caught.value).endswith("; the last good checkpoint is step 2")
    assert ckpt.steps() == [2] and not partial_folders(directory)
    ckpt.close()
    os.remove(small_tmpfs / "filler")
    found = Checkpointer(directory, read_only=True).restore_latest(
        {"theta": np.zeros(200_000, np.float32)})
    assert found[0] == 2
    np.testing.assert_array_equal(found[1]["theta"], arrays["theta"])
    # A file system remounted read-only: the same one line, errno 30.
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True, timeout=20)
    ckpt = Checkpointer(directory, keep=1)
    with pytest.raises(CheckpointSaveError, match=r"^checkpoint of step 4 failed: \[Errno 30\] "
                       r"Read-only file system \(.*\); the last good checkpoint is step 2$"):
        ckpt.save(4, {"theta": arrays["theta"] + 2}, {**meta, "step": 4})
    assert ckpt.steps() == [2]
    ckpt.close()


# --------------------------------------------------------------------- restoring


def _corrupt(directory: str, step: int, how: str) -> None:
    folder = os.path.join(directory, str(step))
    if how == "data file deleted":
        data = [p for p in glob.glob(os.path.join(folder, "state", "**", "d", "*"),
                                     recursive=True) if os.path.isfile(p)]
        assert data
        for path in data:
            os.remove(path)
    elif how == "data file truncated":
        for path in glob.glob(os.path.join(folder, "state", "**", "d", "*"), recursive=True):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif how == "tree metadata garbled":
        with open(os.path.join(folder, "state", "_METADATA"), "w") as f:
            f.write('{"tree_metadata": ')
    elif how == "meta json garbled":
        with open(os.path.join(folder, "meta", "metadata"), "w") as f:
            f.write("{not json")
    elif how == "meta of another step":
        with open(os.path.join(folder, "meta", "metadata"), "w") as f:
            f.write('{"step": 1}')
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["data file deleted", "data file truncated",
                                 "tree metadata garbled", "meta json garbled",
                                 "meta of another step"])
def test_a_corrupt_newest_step_is_moved_aside_and_never_replaced(tmp_path, how):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(3)
    ckpt = Checkpointer(directory, keep=3)
    ckpt.save(1, *learner.state())
    step1_theta = learner.theta.copy()
    for _ in range(3):
        learner.submit(Submission(np.ones(P, np.float32), learner.version,
                                  learner.generation, 1.0))
    ckpt.save(2, *learner.state())
    ckpt.close()
    _corrupt(directory, 2, how)
    corrupt_files = files_of(os.path.join(directory, "2"))
    writer = Checkpointer(directory, keep=3)
    fresh = Learner(np.zeros(P, np.float32), LearnerConfig(meta_batch=3), CurriculumConfig())
    with pytest.warns(CheckpointWarning, match=r"checkpoint .*/2 is unreadable \(.+\); "
                      r"falling back to step 1; moved to .*/corrupt-2-\d+$"):
        step, arrays, meta = writer.restore_latest(fresh.state_template())
    assert step == 1 and meta["step"] == 1 and writer.last_good_step == 1
    np.testing.assert_array_equal(arrays["theta"], step1_theta)
    [moved] = [n for n in os.listdir(directory) if n.startswith("corrupt-")]
    assert writer.steps() == [1] and RunDir(str(tmp_path)).checkpoint_steps() == [1]
    # The resumed learner reaches step 2 again and saves it: the corrupt copy stays.
    fresh.load_state(arrays, meta)
    for _ in range(3):
        fresh.submit(Submission(np.full(P, 0.5, np.float32), fresh.version,
                                fresh.generation, 1.0))
    writer.save(2, *fresh.state())
    assert writer.steps() == [1, 2]
    assert files_of(os.path.join(directory, moved)) == corrupt_files
    writer.close()
    step, arrays, _ = Checkpointer(directory, read_only=True).restore_latest(
        fresh.state_template())
    assert step == 2
    np.testing.assert_array_equal(arrays["theta"], fresh.theta)


def test_nothing_is_moved_when_no_step_reads(tmp_path):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(3)
    ckpt = Checkpointer(directory, keep=3)
    ckpt.save(1, *learner.state())
    ckpt.close()
    wrong = {**learner.state_template(), "extra": np.zeros(2, np.float32)}  # another run's
    with pytest.warns(CheckpointWarning, match="Structure mismatch"):
        assert Checkpointer(directory).restore_latest(wrong) is None
    assert sorted(os.listdir(directory)) == ["1"]


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied"),
    OSError(errno.EIO, "Input/output error"),
    OSError(errno.EMFILE, "Too many open files"),
    MemoryError(),
])
def test_an_environmental_error_on_restore_is_raised_not_swallowed(tmp_path, monkeypatch,
                                                                   error):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(3)
    ckpt = Checkpointer(directory, keep=3)
    ckpt.save(1, *learner.state())
    ckpt.save(2, *learner.state())
    ckpt.close()

    def refuse(self, directory, *args, **kwargs):
        raise error

    writer = Checkpointer(directory, keep=3)
    monkeypatch.setattr(JSON_HANDLER, "restore", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # no fallback warning either
        with pytest.raises(CheckpointReadError, match=r"cannot read checkpoint .*/checkpoints/2: "
                           r".*an environmental error, so no older checkpoint is used"):
            writer.restore_latest(learner.state_template())
    assert writer.steps() == [1, 2] and sorted(os.listdir(directory)) == ["1", "2"]


def test_keyboard_interrupt_during_restore_is_not_a_corrupt_step(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(3)
    ckpt = Checkpointer(directory)
    ckpt.save(1, *learner.state())
    ckpt.close()

    def interrupt(self, directory, *args, **kwargs):
        raise KeyboardInterrupt

    writer = Checkpointer(directory)
    monkeypatch.setattr(JSON_HANDLER, "restore", interrupt)
    with pytest.raises(KeyboardInterrupt):
        writer.restore_latest(learner.state_template())
    assert os.listdir(directory) == ["1"]


def test_tensorstore_errors_are_classified_by_status_and_os_code():
    spec = " [tensorstore_spec='{}']"
    denied = ValueError("PERMISSION_DENIED: Error opening \"zarr\" driver: Error reading "
                        "local file \"/r/2/state/d/x\" [os_error_code='13']" + spec)
    full = ValueError("RESOURCE_EXHAUSTED: Failed to write 175 bytes to file 11: No space "
                      "left on device [os_error_code='28']" + spec)
    lost = ValueError("DATA_LOSS: Error decoding manifest: Length in header (113) does not "
                      "match actual length (56)" + spec)
    missing = ValueError("NOT_FOUND: Error reading byte range of local file \"/r/2/d/x\"" + spec)
    assert is_environmental(denied) and is_environmental(full)
    assert not is_corruption(denied) and not is_corruption(full)
    assert is_corruption(lost) and is_corruption(missing)
    assert is_corruption(KeyError("tree_metadata")) and is_corruption(FileNotFoundError("x"))
    assert not is_corruption(RuntimeError("something else"))  # raised, not skipped


def test_a_new_writer_in_this_process_waits_for_the_previous_ones_save(tmp_path,
                                                                       monkeypatch):
    directory = str(tmp_path / "checkpoints")
    learner = learner_with_steps(7)
    old = Checkpointer(directory)
    slow_json_writes(monkeypatch, 1.0)
    old.save(2, *learner.state(), wait=False)  # e.g. a learner replaced in-process
    new = Checkpointer(directory)
    assert new.steps() == [2] and sorted(os.listdir(directory)) == ["2"]
    assert old.wait() == 2
    new.close()
    old.close()
