"""A sweep definition (``experiments/sweeps/*.yaml``): what Tune searches and how each
trial runs. Ray-free, so a spec is validated (every searched value makes a valid training
config) before Ray starts; see docs/sweeps.md for the file format.
"""

from __future__ import annotations

import dataclasses
import json
import os

from metalearn.core.config import ConfigError
from metalearn.training.config import load_config, read_yaml, resolve_path

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# The options each scheduler type takes (anything else is a typo: refused, not ignored).
SCHEDULER_KEYS = {
    "fifo": {"type"},
    "asha": {"type", "grace_period", "reduction_factor"},
    "pbt": {"type", "perturbation_interval", "quantile_fraction", "resample_probability",
            "mutations", "synch"},
}


# ---------------------------------------------------------------------------
# the sweep definition

@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """Resources and limits of every trial."""

    workers: int = 2  # worker actors per trial (one placement-group bundle each)
    learner_cpus: float = 1.0  # head bundle: the trial's driver loop and its learner
    steps: int = 100  # each trial stops at this learner step
    minutes: float = 30.0  # and after this long (wall clock, per trial session)
    report_every: int = 5  # learner steps between reports (each with a checkpoint)
    spread: bool = False  # place the trial's bundles on different nodes if possible

    def __post_init__(self):
        if self.workers < 1:
            raise ConfigError(f"trial.workers must be >= 1, got {self.workers!r}")
        if self.learner_cpus < 0:
            raise ConfigError(f"trial.learner_cpus must be >= 0, got {self.learner_cpus!r}")
        if self.steps < 1 or self.report_every < 1:
            raise ConfigError("trial.steps and trial.report_every must be >= 1")
        if not self.minutes > 0:
            raise ConfigError(f"trial.minutes must be positive, got {self.minutes!r}")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    base: str  # training config YAML the trials start from
    overrides: tuple[str, ...]  # fixed ``key=value`` overrides on top of the base
    search: dict  # dotted key -> {grid|choice|uniform|loguniform|randint: ...} or value
    num_samples: int
    metric: str
    mode: str
    max_concurrent: int
    max_failures: int
    trial: TrialSettings
    scheduler: dict  # {"type": fifo|asha|pbt, ...}
    path: str = ""


def _check_search(key: str, value) -> None:
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in SEARCH_KINDS:
            raise ConfigError(f"search.{key}: give one of {', '.join(SEARCH_KINDS)}, "
                              f"got {sorted(value)}")
        kind, arg = next(iter(value.items()))
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"search.{key}.{kind} must be a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and len(arg) != 2:
            raise ConfigError(f"search.{key}.{kind} must be [low, high]")


def load_spec(path: str) -> SweepSpec:
    """Read and validate a sweep YAML; the trial config it makes is validated too."""
    raw = read_yaml(path, "sweep spec")
    known = {"name", "base", "set", "search", "num_samples", "metric", "mode",
             "max_concurrent", "max_failures", "trial", "scheduler"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]}")
    search = raw.get("search") or {}
    for key, value in search.items():
        _check_search(key, value)
    fixed = raw.get("set") or {}
    overrides = tuple(f"{k}={json.dumps(v)}" for k, v in fixed.items())
    trial_raw = raw.get("trial") or {}
    bad = sorted(set(trial_raw) - {f.name for f in dataclasses.fields(TrialSettings)})
    if bad:
        raise ConfigError(f"{path}: unknown sweep key trial.{bad[0]}")
    scheduler = dict(raw.get("scheduler") or {"type": "fifo"})
    kind = scheduler.get("type", "fifo")
    if kind not in SCHEDULER_KEYS:
        raise ConfigError(f"scheduler.type must be fifo, asha or pbt, "
                          f"got {scheduler.get('type')!r}")
    bad = sorted(set(scheduler) - SCHEDULER_KEYS[kind])
    if bad:
        raise ConfigError(f"{path}: unknown {kind} scheduler key scheduler.{bad[0]} "
                          f"(known: {', '.join(sorted(SCHEDULER_KEYS[kind] - {'type'}))})")
    if not isinstance(scheduler.get("synch", False), bool):
        raise ConfigError(f"scheduler.synch must be true or false, "
                          f"got {scheduler['synch']!r}")
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be min or max, got {mode!r}")
    spec = SweepSpec(
        name=str(raw.get("name") or os.path.splitext(os.path.basename(path))[0]),
        base=resolve_path(str(raw.get("base", "experiments/local.yaml"))),
        overrides=overrides, search=dict(search),
        num_samples=int(raw.get("num_samples", 1)),
        metric=str(raw.get("metric", "meta_loss_rolling")), mode=mode,
        max_concurrent=int(raw.get("max_concurrent", 0)),
        max_failures=int(raw.get("max_failures", 2)),
        trial=TrialSettings(**trial_raw), scheduler=scheduler,
        path=os.path.abspath(path))
    for key, value in spec.search.items():  # every searched value must make a valid config
        if isinstance(value, dict):
            kind, arg = next(iter(value.items()))
            candidates = arg if kind in ("grid", "choice") else arg[:1]
        else:
            candidates = [value]
        for candidate in candidates:
            trial_config(spec, {key: candidate})
    for key, value in (scheduler.get("mutations") or {}).items():
        _check_search(key, value)
        if "grid" in value or "randint" in value:
            raise ConfigError(f"scheduler.mutations.{key}: use choice, uniform or loguniform")
    return spec


def trial_config(spec: SweepSpec, params: dict):
    """The TrainConfig of one trial: base, fixed overrides, sampled values, trial limits."""
    sampled = [f"{k}={json.dumps(v)}" for k, v in params.items()
               if not k.startswith("_")]
    limits = [f"run.steps={spec.trial.steps}", f"run.minutes={spec.trial.minutes}",
              f"worker.num_workers={spec.trial.workers}"]
    return load_config(spec.base, list(spec.overrides) + sampled + limits)
