"""Fashion-MNIST from its original IDX files; no TFDS, no download.

``fashion_mnist`` is the official test file (10,000 images), the held-out set that
reports use; ``fashion_mnist_val`` is the official train file (60,000), the
meta-validation set that selects (never reported).

Debian's ``dataset-fashion-mnist`` package installs the four files in
``/usr/share/datasets/fashion-mnist``; any folder holding them (gzipped or not) works
(``sources.fashion_mnist_dir`` in a mix, ``--fashion-mnist-dir`` on the command line,
or $METALEARN_FASHION_MNIST_DIR).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from tasks.cache import cached
from tasks.registry import Dataset, SourceOptions, register

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# IDX type codes (third byte of the magic number) -> numpy dtype (big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0x0000TTNN, NN big-endian uint32 dims."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: expected {count} values of shape {dims.tolist()}")
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(dims).astype(
        dtype.newbyteorder("="))


def _find(folder: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {folder}: install Debian's "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass "
        f"--fashion-mnist-dir (sources.fashion_mnist_dir) pointing at the IDX files")


def fashion_mnist_dir(options: SourceOptions) -> str:
    return (options.fashion_mnist_dir or os.environ.get("METALEARN_FASHION_MNIST_DIR")
            or DEFAULT_DIR)


def _build_split(name: str, splits: tuple[str, ...], options: SourceOptions) -> Dataset:
    folder = fashion_mnist_dir(options)
    paths = {split: tuple(_find(folder, stem) for stem in FILES[split]) for split in splits}
    stat = {p: os.path.getsize(p) for pair in paths.values() for p in pair}

    def build() -> Dataset:
        xs, ys, counts = [], [], []
        for split, (images, labels) in paths.items():
            x, y = read_idx(images), read_idx(labels)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{images} has {x.shape[0]} images, {labels} {y.shape[0]} labels")
            xs.append(x.astype(np.uint8))
            ys.append(y.astype(np.int32))
            counts.append((split, int(x.shape[0])))
        return Dataset(name, np.concatenate(xs), np.concatenate(ys), CLASS_NAMES,
                       "image", info={"origin": folder, "splits": dict(counts)})

    return cached(name, {"files": stat}, build, options)


# Two disjoint sources, so that what selects a rule never sees what reports it
# (docs/evaluation.md, "Validation and test"): the official test file is the held-out
# set every reported figure uses; the official train file is the meta-validation set
# that screens, the continuous evaluator, checkpoint choice and sweep ranking use.
@register("fashion_mnist", "Fashion-MNIST 28x28 grey, 10 classes, the official test file "
          "(10000): the reported held-out set", needs=f"IDX files (Debian dataset-fashion-mnist, "
          f"{DEFAULT_DIR})")
def build_fashion_mnist(options: SourceOptions, progress: bool = True) -> Dataset:
    return _build_split("fashion_mnist", ("test",), options)


@register("fashion_mnist_val", "Fashion-MNIST 28x28 grey, 10 classes, the official train "
          "file (60000): the meta-validation set, never reported",
          needs=f"IDX files (Debian dataset-fashion-mnist, {DEFAULT_DIR})")
def build_fashion_mnist_val(options: SourceOptions, progress: bool = True) -> Dataset:
    return _build_split("fashion_mnist_val", ("train",), options)
