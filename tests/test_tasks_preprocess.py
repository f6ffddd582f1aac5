"""Resizing, grey/colour and scaling."""

import numpy as np
import pytest

from metalearn.core.config import ConfigError
from tasks import preprocess
from tasks.preprocess import PreprocessConfig
from tasks.registry import Dataset


def test_resize_matrix_rows_are_averages():
    for n_in, n_out in ((8, 14), (28, 14), (32, 16), (14, 28)):
        m = preprocess.resize_matrix(n_in, n_out)
        assert m.shape == (n_out, n_in) and (m >= 0).all()
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)


def test_resize_halving_is_a_local_average_and_constants_stay():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 28, 28, 1)).astype(np.uint8)
    out = preprocess.resize(x, 14)
    assert out.shape == (3, 14, 14, 1)
    assert abs(out.astype(float).mean() - x.astype(float).mean()) < 1.0
    const = np.full((2, 8, 8, 1), 77, np.uint8)
    assert (preprocess.resize(const, 14) == 77).all()


def test_prepare_grey_colour_and_scale():
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    grey = preprocess.prepare_images(colour, PreprocessConfig(image_size=16))
    assert grey.shape == (4, 16, 16, 1)
    kept = preprocess.prepare_images(colour, PreprocessConfig(image_size=16, colour=True))
    assert kept.shape == (4, 16, 16, 3)
    ds = Dataset("c", colour, np.zeros(4, np.int32), ("a",))
    assert preprocess.prepared(ds, PreprocessConfig(16)) is preprocess.prepared(
        ds, PreprocessConfig(16))  # once per process
    unit = preprocess.scale(grey, PreprocessConfig(), "image")
    signed = preprocess.scale(grey, PreprocessConfig(scale="signed"), "image")
    assert unit.dtype == np.float32 and 0 <= unit.min() and unit.max() <= 1
    np.testing.assert_allclose(signed, unit * 2 - 1, atol=1e-6)


def test_bad_size():
    with pytest.raises(ConfigError, match="image_size"):
        PreprocessConfig(image_size=15)
