"""A sweep definition (``experiments/sweeps/*.yaml``): what Tune searches and how each
trial runs. Ray-free frozen dataclasses, so ``load_spec`` validates a spec before Ray
starts; see docs/sweeps.md (Sweep files) for the format and what is checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Annotated, Any, Literal

from metalearn.core.config_io import (AtLeastOne, Bound, ConfigError, NonNegative,
                                      NonNegativeFloat, Positive, apply_values, check_fields,
                                      from_dict, read_yaml, to_dict)
from metalearn.core.theta import theta_spec
from metalearn.training.config import TrainConfig, config_from_dict, read_config_values
from metalearn.training.metrics import LEARNER_COLUMNS, estimator_columns
from metalearn.training.task_mix import resolve_mix
from tasks.sampler import MixConfig

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
MUTATION_KINDS = ("choice", "uniform", "loguniform")


# ---------------------------------------------------------------------------
# searched values

@dataclasses.dataclass(frozen=True)
class Domain:
    """Where a searched value comes from: exactly one field is set.

    grid: every value, one trial each; choice: one value drawn per trial;
    uniform / loguniform: a float in [low, high]; randint: an integer in [low, high).
    """

    grid: tuple[Any, ...] | None = None
    choice: tuple[Any, ...] | None = None
    uniform: tuple[float, ...] | None = None
    loguniform: tuple[float, ...] | None = None
    randint: tuple[int, ...] | None = None

    def __post_init__(self):
        # Messages start "domain.<field>" so from_dict re-anchors them at the entry.
        kind, args = self.kind, self.args
        if not args:
            raise ConfigError(f"domain.{kind} must be a non-empty list")
        if kind not in ("uniform", "loguniform", "randint"):
            return
        if len(args) != 2:
            raise ConfigError(f"domain.{kind} must be [low, high]")
        low, high = args
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"domain.{kind} must be finite numbers [low, high], "
                              f"got {list(args)}")
        if kind == "uniform" and low > high:
            raise ConfigError(f"domain.uniform: low {low} > high {high}; give [low, high]")
        if kind == "loguniform" and not 0 < low <= high:
            raise ConfigError(f"domain.loguniform needs 0 < low <= high (a log scale), "
                              f"got {list(args)}")
        if kind == "randint" and not low < high:
            raise ConfigError(f"domain.randint needs low < high (high is excluded), "
                              f"got {list(args)}")

    @property
    def kind(self) -> str:
        """The one field that is set (``load_spec`` checks there is exactly one)."""
        return next(k for k in SEARCH_KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> tuple:
        return getattr(self, self.kind)

    def candidates(self) -> tuple:
        """Values a trial may get that ``load_spec`` checks make a valid config: every
        grid or choice value, both ends of a range."""
        if self.kind in ("grid", "choice"):
            return self.args
        low, high = self.args
        return (low, high - 1) if self.kind == "randint" else (low, high)


@dataclasses.dataclass(frozen=True)
class SearchEntry:
    """One searched training-config key: a ``Domain`` or, without one, a fixed value."""

    key: str  # dotted TrainConfig field, e.g. learner.lr_values
    domain: Domain | None = None
    value: Any = None


def _entries(section: str, values: Any, kinds: tuple[str, ...],
             fixed_allowed: bool) -> tuple[SearchEntry, ...]:
    """``SearchEntry`` s of a ``key: value-or-{kind: args}`` mapping named ``section``."""
    if values is None:
        return ()
    if not isinstance(values, dict):
        raise ConfigError(f"{section} must be a mapping of dotted keys, got "
                          f"{type(values).__name__}")
    entries = []
    for key, value in values.items():
        path = f"{section}.{key}"
        if not isinstance(value, dict):
            if not fixed_allowed:
                raise ConfigError(f"{path}: use {', '.join(kinds[:-1])} or {kinds[-1]}")
            entries.append(SearchEntry(str(key), value=value))
            continue
        if len(value) != 1 or next(iter(value)) not in SEARCH_KINDS:
            raise ConfigError(f"{path}: give one of {', '.join(SEARCH_KINDS)}, "
                              f"got {sorted(value)}")
        if next(iter(value)) not in kinds:
            raise ConfigError(f"{path}: use {', '.join(kinds[:-1])} or {kinds[-1]}")
        entries.append(SearchEntry(str(key), domain=from_dict(Domain, value, path)))
    return tuple(entries)


# ---------------------------------------------------------------------------
# trials and schedulers

@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """Resources and limits of every trial."""

    workers: AtLeastOne = 2  # worker actors per trial (one placement-group bundle each)
    learner_cpus: NonNegativeFloat = 1.0  # head bundle: the trial's driver loop and learner
    steps: AtLeastOne = 100  # each trial stops at this learner step
    minutes: Positive = 30.0  # and after this long (wall clock, per trial session)
    report_every: AtLeastOne = 5  # learner steps between reports (each with a checkpoint)
    spread: bool = False  # place the trial's bundles on different nodes if possible

    def __post_init__(self):
        check_fields(self, "trial")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A Tune trial scheduler; ``load_spec`` picks the subclass named by ``type``."""

    type: str = "fifo"


