"""`metalearn bench learner` and `metalearn bench scaling`, shortened: they run end to end
through Ray and report their JSON keys with real, consistent numbers."""

import json
import os

import pytest

from metalearn.cli import main
from metalearn.training.config import config_to_yaml
from train_helpers import tiny_config

os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture
def ray2():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from metalearn.distributed.driver import local_system_config

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config=local_system_config())
    yield ray
    ray.shutdown()


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_learner_bench_counts_what_the_learner_applied(ray2, capsys):
    assert main(["bench", "learner", "--json", "--seconds", "2", "--workers", "2",
                 "--meta-batch", "16"]) == 0
    report = last_json(capsys)
    assert report["theta_params"] == 114670  # paper-size theta
    assert report["grads_per_s"] > 10 and report["driver_loop_grads_per_s"] > 10
    # Every gradient counted was applied in meta-batches of 16: updates/s follows.
    assert report["updates_per_s"] == pytest.approx(report["grads_per_s"] / 16, rel=0.3)
    assert 0 < report["learner_busy_fraction"] <= 1.0
    assert report["dropped_stale"] == 0 and report["dropped_nonfinite"] == 0
    assert report["meets_target"] == (report["grads_per_s"] >= 1000)


# A measuring command's own test (20 s of two-worker phases); the learner bench above
# keeps the bench path in the default suite.
@pytest.mark.slow
def test_scaling_bench_alternates_phases(ray2, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(tiny_config(tmp_path)))
    assert main(["bench", "scaling", "--json", "--config", str(config), "--seconds", "2",
                 "--rounds", "2", "--unroll", "2"]) == 0
    report = last_json(capsys)
    assert report["grads_per_s_1"] > 0 and report["grads_per_s_2"] > 0
    assert report["speedup"] == pytest.approx(report["grads_per_s_2"] / report["grads_per_s_1"])
    assert len(report["round_speedups"]) == 2 and report["arch"] == [64, 8, 8]
    cores = [tuple(c) for c in report["cores"]]
    assert all(len(c) == 1 for c in cores) and len(set(cores)) == 2  # a core each
