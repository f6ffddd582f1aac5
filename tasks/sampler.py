"""The task sampler: ``seed -> Task``, over a configurable mixture of sources.

A mix (YAML file or dict, ``MixConfig``) lists weighted components; each names a source,
the N-way choices, an optional class group (``fixed: true`` always uses the same
classes of that group), preprocessing and augmentation probabilities. Each task also
gets a base-model architecture (2..5 layers, widths log-uniform in [64, 512], output
32, an activation). How many inner steps a task lives is not the sampler's: the
meta-training curriculum draws it when a worker starts the task
(``metalearn.training.schedules``, the paper's shifted normal of truncations).

    mix = load_mix("metalearn/configs/tasks/local.yaml")   # a YAML file
    sampler = TaskSampler(mix)                 # loads (and caches) every source once
    task = sampler.sample(seed)                # deterministic in seed
    x = task.inner_batch(128)                  # [128, D] float32
    pair = task.labelled_pair(5, 10)           # LabelledPair of numpy

A ``Task`` owns its numpy RNG stream (seeded from the task seed), so successive calls
give new batches, the same ones for the same seed. Assembling a batch is pure numpy
indexing plus one vectorised warp (no per-example Python).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from metalearn.core.base_model import Architecture
from metalearn.core.config import ACTIVATIONS
from metalearn.core.config_io import ConfigError, from_dict, read_yaml, to_dict
from metalearn.core.meta_objective import LabelledPair
from metalearn.core.unroll import TruncationBatch
from tasks import augment as aug_lib
from tasks import preprocess
from tasks.registry import Dataset, SourceOptions
from tasks.sources import check_name, load


@dataclasses.dataclass(frozen=True)
class ComponentConfig:
    """One entry of the mixture."""

    source: str
    weight: float = 1.0
    ways: tuple[int, ...] = (10,)  # N-way choices, uniform
    group: str | None = None  # restrict classes to this group of the source
    fixed: bool = False  # the same classes of the group in every task
    fixed_seed: int = 0  # which fixed subset (a seeded shuffle of the group)
    name: str = ""  # label in task metadata; default source[/group]
    preprocess: preprocess.PreprocessConfig = preprocess.PreprocessConfig()
    augment: aug_lib.AugmentConfig = aug_lib.AugmentConfig()

    def __post_init__(self):
        # Messages start "component.<field>" so from_dict re-anchors them at components[i].
        try:
            check_name(self.source)
        except ConfigError as err:
            raise ConfigError(f"component.source: {err}") from None
        if not 0 <= self.weight < float("inf"):
            raise ConfigError(f"component.weight must be a finite number >= 0, got "
                              f"{self.weight}")
        if not self.ways or any(w < 2 for w in self.ways):
            raise ConfigError(f"component.ways must be integers >= 2, got {list(self.ways)}")
        if self.fixed and len(set(self.ways)) != 1:
            raise ConfigError("component.ways: a fixed subset needs a single ways value")

    @property
    def label(self) -> str:
        return self.name or (f"{self.source}/{self.group}" if self.group else self.source)


@dataclasses.dataclass(frozen=True)
class ArchitectureConfig:
    """Base-model architectures of the tasks (docs/tasks.md)."""

    min_layers: int = 2
    max_layers: int = 5
    min_width: int = 64
    max_width: int = 512
    output_size: int = 32
    activations: tuple[str, ...] = ("relu",)  # uniform; repeat a name to weight it

    def __post_init__(self):
        if not 1 <= self.min_layers <= self.max_layers:
            raise ConfigError("architecture.min_layers: need 1 <= min_layers <= max_layers")
        if not 1 <= self.min_width <= self.max_width:
            raise ConfigError("architecture.min_width: need 1 <= min_width <= max_width")
        bad = [a for a in self.activations if a not in ACTIVATIONS]
        if not self.activations or bad:
            raise ConfigError(f"architecture.activations: unknown {bad}; choose from "
                              f"{list(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class MixConfig:
    components: tuple[ComponentConfig, ...] = ()
    architecture: ArchitectureConfig = ArchitectureConfig()
    sources: SourceOptions = SourceOptions()
    permute_inputs: bool = True  # always on in the paper; off only to look at images
    premade_permutations: int = 100  # size of the fixed permutation set
    premade_seed: int = 0

    def __post_init__(self):
        if not self.components or sum(c.weight for c in self.components) <= 0:
            raise ConfigError("components: need at least one component with weight > 0")
        if self.premade_permutations < 1:
            raise ConfigError("premade_permutations must be >= 1")


def load_mix(mix: str | os.PathLike | dict | MixConfig) -> MixConfig:
    """A MixConfig from a YAML path, a dict or a MixConfig; unknown keys -> ConfigError.

    Files are read like training configs (``metalearn.core.config_io.read_yaml``: ``2e4``
    is a float); errors about a file name it.
    """
    if isinstance(mix, MixConfig):
        return mix
    path = None
    if isinstance(mix, (str, os.PathLike)):
        path = os.fspath(mix)
        mix = read_yaml(path, "task mix file")
    if not isinstance(mix, dict):
        where = f"task mix {path}" if path else "a task mix"
        raise ConfigError(f"{where} must be a mapping, got {type(mix).__name__}")
    if "length" in mix:
        # Mixes before issue 12 had a second task-length model here that never took
        # effect; say where the length lives now instead of "unknown field".
        where = f"task mix {path}: " if path else ""
        raise ConfigError(f"{where}length: a task mix no longer sets task lengths; remove "
                          f"it (tasks live round(N(s, s)) truncations, s from the training "
                          f"config's curriculum.truncations_std_start/_end)")
    try:
        return from_dict(MixConfig, mix)
    except ConfigError as err:
        if path is None:
            raise
        raise ConfigError(f"task mix {path}: {err}") from None


def mix_to_dict(mix: MixConfig) -> dict:
    return to_dict(mix)


# Augmentation redraws allowed to match a template task's regression targets.
_MATCH_TRIES = 200


class Task:
    """One task: a class subset of a source, its augmentations and base model.

    Attributes: seed, dataset (source name), component (mix label), num_classes,
    classes ([n] source class ids), arch (Architecture, input D, output 32),
    num_targets (K = num_classes + regression targets), input_size (D). A task has no
    length of its own: how long it lives is the meta-training curriculum's draw
    (``metalearn.training.schedules``), made when a worker starts it.
    """

    def __init__(self, *, seed: int, component: ComponentConfig, source: Dataset,
                 data: np.ndarray, classes: np.ndarray, augment: aug_lib.TaskAugment,
                 arch: Architecture):
        self.seed = seed
        self.component = component.label
        self._config = component
        self.dataset = source.name
        self._source = source
        self._data = data
        self._is_image = source.modality == "image"
        self.classes = classes
        self.num_classes = int(classes.size)
        self.augment = augment
        self.arch = arch
        self.num_targets = self.num_classes + augment.num_targets
        index = source.class_index
        self._offsets = index.offsets[classes]
        self._counts = index.counts[classes]
        self._order = index.order
        self._rng = np.random.default_rng([seed, 1])

    @property
    def input_size(self) -> int:
        return self.arch.input_size

    def metadata(self) -> dict:
        """JSON-able description of the task."""
        names = self._source.class_names
        return {
            "seed": self.seed, "component": self.component, "dataset": self.dataset,
            "group": self._config.group, "fixed": self._config.fixed,
            "num_classes": self.num_classes, "classes": self.classes.tolist(),
            "class_names": [names[c] for c in self.classes],
            "num_targets": self.num_targets,
            "target_names": [f"class_{i}" for i in range(self.num_classes)]
            + self.augment.target_names,
            "augmentations": self.augment.describe(),
            "preprocess": dataclasses.asdict(self._config.preprocess),
            "example_shape": list(self._data.shape[1:]),
            "arch": {"sizes": list(self.arch.sizes), "activation": self.arch.activation},
        }

    # -- batches -------------------------------------------------------------------

    def _examples(self, local: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features [B, D] and regression targets [B, R] of examples given by task-local
        class ids and positions within their class (both [B])."""
        ids = self._order[self._offsets[local] + positions]
        return aug_lib.assemble(self.augment, self._data, ids, local, self._rng,
                                self._is_image, scale=self._scale)

    def _scale(self, values: np.ndarray) -> np.ndarray:
        return preprocess.scale(values, self._config.preprocess, self._source.modality)

    def inner_batch(self, batch_size: int) -> np.ndarray:
        """[B, D] float32 unlabelled examples (classes uniform), augmented and permuted."""
        local = self._rng.integers(self.num_classes, size=batch_size)
        positions = (self._rng.random(batch_size) * self._counts[local]).astype(np.int64)
        return self._examples(local, positions)[0]

    def labelled_pair(self, num_draws: int, samples_per_class: int,
                      regression_targets: bool = True) -> LabelledPair:
        """M class-balanced (train, test) pairs, as numpy.

        x_*: [M, n * spc, D] float32, class-major; y_*: [M, n * spc, K] float32 (one-hot
        then, with ``regression_targets``, the augmentation's regression targets: K = n +
        R; without, K = n). Within a draw, train and test examples are distinct when a
        class has at least 2 * spc examples (else drawn with replacement).
        """
        m, n, spc = num_draws, self.num_classes, samples_per_class
        k = 2 * spc
        counts = self._counts[None, :, None]
        u = np.sort(self._rng.random((m, n, k)), axis=-1)
        # Sorted draws from [0, count - k] plus 0..k-1 are k distinct sorted positions.
        distinct = (u * (counts - k + 1)).astype(np.int64) + np.arange(k)
        with_replacement = (u * counts).astype(np.int64)
        positions = np.where(counts >= k, distinct, with_replacement)
        shuffle = np.argsort(self._rng.random((m, n, k)), axis=-1)
        positions = np.take_along_axis(positions, shuffle, axis=-1)
        # [m, 2 (train/test), n, spc] so each half is class-major.
        positions = positions.reshape(m, n, 2, spc).transpose(0, 2, 1, 3)
        local = np.broadcast_to(np.arange(n)[None, None, :, None], positions.shape)
        x, reg = self._examples(local.reshape(-1), positions.reshape(-1))
        onehot = np.eye(n, dtype=np.float32)[local.reshape(-1)]
        y = np.concatenate([onehot, reg], axis=1) if regression_targets else onehot
        x = x.reshape(m, 2, n * spc, -1)
        y = y.reshape(m, 2, n * spc, -1)
        return LabelledPair(x[:, 0], y[:, 0], x[:, 1], y[:, 1])

    def truncation_batch(self, num_steps: int, batch_size: int, num_draws: int,
                         samples_per_class: int, regression_targets: bool = True
                         ) -> TruncationBatch:
        """U steps of data: inner_x [U, B, D]; pair fields [U, M, n * spc, ...]."""
        u = num_steps
        inner = self.inner_batch(u * batch_size).reshape(u, batch_size, -1)
        pair = self.labelled_pair(u * num_draws, samples_per_class, regression_targets)
        pair = LabelledPair(*(f.reshape(u, num_draws, *f.shape[1:]) for f in pair))
        return TruncationBatch(inner, pair)


