"""Source registry, the Dataset interface, file:PATH sources and scikit-learn sources."""

import atexit
import os
import shutil
import tempfile

# One throwaway parquet cache per test process, never the user's.
os.environ["METALEARN_CACHE"] = os.path.join(tempfile.gettempdir(),
                                             f"metalearn-test-cache-{os.getpid()}")
atexit.register(shutil.rmtree, os.environ["METALEARN_CACHE"], True)

import numpy as np
import pytest

from metalearn.core.config import ConfigError
from tasks import sources
from tasks.sources import Dataset, SourceOptions, check_name, load, registry


def test_registry_has_every_source():
    names = set(registry())
    assert {"glyphs", "digits", "two_moons", "photo_patches", "fashion_mnist",
            "fashion_mnist_val", "mnist", "tfds_fashion_mnist", "cifar10", "imagenet16",
            "imdb"} <= names


def test_photo_patches_are_natural_image_regions_the_same_everywhere(tmp_path):
    patches = load("photo_patches", options=SourceOptions(cache_dir=str(tmp_path)))
    assert patches.shape == (14, 14) and patches.x.dtype == np.uint8
    assert patches.num_classes == 48 and patches.num_examples == 48 * 300
    np.testing.assert_array_equal(patches.class_index.counts, np.full(48, 300))
    assert patches.class_names[0] == "china/0,0" and patches.class_names[-1] == "flower/3,5"
    # Dense grey images (unlike strokes): most pixels lit, regions of different brightness.
    assert (patches.x > 20).mean() > 0.8
    means = [patches.x[patches.y == c].mean() for c in range(48)]
    assert np.ptp(means) > 50
    again = load("photo_patches", options=SourceOptions(cache_dir=str(tmp_path / "other")))
    np.testing.assert_array_equal(again.x, patches.x)  # seeded: identical on every machine


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown source 'nope'.*known sources"):
        load("nope")
    with pytest.raises(ConfigError, match="needs a path"):
        check_name("file:")


def test_digits_and_two_moons_load_once_per_process():
    digits = load("digits")
    assert digits.shape == (8, 8) and digits.x.dtype == np.uint8
    assert digits.num_classes == 10 and digits.num_examples == 1797
    assert load("digits") is digits  # memoised
    moons = load("two_moons")
    assert moons.modality == "vector" and moons.shape == (2,)
    np.testing.assert_array_equal(moons.x, sources.load("two_moons", options=SourceOptions(
        use_cache=False)).x)  # seeded generator: the same points everywhere


def test_class_index_groups_examples_by_class():
    y = np.array([2, 0, 1, 2, 0, 2], np.int32)
    ds = Dataset("t", np.zeros((6, 3), np.float32), y, ("a", "b", "c"), "vector")
    idx = ds.class_index
    np.testing.assert_array_equal(idx.counts, [2, 1, 3])
    for c in range(3):
        ids = idx.order[idx.offsets[c]:idx.offsets[c] + idx.counts[c]]
        assert np.all(y[ids] == c)


def test_file_sources_npz_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 5, 6), dtype=np.uint8)
    labels = np.repeat([7, 3, 9], 10)
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    ds = load(f"file:{tmp_path / 'd.npz'}")
    assert ds.modality == "image" and ds.shape == (5, 6)
    assert ds.class_names == ("3", "7", "9")
    np.testing.assert_array_equal(np.array(ds.class_names)[ds.y].astype(int), labels)

    vectors = rng.normal(size=(20, 4)).astype(np.float32)
    table = pa.table({"x": pa.array(list(vectors)), "y": pa.array(np.arange(20) % 2)})
    pq.write_table(table, tmp_path / "v.parquet")
    ds = load(f"file:{tmp_path / 'v.parquet'}")
    assert ds.modality == "vector" and ds.shape == (4,)
    np.testing.assert_allclose(ds.x, vectors)


def test_file_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load(f"file:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2)))
    with pytest.raises(ConfigError, match="lacks"):
        load(f"file:{tmp_path / 'bad.npz'}")
    (tmp_path / "d.csv").write_text("x,y\n")
    with pytest.raises(ConfigError, match="unsupported format"):
        load(f"file:{tmp_path / 'd.csv'}")
