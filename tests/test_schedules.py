"""Meta-training schedules: the task-length model, the U ramp and the meta learning rate."""

import numpy as np
import pytest

from metalearn.training.config import CurriculumConfig, LearnerConfig
from metalearn.training.learner import lr_schedule
from metalearn.training.schedules import Curriculum, curriculum_at


@pytest.mark.parametrize("std,minimum", [(0.5, 1), (3.0, 1), (20.0, 1), (200.0, 5)])
def test_mean_truncations_matches_the_draws(std, minimum):
    curriculum = Curriculum(2, 4, std, minimum)
    rng = np.random.default_rng(0)
    draws = np.array([curriculum.sample_truncations(rng) for _ in range(20000)])
    assert draws.min() >= minimum
    se = draws.std() / np.sqrt(draws.size)
    # rounding to integers moves the mean by < 0.5 only where the clip bites
    assert abs(draws.mean() - curriculum.mean_truncations()) < 4 * se + 0.1
    assert curriculum.mean_task_steps() == pytest.approx(curriculum.mean_truncations() * 3)


def test_schedule_ramps_linearly_then_holds():
    config = CurriculumConfig(unroll_start=(2, 4), unroll_end=(8, 16), unroll_ramp_steps=100,
                              truncations_std_start=20.0, truncations_std_end=20000.0,
                              truncations_ramp_steps=5000)
    start, mid, end = (curriculum_at(config, step) for step in (0, 2500, 10 ** 6))
    assert (start.unroll_low, start.unroll_high, start.truncations_std) == (2, 4, 20.0)
    assert mid.truncations_std == pytest.approx(10010.0)
    assert (mid.unroll_low, mid.unroll_high) == (8, 16)
    assert end.truncations_std == 20000.0
    assert "~" in start.describe() and "U in [2, 4]" in start.describe()


def test_paper_config_ramps_truncation_spread_20_to_20000_over_5000_updates():
    from metalearn.training.config import load_config

    c = load_config("paper").curriculum
    assert (c.truncations_std_start, c.truncations_std_end, c.truncations_ramp_steps) == (
        20.0, 20000.0, 5000)


def test_lr_schedule_is_piecewise_constant():
    config = LearnerConfig(lr_values=(3e-4, 1e-4, 2e-5), lr_boundaries=(100, 150))
    lr = lr_schedule(config)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 99, 100, 149, 150, 10 ** 6)],
                               [3e-4, 3e-4, 1e-4, 1e-4, 2e-5, 2e-5], rtol=1e-6)
