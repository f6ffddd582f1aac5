"""Parquet cache: round trip, keyed by inputs, corrupt or stale files are rebuilt."""

import numpy as np

from tasks import cache
from tasks.registry import Dataset, SourceOptions


def _dataset():
    rng = np.random.default_rng(0)
    return Dataset("demo", rng.integers(0, 256, (12, 4, 4), dtype=np.uint8),
                   np.arange(12, dtype=np.int32) % 3, ("a", "b", "c"), "image",
                   {"g": (0, 2)}, {"note": "x"})


def test_round_trip_and_single_build(tmp_path):
    options = SourceOptions(cache_dir=str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return _dataset()

    first = cache.cached("demo", {"v": 1}, build, options)
    second = cache.cached("demo", {"v": 1}, build, options)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.y, second.y)
    assert second.class_names == ("a", "b", "c") and second.groups == {"g": (0, 2)}
    assert second.info == {"note": "x"} and second.x.dtype == np.uint8
    cache.cached("demo", {"v": 2}, build, options)  # other inputs: another file
    assert len(calls) == 2


def test_corrupt_cache_is_rebuilt(tmp_path, capsys):
    options = SourceOptions(cache_dir=str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return _dataset()

    cache.cached("demo", {"v": 1}, build, options)
    path = cache.cache_path("demo", {"v": 1}, options)
    with open(path, "r+b") as f:  # truncate the footer away
        f.truncate(100)
    again = cache.cached("demo", {"v": 1}, build, options)
    assert len(calls) == 2
    assert "rebuilding" in capsys.readouterr().err
    np.testing.assert_array_equal(again.x, _dataset().x)
    # ...and the rebuilt file is valid again.
    cache.cached("demo", {"v": 1}, build, options)
    assert len(calls) == 2
    with open(path, "wb") as f:
        f.write(b"not parquet at all")
    cache.cached("demo", {"v": 1}, build, options)
    assert len(calls) == 3


def test_no_cache_option(tmp_path):
    options = SourceOptions(cache_dir=str(tmp_path), use_cache=False)
    cache.cached("demo", {"v": 1}, _dataset, options)
    assert not list(tmp_path.iterdir())
