import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core.base_model import (Architecture, BaseParams, check_params, features, forward,
                                  init_params)
from metalearn.core.config import ACTIVATIONS, ConfigError


@pytest.mark.parametrize("sizes", [(7, 1, 32), (12, 512, 3, 32), (20, 64, 5, 300, 32),
                                   (9, 2, 17, 130, 4, 32), (30, 1, 1, 256, 8, 60, 32)])
def test_forward_shapes_any_depth_and_width(sizes):
    arch = Architecture(sizes)
    params = init_params(jax.random.key(0), arch)
    x = jax.random.normal(jax.random.key(1), (16, sizes[0]))
    out = forward(params, x, arch)
    assert len(out.xs) == arch.num_layers + 1 and len(out.zs) == arch.num_layers
    for n, a in zip(sizes, out.xs):
        assert a.shape == (16, n)
    for n, z in zip(sizes[1:], out.zs):
        assert z.shape == (16, n)
        assert bool(jnp.all(jnp.isfinite(z)))
    # Batch norm without scale: before the bias, every unit (of width > 1 input) is
    # centred over the batch, so z's batch mean equals b.
    for z, b in zip(out.zs, params.b):
        np.testing.assert_allclose(jnp.mean(z, axis=0), b, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_runs(activation):
    arch = Architecture((10, 20, 32), activation)
    params = init_params(jax.random.key(0), arch)
    x = jax.random.normal(jax.random.key(1), (8, 10))
    feats = features(params, x, arch)
    assert feats.shape == (8, 32) and bool(jnp.all(jnp.isfinite(feats)))
    if activation == "step":
        assert set(np.unique(np.asarray(feats))) <= {0.0, 1.0}
    if activation == "identity":
        np.testing.assert_allclose(feats, forward(params, x, arch).zs[-1])


def test_init_is_truncated_normal_with_reference_scales():
    arch = Architecture((100, 200, 32))
    params = init_params(jax.random.key(0), arch, w_std=0.01, b_std=0.1)
    w = np.asarray(params.w[0])
    assert abs(w.std() - 0.01 * 0.88) < 1e-3  # truncation at 2 std shrinks the std
    assert np.abs(w).max() <= 0.02 + 1e-6
    assert not np.allclose(params.w[0], params.v[0])  # V is independent of W
    assert arch.num_params() == 2 * (100 * 200 + 200 * 32) + 200 + 32


def test_bad_architectures_name_the_field():
    with pytest.raises(ConfigError, match="activation"):
        Architecture((4, 32), "gelu-ish")
    with pytest.raises(ConfigError, match=r"sizes\[1\]"):
        Architecture((4, 0, 32))
    with pytest.raises(ConfigError, match=r"sizes\[0\]"):
        Architecture((-3, 32))
    with pytest.raises(ConfigError, match="sizes"):
        Architecture((4,))


def test_check_params_names_mismatched_layer():
    arch = Architecture((4, 6, 32))
    params = init_params(jax.random.key(0), arch)
    check_params(params, arch)
    bad = BaseParams(params.w, (params.v[0], params.v[1][:3]), params.b)
    with pytest.raises(ConfigError, match=r"phi.v\[1\]"):
        check_params(bad, arch)
    with pytest.raises(ConfigError, match="layers"):
        check_params(params, Architecture((4, 6, 6, 32)))
