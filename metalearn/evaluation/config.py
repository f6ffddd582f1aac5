"""Typed configs of an evaluation: ``DataConfig``, ``EvalConfig``, ``ContinuousEvalConfig``.

Frozen dataclasses like every config of the project: built from YAML, dicts and
``--set key=value`` overrides by ``metalearn.core.config_io`` (``from_dict`` names the
dotted field of a bad key or value). This module imports neither JAX nor the baselines'
code: ``ContinuousEvalConfig`` is part of the training config.
"""

from __future__ import annotations

import dataclasses

from metalearn.core.config import ACTIVATIONS
from metalearn.core.config_io import ConfigError
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
    shots: int = 10
    test_size: int = 1000
    pool_size: int = 10000
    split_seed: int = 0

    def __post_init__(self):
        if self.image_size not in (0, *IMAGE_SIZES):
            raise ConfigError(f"data.image_size must be one of {list(IMAGE_SIZES)} or 0 (native), "
                              f"got {self.image_size}")
        for name in ("ways", "shots", "test_size", "pool_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.ways < 2:
            raise ConfigError(f"data.ways must be at least 2, got {self.ways}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation: data, base model, budget, baselines (names in ``baselines.BASELINES``)."""

    data: DataConfig = DataConfig()
    width: int = 128
    depth: int = 4
    activation: str = "relu"
    steps: int = 200  # inner steps of the learned rule
    seeds: int = 3
    batch_size: int = 128
    ridge: float = 0.1
    baselines: tuple[str, ...] = baselines.DEFAULTS
    baseline_steps: int = 2000  # training steps of the VAE and prototypical networks
    supervised_steps: int = 300

    def __post_init__(self):
        object.__setattr__(self, "baselines", tuple(self.baselines))
        baselines.check(self.baselines)
        for name in ("steps", "baseline_steps", "supervised_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be positive, got {self.seeds}")
        if self.batch_size < 2:
            raise ConfigError(f"batch size must be at least 2, got {self.batch_size}")
        check_architecture(self.width, self.depth, self.activation)


@dataclasses.dataclass(frozen=True)
class ContinuousEvalConfig:
    """Small-budget evaluation of the latest theta during meta-training.

    every: learner steps between evaluations.
    datasets: held-out sources (each evaluated at ``image_size``, native if 0).
    steps: inner steps per rollout; seeds: rollouts per dataset.
    """

    enabled: bool = True
    every: int = 100
    datasets: tuple[str, ...] = ("digits",)
    image_size: int = 0
    width: int = 128
    depth: int = 2
    activation: str = "relu"
    steps: int = 20
    seeds: int = 1
    batch_size: int = 128
    test_size: int = 500
    shots: int = 10
    data_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if self.every < 1:
            raise ConfigError(f"evaluator.every must be positive, got {self.every}")
        if not self.datasets:
            raise ConfigError("evaluator.datasets must name at least one dataset")
        for name in ("steps", "seeds", "test_size", "shots"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluator.{name} must be positive, got "
                                  f"{getattr(self, name)}")
        check_architecture(self.width, self.depth, self.activation)


__all__ = ["DataConfig", "EvalConfig", "ContinuousEvalConfig", "check_architecture"]
