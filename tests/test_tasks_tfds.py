"""TFDS sources through tfds.data_source under tfds.testing.mock_data (no TensorFlow)."""

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

from tasks import tfds_sources
from tasks.sources import SourceOptions, load

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def options(tmp_path):
    return SourceOptions(data_dir=str(tmp_path / "tfds"), cache_dir=str(tmp_path / "cache"),
                         imdb_vocab=50)


@pytest.mark.parametrize("name,shape,classes", [
    ("mnist", (28, 28), 10), ("tfds_fashion_mnist", (28, 28), 10),
    ("cifar10", (32, 32, 3), 10), ("imagenet16", (16, 16, 3), 1000)])
def test_image_sources_load(name, shape, classes, options):
    with tfds.testing.mock_data(num_examples=12):
        ds = load(name, options=options, progress=False)
    assert ds.shape == shape and ds.num_classes == classes and ds.x.dtype == np.uint8
    assert ds.num_examples == (12 if name == "imagenet16" else 24)  # train (+ test)
    if name == "imagenet16":
        held, train = ds.groups["held_out"], ds.groups["meta_train"]
        assert len(held) == 200 and len(train) == 800 and not set(held) & set(train)


def test_imdb_bag_of_words(options):
    with tfds.testing.mock_data(num_examples=9):
        ds = load("imdb", options=options, progress=False)
    assert ds.modality == "text" and ds.num_classes == 2 and ds.num_examples == 18
    vocab = ds.shape[0] - 3
    assert vocab <= 50
    assert set(np.unique(ds.x)) <= {0.0, 1.0}
    assert (ds.x[:, vocab] == 1).all() and (ds.x[:, vocab + 1] == 1).all()  # start, end


def test_bag_of_words_columns():
    x = tfds_sources.bag_of_words([["a", "b", "a"], ["zzz"]], ["a", "b"])
    np.testing.assert_array_equal(x, [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert tfds_sources.tokenize(b"Great movie!<br />It's FUN") == ["great", "movie", "it's", "fun"]


def test_missing_data_dir_says_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load("cifar10", options=SourceOptions(cache_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not found in data dir"):
        load("cifar10", data_dir=str(tmp_path / "empty"),
             options=SourceOptions(cache_dir=str(tmp_path)))
