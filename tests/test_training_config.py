"""Training configs: packaged by name, files with ``base:``, overrides, errors."""

import pytest

from metalearn.core.config_io import ConfigError, packaged_names
from metalearn.training.config import config_to_yaml, load_config


def test_packaged_configs_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"local", "paper", "smoke"} <= set(packaged_names())
    assert {"local", "paper", "tiny"} <= set(packaged_names("tasks"))
    local = load_config()  # the default of `metalearn train`
    assert local == load_config("local")
    assert local.rule_preset == "small" and local.tasks.mix == "local"
    assert load_config("paper").learner.meta_batch == 256
    smoke = load_config("smoke", ["run.steps=3"])
    assert smoke.tasks.mix == "tiny" and smoke.run.steps == 3
    assert smoke.evaluator.datasets == local.evaluator.datasets  # inherited through base:
    assert smoke.rule.inner_lr == local.rule.inner_lr


def test_base_chain_relative_mix_and_loops(tmp_path):
    mix = tmp_path / "mine.yaml"
    mix.write_text("components: [{source: digits, ways: [3]}]\n")
    (tmp_path / "parent.yaml").write_text("base: smoke\nlearner: {meta_batch: 4}\n")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("base: ../parent.yaml\ntasks: {mix: ../mine.yaml}\nrun: {steps: 7}\n")
    config = load_config(str(child))
    assert (config.learner.meta_batch, config.run.steps) == (4, 7)
    assert config.rule.top_units == 8  # from smoke, two bases up
    assert config.tasks.mix == str(mix)  # made absolute: it works from any directory
    # The run folder's config.yaml is complete: it needs no base to load back.
    saved = tmp_path / "saved.yaml"
    saved.write_text(config_to_yaml(config))
    assert load_config(str(saved)) == config
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base configs form a loop"):
        load_config(str(tmp_path / "a.yaml"))


def test_unknown_names_and_keys_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no packaged config named 'locl'; "
                                                "packaged: gpu, local, paper, smoke"):
        load_config("locl")
    with pytest.raises(ConfigError, match="unknown config key learner.meta_bach"):
        load_config("local", ["learner.meta_bach=3"])


def test_estimator_keys_left_in_unroll_name_their_new_place():
    with pytest.raises(ConfigError, match=r"unroll.estimator is now estimator.kind"):
        load_config("local", ["unroll.estimator=pes"])
    with pytest.raises(ConfigError, match=r"unroll.pairs is now estimator.pairs"):
        load_config("local", ["unroll.pairs=3"])
    assert load_config("local", ["estimator.pairs=3"]).estimator.pairs == 3


def test_gpu_config_is_the_local_science_sized_for_population_workers():
    from metalearn.distributed.actors import thread_env
    from metalearn.distributed.driver import default_worker_count

    gpu, local = load_config("gpu"), load_config("local")
    assert "gpu" in packaged_names()
    assert gpu.estimator.kind == "es_full" and gpu.worker.tasks_per_worker == 16
    assert gpu.worker.gpus_per_worker == 1.0 and gpu.worker.num_workers == 0
    assert (gpu.evaluator, gpu.learner.trainable) == (local.evaluator, local.learner.trainable)
    # One worker per GPU of the cluster (not per CPU), preallocation off in its env.
    assert default_worker_count({"CPU": 64.0, "GPU": 4.0}, gpu.worker) == 4
    assert default_worker_count({"CPU": 64.0, "GPU": 4.0}, local.worker) == 64
    assert default_worker_count({"CPU": 64.0}, gpu.worker) == 1
    assert thread_env(2, 1.0)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in thread_env(1)
    with pytest.raises(ConfigError, match="guided_es"):
        load_config("gpu", ["estimator.kind=guided_es"])
