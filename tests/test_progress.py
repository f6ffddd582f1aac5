"""The live progress line's held-out part: the newest long-horizon evaluation."""

from metalearn.training.config import load_config
from metalearn.training.progress import long_horizon_text, short_name, unroll_text


def test_short_names():
    assert short_name("fashion_mnist") == "fm"
    assert short_name("two_moons") == "tm"
    assert short_name("digits") == "digits"


def test_long_horizon_text_picks_the_first_dataset_and_the_largest_horizon():
    latest = {"eval/two_moons/accuracy@1000": 0.9, "eval/fashion_mnist/accuracy@100": 0.61,
              "eval/fashion_mnist/accuracy@1000": 0.452, "eval/fashion_mnist/rank90@1000": 9.0,
              "eval/fashion_mnist/accuracy": 0.6, "eval_s": 3.0}
    assert long_horizon_text(latest, ("fashion_mnist", "two_moons")) == " | fm@1000 0.452 r9"
    assert long_horizon_text(latest, ("two_moons",)) == " | tm@1000 0.900"  # no rank
    assert long_horizon_text({"eval/digits/accuracy": 0.5}, ("digits",)) == ""
    assert long_horizon_text({}, ()) == ""


def test_unroll_text_names_what_a_task_runs():
    row = {"unroll_min": 2, "unroll_max": 4}
    assert unroll_text(load_config("local"), row) == "T 100"  # es_full: whole runs
    truncated = load_config("local", ["estimator.kind=truncated"])
    assert unroll_text(truncated, row) == "U 2-4"
