"""Typed configuration of a meta-training run (``metalearn train``; docs/training.md,
Configuration).

A ``TrainConfig`` nests the core configs (rule, meta-objective, unroll, estimator) with the
learner, curriculum, worker, tasks and run sections. It loads from YAML: a packaged config
by name (shipped inside the package: it works from any directory after any install) or a
file, which may start from another with ``base: NAME_OR_PATH``. ``--set a.b=value``
overrides apply before validation; unknown keys are errors naming the dotted key.
``rule_preset`` (``paper``, or ``small``: ``RuleConfig.small()``) is the base of ``rule``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Literal

import numpy as np
import yaml

from metalearn.core.theta import theta_spec
from metalearn.core.config import (ACTIVATIONS, EstimatorConfig, HorizonConfig,
                                   MetaObjectiveConfig, RuleConfig, UnrollConfig)
from metalearn.core.config_io import (AtLeastOne, Bound, ConfigError, NonNegative, NonNegativeFloat,
                                      Positive, apply_overrides, check_fields, from_dict,
                                      is_packaged_name, merge, read_yaml, resolve_config,
                                      to_dict)
from metalearn.evaluation.config import ContinuousEvalConfig


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """The central learner: meta-batching, optax, staleness, checkpoints (docs/training.md)."""

    meta_batch: AtLeastOne = 256  # gradients averaged per theta update
    # Piecewise-constant meta learning rate: lr_values[i] until lr_boundaries[i] updates.
    lr_values: tuple[float, ...] = (3e-4, 1e-4, 2e-5)
    lr_boundaries: tuple[int, ...] = (100_000, 150_000)
    clip_norm: Positive = 5.0  # global-norm clip of the averaged meta-gradient
    # Adam's constants, optax's defaults; named so a run's config.yaml records them.
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    # A gradient computed with theta version v is applied at version V only if
    # V - v <= max_staleness; older ones are dropped and counted.
    max_staleness: NonNegative = 16
    loss_window: AtLeastOne = 256  # gradients in the rolling meta-loss (overall and per dataset)
    # The trainable subspace of theta, as ThetaSpec.mask selectors ("merge_w",
    # "merge_w.w:hebb", "compute_h"): empty trains every entry. ``frozen`` entries are
    # kept at their initial values; both may be given (trainable minus frozen).
    # ``trainable_mask`` is the one place the two are combined (docs/training.md).
    trainable: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    seed: int = 0  # theta initialisation and the learner's RNG
    # A fresh run scores this many initial thetas on validation and starts from the best
    # (metalearn.training.start; 1: the seed's own draw, unscored).
    start_candidates: AtLeastOne = 1
    checkpoint_minutes: Positive = 5.0
    keep_checkpoints: AtLeastOne = 3

    def __post_init__(self):
        check_fields(self, "learner")
        if len(self.lr_values) != len(self.lr_boundaries) + 1:
            raise ConfigError(f"learner.lr_values needs one more entry than "
                              f"learner.lr_boundaries, got {len(self.lr_values)} values and "
                              f"{len(self.lr_boundaries)} boundaries")
        if any(not v > 0 for v in self.lr_values):
            raise ConfigError(f"learner.lr_values must be positive, got {list(self.lr_values)}")
        if list(self.lr_boundaries) != sorted(set(self.lr_boundaries)) or any(
                b <= 0 for b in self.lr_boundaries):
            raise ConfigError(f"learner.lr_boundaries must be increasing positive steps, got "
                              f"{list(self.lr_boundaries)}")


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """Truncation lengths and truncations per task as functions of the learner step.

    U ~ Uniform{lo..hi}, [lo, hi] moving linearly from ``unroll_start`` to ``unroll_end``
    over ``unroll_ramp_steps`` updates. Truncations per task ~ round(Normal(s, s)),
    at least ``min_truncations``, s moving linearly from ``truncations_std_start`` to
    ``truncations_std_end`` over ``truncations_ramp_steps`` updates. (The paper's
    wording of this ramp is ambiguous, see docs/training.md; these are config values.)
    """

    unroll_start: tuple[int, ...] = (2, 4)
    unroll_end: tuple[int, ...] = (8, 15)
    unroll_ramp_steps: NonNegative = 50_000
    truncations_std_start: Positive = 20.0
    truncations_std_end: Positive = 20_000.0
    truncations_ramp_steps: NonNegative = 5_000
    min_truncations: AtLeastOne = 1

    def __post_init__(self):
        check_fields(self, "curriculum")
        for name in ("unroll_start", "unroll_end"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ConfigError(f"curriculum.{name} must be [low, high] with "
                                  f"1 <= low <= high, got {list(lo_hi)}")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Worker actors: how many, their resources, and what each truncation looks like."""

    # 0: one per CPU of the Ray cluster. The learner actor reserves no CPU (it runs beside
    # the driver on its node and is idle most of the time, docs/training.md).
    num_workers: NonNegative = 0
    cpus_per_worker: AtLeastOne = 1  # XLA threads are pinned to this many cores per worker
    # A worker whose constructor fails (a task source it cannot read, a missing package
    # on its node): "stop" ends the run with the cause; "continue" trains with the
    # workers that started (and stops only if none did).
    on_start_failure: Literal["stop", "continue"] = "stop"
    gpus_per_worker: NonNegativeFloat = 0.0
    tasks_per_worker: AtLeastOne = 1  # >1: vmap several tasks of one architecture (GPU workers)
    batch_size: Annotated[int, Bound(2)] = 128  # unlabelled inner batch per step
    # --runner population: learner updates per program call (K meta-steps of
    # learner.meta_batch tasks each, the optax update inside; metalearn.core.population).
    meta_steps: AtLeastOne = 4
    # --runner population: devices a meta-step's tasks are split over. 0: the most local
    # accelerators that share learner.meta_batch evenly (on CPU: one device); N: N, on
    # CPU N CPU devices (unreliable on XLA:CPU today: docs/training.md).
    devices: NonNegative = 0
    seed: int = 0  # root of every worker's task stream
    # Persistent XLA compilation cache shared by workers and restarts; "" picks
    # ~/.cache/metalearn/jax, "none" turns it off.
    compilation_cache: str = ""

    def __post_init__(self):
        check_fields(self, "worker")


