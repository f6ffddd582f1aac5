"""``RunDir``: the layout of a training run folder, and the only code that names its files.

    <run>/config.yaml         the resolved TrainConfig of the run (loads back equal)
    <run>/checkpoints/<step>/ orbax checkpoints of the learner's whole state
    <run>/theta_latest/       theta at the newest checkpoint, in the export format
                              (``metalearn.training.export``: self-describing orbax)
    <run>/metrics.parquet     one row per learner step (plus merged ``eval/*`` columns)
    <run>/tensorboard/        TensorBoard scalars, when asked for

A folder is a run once it has ``config.yaml`` and ``checkpoints/``. See
docs/architecture.md for who writes what.
"""

from __future__ import annotations

import os
import shutil

import yaml

from metalearn.core.config_io import ConfigError
from metalearn.training.checkpoint import atomic_write_bytes
from metalearn.training.config import TrainConfig, config_from_dict, config_to_yaml


class RunDir:
    """A run folder at ``path`` (absolute); nothing is created until ``create``."""

    CONFIG = "config.yaml"
    CHECKPOINTS = "checkpoints"
    THETA = "theta_latest"
    METRICS = "metrics.parquet"
    TENSORBOARD = "tensorboard"
    # Orbax writes a step into a temporary folder and renames it when complete.
    PARTIAL_CHECKPOINT_GLOB = "*.orbax-checkpoint-tmp*"

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def __fspath__(self) -> str:
        return self.path

    # ------------------------------------------------------------------ paths

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip(os.sep))

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, self.CONFIG)

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, self.CHECKPOINTS)

    @property
    def theta(self) -> str:
        return os.path.join(self.path, self.THETA)

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, self.METRICS)

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.path, self.TENSORBOARD)

    # ------------------------------------------------------------------ state

    def is_run(self) -> bool:
        return os.path.isfile(self.config_path) and os.path.isdir(self.checkpoints)

    def is_empty(self) -> bool:
        return not os.path.exists(self.path) or not os.listdir(self.path)

    def checkpoint_steps(self) -> list[int]:
        """Steps of complete checkpoints (orbax's temporary folders are not steps)."""
        if not os.path.isdir(self.checkpoints):
            return []
        return sorted(int(n) for n in os.listdir(self.checkpoints) if n.isdigit())

    def read_config(self) -> TrainConfig:
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"run folder not found: {self.path}")
        if not self.is_run():
            raise ConfigError(f"{self.path} is not a metalearn run folder (needs "
                              f"{self.CONFIG} and {self.CHECKPOINTS}/)")
        return config_from_dict(self.read_config_dict())

    def read_config_dict(self) -> dict | None:
        """The saved config as a plain dict (None if there is none), unvalidated."""
        if not os.path.isfile(self.config_path):
            return None
        with open(self.config_path) as f:
            return yaml.safe_load(f) or {}

    def create(self, config: TrainConfig) -> None:
        """Make the folder and write ``config.yaml`` atomically (validation is done)."""
        os.makedirs(self.checkpoints, exist_ok=True)
        atomic_write_bytes(self.config_path, config_to_yaml(config).encode())

    def copy_to(self, dest: str, up_to_step: int) -> None:
        """Copy what a learner needs to resume (checkpoints up to ``up_to_step``, config,
        metrics, theta) into ``dest``; later and partial checkpoints are left out."""
        source = self.checkpoints
        partial = shutil.ignore_patterns(self.PARTIAL_CHECKPOINT_GLOB)

        def ignore(folder: str, names: list[str]) -> set[str]:
            skip = set(partial(folder, names))
            if os.path.abspath(folder) == source:
                skip |= {n for n in names if n.isdigit() and int(n) > up_to_step}
            return skip

        os.makedirs(dest, exist_ok=True)
        shutil.copytree(source, os.path.join(dest, self.CHECKPOINTS), ignore=ignore)
        for path in (self.config_path, self.metrics):
            if os.path.exists(path):
                shutil.copy2(path, dest)
        if os.path.isdir(self.theta):
            shutil.copytree(self.theta, os.path.join(dest, self.THETA))


__all__ = ["RunDir"]
