"""The task sampler: determinism, class balance, shapes of the contract, bad configs."""

import json
import atexit
import os
import shutil
import tempfile

# One throwaway parquet cache per test process, never the user's.
os.environ["METALEARN_CACHE"] = os.path.join(tempfile.gettempdir(),
                                             f"metalearn-test-cache-{os.getpid()}")
atexit.register(shutil.rmtree, os.environ["METALEARN_CACHE"], True)

import numpy as np
import pytest

from metalearn.core.base_model import Architecture
from metalearn.core.config import ConfigError
from metalearn.core.meta_objective import LabelledPair
from metalearn.core.unroll import TruncationBatch
from tasks.sampler import TaskSampler, load_mix

# Quick glyphs: a few blocks, a few bundled fonts.
GLYPHS = {"blocks": ["basic_latin", "latin1", "currency", "math_operators"],
          "system_fonts": False, "max_fonts": 6, "min_fonts_per_char": 2}
NOISE = {"geometric_prob": 0.5, "x_shift_prob": 0.5, "example_dropout_prob": 0.5,
         "task_dropout_prob": 0.5, "class_permutation_prob": 0.5}


def small_mix(**overrides):
    mix = {
        "components": [
            {"source": "glyphs", "weight": 2, "ways": [10, 13, 20], "augment": NOISE},
            {"source": "glyphs", "name": "glyphs/currency", "group": "currency", "fixed": True,
             "ways": [10], "augment": {"geometric_prob": 1.0}},
            {"source": "digits", "ways": [5, 10], "preprocess": {"image_size": 14},
             "augment": NOISE},
        ],
        "sources": {"glyphs": GLYPHS},
    }
    mix.update(overrides)
    return mix


@pytest.fixture(scope="module")
def sampler():
    return TaskSampler(small_mix())


def test_same_seed_same_task_and_batches(sampler):
    a, b = sampler.sample(7), sampler.sample(7)
    assert a.metadata() == b.metadata()
    for _ in range(2):  # successive calls: new batches, the same ones for the same seed
        np.testing.assert_array_equal(a.inner_batch(32), b.inner_batch(32))
        for x, y in zip(a.labelled_pair(2, 3), b.labelled_pair(2, 3)):
            np.testing.assert_array_equal(x, y)
    other = TaskSampler(small_mix()).sample(7)  # another sampler (another worker)
    assert other.metadata() == a.metadata()
    np.testing.assert_array_equal(other.inner_batch(32), TaskSampler(small_mix()).sample(7)
                                  .inner_batch(32))


def test_successive_batches_and_seeds_differ(sampler):
    task = sampler.sample(3)
    assert not np.array_equal(task.inner_batch(16), task.inner_batch(16))
    metas = [sampler.sample(s).metadata() for s in range(40)]
    assert len({json.dumps(m["classes"]) for m in metas}) > 20
    assert len({tuple(m["arch"]["sizes"]) for m in metas}) > 30
    assert {m["component"] for m in metas} == {"glyphs", "glyphs/currency", "digits"}


def test_contract_shapes_and_metadata(sampler):
    for seed in range(25):
        task = sampler.sample(seed)
        d, k, n = task.arch.input_size, task.num_targets, task.num_classes
        assert isinstance(task.arch, Architecture) and task.arch.output_size == 32
        assert 2 <= task.arch.num_layers <= 5
        assert all(64 <= w <= 512 for w in task.arch.sizes[1:-1])
        assert d == 196 and "total_steps" not in task.metadata()
        assert isinstance(task.dataset, str)
        x = task.inner_batch(20)
        assert x.shape == (20, d) and x.dtype == np.float32
        pair = task.labelled_pair(3, 4)
        assert isinstance(pair, LabelledPair)
        assert pair.x_train.shape == pair.x_test.shape == (3, n * 4, d)
        assert pair.y_train.shape == pair.y_test.shape == (3, n * 4, k)
        assert all(f.dtype == np.float32 for f in pair)
        meta = task.metadata()
        json.dumps(meta)
        assert meta["num_targets"] == k == n + len(meta["augmentations"]["targets"])
        assert meta["arch"]["sizes"] == list(task.arch.sizes)
    tb = task.truncation_batch(3, 8, 2, 4)
    assert isinstance(tb, TruncationBatch) and tb.num_steps == 3
    assert tb.inner_x.shape == (3, 8, d)
    assert tb.pair.x_train.shape == (3, 2, n * 4, d) and tb.pair.y_test.shape == (3, 2, n * 4, k)


