"""``RunDir``: the layout of a training run folder, and the only code that names its files.

See docs/training.md (Run folder) for the files and docs/architecture.md for who writes
what.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil

from metalearn.core.config_io import ConfigError, read_yaml
from metalearn.training.checkpoint import QUARANTINE_PREFIX, atomic_write_bytes
from metalearn.training.config import TrainConfig, config_from_dict, config_to_yaml


def _child(name: str) -> property:
    """The path of ``<run>/<name>``."""
    return property(lambda self: os.path.join(self.path, name))


class RunDir:
    """A run folder at ``path`` (absolute); nothing is created until ``create``."""

    CONFIG = "config.yaml"
    CONFIGS = "configs"  # one config per session: <NNN>-step<S>.yaml
    CHECKPOINTS = "checkpoints"
    THETA = "theta_latest"
    BEST = "theta_best"  # the best theta by the validation score (training/best.py)
    START = "theta_start"  # the start chosen by validation (training/start.py)
    METRICS = "metrics"
    EVALUATIONS = "evaluations"
    DISCARDED = "discarded"
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

    config_path = _child(CONFIG)
    configs = _child(CONFIGS)
    checkpoints = _child(CHECKPOINTS)
    theta = _child(THETA)
    best = _child(BEST)
    start = _child(START)
    metrics = _child(METRICS)
    evaluations = _child(EVALUATIONS)
    discarded = _child(DISCARDED)
    tensorboard = _child(TENSORBOARD)

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
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"{self.path} is a file, not a run folder")
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"run folder not found: {self.path}")
        if not self.is_run():
            raise ConfigError(f"{self.path} is not a metalearn run folder (needs "
                              f"{self.CONFIG} and {self.CHECKPOINTS}/)")
        try:
            return config_from_dict(self.read_config_dict())
        except ConfigError as err:  # e.g. a folder of another project with a config.yaml
            raise ConfigError(f"{self.config_path} is not a metalearn training config: "
                              f"{err}") from None

    def read_config_dict(self) -> dict | None:
        """The saved config as a plain dict (None if there is none), unvalidated;
        ConfigError if the file is not YAML."""
        if not os.path.isfile(self.config_path):
            return None
        return read_yaml(self.config_path, "run config")

    def config_history(self) -> list[tuple[int, int, str]]:
        """(session number, start step, file) of every session's config, oldest first;
        empty for a run from before the history was kept."""
        if not os.path.isdir(self.configs):
            return []
        found = [(m, name) for name in os.listdir(self.configs)
                 if (m := _SESSION_CONFIG.fullmatch(name))]
        return sorted((int(m[1]), int(m[2]), os.path.join(self.configs, name))
                      for m, name in found)

    def create(self, config: TrainConfig) -> None:
        """Make the folder, keep ``config`` as this session's entry of ``configs/``
        (``<NNN>-step<S>.yaml``: docs/training.md, Run folder) and write ``config.yaml``
        (both atomically; validation is done)."""
        os.makedirs(self.checkpoints, exist_ok=True)
        os.makedirs(self.configs, exist_ok=True)
        history = self.config_history()
        steps = self.checkpoint_steps()
        if not history and steps and os.path.isfile(self.config_path):
            earlier = pathlib.Path(self.config_path).read_bytes()
            atomic_write_bytes(os.path.join(self.configs, _session_name(0, 0)), earlier)
            history = self.config_history()
        number = history[-1][0] + 1 if history else 0
        text = config_to_yaml(config).encode()
        name = _session_name(number, steps[-1] if steps else 0)
        atomic_write_bytes(os.path.join(self.configs, name), text)
        atomic_write_bytes(self.config_path, text)

    def copy_to(self, dest: str, up_to_step: int) -> None:
        """Copy what a learner needs to resume (checkpoints up to ``up_to_step``, config,
        metrics, theta, the sessions' configs) into ``dest``; later and partial
        checkpoints (and sessions that started after ``up_to_step``) are left out."""
        source = self.checkpoints
        partial = shutil.ignore_patterns(self.PARTIAL_CHECKPOINT_GLOB)

        def ignore(folder: str, names: list[str]) -> set[str]:
            skip = set(partial(folder, names))
            if os.path.abspath(folder) == source:
                skip |= {n for n in names if (n.isdigit() and int(n) > up_to_step)
                         or n.startswith(QUARANTINE_PREFIX)}
            return skip

        os.makedirs(dest, exist_ok=True)
        shutil.copytree(source, os.path.join(dest, self.CHECKPOINTS), ignore=ignore)
        if os.path.exists(self.config_path):
            shutil.copy2(self.config_path, dest)
        for folder in (self.metrics, self.evaluations, self.discarded):
            if os.path.isdir(folder):
                shutil.copytree(folder, os.path.join(dest, os.path.basename(folder)),
                                ignore=shutil.ignore_patterns(".tmp-*"))
        for folder in (self.theta, self.best):
            if os.path.isdir(folder):
                shutil.copytree(folder, os.path.join(dest, os.path.basename(folder)))
        if os.path.isdir(self.configs):  # the configs of the sessions up to that step
            def later(folder: str, names: list[str]) -> set[str]:
                return {n for n in names if not (m := _SESSION_CONFIG.fullmatch(n))
                        or int(m[2]) > up_to_step}

            shutil.copytree(self.configs, os.path.join(dest, self.CONFIGS), ignore=later)


_SESSION_CONFIG = re.compile(r"(\d+)-step(\d+)\.yaml")


def _session_name(number: int, step: int) -> str:
    return f"{number:03d}-step{step}.yaml"


__all__ = ["RunDir"]
