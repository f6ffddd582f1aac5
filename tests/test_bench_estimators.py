"""``metalearn bench estimators``: one truncation's gradient per estimator, in one run."""

import pytest

from metalearn.cli.bench import format_estimators
from metalearn.core.bench import measure_estimators
from train_helpers import TINY_RULE


@pytest.mark.slow  # compiles all four estimators (~1 minute); run with -m slow
def test_measures_every_estimator_on_the_same_truncation():
    from metalearn.core.config import RuleConfig

    rule = RuleConfig(**{**RuleConfig.small().__dict__, **TINY_RULE})
    report = measure_estimators(unroll=2, pairs=2, batch=8, repeats=1,
                                base_model=(16, 8, 8), rule=rule)
    runs = report["estimators"]
    assert list(runs) == ["truncated", "es", "pes", "hybrid",
                          "es/grouped", "pes/grouped", "hybrid/grouped"]
    forward, backprop = report["step_flops"]["forward"], report["step_flops"]["backprop"]
    assert 0 < forward < backprop
    assert runs["es"]["flop_ratio"] == pytest.approx(5 * forward / backprop)  # 1 + 2K
    assert runs["hybrid"]["flop_ratio"] == pytest.approx(1 + 4 * forward / backprop)
    assert runs["truncated"]["over_truncated"] == 1.0
    assert runs["truncated"]["cosine_to_truncated"] == pytest.approx(1.0, abs=1e-5)
    for name, entry in runs.items():
        assert entry["finite"] and entry["seconds"] > 0, name
        assert -1.0 <= entry["cosine_to_truncated"] <= 1.0 + 1e-6
    # The hybrid's first truncation weighs both halves 0.5, so it leans towards backprop.
    assert runs["hybrid"]["cosine_to_truncated"] > runs["es"]["cosine_to_truncated"]
    # The convolution form changes the speed, not the estimate (same noise, same data),
    # up to float32 round-off: on this tiny rule at sigma 0.01, L+ - L- is about 1e-6
    # and the two forms' losses differ by about 1e-7 (tests/test_rule_layers.py checks
    # the forms' values directly).
    for name in ("es", "pes", "hybrid"):
        assert runs[f"{name}/grouped"]["cosine_to_truncated"] == pytest.approx(
            runs[name]["cosine_to_truncated"], abs=0.1)
        assert runs[f"{name}/grouped"]["grouped_over_matmul"] > 0
    refs = report["references"]
    assert set(refs) == {"forward", "truncated/scan"}
    assert all(entry["seconds"] > 0 for entry in refs.values())
    assert report["meta_grad_over_forward"] == pytest.approx(
        runs["truncated"]["seconds"] / refs["forward"]["seconds"])
    assert report["program_speedup"] == pytest.approx(
        runs["truncated"]["seconds"] / refs["truncated/scan"]["seconds"])
    text = format_estimators(report)
    assert "x truncated" in text and "grouped convolutions over batched matmuls" in text
    assert "truncated as one program" in text
    assert text.count("\n") == 12


def test_xla_flops_counts_a_matmul():
    import jax
    import jax.numpy as jnp

    from metalearn.core.bench import xla_flops

    a = jnp.ones((32, 48))
    b = jnp.ones((48, 16))
    compiled = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    assert xla_flops(compiled) == pytest.approx(2 * 32 * 48 * 16, rel=0.01)
