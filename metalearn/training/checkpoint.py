"""Orbax checkpoints of the learner's whole state (``Checkpointer``): saves in the
background, and restores that skip a corrupt step but stop at an environmental error.

See docs/training.md (Run folder, Faults). Theta alone is stored in one format, the
export (``metalearn.training.export``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy, save_decision_policy

from metalearn.core.config_io import RunError

# errno values that say "the machine or the file system", not "this checkpoint".
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EACCES", "EPERM", "EIO", "ENOSPC", "EDQUOT", "EROFS", "EMFILE", "ENFILE",
        "ENOMEM", "ETIMEDOUT", "ESTALE", "ENODEV", "ENXIO", "EBUSY", "EAGAIN", "EINTR",
        "ENOLCK", "ENOTCONN", "EHOSTDOWN", "ECONNRESET")
    if hasattr(errno, name))
# tensorstore raises ValueError("<STATUS>: ... [os_error_code='28'] ...").
_TS_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_TS_PATH = re.compile(r'local file "([^"]+)"')
_TS_ENVIRONMENT_STATUS = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                          "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "CANCELLED", "ABORTED")
# What orbax, tensorstore and json raise for a step whose files are missing, truncated,
# garbled or of another structure (tried: docs/training.md, tests/test_checkpoint.py).
_CORRUPTION_TYPES = (ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError,
                     FileNotFoundError, NotADirectoryError, IsADirectoryError)
QUARANTINE_PREFIX = "corrupt-"
# After a failed save, how long orbax's other writer threads get to finish before the
# step's temporary folder is removed (it is removed again at ``close``).
ORBAX_SETTLE_S = 2.0


class CheckpointWarning(UserWarning):
    """A checkpoint could not be read and an older one was used."""


class CheckpointReadError(RunError):
    """A checkpoint folder cannot be read for a reason that is not corruption of a step
    (permissions, I/O, memory ...): nothing was skipped or moved."""


class CheckpointSaveError(RunError):
    """A checkpoint could not be written; the message is one line: the step, the cause,
    the last good step. ``step`` and ``last_good`` (None: there is none) say the same."""

    def __init__(self, message: str, step: int = -1, last_good: int | None = None):
        super().__init__(message)
        self.step, self.last_good = step, last_good

    def __reduce__(self):
        return type(self), (str(self), self.step, self.last_good)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def os_error_of(err: BaseException) -> tuple[int, str] | None:
    """(errno, path) of the operating-system error behind ``err`` (a Python ``OSError``,
    a ``MemoryError`` or a tensorstore error carrying ``os_error_code``), or None."""
    for e in _chain(err):
        if isinstance(e, MemoryError):
            return errno.ENOMEM, ""
        if isinstance(e, OSError) and e.errno:
            return e.errno, os.fspath(e.filename) if e.filename else ""
        text = str(e)
        code = _TS_OS_CODE.search(text)
        if code:
            path = _TS_PATH.search(text)
            return int(code.group(1)), path.group(1) if path else ""
    return None


def is_environmental(err: BaseException) -> bool:
    """True for errors of the machine or file system rather than of a checkpoint's data."""
    for e in _chain(err):
        text = str(e)
        code = _TS_OS_CODE.search(text)
        if (isinstance(e, (PermissionError, MemoryError))
                or isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS
                or code and int(code.group(1)) in ENVIRONMENT_ERRNOS
                or text.startswith(_TS_ENVIRONMENT_STATUS)):
            return True
    return False


def is_corruption(err: BaseException) -> bool:
    """True for what a corrupt step raises (and nothing environmental)."""
    return isinstance(err, _CORRUPTION_TYPES) and not is_environmental(err)


def describe_error(err: BaseException, where: str = "") -> str:
    """One line: ``[Errno 28] No space left on device (<path>)`` for OS errors, else
    ``<type>: <first line of the message>``."""
    found = os_error_of(err)
    if found is not None and (found[0] in ENVIRONMENT_ERRNOS or isinstance(err, OSError)):
        code, path = found
        return f"[Errno {code}] {os.strerror(code)} ({path or where})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


class _OrbaxSaveErrorFilter(logging.Filter):
    """Drops orbax's own ERROR logs (several tracebacks per failure) while a save of ours
    is in flight: the failure is reported once, as a ``CheckpointSaveError``."""

    active = 0  # saves of ours in flight

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and record.levelno >= logging.ERROR
                    and f"{os.sep}orbax{os.sep}" in record.pathname)


