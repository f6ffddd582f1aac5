"""Data a sweep needs, checked on every node before any trial (metalearn.distributed.data_check)."""

import os

import pytest

from metalearn.core.config import ConfigError
from metalearn.distributed.data_check import check_nodes, missing_sources, ranked_dataset
from tasks.registry import SourceOptions

os.environ["RAY_AUTH_MODE"] = "disabled"


def test_the_ranked_dataset_is_read_off_the_metric():
    assert ranked_dataset("eval/fashion_mnist_val/accuracy@100") == "fashion_mnist_val"
    assert ranked_dataset("eval/file:/data/my set.npz/rank90@300") == "file:/data/my set.npz"
    assert ranked_dataset("meta_loss_rolling") is None
    assert ranked_dataset("loss/digits") is None
    assert ranked_dataset("eval_s") is None


def test_missing_sources_names_each_one_and_why(tmp_path):
    empty = SourceOptions(fashion_mnist_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    missing = missing_sources([("digits", SourceOptions(cache_dir=str(tmp_path / "c"))),
                               ("fashion_mnist_val", empty),
                               (f"file:{tmp_path}/none.npz", SourceOptions())])
    assert sorted(missing) == ["fashion_mnist_val", f"file:{tmp_path}/none.npz"]
    assert "train-images-idx3-ubyte(.gz) not found" in missing["fashion_mnist_val"]
    assert "metalearn data fetch fashion_mnist --from" in missing["fashion_mnist_val"]


def test_every_node_is_asked_and_a_missing_source_is_one_line(ray_session, tmp_path):
    there = [("digits", SourceOptions(cache_dir=str(tmp_path / "c")))]
    assert check_nodes(there, "sweep s") == 1
    gone = there + [(f"file:{tmp_path}/gone.npz", SourceOptions())]
    with pytest.raises(ConfigError) as err:
        check_nodes(gone, "sweep s")
    message = str(err.value)
    assert "\n" not in message
    assert f"sweep s needs the source 'file:{tmp_path}/gone.npz', which is missing on node" \
        in message and "Stage it on every node" in message
