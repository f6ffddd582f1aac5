"""Typed configs of an evaluation: ``DataConfig``, ``EvalConfig``, ``ContinuousEvalConfig``
(and ``EvaluationSchedule``, when its evaluations are due during meta-training).

Frozen dataclasses like every config of the project: built from YAML, dicts and
``--set key=value`` overrides by ``metalearn.core.config_io`` (``from_dict`` names the
dotted field of a bad key or value). This module imports neither JAX nor the baselines'
code: ``ContinuousEvalConfig`` is part of the training config.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from metalearn.core.config import ACTIVATIONS
from metalearn.core.config_io import (AtLeastOne, Bound, ConfigError, Fraction, NonNegative,
                                      NonNegativeFloat, check_fields)
from metalearn.evaluation import baselines
from tasks.preprocess import IMAGE_SIZES


def check_architecture(width: int, depth: int, activation: str) -> None:
    """Raise ConfigError unless ``width`` x ``depth`` ``activation`` is a valid base model."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of "
                          f"{', '.join(ACTIVATIONS)}")
    if depth < 1 or width < 1:
        raise ConfigError(f"width and depth must be positive, got width {width}, depth {depth}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data and how much of it.

    dataset: a ``tasks.sources`` name (``digits``, ``fashion_mnist``, ``two_moons``,
      ``mnist``, ``imdb``, ``imagenet16``, ``file:PATH``...).
    image_size: 0 keeps the native resolution; 14, 16 or 28 resizes images.
    group: restrict classes to a source group (e.g. ``held_out`` of ``imagenet16``).
    ways: classes per task; datasets with more classes draw a subset per seed.
    shots: labelled examples per class for the readouts (the paper's 10-shot).
    test_size: labelled test examples (at most).
    pool_size: unlabelled examples the rule and the unsupervised baselines train on.

    Errors name fields as ``data.<field>``, the section of ``EvalConfig`` this is.
    """

    dataset: str = "digits"
    image_size: int = 0
    group: str | None = None
    data_dir: str | None = None
    ways: int = 10
    shots: AtLeastOne = 10
    test_size: AtLeastOne = 1000
    pool_size: AtLeastOne = 10000
    split_seed: int = 0  # the train/validation/test split of a dataset; fixed so scores compare

    def __post_init__(self):
        if self.image_size not in (0, *IMAGE_SIZES):
            raise ConfigError(f"data.image_size must be one of {list(IMAGE_SIZES)} or 0 (native), "
                              f"got {self.image_size}")
        check_fields(self, "data")
        if self.ways < 2:
            raise ConfigError(f"data.ways must be at least 2, got {self.ways}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation: data, base model, budget, baselines (names in ``baselines.BASELINES``)."""

    data: DataConfig = DataConfig()
    width: int = 128
    depth: int = 4
    activation: str = "relu"
    steps: NonNegative = 200  # inner steps of the learned rule
    seeds: AtLeastOne = 3
    batch_size: Annotated[int, Bound(2)] = 128
    ridge: float = 0.1
    baselines: tuple[str, ...] = baselines.DEFAULTS
    baseline_steps: NonNegative = 2000  # training steps of the VAE and prototypical networks
    supervised_steps: NonNegative = 300
    # inner steps scored besides the standard horizons (``readout.eval_points_for``)
    extra_points: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "baselines", tuple(self.baselines))
        if any(p < 0 for p in self.extra_points):
            raise ConfigError(f"extra_points must be >= 0, got {list(self.extra_points)}")
        baselines.check(self.baselines)
        check_fields(self, "")
        check_architecture(self.width, self.depth, self.activation)


@dataclasses.dataclass(frozen=True)
class ContinuousEvalConfig:
    """Small-budget evaluation of the latest theta during meta-training.

    every: learner steps between (short) evaluations.
    datasets: held-out sources, each evaluated at ``image_size``; 0 (the default) takes
      the resolution ``metalearn eval`` and ``metalearn table`` use (14 px for images
      larger than 16 px, else native), so that what selects and what reports agree.
    steps: inner steps per short rollout; seeds: rollouts per dataset; long_seeds: rollouts
      of a long evaluation (0: ``seeds``). The same seeds every time (paired), so that
      successive thetas are compared on the same tasks, draws and batches.
    horizons: inner-step counts at which a long rollout is measured (accuracy, rank90,
      w_growth at each; the rollout runs to the largest).
    long_every: learner steps between long-horizon rollouts; 0 disables them.
    long_datasets: datasets that get long rollouts (each must be in ``datasets``);
      empty: the first of ``datasets`` that is available on the machine.
    final_timeout_s: how long the end of a run waits for its final evaluation of the
      last theta (the Ray runner's evaluator actor; the local runner runs it inline).
    best_margin: how far a theta's validation score must exceed the best so far (the
      start's, at first) to become the run's best theta, the one exported: a gain
      smaller than the validation estimate's noise is not taken.
    select_from: the score is the mean accuracy over the horizons of at least this many
      steps (0: all of them; the largest alone if none is that long). A rule judged at
      long horizons is selected on them: a short horizon's gain can hide a long one's
      loss. A minimum rather than a list, so that overriding ``horizons`` never leaves
      it pointing at horizons that are not measured.
    """

    enabled: bool = True
    every: AtLeastOne = 100
    datasets: tuple[str, ...] = ("digits",)
    image_size: int = 0
    width: int = 128
    depth: int = 2
    activation: str = "relu"
    steps: AtLeastOne = 20
    seeds: AtLeastOne = 1
    batch_size: int = 128
    test_size: AtLeastOne = 500
    shots: AtLeastOne = 10
    data_dir: str | None = None
    horizons: tuple[int, ...] = (100, 300, 1000)
    long_every: NonNegative = 200  # 0: no long rollouts
    long_datasets: tuple[str, ...] = ()
    long_seeds: NonNegative = 0  # 0: evaluator.seeds
    # Inner lr of every rollout (0: the rule's). A validation screen can run fewer
    # steps at a larger lr: 100 steps at 3e-2 measured like 1,000 at 3e-3 (the horizon
    # is inner_lr x steps; docs/results.md), at a tenth of the cost.
    inner_lr: Fraction = 0.0
    final_timeout_s: NonNegativeFloat = 1800.0
    best_margin: Fraction = 0.0  # a score difference
    select_from: NonNegative = 0  # inner steps; 0: every horizon scores

    def selection_horizons(self) -> tuple[int, ...]:
        """The horizons whose mean accuracy scores a theta (``select_from``)."""
        long = tuple(h for h in self.horizons if h >= self.select_from)
        return long or self.horizons[-1:]

    def __post_init__(self):
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "horizons", tuple(sorted(set(self.horizons))))
        object.__setattr__(self, "long_datasets", tuple(self.long_datasets))
        check_fields(self, "evaluator")
        if not self.datasets:
            raise ConfigError("evaluator.datasets must name at least one dataset")
        if self.long_every and not self.horizons:
            raise ConfigError("evaluator.horizons must name at least one inner-step count "
                              "when evaluator.long_every > 0")
        if any(h < 1 for h in self.horizons):
            raise ConfigError(f"evaluator.horizons must be positive, got "
                              f"{list(self.horizons)}")
        missing = [d for d in self.long_datasets if d not in self.datasets]
        if missing:
            raise ConfigError(f"evaluator.long_datasets: {', '.join(missing)} not in "
                              f"evaluator.datasets {list(self.datasets)}")
        check_architecture(self.width, self.depth, self.activation)

    def long_names(self) -> tuple[str, ...]:
        """The datasets meant for long rollouts (``long_datasets``, else the first of
        ``datasets``; at run time a missing first dataset gives way to the next)."""
        if not self.long_every:
            return ()
        return self.long_datasets or self.datasets[:1]

    def columns(self) -> list[str]:
        """The metrics columns this evaluator writes when every dataset is available
        (``eval/<dataset>/...``): what a sweep's metric may name."""
        if not self.enabled:
            return []
        cols = [f"eval/{d}/{m}" for d in self.datasets
                for m in ("meta_loss", "accuracy", "logreg_accuracy")]
        cols += [f"eval/{d}/{m}@{h}" for d in self.long_names()
                 for h in self.horizons for m in LONG_METRICS]
        return cols + ["eval_s"] + (["eval_long_s"] if self.long_every else [])


