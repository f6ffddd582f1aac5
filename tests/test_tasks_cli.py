"""``metalearn data`` and ``metalearn bench tasks`` end to end (in process)."""

import json
import atexit
import os
import shutil
import tempfile

# One throwaway parquet cache per test process, never the user's.
os.environ["METALEARN_CACHE"] = os.path.join(tempfile.gettempdir(),
                                             f"metalearn-test-cache-{os.getpid()}")
atexit.register(shutil.rmtree, os.environ["METALEARN_CACHE"], True)

import pytest

from metalearn.cli import main

QUICK_GLYPHS = ["--glyph-blocks", "basic_latin,latin1,currency,math_operators",
                "--glyph-max-fonts", "6"]


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_list(capsys):
    assert main(["data", "list", "--json"]) == 0
    names = {s["name"] for s in _last_json(capsys)["sources"]}
    assert {"glyphs", "digits", "fashion_mnist", "cifar10", "imdb", "file:PATH"} <= names


def test_info_json(capsys):
    assert main(["data", "info", "digits", "--json"]) == 0
    info = _last_json(capsys)
    assert info["num_classes"] == 10 and info["num_examples"] == 1797 and info["shape"] == [8, 8]
    assert main(["data", "info", "glyphs", "--json", *QUICK_GLYPHS]) == 0
    info = _last_json(capsys)
    assert info["groups"]["alphabet"] == 52 and info["groups"]["currency"] >= 10
    assert info["shape"] == [14, 14] and info["num_fonts"] == 6


def test_build_and_show(tmp_path, capsys):
    assert main(["data", "build", "glyphs", *QUICK_GLYPHS]) == 0
    out = tmp_path / "g.png"
    assert main(["data", "show", "glyphs", "--out", str(out), "--rows", "4", "--cols", "6",
                 *QUICK_GLYPHS]) == 0
    from PIL import Image
    image = Image.open(out)
    assert image.size[0] > image.size[1] > 100
    assert main(["data", "show", "two_moons", "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_sample_json_is_deterministic(tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text("components:\n  - {source: digits, ways: [5], preprocess: {image_size: 14}}\n")
    assert main(["data", "sample", "--seed", "4", "--mix", str(mix), "--json"]) == 0
    first = _last_json(capsys)
    assert main(["data", "sample", "--seed", "4", "--mix", str(mix), "--json"]) == 0
    assert _last_json(capsys) == first
    assert first["num_classes"] == 5 and first["arch"]["sizes"][0] == 196
    assert main(["data", "sample", "--seed", "4", "--mix", str(mix)]) == 0
    out = capsys.readouterr().out
    assert "5-way" in out and "length (a task started at learner step 0)" in out


def test_sample_shows_the_curriculum_length(tmp_path, capsys):
    """The length comes from the training config's curriculum at the given step: the
    paper's spread ramps from 20 to 20,000 truncations over 5,000 updates."""
    mix = tmp_path / "mix.yaml"
    mix.write_text("components:\n  - {source: digits, ways: [5], preprocess: {image_size: 14}}\n")
    lengths = {}
    for step in (0, 5000):
        assert main(["data", "sample", "--seed", "4", "--mix", str(mix), "--config", "paper",
                     "--step", str(step), "--json"]) == 0
        lengths[step] = _last_json(capsys)["length"]
    # E[max(1, N(20, 20))] = 21.8 truncations (the clip lifts the mean) x mean U 3
    assert lengths[0]["mean_inner_steps"] == pytest.approx(65.5, abs=0.2)
    assert lengths[5000]["mean_inner_steps"] > 1000 * lengths[0]["mean_inner_steps"] / 2
    assert lengths[5000]["truncations"] > 100 and lengths[0]["truncations"] >= 1
    assert main(["data", "sample", "--seed", "4", "--mix", str(mix), "--step", "-1"]) == 2


@pytest.mark.parametrize("argv,message", [
    (["data", "info", "nope"], "unknown source 'nope'"),
    (["data", "info", "fashion_mnist", "--fashion-mnist-dir", "/nonexistent"],
     "dataset-fashion-mnist"),
    (["data", "info", "glyphs", "--glyph-blocks", "klingon"], "unknown block"),
])
def test_errors_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_tfds_without_data_dir_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert main(["data", "info", "cifar10"]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_bench_tasks_without_inner_step(tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text("components:\n  - {source: digits, ways: [10], preprocess: {image_size: 14},"
                   " augment: {geometric_prob: 1.0}}\n")
    assert main(["bench", "tasks", "--mix", str(mix), "--tasks", "20", "--skip-inner-step",
                 "--json"]) == 0
    report = _last_json(capsys)
    assert 0 < report["task_s"] < 1 and report["components"]["digits"]["tasks"] == 20
