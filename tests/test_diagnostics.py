"""Collapse diagnostics: principal components for 90% of the variance, weight growth."""

import numpy as np
import pytest

from metalearn.core.base_model import BaseParams
from metalearn.evaluation.diagnostics import components_for_variance, rank90, weight_growth


def test_rank_one_data_needs_one_component():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=32)
    features = rng.normal(size=(500, 1)) * direction + 7.0  # offset: centring removes it
    assert components_for_variance(features) == 1
    assert components_for_variance(features, fraction=1.0) == 1


def test_isotropic_gaussian_needs_about_90_percent_of_the_dimensions():
    # Equal variance in 32 directions: 0.9 * 32 = 28.8 -> 29 components (sampling noise
    # of 20000 rows moves the explained fractions by well under one component).
    features = np.random.default_rng(1).normal(size=(20000, 32))
    assert components_for_variance(features) == 29
    assert components_for_variance(features, fraction=0.5) == 16


def test_hand_computed_variances():
    # Independent axes with variances 16, 4, 1 (total 21): the first explains 0.762,
    # the first two 0.952, so 90% needs 2 and 96% needs 3.
    x = np.array([[4.0, 0, 0], [-4, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 1], [0, 0, -1]])
    assert components_for_variance(x, 0.7) == 1
    assert components_for_variance(x, 0.9) == 2
    assert components_for_variance(x, 0.96) == 3


def test_constant_representation_has_no_components():
    assert components_for_variance(np.full((100, 32), 0.3, np.float32)) == 0
    assert components_for_variance(np.zeros((10, 8))) == 0  # every unit dead


def test_non_finite_features():
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        components_for_variance(bad)
    assert np.isnan(rank90(bad))
    assert rank90(np.eye(3)) == 2.0  # centred eye(3): two equal components


def _params(w0):
    return BaseParams((np.asarray(w0, np.float32), np.ones((2, 2))), (), ())


def test_weight_growth_is_the_frobenius_ratio_of_the_first_layer():
    before = _params([[3.0, 0.0], [0.0, 4.0]])  # ||W|| = 5
    after = _params([[0.0, 30.0], [40.0, 0.0]])  # ||W|| = 50; other layers ignored
    assert weight_growth(before, after) == pytest.approx(10.0)
    assert weight_growth(before, before) == pytest.approx(1.0)
    assert np.isnan(weight_growth(before, _params([[np.inf, 0], [0, 1]])))
    assert np.isnan(weight_growth(_params(np.zeros((2, 2))), after))
