"""Evaluation data: a dataset split once into an unlabelled pool and a labelled test set
(``load_data`` -> ``EvalData``), and one seed's task drawn from it (``make_task`` ->
``Task``: a class subset, its pool and the ``shots``-per-class labelled draw)."""

from __future__ import annotations

import dataclasses

import numpy as np

from metalearn.core.config_io import ConfigError
from metalearn.evaluation.config import DataConfig
from tasks import sources
from tasks.preprocess import PreprocessConfig, prepared, scale


@dataclasses.dataclass(frozen=True)
class EvalData:
    """A dataset split for evaluation. x_*: [N, D] float32; y_*: [N] int class ids."""

    name: str
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    image_shape: tuple[int, ...] | None  # (H, W, C) for images, None for vectors

    @property
    def input_size(self) -> int:
        return int(self.x_pool.shape[1])


def is_image_dataset(dataset: str, data_dir: str | None = None) -> bool:
    return sources.load(dataset, data_dir).modality == "image"


def default_image_size(dataset: str, data_dir: str | None = None) -> int:
    """14 for images larger than 16 px, else 0 (native)."""
    ds = sources.load(dataset, data_dir)
    if ds.modality != "image":
        return 0
    return 14 if max(ds.shape[:2]) > 16 else 0


def load_data(config: DataConfig, progress: bool = False) -> EvalData:
    """Load, preprocess (resize, flatten, scale to [0, 1]) and split a dataset."""
    ds = sources.load(config.dataset, config.data_dir, progress=progress)
    pre = PreprocessConfig(image_size=config.image_size)
    if ds.modality == "image":
        x = prepared(ds, pre)
        image_shape = tuple(int(s) for s in x.shape[1:])
        x = scale(x.reshape(x.shape[0], -1), pre, "image")
    else:
        if config.image_size:
            raise ConfigError(f"{config.dataset} is not an image dataset; --image-size does "
                              f"not apply")
        x, image_shape = ds.x.astype(np.float32), None
    y = ds.y.astype(np.int64)
    classes = np.arange(ds.num_classes)
    if config.group is not None:
        if config.group not in ds.groups:
            raise ConfigError(f"{config.dataset} has no class group {config.group!r}; groups: "
                              f"{', '.join(sorted(ds.groups)) or 'none'}")
        classes = np.asarray(ds.groups[config.group])
    keep = np.isin(y, classes)
    x, y = x[keep], y[keep]
    # Relabel to 0..C-1 so class ids index arrays.
    remap = np.full(int(y.max()) + 1, -1, np.int64)
    remap[classes] = np.arange(len(classes))
    y = remap[y]
    rng = np.random.default_rng(config.split_seed)
    order = rng.permutation(len(y))
    n_test = min(config.test_size, len(y) // 3)
    test, pool = order[:n_test], order[n_test:n_test + config.pool_size]
    counts = np.bincount(y[pool], minlength=len(classes))
    if counts.min() < config.shots:
        raise ConfigError(f"{config.dataset}: class {int(counts.argmin())} has only "
                          f"{int(counts.min())} pool examples, fewer than --shots "
                          f"{config.shots}")
    return EvalData(config.dataset, np.ascontiguousarray(x[pool]), y[pool],
                    np.ascontiguousarray(x[test]), y[test], len(classes), image_shape)


@dataclasses.dataclass(frozen=True)
class Task:
    """One seed's task: a class subset (relabelled 0..K-1), its unlabelled pool, the
    ``shots``-per-class labelled draw and the test set."""

    x_pool: np.ndarray
    y_pool: np.ndarray  # labels of the pool: used only by supervised / protonet baselines
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    seed: int


def make_task(data: EvalData, seed: int, ways: int, shots: int) -> Task:
    """Seed ``seed``'s task: ``ways`` classes (all if the data has no more) and ``shots``
    labelled pool examples per class (random stream ``[seed, 1]``)."""
    rng = np.random.default_rng([seed, 1])
    k = min(ways, data.num_classes)
    classes = (np.arange(k) if k == data.num_classes
               else np.sort(rng.choice(data.num_classes, k, replace=False)))
    remap = np.full(data.num_classes, -1, np.int64)
    remap[classes] = np.arange(k)
    in_pool, in_test = remap[data.y_pool] >= 0, remap[data.y_test] >= 0
    x_pool, y_pool = data.x_pool[in_pool], remap[data.y_pool[in_pool]]
    x_test, y_test = data.x_test[in_test], remap[data.y_test[in_test]]
    chosen = np.concatenate([rng.choice(np.flatnonzero(y_pool == c), shots, replace=False)
                             for c in range(k)])
    return Task(x_pool, y_pool, x_pool[chosen], y_pool[chosen], x_test, y_test, k, seed)


__all__ = ["EvalData", "Task", "load_data", "make_task", "default_image_size",
           "is_image_dataset"]
