"""The driver's task mix: packaged or a file, validated, shipped to workers as data."""

import os

import pytest

from metalearn.core.config_io import ConfigError, from_dict, to_dict
from metalearn.training.config import ArchitectureOverrides, TasksConfig, load_config
from metalearn.training.task_mix import resolve_mix
from tasks.sampler import MixConfig


def test_packaged_mix_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the checkout is here
    mix = resolve_mix(TasksConfig(mix="tiny", ways=(2,),
                                  architecture=ArchitectureOverrides(max_width=16)))
    assert [c.source for c in mix.components] == ["digits"]
    assert mix.components[0].ways == (2,) and mix.architecture.max_width == 16
    # What a worker receives is data: it rebuilds the same mix without any file.
    assert from_dict(MixConfig, to_dict(mix)) == mix
    assert load_config().tasks.mix == "local" and resolve_mix(load_config().tasks)


def test_wrong_mix_names_the_reference_and_the_packaged_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no packaged task mix named 'tinyy'.*"
                                                r"local, paper, tiny"):
        resolve_mix(TasksConfig(mix="tinyy"))
    with pytest.raises(FileNotFoundError, match="task mix file not found: nope.yaml"):
        resolve_mix(TasksConfig(mix="nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("components: [{source: digits, wayz: [3]}]\n")
    with pytest.raises(ConfigError, match=rf"task mix {bad}: .*wayz"):
        resolve_mix(TasksConfig(mix=str(bad)))


def test_file_sources_are_checked_here_and_shipped_as_absolute_paths(tmp_path, monkeypatch):
    import numpy as np
    data = tmp_path / "mine.npz"
    np.savez(data, x=np.zeros((20, 4), np.float32), y=np.arange(20) % 2)
    mix_file = tmp_path / "mix.yaml"
    mix_file.write_text("components: [{source: 'file:mine.npz', ways: [2]}]\n"
                        "architecture: {output_size: 8}\n")
    monkeypatch.chdir("/")  # relative to the mix file, not to where the user stands
    mix = resolve_mix(TasksConfig(mix=str(mix_file)))
    assert mix.components[0].source == f"file:{data}"
    mix_file.write_text("components: [{source: 'file:missing.npz', ways: [2]}]\n")
    with pytest.raises(FileNotFoundError, match=r"components\[0\]\.source: data file "
                                                r".*missing.npz not found"):
        resolve_mix(TasksConfig(mix=str(mix_file)))


def test_unreadable_data_dir_is_refused(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="tasks.data_dir: .*nowhere is not a folder"):
        resolve_mix(TasksConfig(mix="tiny", data_dir=str(tmp_path / "nowhere")))
    locked = tmp_path / "locked"
    locked.mkdir()
    # Tests run as root, whom permissions do not stop: the kernel's answer is patched.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked)
                        else real_access(path, mode))
    with pytest.raises(ConfigError, match=rf"tasks.data_dir: {locked} is not readable"):
        resolve_mix(TasksConfig(mix="tiny", data_dir=str(locked)))
