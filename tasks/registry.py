"""What every data source shares: the ``Dataset`` type, ``SourceOptions`` and the registry.

Source modules (``tasks.glyphs``, ``tasks.sklearn_sources``, ``tasks.idx``,
``tasks.tfds_sources``) register their builders here with ``@register``;
``tasks.sources`` imports them all and looks names up (``load``, ``registry``,
``check_name``). This module imports no source module, so sources, the cache and
``tasks.files`` all depend on it and never on each other in a cycle.

Images are stored as uint8 ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (colour) at the
source's native resolution; vector sources are float32 ``[N, D]``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Literal

import numpy as np

from metalearn.core.config_io import ConfigError

Modality = Literal["image", "vector", "text"]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset held in memory.

    x: [N, H, W] or [N, H, W, C] uint8 images (``modality == "image"``), or
       [N, D] float32 features (``"vector"``, ``"text"``).
    y: [N] int32 class ids in [0, num_classes).
    class_names: one readable name per class id.
    groups: named class subsets (e.g. glyph ``alphabet``), as sorted class-id tuples.
    info: JSON-able facts about how it was built (fonts used, source files...).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    modality: Modality = "image"
    groups: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.name}: {self.x.shape[0]} examples but "
                             f"{self.y.shape[0]} labels")
        if self.y.size and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise ValueError(f"{self.name}: labels outside [0, {len(self.class_names)})")

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example (without the batch axis)."""
        return tuple(int(s) for s in self.x.shape[1:])

    @functools.cached_property
    def class_index(self) -> "ClassIndex":
        return ClassIndex.build(self.y, self.num_classes)

    def summary(self) -> dict:
        """JSON-able description used by ``metalearn data info``."""
        counts = self.class_index.counts
        return {
            "name": self.name,
            "modality": self.modality,
            "num_classes": self.num_classes,
            "num_examples": self.num_examples,
            "shape": list(self.shape),
            "dtype": str(self.x.dtype),
            "examples_per_class": {"min": int(counts.min()) if counts.size else 0,
                                   "max": int(counts.max()) if counts.size else 0,
                                   "mean": float(counts.mean()) if counts.size else 0.0},
            "groups": {k: len(v) for k, v in self.groups.items()},
            "info": self.info,
        }


@dataclasses.dataclass(frozen=True, eq=False)
class ClassIndex:
    """Example ids grouped by class, so class-balanced draws are pure indexing.

    order: [N] example ids sorted by class (stable); offsets: [C] start of each class
    in ``order``; counts: [C] examples per class.
    """

    order: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray

    @classmethod
    def build(cls, y: np.ndarray, num_classes: int) -> "ClassIndex":
        order = np.argsort(y, kind="stable").astype(np.int64)
        counts = np.bincount(y, minlength=num_classes).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(order, offsets, counts)


# ---------------------------------------------------------------------------
# Options that reach builders (typed; part of the mix config as ``sources:``)

@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Where sources find their inputs.

    data_dir: TFDS data dir (prepared elsewhere with TensorFlow, see docs/tasks.md);
      defaults to $TFDS_DATA_DIR when unset.
    fashion_mnist_dir: folder with Fashion-MNIST IDX files; default Debian's
      ``dataset-fashion-mnist`` location.
    download: let TFDS download and prepare (needs TensorFlow and internet); never
      implied.
    cache_dir: parquet cache folder; default $METALEARN_CACHE or ~/.cache/metalearn.
    use_cache: read and write the parquet cache.
    glyphs: how the glyph dataset is rendered (``tasks.glyphs.GlyphConfig`` as a dict
      of overrides; kept untyped here so this module does not import the renderer).
    imagenet_heldout_every: every k-th ImageNet class (by id) is held out of meta-training.
    imdb_vocab: words in the IMDB bag of words (plus start, end, unknown tokens).
    """

    data_dir: str | None = None
    fashion_mnist_dir: str | None = None
    download: bool = False
    cache_dir: str | None = None
    use_cache: bool = True
    glyphs: dict = dataclasses.field(default_factory=dict)
    imagenet_heldout_every: int = 5
    imdb_vocab: int = 1000

    def __post_init__(self):
        if self.imagenet_heldout_every < 2:
            raise ConfigError("sources.imagenet_heldout_every must be >= 2, got "
                              f"{self.imagenet_heldout_every}")
        if self.imdb_vocab < 1:
            raise ConfigError(f"sources.imdb_vocab must be positive, got {self.imdb_vocab}")

    def key(self) -> tuple:
        """Hashable identity for the in-process memo."""
        return tuple((f.name, repr(getattr(self, f.name))) for f in dataclasses.fields(self))


Builder = Callable[[SourceOptions, bool], Dataset]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    builder: Builder
    description: str
    needs: str  # what must exist on the machine ("nothing", "TFDS data dir", ...)


_REGISTRY: dict[str, SourceSpec] = {}


def register(name: str, description: str, needs: str = "nothing"):
    """Decorator: register ``builder(options, progress) -> Dataset`` under ``name``."""
    def wrap(builder: Builder) -> Builder:
        _REGISTRY[name] = SourceSpec(name, builder, description, needs)
        return builder
    return wrap


def registered() -> dict[str, SourceSpec]:
    """The sources registered so far (``tasks.sources.registry`` imports them all)."""
    return dict(_REGISTRY)


def default_cache_dir(options: SourceOptions | None = None) -> str:
    if options is not None and options.cache_dir:
        return os.path.expanduser(options.cache_dir)
    return os.path.expanduser(os.environ.get("METALEARN_CACHE") or "~/.cache/metalearn")