def test_labelled_pairs_are_class_balanced(sampler):
    for seed in range(10):
        task = sampler.sample(seed)
        pair = task.labelled_pair(4, 5)
        for y in (pair.y_train, pair.y_test):
            onehot = y[..., :task.num_classes]
            assert set(np.unique(onehot)) == {0.0, 1.0}
            np.testing.assert_array_equal(onehot.sum(axis=1), np.full((4, task.num_classes), 5))


def test_train_and_test_examples_are_distinct_when_possible():
    # digits has ~180 examples per class, without augmentation or permutation.
    sampler = TaskSampler({"components": [{"source": "digits", "ways": [10]}],
                           "permute_inputs": False})
    digits = sampler.dataset("digits")
    flat = digits.x.reshape(len(digits.x), -1).astype(np.float32) * np.float32(1 / 255)
    lookup = {row.tobytes(): i for i, row in enumerate(flat)}
    assert len(lookup) == len(flat)  # no duplicate images, so bytes identify examples
    pair = sampler.sample(0).labelled_pair(3, 10)
    for m in range(3):
        train = {lookup[r.tobytes()] for r in pair.x_train[m]}
        test = {lookup[r.tobytes()] for r in pair.x_test[m]}
        assert len(train) == 100 and len(test) == 100 and not train & test


def test_fixed_subset_is_fixed_and_in_group(sampler):
    glyphs = sampler.dataset("glyphs")
    seen = set()
    for seed in range(60):
        task = sampler.sample(seed)
        if task.component == "glyphs/currency":
            seen.add(tuple(task.classes))
            assert set(task.classes) <= set(glyphs.groups["currency"])
            assert task.augment.geometric
    assert len(seen) == 1


def test_sampling_is_fast(sampler):
    import time
    sampler.sample(0).labelled_pair(5, 10)  # warm the tables
    start = time.perf_counter()
    for seed in range(50):
        task = sampler.sample(seed)
        task.inner_batch(128)
        task.labelled_pair(5, 10)
    assert (time.perf_counter() - start) / 50 < 0.05  # generous: loaded CI machines


def test_bad_mixes_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown config key components\\[0\\]|bogus"):
        load_mix(small_mix(components=[{"source": "digits", "bogus": 1}]))
    with pytest.raises(ConfigError, match="components: need at least one"):
        load_mix({})
    with pytest.raises(ConfigError, match="components: need at least one"):
        load_mix({"components": [{"source": "digits", "weight": 0}]})
    with pytest.raises(ConfigError, match="unknown config key wat"):
        load_mix(small_mix(wat=1))
    with pytest.raises(ConfigError, match="length: a task mix no longer sets task lengths.*"
                                          "curriculum.truncations_std"):
        load_mix(small_mix(length={"scale": 40}))
    with pytest.raises(ConfigError, match="components\\[0\\].source: unknown source 'nope'"):
        load_mix({"components": [{"source": "nope"}]})
    with pytest.raises(ConfigError, match="components\\[0\\].augment.geometric_prob"):
        load_mix({"components": [{"source": "digits", "augment": {"geometric_prob": 2}}]})
    with pytest.raises(ConfigError, match="components\\[0\\].preprocess.image_size"):
        load_mix({"components": [{"source": "digits", "preprocess": {"image_size": 13}}]})
    with pytest.raises(ConfigError, match="30-way tasks need 30 classes but digits has 10"):
        TaskSampler({"components": [{"source": "digits", "ways": [30]}]})
    with pytest.raises(ConfigError, match="no class group 'letters'"):
        TaskSampler({"components": [{"source": "digits", "group": "letters"}]})
    with pytest.raises(ConfigError, match="non-negative"):
        TaskSampler({"components": [{"source": "digits"}]}).sample(-1)


