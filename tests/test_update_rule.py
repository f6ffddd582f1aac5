import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import update_rule as ur
from metalearn.core.base_model import Architecture, init_params
from metalearn.core.config import ACTIVATIONS, ConfigError, RuleConfig


def _problem(rule, sizes, activation="relu", batch=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    theta = ur.init_theta(keys[0], rule)
    params = init_params(keys[1], Architecture(sizes, activation))
    x = jax.random.normal(keys[2], (batch, sizes[0]))
    return theta, params, x


_step = jax.jit(ur.inner_step, static_argnums=(3, 4))
_internals = jax.jit(ur.rule_internals, static_argnums=(3, 4))


def test_theta_size_at_paper_sizes_matches_reference():
    theta = ur.init_theta(jax.random.key(0), RuleConfig())
    count = ur.num_params(theta)
    # The reference TF1 implementation reports about 115k meta-parameters.
    assert 110_000 < count < 120_000, count
    assert set(theta) == {"top_d", "compute_h", "to_delta", "bias_readout", "readouts",
                          "merge_w"}
    assert set(theta["readouts"]) == set(ur.READOUT_NAMES) and len(ur.READOUT_NAMES) == 15
    assert theta["merge_w"]["w"].shape == (12,)
    separate = ur.init_theta(jax.random.key(0), RuleConfig(identical_updates=False))
    assert "merge_v" in separate and "readouts_v" in separate


@pytest.mark.parametrize("sizes", [(7, 1, 8), (12, 512, 3, 8), (20, 64, 5, 300, 8),
                                   (9, 2, 17, 130, 4, 8), (10, 1, 3, 256, 8, 60, 8)])
def test_step_shapes_and_finite_any_depth_width(tiny_rule, sizes):
    theta, params, x = _problem(tiny_rule, sizes)
    internals = _internals(theta, params, x, "relu", tiny_rule)
    for l, n in enumerate(sizes):
        assert internals.hs[l].shape == (16, n, tiny_rule.compute_h_size)
        assert internals.ds[l].shape == (16, n, tiny_rule.delta_dim)
    new = ur.apply_updates(params, internals.dws, internals.dvs, internals.dbs,
                           tiny_rule.inner_lr)
    for old, upd in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        assert old.shape == upd.shape
        assert bool(jnp.all(jnp.isfinite(upd)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_step_every_activation(tiny_rule, activation):
    theta, params, x = _problem(tiny_rule, (12, 24, 8), activation)
    new = _step(theta, params, x, activation, tiny_rule)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(new))
    assert float(jnp.max(jnp.abs(new.w[0] - params.w[0]))) > 0


def test_inner_step_takes_no_labels(tiny_rule):
    params_in_signature = set(inspect.signature(ur.inner_step).parameters)
    assert params_in_signature == {"theta", "params", "x", "activation", "config"}
    theta, params, x = _problem(tiny_rule, (12, 24, 8))
    jaxpr = jax.make_jaxpr(lambda th, ph, xx: ur.inner_step(th, ph, xx, "relu", tiny_rule))(
        theta, params, x)
    # Its only array inputs are theta, phi and the unlabelled batch.
    assert len(jaxpr.jaxpr.invars) == len(jax.tree.leaves(theta)) + len(jax.tree.leaves(params)) + 1


def test_fresh_theta_step_is_more_than_decay(tiny_rule):
    theta, params, x = _problem(tiny_rule, (12, 24, 8))
    new = _step(theta, params, x, "relu", tiny_rule)
    lr = tiny_rule.inner_lr
    for w, w_new in zip(params.w, new.w):
        decay_only = w * (1 - lr)
        change = np.asarray(w_new - decay_only)
        # The learned part: lr * dW with dW of order 1 per column-normalised entry.
        assert np.abs(change).mean() > 0.1 * lr * np.abs(np.asarray(w)).mean() / np.sqrt(
            np.mean(np.asarray(w) ** 2))
    for b, b_new in zip(params.b, new.b):
        assert float(jnp.max(jnp.abs(b_new - b * (1 - lr)))) > 0


@pytest.mark.parametrize("plane", ur.PLANE_NAMES)
def test_every_plane_contributes(tiny_rule, plane):
    theta, params, x = _problem(tiny_rule, (12, 24, 8))
    base = _internals(theta, params, x, "relu", tiny_rule)
    index = ur.PLANE_NAMES.index(plane)
    theta_off = jax.tree.map(lambda a: a, theta)
    theta_off["merge_w"] = {"w": theta["merge_w"]["w"].at[index].set(0.0),
                            "b": theta["merge_w"]["b"]}
    off = _internals(theta_off, params, x, "relu", tiny_rule)
    diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(base.dws, off.dws)]
    scale = max(float(jnp.max(jnp.abs(a))) for a in base.dws)
    # float32 round-off is ~1e-7 of the scale. w_base is the weakest: the no-shrink
    # projection removes most of what it adds along W_hat, but not all.
    assert max(diffs) > 1e-5 * scale, (plane, diffs)


def test_planes_are_named_and_shaped(tiny_rule):
    theta, params, x = _problem(tiny_rule, (12, 24, 8))
    internals = _internals(theta, params, x, "relu", tiny_rule)
    readouts = [ur.readout_all(theta["readouts"], h) for h in internals.hs]
    from metalearn.core.base_model import forward
    fwd = forward(params, x, Architecture((12, 24, 8)))
    planes = ur.weight_planes(params.w[0], fwd.xs[0], fwd.xs[1], readouts[0], readouts[1])
    assert tuple(planes) == ur.PLANE_NAMES
    for value in planes.values():
        assert value.shape == (12, 24)
    # w_base has unit RMS columns up to the normaliser's 1e-6: mean(W_hat^2) over a
    # column is m / (m + 1e-6) with m = mean(W^2). hebb is minus a correlation (<= 1).
    m = jnp.mean(params.w[0] ** 2, axis=0)
    np.testing.assert_allclose(jnp.mean(planes["w_base"] ** 2, axis=0), m / (m + 1e-6),
                               rtol=1e-4)
    assert float(jnp.max(jnp.abs(planes["hebb"]))) <= 1.0 + 1e-4


def test_no_shrink_projection_and_bias_constraint(tiny_rule):
    theta, params, x = _problem(tiny_rule, (12, 24, 8))
    internals = _internals(theta, params, x, "relu", tiny_rule)
    for w, dw in zip(params.w, internals.dws):
        w_hat = ur.normalize_weights(w)
        # After the projection and growth term, -dW never points against W_hat on
        # average: the update cannot shrink W (beyond the constant decay).
        assert float(jnp.mean(dw * w_hat)) <= 1e-6
    for db in internals.dbs:
        # db is subtracted; its mean is never negative (biases cannot all rise).
        assert float(jnp.mean(db)) >= -1e-6
        assert float(jnp.sqrt(jnp.mean(db ** 2))) < np.sqrt(2.0)


def test_five_hundred_steps_stay_finite_and_bounded(tiny_rule):
    theta, params, x = _problem(tiny_rule, (16, 32, 24, 8), batch=32)
    xs = jax.random.normal(jax.random.key(5), (500, 32, 16))

    @jax.jit
    def run(params):
        def body(p, xb):
            new = ur.inner_step(theta, p, xb, "relu", tiny_rule)
            return new, jnp.max(jnp.array([jnp.max(jnp.abs(w)) for w in new.w]))
        return jax.lax.scan(body, params, xs)

    final, max_abs = run(params)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(final))
    max_abs = np.asarray(max_abs)
    assert max_abs.max() < 1.0  # starts near 0.02: no blow-up over 500 steps
    col_rms = [float(jnp.min(jnp.sqrt(jnp.mean(w ** 2, axis=0)))) for w in final.w]
    assert min(col_rms) > 1e-3  # receptive fields do not collapse to zero


