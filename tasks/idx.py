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
import shutil

import numpy as np

from tasks.cache import cached
from tasks.registry import Dataset, SourceOptions, default_cache_dir, register

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
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist), copy the IDX files "
        f"you have with `metalearn data fetch fashion_mnist --from DIR`, or pass "
        f"--fashion-mnist-dir (sources.fashion_mnist_dir) pointing at the IDX files")


def fetched_dir(options: SourceOptions) -> str:
    """Where ``metalearn data fetch fashion_mnist`` puts the files: the cache folder's
    ``fashion-mnist`` (``--cache-dir``, $METALEARN_CACHE or ~/.cache/metalearn)."""
    return os.path.join(default_cache_dir(options), "fashion-mnist")


def _has_files(folder: str) -> bool:
    return all(os.path.exists(os.path.join(folder, stem)) or
               os.path.exists(os.path.join(folder, stem + ".gz"))
               for pair in FILES.values() for stem in pair)


def fashion_mnist_dir(options: SourceOptions) -> str:
    """The folder read: the one named (option, then $METALEARN_FASHION_MNIST_DIR), else
    Debian's if it has the files, else the fetched copy if it has them, else Debian's
    (whose absence the error then names)."""
    named = options.fashion_mnist_dir or os.environ.get("METALEARN_FASHION_MNIST_DIR")
    if named:
        return named
    for folder in (DEFAULT_DIR, fetched_dir(options)):
        if _has_files(folder):
            return folder
    return DEFAULT_DIR


def fetch_fashion_mnist(source: str, options: SourceOptions) -> dict:
    """Check the four IDX files in ``source`` (gzipped or not) and copy them to
    ``fetched_dir(options)``, each atomically (a copy cut short leaves no file behind).
    Returns {"dir": target, "train": examples, "test": examples}. Nothing is downloaded."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--from {source}: no such folder (it should hold the four "
                                f"Fashion-MNIST IDX files, e.g. t10k-images-idx3-ubyte.gz)")
    counts, found = {}, []
    for split, (images, labels) in FILES.items():
        x_path, y_path = _find(source, images), _find(source, labels)
        x, y = read_idx(x_path), read_idx(y_path)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise ValueError(f"{x_path}: expected uint8 images of 28 x 28, got "
                             f"{x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],) or y.min() < 0 or y.max() >= len(CLASS_NAMES):
            raise ValueError(f"{y_path}: expected {x.shape[0]} labels in 0..9 to match "
                             f"{x_path}, got shape {tuple(y.shape)}")
        counts[split] = int(x.shape[0])
        found += [x_path, y_path]
    target = fetched_dir(options)
    os.makedirs(target, exist_ok=True)
    for path in found:
        final = os.path.join(target, os.path.basename(path))
        partial = final + ".partial"
        shutil.copyfile(path, partial)
        os.replace(partial, final)
    return {"dir": target, **counts}


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
