"""rule_layers: the rule's convolutions traced as XLA convolutions or as im2col + matmul
(``matmul_convs``) give the same numbers; under vmap over per-particle weights only the
matmul form avoids grouped convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import rule_layers as rl


def _params(kernel, c_in, c_out, seed=0):
    params = rl.init_conv(jax.random.key(seed), kernel, c_in, c_out)
    params["b"] = jnp.linspace(-1.0, 1.0, c_out)
    return params


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("conv", [rl.conv_batch, rl.conv_units])
def test_matmul_convs_equal_xla_convolutions(kernel, conv):
    params = _params(kernel, 6, 7)
    x = jax.random.normal(jax.random.key(1), (9, 11, 6))  # [B, N, C_in]
    expected = conv(params, x)
    with rl.matmul_convs():
        got = conv(params, x)
    assert got.shape == (9, 11, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Hand check of one output of the batch-axis conv: sum_k x[b + k - pad] w[k] + b.
    if conv is rl.conv_batch and kernel == 3:
        b, n, pad = 4, 2, 1
        manual = sum(x[b + k - pad, n] @ params["w"][k] for k in range(kernel)) + params["b"]
        np.testing.assert_allclose(got[b, n], manual, rtol=1e-5, atol=1e-5)


def test_matmul_convs_is_scoped_and_per_thread():
    import threading

    assert not rl.matmul_convs_enabled()
    seen = []
    with rl.matmul_convs():
        assert rl.matmul_convs_enabled()
        # another thread tracing meanwhile keeps the default
        thread = threading.Thread(target=lambda: seen.append(rl.matmul_convs_enabled()))
        thread.start()
        thread.join()
        with rl.matmul_convs(False):
            assert not rl.matmul_convs_enabled()
        assert rl.matmul_convs_enabled()
    assert not rl.matmul_convs_enabled() and seen == [False]


def test_per_particle_weights_become_a_batched_matmul_not_a_grouped_conv():
    particles = 4
    keys = jax.random.split(jax.random.key(2), particles)
    weights = jax.vmap(lambda key: rl.init_conv(key, 3, 5, 6))(keys)  # w: [4, 3, 5, 6]
    x = jax.random.normal(jax.random.key(3), (particles, 8, 10, 5))

    def apply(params, x):
        return rl.conv_units(params, x)

    grouped = str(jax.make_jaxpr(jax.vmap(apply))(weights, x))
    with rl.matmul_convs():
        matmul = str(jax.make_jaxpr(jax.vmap(apply))(weights, x))
        got = jax.vmap(apply)(weights, x)
    assert "feature_group_count=4" in grouped  # XLA's grouped form, one group a particle
    assert "conv_general_dilated" not in matmul and "dot_general" in matmul
    np.testing.assert_allclose(got, jax.vmap(apply)(weights, x), rtol=1e-5, atol=1e-5)
