"""What one ``metalearn train`` invocation trains, and where: config, run folder, resume.

Resume order: with a run folder to resume, the run's own ``config.yaml`` is the base
(or an explicit config file if given), then ``--set`` overrides; the learner continues
from the newest readable checkpoint. A resumed config must give theta of the same
structure and shapes. Everything is validated before any folder is touched.
"""

from __future__ import annotations

import dataclasses
import os
import time

from metalearn.core.config_io import ConfigError, apply_overrides, to_dict
from metalearn.core.theta import theta_spec
from metalearn.training.config import TrainConfig, config_from_dict, load_config
from metalearn.training.run_dir import RunDir
from metalearn.training.task_mix import resolve_mix
from tasks.sampler import MixConfig


def check_resume_compatible(saved: TrainConfig, config: TrainConfig, run: RunDir) -> None:
    """A resumed run must have theta of the same structure and shapes (a different
    meta-batch is fine: the learner's buffer is a sum plus a count)."""
    theta_spec(saved.rule).check_compatible(
        theta_spec(config.rule), where=f"cannot resume {run.path}: this config's theta")


@dataclasses.dataclass(frozen=True)
class Session:
    """What one invocation trains: the config, its resolved task mix, the run folder."""

    config: TrainConfig
    run: RunDir
    resume: bool
    mix: MixConfig


def resolve_session(config_path: str | None, overrides: list[str], out: str | None,
                    resume: str | None) -> Session:
    """The ``Session`` of one invocation; ConfigError / FileNotFoundError on bad input,
    before any folder is touched and before Ray starts."""
    config, run, resuming = _config_and_run(config_path, overrides, out, resume)
    return Session(config, run, resuming, resolve_mix(config.tasks))


def _config_and_run(config_path: str | None, overrides: list[str], out: str | None,
                    resume: str | None) -> tuple[TrainConfig, RunDir, bool]:
    if resume:
        run = RunDir(resume)
        saved = run.read_config()
        if config_path:
            config = load_config(config_path, overrides)
        else:
            config = config_from_dict(apply_overrides(to_dict(saved), overrides))
        check_resume_compatible(saved, config, run)
        if not run.checkpoint_steps():
            raise ConfigError(f"{run.path} has no complete checkpoint to resume from")
        if out and os.path.abspath(out) != run.path:
            raise ConfigError("--out and --resume name different folders; a resumed run "
                              "continues in its own folder")
        return config, run, True
    config = load_config(config_path, overrides)
    run = RunDir(out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    if not run.is_empty():
        what = "a run" if run.is_run() else "not empty"
        raise ConfigError(f"{run.path} is {what}; choose a new --out"
                          + (" or use --resume" if what == "a run" else ""))
    return config, run, False


__all__ = ["Session", "check_resume_compatible", "resolve_session"]