class TaskSampler:
    """Draws tasks from a mix. Loads every source with weight > 0 once, up front, so
    bad configs (missing data, N-way larger than a source's classes) fail here."""

    def __init__(self, mix: Any, data_dir: str | None = None, *, progress: bool = False,
                 datasets: dict[str, Dataset] | None = None):
        """mix: path, dict or MixConfig. data_dir: TFDS data dir (overrides the mix's).
        datasets: already loaded sources by name (e.g. read from Ray's object store),
        used instead of ``tasks.sources.load``."""
        self.mix = load_mix(mix)
        options = self.mix.sources
        if data_dir is not None:
            options = dataclasses.replace(options, data_dir=str(data_dir))
        self.options = options
        self._active = [c for c in self.mix.components if c.weight > 0]
        weights = np.array([c.weight for c in self._active], np.float64)
        self._probs = weights / weights.sum()
        self._sources: list[Dataset] = []
        self._data: list[np.ndarray] = []
        self._pools: list[np.ndarray] = []
        self._fixed: list[np.ndarray | None] = []
        for comp in self._active:
            source = ((datasets or {}).get(comp.source)
                      or load(comp.source, options=options, progress=progress))
            pool = self._pool(comp, source)
            self._sources.append(source)
            self._data.append(preprocess.prepared(source, comp.preprocess))
            self._pools.append(pool)
            fixed = None
            if comp.fixed:
                fixed = np.sort(np.random.default_rng(comp.fixed_seed).permutation(pool)
                                [:comp.ways[0]])
            self._fixed.append(fixed)

    @staticmethod
    def _pool(comp: ComponentConfig, source: Dataset) -> np.ndarray:
        if comp.group is None:
            pool = np.flatnonzero(source.class_index.counts > 0)
        elif comp.group not in source.groups:
            raise ConfigError(f"component {comp.label}: source {source.name} has no class "
                              f"group {comp.group!r}; groups: {sorted(source.groups) or 'none'}")
        else:
            pool = np.asarray(source.groups[comp.group], np.int64)
            pool = pool[source.class_index.counts[pool] > 0]
        if max(comp.ways) > pool.size:
            raise ConfigError(f"component {comp.label}: {max(comp.ways)}-way tasks need "
                              f"{max(comp.ways)} classes but {source.name}"
                              f"{'/' + comp.group if comp.group else ''} has {pool.size}")
        return pool

    @property
    def components(self) -> list[ComponentConfig]:
        return list(self._active)

    def dataset(self, name: str) -> Dataset:
        for source in self._sources:
            if source.name == name:
                return source
        raise KeyError(name)

    def sample(self, seed: int, *, like: Task | None = None) -> Task:
        """The task of ``seed`` (a non-negative int): same seed, same task and batches.

        ``like``: a task whose shapes this one must share, so both can be vmapped in one
        estimator call (a multi-task worker): same component (so source and input size),
        number of classes and base-model architecture, and the same number of
        regression targets (augmentations are redrawn until it matches). Classes,
        augmentations, permutations and batches are this seed's own.
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"task seed must be a non-negative integer, got {seed!r}")
        seed = int(seed)
        rng = np.random.default_rng([seed, 0])
        if like is None:
            i = int(rng.choice(len(self._active), p=self._probs))
        else:
            matches = [j for j, c in enumerate(self._active) if c.label == like.component]
            if not matches:
                raise ConfigError(f"task component {like.component!r} is not in this mix")
            i = matches[0]
        comp, source, data = self._active[i], self._sources[i], self._data[i]
        ways = int(rng.choice(comp.ways)) if like is None else like.num_classes
        classes = (self._fixed[i] if self._fixed[i] is not None
                   else np.sort(rng.choice(self._pools[i], ways, replace=False)))
        dim = int(np.prod(data.shape[1:]))
        targets = None if like is None else like.num_targets - like.num_classes
        for _ in range(_MATCH_TRIES):
            augment = aug_lib.draw(comp.augment, rng, num_classes=classes.size, dim=dim,
                                   is_image=source.modality == "image",
                                   permute_inputs=self.mix.permute_inputs,
                                   num_premade=self.mix.premade_permutations,
                                   premade_seed=self.mix.premade_seed)
            if targets is None or augment.num_targets == targets:
                break
        else:
            raise ConfigError(f"component {comp.label}: no augmentation with {targets} "
                              f"regression targets in {_MATCH_TRIES} draws")
        if like is not None:
            return Task(seed=seed, component=comp, source=source, data=data, classes=classes,
                        augment=augment, arch=like.arch)
        a = self.mix.architecture
        layers = int(rng.integers(a.min_layers, a.max_layers + 1))
        widths = np.exp(rng.uniform(math.log(a.min_width), math.log(a.max_width), layers - 1))
        activation = str(rng.choice(a.activations))
        arch = Architecture((dim, *(int(round(w)) for w in widths), a.output_size), activation)
        return Task(seed=seed, component=comp, source=source, data=data, classes=classes,
                    augment=augment, arch=arch)
