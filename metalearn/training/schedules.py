"""Schedules of meta-training, as functions of the learner step (docs/training.md).

* ``Curriculum``: what a worker needs at one step: the range of the truncation length U
  (uniform) and the spread of the number of truncations per task, drawn when a task
  starts as round(Normal(std, std)) and at least ``min_truncations``. A task's length in
  inner steps is the sum of its truncations' U. This is the project's one task-length
  model (the paper's shifted normal, SPEC section 4); tasks themselves carry none.
* ``TruncationSchedule``: ``CurriculumConfig`` -> ``Curriculum`` at a step (linear ramps).
* ``lr_at``: the piecewise-constant meta learning rate (``LearnerConfig``), the same
  schedule ``metalearn.training.learner.make_optimizer`` compiles into optax.

This module is the only owner of these draws; docs/training.md describes the ramps.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from metalearn.training.config import CurriculumConfig, LearnerConfig


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """Values a worker needs from the learner's curriculum at one step."""

    unroll_low: int
    unroll_high: int
    truncations_std: float
    min_truncations: int = 1

    def sample_unroll(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.unroll_low, self.unroll_high + 1))

    def sample_truncations(self, rng: np.random.Generator) -> int:
        """Truncations for a new task: round(Normal(mean=std, std)), at least the minimum."""
        count = rng.normal(self.truncations_std, self.truncations_std)
        return max(self.min_truncations, int(round(count)))

    def mean_truncations(self) -> float:
        """E[max(m, X)] for X ~ Normal(s, s), m = ``min_truncations`` (rounding ignored):
        m Phi(a) + s (1 - Phi(a)) + s phi(a) with a = (m - s) / s."""
        s, m = self.truncations_std, float(self.min_truncations)
        a = (m - s) / s
        cdf = 0.5 * (1.0 + math.erf(a / math.sqrt(2.0)))
        pdf = math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        return m * cdf + s * (1.0 - cdf) + s * pdf

    def mean_task_steps(self) -> float:
        """Mean inner steps a task started now lives (mean truncations x mean U)."""
        return self.mean_truncations() * (self.unroll_low + self.unroll_high) / 2.0

    def describe(self) -> str:
        return (f"truncations per task ~ max({self.min_truncations}, round(N({self.truncations_std:.4g}, "
                f"{self.truncations_std:.4g}))) (mean {self.mean_truncations():.1f}), "
                f"U in [{self.unroll_low}, {self.unroll_high}]: "
                f"~{self.mean_task_steps():.0f} inner steps per task")


def _ramp(start: float, end: float, step: int, steps: int) -> float:
    frac = 1.0 if steps <= 0 else min(max(step / steps, 0.0), 1.0)
    return start + (end - start) * frac


class TruncationSchedule:
    """The curriculum as a function of the learner step (``CurriculumConfig``).

    ``at(step)`` interpolates the U range and the truncations-per-task spread linearly
    between their start and end values over their ramps. The learner owns one and hands
    ``at(step)`` to workers with theta; workers draw from it and never see the config.
    """

    def __init__(self, config: CurriculumConfig):
        self.config = config

    def at(self, step: int) -> Curriculum:
        return curriculum_at(self.config, step)


def curriculum_at(config: CurriculumConfig, step: int) -> Curriculum:
    """Linear interpolation of the U range and truncation spread at learner ``step``."""
    low = _ramp(config.unroll_start[0], config.unroll_end[0], step, config.unroll_ramp_steps)
    high = _ramp(config.unroll_start[1], config.unroll_end[1], step, config.unroll_ramp_steps)
    low, high = int(round(low)), int(round(high))
    std = _ramp(config.truncations_std_start, config.truncations_std_end, step,
                config.truncations_ramp_steps)
    return Curriculum(low, max(low, high), float(std), config.min_truncations)


def lr_at(config: LearnerConfig, step: int) -> float:
    """Piecewise-constant meta learning rate for the update number ``step`` (0-based)."""
    index = int(np.searchsorted(np.asarray(config.lr_boundaries), step, side="right"))
    return float(config.lr_values[index])


__all__ = ["Curriculum", "TruncationSchedule", "curriculum_at", "lr_at"]
