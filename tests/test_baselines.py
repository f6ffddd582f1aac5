"""Each baseline trains something real and beats chance; supervised reaches 80% on digits."""

import dataclasses

import numpy as np
import pytest

from metalearn.evaluation import baselines
from metalearn.evaluation.config import DataConfig, EvalConfig
from metalearn.evaluation.data import load_data, make_task
from metalearn.evaluation.rollout import architecture


@pytest.fixture(scope="module")
def digits_task():
    data = load_data(DataConfig(dataset="digits", test_size=500))
    return make_task(data, seed=0, ways=10, shots=10), data


CONFIG = EvalConfig(baseline_steps=150, supervised_steps=200)


@pytest.mark.parametrize("name", ["random_init", "pca", "vae", "supervised", "protonet",
                                  "protonet_intact"])
def test_baseline_beats_chance_on_digits(name, digits_task):
    task, data = digits_task
    arch = architecture(data.input_size, 64, 2, "relu")
    rows = baselines.run(name, task, arch, CONFIG)
    final = rows[-1]
    assert final["step"] == (0 if name in ("random_init", "pca") else
                             CONFIG.supervised_steps if name == "supervised"
                             else CONFIG.baseline_steps)
    # 10 classes: chance is 0.1; every method here must be far above it.
    assert final["ridge_accuracy"] > 0.3, rows
    assert final["logreg_accuracy"] > 0.3, rows
    if len(rows) > 1:
        assert "train_loss" in final and np.isfinite(final["train_loss"])


def test_supervised_reaches_80_percent_with_10_per_class(digits_task):
    task, data = digits_task
    assert len(task.y_train) == 100 and np.all(np.bincount(task.y_train) == 10)
    arch = architecture(data.input_size, 128, 4, "relu")
    rows = baselines.run("supervised", task, arch, EvalConfig(supervised_steps=300))
    first, final = rows[0], rows[-1]
    assert final["head_accuracy"] >= 0.8, final
    assert final["ridge_accuracy"] >= 0.8, final
    assert first["head_accuracy"] < 0.5  # it was trained, not born accurate
    assert final["train_loss"] < 0.05  # it fits its 100 examples


def test_vae_improves_its_objective_and_uses_unlabelled_pool_only(digits_task):
    task, data = digits_task
    # Corrupting the pool's labels must not change an unsupervised baseline.
    shuffled = dataclasses.replace(task, y_pool=np.random.default_rng(0).permutation(task.y_pool))
    config = EvalConfig(baseline_steps=60)
    arch = architecture(data.input_size, 64, 2, "relu")
    a = baselines.run("vae", task, arch, config)
    b = baselines.run("vae", shuffled, arch, config)
    assert [r["ridge_accuracy"] for r in a] == [r["ridge_accuracy"] for r in b]
    losses = [r["train_loss"] for r in a if "train_loss" in r]
    assert losses[-1] < losses[0]


def test_permuted_protonet_beats_chance_on_two_moons():
    data = load_data(DataConfig(dataset="two_moons", test_size=400))
    task = make_task(data, seed=1, ways=10, shots=10)
    assert task.num_classes == 2
    rows = baselines.run("protonet", task, architecture(2, 32, 2, "relu"),
                         EvalConfig(baseline_steps=150))
    assert rows[-1]["ridge_accuracy"] > 0.7


def test_unknown_baseline_is_a_config_error():
    from metalearn.core.config import ConfigError
    with pytest.raises(ConfigError, match="unknown baseline"):
        EvalConfig(baselines=("kmeans",))
