"""Data sources by name: one registry, one ``Dataset`` interface, loaded once per process.

A source is a name (``glyphs``, ``digits``, ``fashion_mnist``, ``cifar10``, ...,
or ``file:PATH``) bound to a builder that returns a ``Dataset`` of numpy arrays.
Builders run at most once per machine per set of inputs: their output is cached as
parquet (``tasks.cache``), and at most once per process: ``load`` memoises the
``Dataset`` so that every task sampler (and every Ray actor thread) in a process
shares the same arrays.

Images are stored as uint8 ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (colour) at the
source's native resolution; preprocessing to the task's resolution happens once per
process in ``tasks.preprocess``. Vector sources (two moons, IMDB bags of words) are
float32 ``[N, D]``.

The shared types (``Dataset``, ``SourceOptions``, ``register``) live in
``tasks.registry`` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import threading

from metalearn.core.config_io import ConfigError
from tasks import glyphs, idx, sklearn_sources, tfds_sources
from tasks.files import load_file
from tasks.registry import (Builder, ClassIndex, Dataset, Modality, SourceOptions, SourceSpec,
                            default_cache_dir, register, registered)

__all__ = ["Builder", "ClassIndex", "Dataset", "Modality", "SourceOptions", "SourceSpec",
           "check_name", "clear_memo", "default_cache_dir", "load", "register", "registry"]

# The source modules register their builders when imported; importing them here is
# what makes every source known to ``registry``, ``check_name`` and ``load``.
SOURCE_MODULES = (glyphs, sklearn_sources, idx, tfds_sources)


def registry() -> dict[str, SourceSpec]:
    """All registered sources (``file:PATH`` is accepted in addition)."""
    return registered()


def check_name(name: str) -> None:
    """Raise ConfigError if ``name`` is neither registered nor ``file:PATH``."""
    if name.startswith("file:"):
        if len(name) <= 5:
            raise ConfigError("source 'file:' needs a path: file:/path/to/data.parquet or .npz")
        return
    if name not in registry():
        raise ConfigError(f"unknown source {name!r}; known sources: "
                          f"{', '.join(sorted(registry()))}, or file:PATH (.parquet/.npz)")


_MEMO: dict[tuple, Dataset] = {}
_MEMO_LOCK = threading.Lock()


def load(name: str, data_dir: str | None = None, *, options: SourceOptions | None = None,
         progress: bool = True) -> Dataset:
    """The ``Dataset`` of source ``name``, built (and cached) on first use in this process.

    data_dir: TFDS data dir; overrides ``options.data_dir``.
    Raises ConfigError for an unknown name, FileNotFoundError (saying what to install
    or pass) when a source's inputs are missing.
    """
    check_name(name)
    options = options or SourceOptions()
    if data_dir is not None:
        options = dataclasses.replace(options, data_dir=str(data_dir))
    key = (name, options.key())
    with _MEMO_LOCK:
        if key in _MEMO:
            return _MEMO[key]
        if name.startswith("file:"):
            dataset = load_file(name[5:], options, progress)
        else:
            dataset = registered()[name].builder(options, progress)
        _MEMO[key] = dataset
        return dataset


def clear_memo() -> None:
    """Forget datasets loaded in this process (tests)."""
    with _MEMO_LOCK:
        _MEMO.clear()