@dataclasses.dataclass(frozen=True)
class ArchitectureOverrides:
    """Keys of a task mix's ``architecture`` section to replace (unset: the mix's own)."""

    min_layers: int | None = None
    max_layers: int | None = None
    min_width: int | None = None
    max_width: int | None = None
    output_size: int | None = None
    activations: tuple[str, ...] | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "activations" and value is not None and value < 1:
                raise ConfigError(f"tasks.architecture.{field.name} must be >= 1, "
                                  f"got {value!r}")
        if self.activations is not None:
            bad = [a for a in self.activations if a not in ACTIVATIONS]
            if not self.activations or bad:
                raise ConfigError(f"tasks.architecture.activations: unknown {bad}; choose "
                                  f"from {list(ACTIVATIONS)}")

    def values(self) -> dict:
        """The keys that are set, as a mix's ``architecture`` entries."""
        return {k: v for k, v in to_dict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """Where tasks come from (the ``tasks`` package)."""

    # A packaged task mix by name (local, paper, tiny) or a YAML file; a relative path is
    # taken from the referring config file's folder, then the current directory. The
    # driver reads and validates it and ships it to workers as data.
    mix: str = "local"
    data_dir: str | None = None
    # Every new base-model shape (architecture, N-way, number of targets) costs one
    # compilation of the meta-gradient (about a minute on one CPU core for the small
    # rule), so CPU runs bound the shapes: ``architecture`` overrides keys of the mix's
    # architecture section (min_layers, max_layers, min_width, max_width, activations),
    # and a non-empty ``ways`` replaces the N-way choices of every non-fixed component.
    architecture: ArchitectureOverrides = ArchitectureOverrides()
    ways: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Limits and reporting of one ``metalearn train`` invocation."""

    minutes: NonNegativeFloat = 10.0  # wall-clock budget; 0: no time limit
    steps: NonNegative = 0  # stop at this learner step; 0: no step limit
    address: str = ""  # Ray address to join; "" starts a local Ray
    # "ray": learner and worker actors; "local": the same loop in one process, no Ray
    # (metalearn.training.local: tests, debugging); "population": one process whose
    # compiled program runs worker.meta_steps learner updates per call, the optax update
    # inside (metalearn.training.population; es_full only).
    runner: Literal["ray", "local", "population"] = "ray"
    progress_every_s: NonNegativeFloat = 2.0
    metrics_flush_s: NonNegativeFloat = 15.0  # seconds between metrics segment flushes
    tensorboard: bool = False
    # Trackers beside TensorBoard: "wandb", "mlflow" (metalearn.training.trackers).
    loggers: tuple[Literal["wandb", "mlflow"], ...] = ()

    def __post_init__(self):
        check_fields(self, "run")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    rule_preset: Literal["paper", "small"] = "paper"
    rule: RuleConfig = RuleConfig()
    objective: MetaObjectiveConfig = MetaObjectiveConfig()
    unroll: UnrollConfig = UnrollConfig()  # how truncations are differentiated
    estimator: EstimatorConfig = EstimatorConfig()  # which estimator makes the gradient
    # Whole inner runs of the full-horizon estimators (estimator.kind es_full, guided_es)
    horizon: HorizonConfig = HorizonConfig()
    learner: LearnerConfig = LearnerConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    worker: WorkerConfig = WorkerConfig()
    tasks: TasksConfig = TasksConfig()
    run: RunConfig = RunConfig()
    # Continuous held-out evaluation (an evaluator actor; off unless a config turns it on).
    evaluator: ContinuousEvalConfig = ContinuousEvalConfig(enabled=False)

    def __post_init__(self):
        if self.learner.frozen or self.learner.trainable:
            trainable_mask(self.rule, self.learner)  # selectors must name theta entries
        if self.estimator.kind == "guided_es" and self.worker.tasks_per_worker > 1:
            raise ConfigError(f"worker.tasks_per_worker must be 1 with estimator.kind "
                              f"guided_es (its surrogate subspace is per worker), got "
                              f"{self.worker.tasks_per_worker}; es_full takes T > 1 (a "
                              f"population worker)")


def trainable_mask(rule, learner: LearnerConfig) -> np.ndarray | None:
    """[P] bool: True at the theta entries the learner trains (``learner.trainable``, all
    if empty, minus ``learner.frozen``); None when every entry trains."""
    if not learner.trainable and not learner.frozen:
        return None
    spec = theta_spec(rule)
    mask = (spec.mask(learner.trainable, "learner.trainable") if learner.trainable
            else np.ones(spec.num_params, bool))
    if learner.frozen:
        mask &= ~spec.mask(learner.frozen, "learner.frozen")
    if not mask.any():
        raise ConfigError("learner.trainable / learner.frozen leave no theta entry to train")
    return mask


DEFAULT_CONFIG = "local"  # the packaged local default (metalearn/configs/local.yaml)
# Keys of the unroll section before the estimator got its own (2026-12-06).
MOVED_TO_ESTIMATOR = {"estimator": "estimator.kind", "pairs": "estimator.pairs",
                      "perturbation_std": "estimator.perturbation_std",
                      "variance_decay": "estimator.variance_decay"}


def config_from_dict(values: dict) -> TrainConfig:
    """Validate a nested dict into a TrainConfig (unknown keys name their dotted path)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a training config must be a mapping, got {type(values).__name__}")
    values = dict(values)
    preset = values.get("rule_preset", "paper")
    if preset not in ("paper", "small"):
        raise ConfigError(f"rule_preset must be 'paper' or 'small', got {preset!r}")
    rule_values = values.pop("rule", None) or {}
    if not isinstance(rule_values, dict):
        raise ConfigError("rule must be a mapping")
    base = RuleConfig.small() if preset == "small" else RuleConfig()
    moved = sorted(set(values.get("unroll") or {}) & set(MOVED_TO_ESTIMATOR))
    if moved:
        raise ConfigError(f"unroll.{moved[0]} is now {MOVED_TO_ESTIMATOR[moved[0]]}: move it "
                          f"in the config file (the estimator has its own section; "
                          f"docs/estimators.md)")
    config = from_dict(TrainConfig, values)
    rule = from_dict(RuleConfig, {**to_dict(base), **rule_values}, "rule")
    return dataclasses.replace(config, rule=rule)


def read_config_values(ref: str, *, relative_to: str | None = None,
                       _seen: tuple[str, ...] = ()) -> dict:
    """The raw values of training config ``ref`` (a packaged name or a file), with its
    ``base`` chain merged in and a relative ``tasks.mix`` made absolute."""
    path = resolve_config(ref, relative_to=relative_to)
    if path in _seen:
        raise ConfigError(f"{path}: base configs form a loop ({' -> '.join(_seen)})")
    values = read_yaml(path, "config file")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a training config must be a mapping")
    folder = os.path.dirname(path)
    tasks = values.get("tasks")
    mix = tasks.get("mix") if isinstance(tasks, dict) else None
    if isinstance(mix, str) and not is_packaged_name(mix) and not os.path.isabs(mix) \
            and os.path.isfile(os.path.join(folder, mix)):
        values = merge(values, {"tasks": {"mix": os.path.normpath(os.path.join(folder, mix))}})
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name a config, got {base!r}")
    return merge(read_config_values(base, relative_to=folder, _seen=_seen + (path,)),
                 values)


def load_config(ref: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A training config (default the packaged ``local``) plus ``--set`` overrides."""
    values = read_config_values(ref or DEFAULT_CONFIG)
    return config_from_dict(apply_overrides(values, overrides or []))


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
