"""The Ray actor around the continuous evaluator (slow: starts a Ray instance)."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from metalearn.evaluation.config import ContinuousEvalConfig
from metalearn.core.update_rule import init_theta


@pytest.mark.slow
def test_evaluator_actor_returns_metrics_row(tiny_rule):
    import ray

    from metalearn.distributed.evaluator import start_evaluator

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = ContinuousEvalConfig(datasets=("two_moons",), width=16, depth=1, steps=2,
                                      test_size=200, every=5, horizons=(2,), long_every=1)
        actor = start_evaluator(config, tiny_rule)
        flat, _ = ravel_pytree(init_theta(jax.random.key(0), tiny_rule))
        row = ray.get(actor.evaluate.remote(10, np.asarray(flat)), timeout=300)
        assert row["step"] == 10 and 0.0 < row["eval/two_moons/meta_loss"] < 3.0
        assert 0.5 <= row["eval/two_moons/accuracy"] <= 1.0
        assert ray.get(actor.every.remote()) == 5
        long = ray.get(actor.evaluate.remote(10, np.asarray(flat), short=False, long=True),
                       timeout=300)
        assert "eval/two_moons/meta_loss" not in long
        assert 0.5 <= long["eval/two_moons/accuracy@2"] <= 1.0
    finally:
        ray.shutdown()