def test_bad_inputs_name_the_field(tiny_rule):
    theta, params, x = _problem(tiny_rule, (12, 24, 8))
    with pytest.raises(ConfigError, match="features"):
        ur.check_inputs(params, x[:, :5], tiny_rule)
    with pytest.raises(ConfigError, match="top_units"):
        ur.check_inputs(params, x, RuleConfig.small())
    with pytest.raises(ConfigError, match="rule.compute_h_size"):
        RuleConfig(compute_h_size=0)
    with pytest.raises(ConfigError, match="rule.kernel"):
        RuleConfig(kernel=4)
    with pytest.raises(ConfigError, match="activation"):
        ur.inner_step(theta, params, x, "relu6", tiny_rule)


def test_merge_init_planes_set_named_mixing_weights():
    rule = RuleConfig.small(merge_init=0.0, merge_init_planes={"hebb": 3.0, "decorr_x": 1.35})
    w = np.asarray(ur.init_theta(jax.random.key(0), rule)["merge_w"]["w"])
    expected = np.zeros(len(ur.PLANE_NAMES), np.float32)
    expected[ur.PLANE_NAMES.index("hebb")] = 3.0
    expected[ur.PLANE_NAMES.index("decorr_x")] = 1.35
    np.testing.assert_array_equal(w, expected)
    assert rule.merge_init_planes == (("hebb", 3.0), ("decorr_x", 1.35))
    hash(rule)  # a static argument of jit
    with pytest.raises(ConfigError, match="rule.merge_init_planes: unknown plane 'heb'"):
        RuleConfig(merge_init_planes={"heb": 1.0})