# The writer of each directory in this process (a learner replaced in-process must not
# race the save its predecessor still has in flight).
_WRITERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class Checkpointer:
    """Owns ``<run>/checkpoints`` (one process writes; ``read_only`` for inspection)."""

    def __init__(self, directory: str, *, keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        if not read_only:
            os.makedirs(self.directory, exist_ok=True)
            thread = getattr(_WRITERS.get(self.directory), "_thread", None)
            if thread is not None:
                thread.join()  # its outcome stays with it; its step, if whole, is listed
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_decision_policy.ContinuousCheckpointingPolicy(),
            preservation_policy=preservation_policy.LatestN(keep),
            read_only=read_only,
            create=not read_only,
            # The one writer removes what a killed or failed save of its own left.
            cleanup_tmp_directories=not read_only,
            # Step folders are made in ``save`` (a few ms): when that fails (disk full,
            # read-only, permission), orbax's writer threads would otherwise wait for
            # them for 5 minutes and hold the process open.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._thread: threading.Thread | None = None
        self.in_flight: int | None = None  # the step being saved in the background
        self.last_good_step: int | None = max(self.steps(), default=None)
        self._error: CheckpointSaveError | None = None  # its failure, not yet raised
        self._partial: set[int] = set()  # steps whose failed save may have left a folder
        self.failed: CheckpointSaveError | None = None  # the last failure raised
        self._log_filter = _OrbaxSaveErrorFilter()
        if not read_only:
            logging.getLogger("absl").addFilter(self._log_filter)
            _WRITERS[self.directory] = self

    # ------------------------------------------------------------------ steps

    def steps(self) -> list[int]:
        """Complete steps (a save in flight is not one yet)."""
        return sorted(s for s in self.manager.all_steps() if s != self.in_flight)

    # ------------------------------------------------------------------ saving

    def save(self, step: int, arrays, meta: dict, *, wait: bool = True,
             then: Callable[[], None] | None = None, then_what: str = "what follows it"
             ) -> int | None:
        """Save ``step``; ``then`` (``then_what``, for messages) runs once orbax has
        completed it (in the background unless ``wait``). Waits for the previous save
        first. Returns the step when ``wait`` (None otherwise); raises
        ``CheckpointSaveError`` when the save fails (without ``wait``: from ``poll``,
        ``wait`` or the next ``save``)."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        self.wait()
        # Copies: the learner updates its buffers in place, and orbax writes (and
        # json-encodes) them later, in its own threads.
        arrays = jax.tree.map(lambda a: np.array(a, copy=True), arrays)
        meta = json.loads(json.dumps(meta))
        self._log_filter.active += 1
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as err:
            self._log_filter.active -= 1
            error = self._failure(step, err)
            self.failed = error
            raise error from err
        self.in_flight = step
        self._thread = threading.Thread(target=self._complete, args=(step, then, then_what),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        return self.wait() if wait else None

    def _complete(self, step: int, then: Callable[[], None] | None, then_what: str) -> None:
        """The background half of ``save``: wait for orbax, then run ``then``."""
        try:
            try:
                self.manager.wait_until_finished()
            except BaseException as err:  # noqa: BLE001 - reported by poll/wait
                try:
                    self._error = self._failure(step, err)
                except BaseException:  # noqa: BLE001 - the save failed all the same
                    self._error = CheckpointSaveError(
                        f"checkpoint of step {step} failed: "
                        f"{describe_error(err, self.directory)}", step, None)
                self._error.__cause__ = err
                return
            self.last_good_step = step
            if then is not None:
                try:
                    then()
                except BaseException as err:  # noqa: BLE001 - reported by poll/wait
                    self._error = CheckpointSaveError(
                        f"checkpoint of step {step} was written but {then_what} failed: "
                        f"{describe_error(err, self.directory)}; the last good checkpoint "
                        f"is step {step}", step, step)
                    self._error.__cause__ = err
        finally:
            self._log_filter.active -= 1

    def _failure(self, step: int, err: BaseException) -> CheckpointSaveError:
        """After a failed save of ``step``: forget what orbax assumed, remove the step's
        temporary folder, and describe the failure in one line."""
        with contextlib.suppress(Exception):  # best effort on a broken disk
            self.manager.reload()  # orbax listed the step (and dropped old ones) at save
        # Orbax reports the first failed write while its other writers may still run:
        # give them a moment before removing the folder (again at ``close``).
        deadline = time.monotonic() + ORBAX_SETTLE_S
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and thread.is_alive() \
                    and type(thread).__module__.startswith("orbax."):
                # (orbax's threads raise their own errors from join)
                with contextlib.suppress(BaseException):
                    thread.join(max(0.0, deadline - time.monotonic()))
        self._partial.add(step)
        self._remove_partial()
        last = self.last_good_step = max(self.manager.all_steps(), default=None)
        good = (f"the last good checkpoint is step {last}" if last is not None
                else "there is no good checkpoint")
        return CheckpointSaveError(f"checkpoint of step {step} failed: "
                                   f"{describe_error(err, self.directory)}; {good}", step, last)

    def _remove_partial(self) -> None:
        """Remove the temporary folders of this writer's failed saves (no step is ever
        removed: orbax lists only renamed, complete folders as steps)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            head, sep, _ = name.partition(".orbax-checkpoint-tmp")
            if sep and head.isdigit() and int(head) in self._partial:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def poll(self) -> int | None:
        """The step of a background save that has completed since the last call (None if
        there is none, or it is still running); raises its ``CheckpointSaveError``."""
        if self._thread is None or self._thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> int | None:
        """Wait for the save in flight; its step (None if there was none). Raises its
        ``CheckpointSaveError`` (once)."""
        if self._thread is None:
            return None
        self._thread.join()
        step, self._thread, self.in_flight = self.in_flight, None, None
        error, self._error = self._error, None
        if error is not None:
            self.failed = error
            self._log_filter.active += 1
            try:  # orbax re-raises a failure once in every thread that waits for it
                self.manager.wait_until_finished()
            except Exception:  # noqa: BLE001 - the same failure, already in ``error``
                pass
            finally:
                self._log_filter.active -= 1
            raise error
        return step

    # ------------------------------------------------------------------ restoring

    def restore(self, step: int, template):
        """(arrays, meta) of ``step``; arrays restored against ``template``'s structure
        (built from a live learner: without a target, optax's NamedTuple states would come
        back as lists)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        arrays = jax.tree.map(np.asarray, restored["state"])
        return arrays, dict(restored["meta"])

    def restore_latest(self, template):
        """(step, arrays, meta) of the newest readable checkpoint, or None if none is.

        Corrupt steps are skipped with a ``CheckpointWarning``; when an older step reads
        and the folder is not ``read_only``, they are moved aside to
        ``corrupt-<step>-<unixtime>``. Any other error raises ``CheckpointReadError``.
        """
        skipped: list[tuple[int, str]] = []
        found = None
        for step in reversed(self.steps()):
            path = os.path.join(self.directory, str(step))
            try:
                arrays, meta = self.restore(step, template)
            except Exception as err:
                if not is_corruption(err):
                    kind = ("an environmental error" if is_environmental(err)
                            else "an error that is not corruption")
                    raise CheckpointReadError(
                        f"cannot read checkpoint {path}: {describe_error(err, path)}; "
                        f"{kind}, so no older checkpoint is used instead and nothing was "
                        f"moved: fix the cause and try again") from err
                skipped.append((step, describe_error(err, path)))
                continue
            if int(meta.get("step", -1)) != step:
                skipped.append((step, f"it holds step {meta.get('step')}"))
                continue
            found = (step, arrays, meta)
            break
        then = (f"falling back to step {found[0]}" if found is not None
                else "falling back to an earlier one")
        for step, why in skipped:
            path = os.path.join(self.directory, str(step))
            moved = self._quarantine(step) if found is not None and not self.read_only else ""
            warnings.warn(f"checkpoint {path} is unreadable ({why}); {then}"
                          + (f"; moved to {moved}" if moved else ""),
                          CheckpointWarning, stacklevel=2)
        if found is not None and not self.read_only:
            self.last_good_step = found[0]
        return found

    def _quarantine(self, step: int) -> str:
        """Move a corrupt step out of orbax's sight; the new path ('' if it stays)."""
        source = os.path.join(self.directory, str(step))
        base = os.path.join(self.directory, f"{QUARANTINE_PREFIX}{step}-{int(time.time())}")
        dest, n = base, 1
        while os.path.exists(dest):
            dest, n = f"{base}.{n}", n + 1
        try:
            os.rename(source, dest)
        except OSError as err:
            warnings.warn(f"could not move the corrupt checkpoint {source} aside "
                          f"({describe_error(err, source)}); a save of step {step} will "
                          f"fail rather than replace it", CheckpointWarning, stacklevel=3)
            return ""
        finally:
            self.manager.reload()
        return dest

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Wait for the save in flight (raising its failure) and close orbax."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                if self.failed is None:
                    raise
            finally:
                self._remove_partial()
                logging.getLogger("absl").removeFilter(self._log_filter)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
