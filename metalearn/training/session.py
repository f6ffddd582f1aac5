"""What one ``metalearn train`` invocation trains, and where: config, run folder, resume.

Everything is validated before any folder is touched. See docs/training.md (Faults: the
resume order and what a resumed config may change; Run folder: ``configs/``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from metalearn.core.config_io import ConfigError, apply_overrides, to_dict
from metalearn.core.theta import theta_spec
from metalearn.training.config import TrainConfig, config_from_dict, load_config
from metalearn.training.events import read_events
from metalearn.training.run_dir import RunDir
from metalearn.training.task_mix import resolve_mix
from tasks.sampler import MixConfig
from tasks.sources import check_name

# Dotted keys (a section, or one field) a resume may change without
# ``--allow-config-change``: docs/training.md (Faults) says why each is here.
RESUME_FREE = (
    "run",
    "worker.num_workers", "worker.cpus_per_worker", "worker.gpus_per_worker",
    "worker.on_start_failure", "worker.compilation_cache",
    "learner.checkpoint_minutes", "learner.keep_checkpoints",
    "tasks.data_dir",
    "evaluator",
)


def check_resume_compatible(saved: TrainConfig, config: TrainConfig, run: RunDir) -> None:
    """A resumed run must have theta of the same structure and shapes (a different
    meta-batch is fine: the learner's buffer is a sum plus a count)."""
    theta_spec(saved.rule).check_compatible(
        theta_spec(config.rule), where=f"cannot resume {run.path}: this config's theta")


def resume_free(key: str) -> bool:
    """True if dotted ``key`` may change on resume without ``--allow-config-change``."""
    return any(key == free or key.startswith(free + ".") for free in RESUME_FREE)


_MISSING = object()


def _leaves(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: TrainConfig, config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for each value that differs and changes what is trained
    (``resume_free`` keys left out), in the config's order."""
    old, new = _leaves(to_dict(saved)), _leaves(to_dict(config))
    keys = list(new) + [k for k in old if k not in new]
    return [(k, old.get(k, _MISSING), new.get(k, _MISSING)) for k in keys
            if old.get(k, _MISSING) != new.get(k, _MISSING) and not resume_free(k)]


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value)


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``learner.meta_batch 4 -> 8, estimator.kind 'truncated' -> 'pes'``."""
    return ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changes)


@dataclasses.dataclass(frozen=True)
class Session:
    """What one invocation trains: the config, its resolved task mix, the run folder;
    ``changes``: what a resume allowed to change (``config_changes``), else empty."""

    config: TrainConfig
    run: RunDir
    resume: bool
    mix: MixConfig
    changes: tuple = ()

    @classmethod
    def of(cls, config: TrainConfig, run_dir, *, resume: bool = False,
           mix: MixConfig | None = None) -> "Session":
        """A session built in code (tests, a sweep's trial): ``config`` as given."""
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        return cls(config, run, resume, mix if mix is not None else resolve_mix(config.tasks))


def resolve_session(config_path: str | None, overrides: list[str], out: str | None,
                    resume: str | None, *, allow_config_change: bool = False) -> Session:
    """The ``Session`` of one invocation; ConfigError / FileNotFoundError on bad input,
    before any folder is touched and before Ray starts. A resume whose config changes
    what is trained is refused unless ``allow_config_change`` (docs/training.md, Faults)."""
    config, run, resuming, changes = _config_and_run(config_path, overrides, out, resume,
                                                     allow_config_change)
    check_evaluator(config)
    return Session(config, run, resuming, resolve_mix(config.tasks), tuple(changes))


def check_evaluator(config: TrainConfig) -> None:
    """The continuous evaluator's datasets are source names (a typo would only show as
    a dataset skipped at run time)."""
    if not config.evaluator.enabled:
        return
    for index, name in enumerate(config.evaluator.datasets):
        try:
            check_name(name)
        except ConfigError as err:
            raise ConfigError(f"evaluator.datasets[{index}]: {err}") from None


def _config_and_run(config_path: str | None, overrides: list[str], out: str | None,
                    resume: str | None, allow_config_change: bool
                    ) -> tuple[TrainConfig, RunDir, bool, list]:
    if resume:
        run = RunDir(resume)
        saved = run.read_config()
        config = (load_config(config_path, overrides) if config_path
                  else config_from_dict(apply_overrides(to_dict(saved), overrides)))
        check_resume_compatible(saved, config, run)
        if out and os.path.abspath(out) != run.path:
            raise ConfigError("--out and --resume name different folders; a resumed run "
                              "continues in its own folder")
        if not run.checkpoint_steps():
            if any(e.get("event") == "session_start" for e in read_events(run.path)):
                raise ConfigError(f"{run.path} has no complete checkpoint to resume from")
            # Stopped before its first session started (while it scored its start
            # candidates, say): nothing was trained, so the run starts again here, from
            # the start it chose if it got that far.
            print(f"{run.path} stopped before its first session trained: starting it "
                  f"again in the same folder", file=sys.stderr)
            return config, run, False, []
        changes = config_changes(saved, config)
        if changes and not allow_config_change:
            raise ConfigError(
                f"cannot resume {run.path} with a changed config: "
                f"{describe_changes(changes)}; pass --allow-config-change to train the "
                f"next steps with it (each session's config is kept in "
                f"{os.path.join(run.path, RunDir.CONFIGS)}/)")
        return config, run, True, changes
    config = load_config(config_path, overrides)
    run = RunDir(out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    if os.path.exists(run.path) and not os.path.isdir(run.path):
        raise ConfigError(f"--out {run.path} is a file; choose a new --out")
    if not run.is_empty():
        what = "a run" if run.is_run() else "not empty"
        raise ConfigError(f"{run.path} is {what}; choose a new --out"
                          + (" or use --resume" if what == "a run" else ""))
    return config, run, False, []


__all__ = ["RESUME_FREE", "Session", "check_evaluator", "check_resume_compatible",
           "config_changes", "describe_changes", "resolve_session", "resume_free"]