# The columns of a long rollout, per dataset and horizon h: ``<metric>@<h>``.
LONG_METRICS = ("accuracy", "rank90", "w_growth")


class EvaluationSchedule:
    """When the continuous evaluation is due: a short rollout every ``evaluator.every``
    learner steps, a long one every ``evaluator.long_every`` (0: never), and both once
    more at the end of a run for a theta not yet measured. Shared by the local runner
    and the Ray runner's evaluator callback."""

    def __init__(self, config: ContinuousEvalConfig):
        self.every, self.long_every = config.every, config.long_every
        self.last_short = self.last_long = 0

    def start(self, step: int, measure_now: bool = False) -> None:
        """Count from ``step``; ``measure_now``: evaluate ``step`` itself first (a new run's
        start, so that the best theta by validation can be the start)."""
        self.last_short = self.last_long = step
        if measure_now:
            self.last_short, self.last_long = step - self.every, step - self.long_every

    def due(self, step: int, final: bool = False) -> dict | None:
        """``{"short": bool, "long": bool}`` for ``evaluate`` (marked as done), or None.
        ``final``: whatever has not measured ``step`` yet."""
        if final:
            short = step > self.last_short
            long = bool(self.long_every) and step > self.last_long
        else:
            short = step - self.last_short >= self.every
            long = bool(self.long_every) and step - self.last_long >= self.long_every
        if not (short or long):
            return None
        if short:
            self.last_short = step
        if long:
            self.last_long = step
        return {"short": short, "long": long}


__all__ = ["EvaluationSchedule", "DataConfig", "EvalConfig", "ContinuousEvalConfig", "LONG_METRICS",
           "check_architecture"]
