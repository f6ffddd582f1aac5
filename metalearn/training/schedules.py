"""The curriculum of meta-training as a function of the learner step: the truncation
length U and the truncations per task (docs/training.md, Curriculum). The meta learning
rate's schedule is ``metalearn.training.learner.lr_schedule``."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from metalearn.training.config import CurriculumConfig


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
        std = f"{self.truncations_std:.4g}"
        return (f"truncations per task ~ max({self.min_truncations}, round(N({std}, {std}))) "
                f"(mean {self.mean_truncations():.1f}), "
                f"U in [{self.unroll_low}, {self.unroll_high}]: "
                f"~{self.mean_task_steps():.0f} inner steps per task")


def _ramp(start: float, end: float, step: int, steps: int) -> float:
    frac = 1.0 if steps <= 0 else min(max(step / steps, 0.0), 1.0)
    return start + (end - start) * frac


def curriculum_at(config: CurriculumConfig, step: int) -> Curriculum:
    """Linear interpolation of the U range and truncation spread at learner ``step``."""
    low, high = (int(round(_ramp(start, end, step, config.unroll_ramp_steps)))
                 for start, end in zip(config.unroll_start, config.unroll_end))
    std = _ramp(config.truncations_std_start, config.truncations_std_end, step,
                config.truncations_ramp_steps)
    return Curriculum(low, max(low, high), float(std), config.min_truncations)


__all__ = ["Curriculum", "curriculum_at"]