@dataclasses.dataclass(frozen=True)
class FifoScheduler(SchedulerConfig):
    """Every trial runs to its end."""

    type: Literal["fifo"] = "fifo"


@dataclasses.dataclass(frozen=True)
class AshaScheduler(SchedulerConfig):
    """ASHA: the worse trials stop at each rung (time = the learner step)."""

    type: Literal["asha"] = "asha"
    grace_period: int | None = None  # None: trial.report_every
    reduction_factor: Annotated[float, Bound(1, open_low=True)] = 2.0

    def __post_init__(self):
        check_fields(self, "scheduler")
        if self.grace_period is not None and self.grace_period < 1:
            raise ConfigError(f"scheduler.grace_period must be >= 1 learner step, "
                              f"got {self.grace_period}")


@dataclasses.dataclass(frozen=True)
class PbtScheduler(SchedulerConfig):
    """Population-based training: worse trials continue from a better one's checkpoint
    with mutated values."""

    type: Literal["pbt"] = "pbt"
    perturbation_interval: int | None = None  # None: trial.report_every
    # The share of trials cloned, and of donors.
    quantile_fraction: Annotated[float, Bound(0, 0.5)] = 0.5
    resample_probability: Annotated[float, Bound(0, 1)] = 0.25
    mutations: tuple[SearchEntry, ...] = ()  # choice, uniform or loguniform domains
    synch: bool = False

    def __post_init__(self):
        check_fields(self, "scheduler")
        if not self.mutations:
            raise ConfigError("scheduler.mutations is required for pbt")
        if self.perturbation_interval is not None and self.perturbation_interval < 1:
            raise ConfigError(f"scheduler.perturbation_interval must be >= 1 learner step, "
                              f"got {self.perturbation_interval}")


SCHEDULERS: dict[str, type[SchedulerConfig]] = {
    "fifo": FifoScheduler, "asha": AshaScheduler, "pbt": PbtScheduler}


def _scheduler(values: Any) -> SchedulerConfig:
    if values is None:
        return FifoScheduler()
    if not isinstance(values, dict):
        raise ConfigError(f"scheduler must be a mapping, got {type(values).__name__}")
    kind = values.get("type", "fifo")
    if kind not in SCHEDULERS:
        raise ConfigError(f"scheduler.type must be fifo, asha or pbt, got {kind!r}")
    values = dict(values)
    if kind == "pbt" and "mutations" in values:
        values["mutations"] = _entries("scheduler.mutations", values["mutations"],
                                       MUTATION_KINDS, fixed_allowed=False)
    return from_dict(SCHEDULERS[kind], values, "scheduler")


@dataclasses.dataclass(frozen=True)
class SearchAlgConfig:
    """How trials' searched values are chosen: ``random``, Tune's variant generator, or
    ``optuna`` with its ``sampler`` seeded by ``seed`` (docs/sweeps.md)."""

    type: Literal["random", "optuna"] = "random"
    sampler: Literal["tpe", "random", "qmc"] = "tpe"
    seed: int = 0


# ---------------------------------------------------------------------------
# the sweep definition

