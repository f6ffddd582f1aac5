"""Fashion-MNIST from IDX files: the real Debian files, the parser, clear errors."""

import atexit
import gzip
import os
import shutil
import tempfile

# One throwaway parquet cache per test process, never the user's.
os.environ["METALEARN_CACHE"] = os.path.join(tempfile.gettempdir(),
                                             f"metalearn-test-cache-{os.getpid()}")
atexit.register(shutil.rmtree, os.environ["METALEARN_CACHE"], True)

import numpy as np
import pytest

from tasks import idx
from tasks.sources import SourceOptions, load


def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", images, 0x08)
    np.testing.assert_array_equal(idx.read_idx(str(tmp_path / "a.gz")), images)
    values = np.array([1, -2, 300], np.int32)
    _write_idx(tmp_path / "b", values, 0x0C)
    np.testing.assert_array_equal(idx.read_idx(str(tmp_path / "b")), values)
    (tmp_path / "c").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        idx.read_idx(str(tmp_path / "c"))
    (tmp_path / "d").write_bytes(bytes([0, 0, 8, 1]) + np.array([10], ">u4").tobytes() + b"xy")
    with pytest.raises(ValueError, match="truncated"):
        idx.read_idx(str(tmp_path / "d"))


def test_small_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), 0x08)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8), 0x08)
    options = SourceOptions(fashion_mnist_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    test, val = load("fashion_mnist", options=options), load("fashion_mnist_val", options=options)
    # The reported set is the test file alone; validation is the train file alone.
    assert test.num_examples == 4 and val.num_examples == 6 and test.shape == (28, 28)
    assert test.info["splits"] == {"test": 4} and val.info["splits"] == {"train": 6}


def test_missing_files_say_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*--fashion-mnist-dir"):
        load("fashion_mnist", options=SourceOptions(fashion_mnist_dir=str(tmp_path)))


@pytest.mark.skipif(not os.path.isdir(idx.DEFAULT_DIR),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install "
                           "dataset-fashion-mnist; .ci/run installs it)")
def test_real_fashion_mnist(tmp_path):
    ds = load("fashion_mnist", options=SourceOptions(cache_dir=str(tmp_path)))
    assert ds.num_examples == 10000 and ds.shape == (28, 28) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.class_index.counts, np.full(10, 1000))
    assert ds.x.max() == 255 and 40 < ds.x.mean() < 100  # real images, not zeros
    assert ds.info["splits"] == {"test": 10000}
    val = load("fashion_mnist_val", options=SourceOptions(cache_dir=str(tmp_path)))
    assert val.num_examples == 60000 and val.info["splits"] == {"train": 60000}
    np.testing.assert_array_equal(val.class_index.counts, np.full(10, 6000))
