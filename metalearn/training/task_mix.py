"""The task mix of a training run, resolved and checked once by the driver
(``resolve_mix``) and shipped to the workers as data: no node reads the mix file.

See docs/training.md (Faults, Clusters), docs/tasks.md and clusters/README.md.
"""

from __future__ import annotations

import os

import numpy as np

from metalearn.core.config_io import ConfigError, read_yaml, resolve_config
from metalearn.training.config import TasksConfig
from tasks.sampler import MixConfig, TaskSampler, load_mix
from tasks.sources import load


def task_sampler(tasks: TasksConfig, mix: MixConfig | None = None) -> TaskSampler:
    """The sampler of ``mix`` (resolved by the driver and handed over), else of the
    config's own mix (tests, a single process)."""
    return TaskSampler(resolve_mix(tasks) if mix is None else mix, data_dir=tasks.data_dir)


def stream_rng(stream_seed: int, index: int) -> np.random.Generator:
    """Worker ``index``'s stream of task seeds: the same draws for the same (seed, index)
    on every machine."""
    return np.random.default_rng(np.random.SeedSequence([int(stream_seed), int(index)]))


def sample_tasks(sampler: TaskSampler, rng: np.random.Generator, count: int):
    """``count`` new task seeds from ``rng`` and their tasks, all of the first one's shape
    (``TaskSampler.sample(like=...)``): (seeds, tasks)."""
    seeds = [int(s) for s in rng.integers(0, 2 ** 62, size=count)]
    first = sampler.sample(seeds[0])
    return seeds, [first] + [sampler.sample(s, like=first) for s in seeds[1:]]


def resolve_mix(tasks: TasksConfig) -> MixConfig:
    """The validated task mix of ``tasks`` (ConfigError / FileNotFoundError name it)."""
    path = resolve_config(tasks.mix, "tasks")
    values = read_yaml(path, "task mix file")
    if not isinstance(values, dict):
        raise ConfigError(f"task mix {path} must be a mapping, got {type(values).__name__}")
    overrides = tasks.architecture.values()
    if overrides:
        values["architecture"] = {**(values.get("architecture") or {}), **overrides}
    folder = os.path.dirname(path)
    components = values.get("components") or []
    if isinstance(components, list):  # ``file:`` paths made absolute: nodes have other cwds
        values["components"] = [_absolute_file_source(c, folder) for c in components]
    if tasks.ways:
        components = values.get("components") or []
        values["components"] = [c if not isinstance(c, dict) or c.get("fixed")
                                else {**c, "ways": list(tasks.ways)} for c in components]
    try:
        mix = load_mix(values)
    except ConfigError as err:
        raise ConfigError(f"task mix {path}: {err}") from None
    check_readable(mix, tasks.data_dir, path)
    return mix


def _absolute_file_source(component, folder: str):
    source = component.get("source") if isinstance(component, dict) else None
    if not isinstance(source, str) or not source.startswith("file:"):
        return component
    path = os.path.expanduser(source[len("file:"):])
    if path and not os.path.isabs(path):
        beside = os.path.join(folder, path)
        path = os.path.abspath(beside if os.path.exists(beside) else path)
    return {**component, "source": f"file:{path}"}


def check_readable(mix: MixConfig, data_dir: str | None, where: str) -> None:
    """What this machine can check of the mix's data before anything starts."""
    if data_dir:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"tasks.data_dir: {data_dir} is not a folder")
        if not os.access(data_dir, os.R_OK | os.X_OK):
            raise ConfigError(f"tasks.data_dir: {data_dir} is not readable (permissions)")
    for index, component in enumerate(mix.components):
        if not component.source.startswith("file:"):
            continue
        path = os.path.expanduser(component.source[len("file:"):])
        field = f"task mix {where}: components[{index}].source"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{field}: data file {path} not found")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{field}: data file {path} is not readable (permissions)")
        try:  # memoised: a local run's sampler reuses what is loaded here
            dataset = load(component.source, options=mix.sources, progress=False)
            TaskSampler._pool(component, dataset)  # N-way and group against its classes
        except ConfigError as err:
            raise ConfigError(f"{field}: {err}") from None


def task_dataset_name(task) -> str:
    """Short dataset name of a task, for per-dataset losses."""
    meta = task.metadata()
    for key in ("dataset", "source", "name"):
        value = meta.get(key)
        if isinstance(value, str):
            return value
    value = getattr(task, "dataset", None)
    return value if isinstance(value, str) else getattr(value, "name", "unknown")


__all__ = ["check_readable", "resolve_mix", "sample_tasks", "stream_rng", "task_dataset_name",
           "task_sampler"]