@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    base: str  # training config the trials start from: a packaged name or a file
    set: dict = dataclasses.field(default_factory=dict)  # fixed values at dotted keys
    search: tuple[SearchEntry, ...] = ()
    num_samples: AtLeastOne = 1
    metric: str = "meta_loss_rolling"
    mode: Literal["min", "max"] = "min"
    max_concurrent: NonNegative = 0  # 0: as many trials as the cluster fits
    max_failures: Annotated[int, Bound(-1)] = 2  # -1: retry for ever
    trial: TrialSettings = TrialSettings()
    scheduler: SchedulerConfig = FifoScheduler()
    search_alg: SearchAlgConfig = SearchAlgConfig()
    # Where trials' checkpoints go: "" (OUT/tune), a folder every node mounts, or a
    # URI (s3://bucket/prefix); `metalearn sweep --storage` overrides it.
    storage: str = ""
    # Trackers for the sweep's reports, beside Tune's TensorBoard files: wandb, mlflow.
    loggers: tuple[Literal["wandb", "mlflow"], ...] = ()
    path: str = ""  # the spec file (absolute), set by load_spec
    # Read on the submitting machine by ``load_spec`` and carried to the trials, which
    # may run on other nodes: the base config's values, and the resolved task mix of
    # every task section a validated trial config has (JSON of ``tasks`` -> mix dict).
    base_values: dict = dataclasses.field(default_factory=dict)
    mixes: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.set, dict):
            raise ConfigError(f"set must be a mapping of dotted keys to values, got "
                              f"{type(self.set).__name__}")
        check_fields(self, "")
        if self.search_alg.type == "optuna":
            if self.scheduler.type == "pbt":
                raise ConfigError("search_alg.type optuna with scheduler pbt: PBT changes "
                                  "trials' values itself; use asha or fifo with Optuna")
            for entry in self.search:
                if entry.domain is None:
                    continue
                if entry.domain.kind == "grid":
                    raise ConfigError(f"search.{entry.key}: grid enumerates values, Optuna "
                                      f"samples them: use choice (or search_alg.type: "
                                      f"random)")
                if entry.domain.kind == "choice" and any(
                        isinstance(v, (list, tuple, dict)) for v in entry.domain.args):
                    raise ConfigError(f"search.{entry.key}: Optuna chooses among single "
                                      f"values (numbers, strings), not lists: search a "
                                      f"scalar key, or use search_alg.type: random")


_FILE_KEYS = tuple(f.name for f in dataclasses.fields(SweepSpec)
                   if f.name not in ("path", "base_values", "mixes"))