def test_tfds_source_without_data_dir(monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        TaskSampler({"components": [{"source": "cifar10"}]})
    # weight 0: not loaded, no error
    TaskSampler({"components": [{"source": "digits"}, {"source": "cifar10", "weight": 0}]})


def test_shipped_mixes_parse():
    root = os.path.join(os.path.dirname(__file__), "..", "metalearn", "configs", "tasks")
    local = load_mix(os.path.join(root, "local.yaml"))
    paper = load_mix(os.path.join(root, "paper.yaml"))
    assert {c.source for c in local.components} == {"glyphs", "digits"}
    assert {c.source for c in paper.components} == {"glyphs", "cifar10", "imagenet16"}
    assert {c.group for c in paper.components if c.fixed} == {"alphabet", "math", "currency"}
    glyph_weight = sum(c.weight for c in paper.components if c.source == "glyphs")
    assert abs(glyph_weight / sum(c.weight for c in paper.components) - 0.5) < 1e-9
    with pytest.raises(FileNotFoundError):
        load_mix(os.path.join(root, "missing.yaml"))


def test_paper_mix_under_mock_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    root = os.path.join(os.path.dirname(__file__), "..", "metalearn", "configs", "tasks")
    mix = load_mix(os.path.join(root, "paper.yaml"))
    import dataclasses
    mix = dataclasses.replace(mix, sources=dataclasses.replace(
        mix.sources, glyphs=GLYPHS, cache_dir=str(tmp_path)))
    with tfds.testing.mock_data(num_examples=300):
        sampler = TaskSampler(mix, data_dir=str(tmp_path / "tfds"))
    dims = {}
    for seed in range(40):
        task = sampler.sample(seed)
        dims[task.dataset] = task.input_size
        pair = task.labelled_pair(2, 3)
        assert pair.x_train.shape[-1] == task.input_size
    assert dims == {"glyphs": 196, "cifar10": 256, "imagenet16": 256}


def test_preloaded_datasets_are_used_as_given():
    # What a Ray worker does with arrays from the object store (read-only numpy).
    from tasks.sources import load
    digits = load("digits")
    frozen = type(digits)(digits.name, digits.x.copy(), digits.y.copy(), digits.class_names,
                          digits.modality)
    frozen.x.setflags(write=False)
    frozen.y.setflags(write=False)
    sampler = TaskSampler({"components": [{"source": "digits", "augment": NOISE}]},
                          datasets={"digits": frozen})
    assert sampler.dataset("digits") is frozen
    task = sampler.sample(1)
    assert task.inner_batch(8).shape == (8, 64)
    reference = TaskSampler({"components": [{"source": "digits", "augment": NOISE}]}).sample(1)
    reference.inner_batch(8)  # same position in the task's stream
    np.testing.assert_array_equal(task.labelled_pair(2, 3).x_train,
                                  reference.labelled_pair(2, 3).x_train)


def test_sample_like_shares_the_shape_not_the_task(sampler):
    # Templates from every component, with and without regression targets.
    templates = [sampler.sample(seed) for seed in range(12)]
    assert len({t.component for t in templates}) == 3
    assert len({t.num_targets - t.num_classes for t in templates}) > 1
    for template in templates:
        likes = [sampler.sample(1000 + i, like=template) for i in range(4)]
        for task in likes:
            assert (task.component, task.arch, task.num_classes, task.num_targets) == (
                template.component, template.arch, template.num_classes, template.num_targets)
            pair = task.labelled_pair(2, 3)
            assert pair.y_train.shape == template.labelled_pair(2, 3).y_train.shape
        if not template.metadata()["fixed"] and template.dataset == "glyphs":  # digits: 10 of 10
            assert len({tuple(t.classes) for t in likes + [template]}) > 1
        # Seeded like any task: the same seed and template give the same task.
        again = sampler.sample(1000, like=template)
        assert again.metadata() == likes[0].metadata()
