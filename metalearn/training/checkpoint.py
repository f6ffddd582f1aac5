"""Orbax checkpoints of the learner's whole state.

A checkpoint is one orbax step folder ``<run>/checkpoints/<step>/`` with two items:

* ``state``: the learner's arrays (theta, optax state, gradient buffer), saved with
  ``StandardSave`` and restored against a target built from a live learner (without
  a target, optax's NamedTuple states come back as lists);
* ``meta``: a JSON dict (step, version, counters, rolling losses, curriculum position,
  RNG state, wall time).

Orbax writes into a temporary folder and renames it when complete, so a save cut by a
crash leaves a ``*.orbax-checkpoint-tmp*`` folder that is never listed as a step.
``restore_latest`` also survives a complete-looking step that fails to read (files
lost or truncated): it warns and falls back to the previous step.

Theta alone is stored in one format, the export (``metalearn.training.export``).
"""

from __future__ import annotations

import os
import tempfile
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy, save_decision_policy


class CheckpointWarning(UserWarning):
    """A checkpoint could not be read and an older one was used."""


class Checkpointer:
    """Owns ``<run>/checkpoints`` (one process writes; ``read_only`` for inspection)."""

    def __init__(self, directory: str, *, keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if not read_only:
            os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_decision_policy.ContinuousCheckpointingPolicy(),
            preservation_policy=preservation_policy.LatestN(keep),
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, arrays, meta: dict, *, wait: bool = True) -> None:
        self.manager.wait_until_finished()
        if step in self.manager.all_steps():
            # Only after a fallback restore (the newer step was unreadable): replace it.
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, template):
        """(arrays, meta) of ``step``; arrays restored against ``template``'s structure."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        arrays = jax.tree.map(np.asarray, restored["state"])
        return arrays, dict(restored["meta"])

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_latest(self, template):
        """(step, arrays, meta) of the newest readable checkpoint, or None if none is.

        Steps that fail to restore are skipped with a ``CheckpointWarning``.
        """
        for step in reversed(self.steps()):
            try:
                arrays, meta = self.restore(step, template)
            except Exception as err:  # noqa: BLE001 - any unreadable step is skipped
                warnings.warn(f"checkpoint {self.directory}/{step} is unreadable "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                              f"falling back to an earlier one", CheckpointWarning,
                              stacklevel=2)
                continue
            if int(meta.get("step", -1)) != step:
                warnings.warn(f"checkpoint {self.directory}/{step} holds step "
                              f"{meta.get('step')}; skipped", CheckpointWarning, stacklevel=2)
                continue
            return step, arrays, meta
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