def load_spec(path: str) -> SweepSpec:
    """Read and validate a sweep YAML; the trial config it makes is validated too."""
    raw = read_yaml(path, "sweep spec")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep spec must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]}")
    values = dict(raw)
    values["name"] = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    values["base"] = str(raw.get("base", "local"))
    values["set"] = raw.get("set") or {}
    values["trial"] = raw.get("trial") or {}
    try:
        values["search"] = _entries("search", raw.get("search"), SEARCH_KINDS,
                                    fixed_allowed=True)
        values["scheduler"] = _scheduler(raw.get("scheduler"))
        values["search_alg"] = from_dict(SearchAlgConfig, raw.get("search_alg") or {},
                                         "search_alg")
        spec = from_dict(SweepSpec, values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    base_values = read_config_values(spec.base, relative_to=os.path.dirname(
        os.path.abspath(path)))
    spec = dataclasses.replace(spec, path=os.path.abspath(path), base_values=base_values)
    configs = _checked_configs(spec, path)
    for config in configs:  # every trial must report the metric Tune ranks them by
        try:
            check_metric(spec.metric, config)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    tasks = {mix_key(config): config.tasks for config in configs}
    return dataclasses.replace(spec, mixes={k: to_dict(resolve_mix(t)) for k, t in tasks.items()})


# Keys ``trial_config`` sets from ``trial`` after everything else: a spec that sets or
# searches them would be silently overridden.
TRIAL_LIMITS = {"run.steps": "trial.steps", "run.minutes": "trial.minutes",
                "worker.num_workers": "trial.workers"}


def _checked_configs(spec: SweepSpec, path: str) -> list[TrainConfig]:
    """The base trial config and one per searched or mutated candidate value, each
    validated; ConfigError names ``path`` and the entry."""
    try:
        base = trial_config(spec, {})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    mutations = spec.scheduler.mutations if isinstance(spec.scheduler, PbtScheduler) else ()
    sections = [("set", SearchEntry(str(k), value=v)) for k, v in spec.set.items()]
    sections += [("search", e) for e in spec.search]
    sections += [("scheduler.mutations", e) for e in mutations]
    configs = [base]
    for section, entry in sections:
        where = f"{path}: {section}.{entry.key}"
        limit = _sets_limit(entry.key, entry.value)
        if limit:
            raise ConfigError(f"{where}: {limit} is set by {TRIAL_LIMITS[limit]} in every "
                              f"trial; set it there")
        if section == "set":
            continue  # validated in the base config
        if entry.domain and entry.domain.kind in ("uniform", "loguniform") \
                and _field_type(entry.key) is int:
            raise ConfigError(f"{where}: {entry.domain.kind} draws floats but {entry.key} "
                              f"is an integer; use "
                              f"{'randint or choice' if section == 'search' else 'choice'}")
        candidates = entry.domain.candidates() if entry.domain else (entry.value,)
        for candidate in candidates:  # every searched or mutated value: a valid config
            try:
                config = trial_config(spec, {entry.key: candidate})
            except ConfigError as err:
                raise ConfigError(f"{where} = {candidate!r}: {err}") from None
            if mutations:  # PBT clones checkpoints between trials: theta must fit
                theta_spec(base.rule).check_compatible(theta_spec(config.rule), where=(
                    f"{where} = {candidate!r}: PBT trials continue from each other's "
                    f"checkpoints, so theta must keep its shapes; this value's theta"))
            configs.append(config)
    return configs


def _sets_limit(key: str, value: Any) -> str | None:
    """The trial limit that setting ``key`` to ``value`` would set, if any."""
    for limit in TRIAL_LIMITS:
        if key == limit:
            return limit
        if limit.startswith(key + ".") and isinstance(value, dict):
            node = value
            for part in limit[len(key) + 1:].split("."):
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return limit
    return None


def _field_type(key: str) -> Any:
    """The annotation of training-config field ``key`` (Optional stripped), or None."""
    cls: Any = TrainConfig
    for part in key.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
        if typing.get_origin(cls) in (typing.Union, types.UnionType):
            cls = next(a for a in typing.get_args(cls) if a is not type(None))
    return cls


# What a trial's reports hold besides its metrics row (sweep.TrialReporter, and Tune's
# own counters); a held-out evaluation's columns also carry ``eval_step``.
REPORT_COLUMNS = ("trial_id", "restored_from", "restored_step", "worker_failures",
                  "learner_restarts", "eval_step", "training_iteration", "time_total_s",
                  "time_this_iter_s")


def check_metric(metric: str, config: TrainConfig) -> None:
    """Raise a ConfigError naming ``metric`` unless trials of ``config`` report it (Tune
    fails a trial whose reports lack the metric; a typo would waste a whole sweep): the
    learner's row, ``loss/<dataset>``, the reporter's extras or the evaluator's columns."""
    ev = config.evaluator
    columns = [*LEARNER_COLUMNS, *estimator_columns(config.estimator.kind)]
    if metric.startswith("loss/") or metric in [*columns, *REPORT_COLUMNS, *ev.columns()]:
        return
    if metric.startswith("eval"):
        if not ev.enabled:
            hint = "the trials run no evaluator: set evaluator.enabled: true"
        else:
            hint = (f"the evaluator writes {', '.join(ev.columns())} (datasets "
                    f"{list(ev.datasets)}, long_datasets {list(ev.long_names())}, "
                    f"horizons {list(ev.horizons)}, long_every {ev.long_every})")
    else:
        hint = f"training rows have {', '.join(columns)} and loss/<dataset>"
    raise ConfigError(f"metric: {metric!r} is not a column the trials report; {hint}")


def mix_key(config: TrainConfig) -> str:
    """The key of ``config``'s task section in ``SweepSpec.mixes``."""
    return json.dumps(to_dict(config.tasks), sort_keys=True)


def trial_mix(spec: SweepSpec, config: TrainConfig) -> MixConfig:
    """A trial's task mix: carried in the spec, or resolved where the trial runs (a task
    section only a continuous search domain reaches)."""
    values = spec.mixes.get(mix_key(config))
    return from_dict(MixConfig, values) if values is not None else resolve_mix(config.tasks)


def trial_config(spec: SweepSpec, params: dict) -> TrainConfig:
    """The TrainConfig of one trial: the base config's values with the fixed values, the
    sampled ``params`` (dotted keys; Tune's own ``_``-prefixed keys skipped) and the
    trial's limits set in that order."""
    values = dict(spec.base_values)
    sampled = {k: v for k, v in params.items() if not k.startswith("_")}
    limits = {key: getattr(spec.trial, field.split(".")[1])
              for key, field in TRIAL_LIMITS.items()}
    for updates in (spec.set, sampled, limits):
        values = apply_values(values, updates)
    return config_from_dict(values)


__all__ = ["REPORT_COLUMNS", "SearchAlgConfig", "TRIAL_LIMITS", "check_metric",
           "AshaScheduler", "Domain", "FifoScheduler", "PbtScheduler", "SchedulerConfig",
           "SearchEntry", "SweepSpec", "TrialSettings", "load_spec", "mix_key",
           "trial_config", "trial_mix"]
