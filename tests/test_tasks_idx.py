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
from tasks.sources import SourceOptions, clear_memo, load


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


@pytest.mark.skipif(not os.path.isdir(idx.DEFAULT_DIR),
                    reason="needs Debian's dataset-fashion-mnist files to copy")
def test_fetch_from_files_makes_eval_run_without_the_debian_package(tmp_path, monkeypatch,
                                                                    capsys, request):
    import json

    from metalearn.cli import main
    # A machine without the Debian package, and a user who has the IDX files somewhere.
    source = tmp_path / "downloads"
    shutil.copytree(idx.DEFAULT_DIR, source)
    monkeypatch.setattr(idx, "DEFAULT_DIR", str(tmp_path / "no-debian-package"))
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METALEARN_FASHION_MNIST_DIR", raising=False)
    # Datasets an earlier test loaded in this process (from Debian's files) are forgotten,
    # now and after this test.
    clear_memo()
    request.addfinalizer(clear_memo)
    with pytest.raises(FileNotFoundError, match="metalearn data fetch fashion_mnist --from"):
        load("fashion_mnist", options=SourceOptions())
    assert main(["data", "fetch", "fashion_mnist"]) == 2
    assert "needs --from DIR" in capsys.readouterr().err
    assert main(["data", "fetch", "fashion_mnist", "--from", str(source), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test"] == 10000 and summary["train"] == 60000
    assert summary["dir"] == str(tmp_path / "cache" / "fashion-mnist")
    assert sorted(os.listdir(summary["dir"])) == sorted(os.listdir(source))
    assert idx.fashion_mnist_dir(SourceOptions()) == summary["dir"]
    code = main(["eval", "pretrained:laptop", "--dataset", "fashion_mnist", "--steps", "5",
                 "--seeds", "1", "--baselines", "none", "--out", str(tmp_path / "report"),
                 "--json", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "fashion_mnist" in json.dumps(report)


def test_fetch_refuses_files_that_are_not_fashion_mnist_and_copies_nothing(tmp_path,
                                                                          monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte",
                   rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), 0x08)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8),
                   0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 12], np.uint8), 0x08)
    options = SourceOptions(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: expected 4 labels in 0..9"):
        idx.fetch_fashion_mnist(str(tmp_path), options)
    assert not os.path.exists(idx.fetched_dir(options))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        idx.fetch_fashion_mnist(str(tmp_path / "nowhere"), options)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        idx.fetch_fashion_mnist(str(tmp_path), options)
