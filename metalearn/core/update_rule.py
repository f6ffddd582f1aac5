"""The learned, neuron-local UnsupervisedUpdate (docs/rule.md).

    phi_{t+1} = UnsupervisedUpdate(phi_t, x_t; theta)

The rule sees an unlabelled batch x_t: [B, N_0] and the base model's parameters phi
(``base_model.BaseParams``); it never sees labels. One theta is shared by every layer,
which is what lets a single rule train any depth and width.

One inner step:
1. forward pass of the base model: x^0..x^L, z^1..z^L;
2. d^L = TopD(x^L): [B, N_L, delta_dim];
3. top-down sweep l = L..0: h^l = ComputeH(x^l, z^l, d^l, b^l, W^l, W^{l+1})
   ([B, N_l, H]); for l >= 1, delta^l = d^l * sigmoid(z^l) + Linear(h^l) and
   d^{l-1} = delta^l (V^l)^T, RMS-normalised over the delta channels;
4. per layer, the twelve weight-update planes (``PLANE_NAMES``), each [N_{l-1}, N_l],
   merged by a learned linear mix with normalisations and the no-shrink projection;
5. the constrained bias update;
6. W <- W (1 - lr) - lr dW, V likewise (identical dW by default), b <- b (1 - lr) - lr db.

theta is a nested dict with stable names (``init_theta``), so checkpoints and logs
can address its parts: ``top_d``, ``compute_h``, ``to_delta``, ``bias_readout``,
``readouts`` (one per learned plane side), ``merge_w`` (and ``merge_v`` when V has its
own merge).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metalearn.core import rule_layers as rl
from metalearn.core.base_model import Architecture, BaseParams, forward
from metalearn.core.config import PLANE_NAMES, ConfigError, RuleConfig

# Learned low-rank readouts: plane -> the readouts it owns (``_top`` reads the upper
# layer's h or, for the symmetric "lower" planes, the lower layer's).
READOUTS = {
    "0_order": ("top", "bottom"),
    "rbf": ("top", "bottom"),
    "1_order": ("top", "bottom"),
    "lin_upper_symm": ("top", "bottom"),
    "lin_upper_psd": ("top",),
    "lin_lower_symm": ("top", "bottom"),
    "sqr_upper_symm": ("top", "bottom"),
    "sqr_lower_symm": ("top", "bottom"),
}
READOUT_NAMES = tuple(f"{plane}_{side}" for plane, sides in READOUTS.items() for side in sides)

NUM_INPUT_CHANNELS = 4  # x, z, sin(p), cos(p) before the delta channels
NUM_WEIGHT_STATS = 8


# ---------------------------------------------------------------------------
# theta

def init_theta(key: jax.Array, config: RuleConfig = RuleConfig()) -> dict:
    """Initialise the rule's meta-parameters theta (a nested dict of float32 arrays)."""
    c = config
    keys = iter(jax.random.split(key, 64))
    s = c.theta_init_scale
    top_d = {
        "conv_in": rl.init_conv(next(keys), c.top_first_kernel, 1, c.top_delta_size, s),
        "bn_in": rl.init_bn(c.top_delta_size),
        "unit_mix": [{"conv": rl.init_conv(next(keys), c.kernel, c.top_units, c.top_units, s),
                      "bn": rl.init_bn(c.top_units)} for _ in range(c.top_unit_mix_layers)],
        "layers": [{"conv": rl.init_conv(next(keys), c.kernel, c.top_delta_size,
                                         c.top_delta_size, s),
                    "bn": rl.init_bn(c.top_delta_size)} for _ in range(c.top_delta_layers)],
        "conv_out": rl.init_conv(next(keys), c.kernel, c.top_delta_size, c.delta_dim, s),
    }
    n_in = NUM_WEIGHT_STATS + 1 + NUM_INPUT_CHANNELS + c.delta_dim

    def unit_block():
        return {"conv_a": rl.init_conv(next(keys), c.kernel, c.compute_h_size, c.compute_h_size, s),
                "bn_a": rl.init_bn(c.compute_h_size),
                "conv_b": rl.init_conv(next(keys), c.kernel, c.compute_h_size, c.compute_h_size, s),
                "bn_b": rl.init_bn(c.compute_h_size)}

    compute_h = {
        "input_bn": rl.init_bn(NUM_INPUT_CHANNELS + c.delta_dim),
        "layers": [{"conv": rl.init_conv(next(keys), c.kernel,
                                         n_in if i == 0 else c.compute_h_size,
                                         c.compute_h_size, s),
                    "bn": rl.init_bn(c.compute_h_size),
                    "block": unit_block()} for i in range(1 + c.compute_h_layers)],
    }

    def readouts():
        return {name: rl.init_linear(next(keys), c.compute_h_size, c.num_grad_channels, s)
                for name in READOUT_NAMES}

    def merge():
        weights = dict.fromkeys(PLANE_NAMES, c.merge_init)
        weights.update(c.merge_init_planes)
        return {"w": jnp.asarray([weights[n] for n in PLANE_NAMES], jnp.float32),
                "b": jnp.zeros(())}

    theta = {
        "top_d": top_d,
        "compute_h": compute_h,
        "to_delta": rl.init_linear(next(keys), c.compute_h_size, c.delta_dim, s),
        "bias_readout": rl.init_linear(next(keys), c.compute_h_size, 1, s),
        "readouts": readouts(),
        "merge_w": merge(),
    }
    if not c.identical_updates:
        theta["readouts_v"] = readouts()
        theta["merge_v"] = merge()
    return theta


def num_params(theta) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(theta))


# ---------------------------------------------------------------------------
# TopD and ComputeH

def top_d(theta: dict, x_top: jax.Array, config: RuleConfig) -> jax.Array:
    """Top-down signal from the top layer's activity. x_top: [B, N_L] -> [B, N_L, delta_dim]."""
    p, eps = theta["top_d"], config.rule_bn_eps
    act = x_top[:, :, None]
    act = jax.nn.relu(rl.batch_norm(p["bn_in"], rl.conv_batch(p["conv_in"], act), eps))
    # Units as channels: [B, N_L, C] -> [B, C, N_L], a conv along the batch mixes all
    # top-layer units, separately for each of the C channels.
    act = jnp.swapaxes(act, 1, 2)
    for layer in p["unit_mix"]:
        act = jax.nn.relu(rl.batch_norm(layer["bn"], rl.conv_batch(layer["conv"], act), eps))
    act = jnp.swapaxes(act, 1, 2)
    for layer in p["layers"]:
        act = jax.nn.relu(rl.batch_norm(layer["bn"], rl.conv_batch(layer["conv"], act), eps))
    return rl.conv_batch(p["conv_out"], act)


def _weight_stats(w: jax.Array, axis: int) -> list[jax.Array]:
    """[mean|w|, rms, mean, std] of w over ``axis``: four vectors over the other axis."""
    mean = jnp.mean(w, axis=axis)
    var = jnp.mean(jnp.square(w - jnp.expand_dims(mean, axis)), axis=axis)
    return [jnp.mean(jnp.abs(w), axis=axis), jnp.sqrt(jnp.mean(jnp.square(w), axis=axis) + 1e-6),
            mean, jnp.sqrt(var + 1e-8)]


def _unit_block(p: dict, x: jax.Array, eps: float) -> jax.Array:
    y = jax.nn.relu(rl.batch_norm(p["bn_a"], rl.conv_units(p["conv_a"], x), eps))
    y = jax.nn.relu(rl.batch_norm(p["bn_b"], rl.conv_units(p["conv_b"], y), eps))
    return x + y


def compute_h(theta: dict, x: jax.Array, z: jax.Array, d: jax.Array, bias: jax.Array,
              w_below: jax.Array | None, w_above: jax.Array | None,
              config: RuleConfig) -> jax.Array:
    """Per-neuron hidden state h: [B, N, compute_h_size].

    x, z: [B, N]; d: [B, N, delta_dim]; bias: [N]; w_below: [N_prev, N] (None at the
    input layer); w_above: [N, N_next] (None at the top layer).
    """
    p, eps = theta["compute_h"], config.rule_bn_eps
    batch, units = x.shape
    position = jnp.linspace(0.0, config.positional_period, units, dtype=x.dtype)
    position = jnp.broadcast_to(position, (batch, units))
    inputs = jnp.concatenate(
        [x[..., None], z[..., None], jnp.sin(position)[..., None],
         jnp.cos(position)[..., None], d], axis=-1)
    inputs = rl.batch_norm(p["input_bn"], inputs, eps)

    stats = []
    if w_below is not None:
        stats += _weight_stats(w_below, axis=0)
    if w_above is not None:
        stats += _weight_stats(w_above, axis=1)
    if w_below is None or w_above is None:
        stats = stats + stats  # an edge layer uses its one matrix's statistics twice
    stats = jnp.stack(stats, axis=-1)  # [N, 8]
    stats = stats * jax.lax.rsqrt(jnp.mean(jnp.square(stats)) + 1e-6)
    act = jnp.concatenate([jnp.broadcast_to(stats, (batch, units, NUM_WEIGHT_STATS)),
                           jnp.broadcast_to(bias[:, None], (batch, units, 1)),
                           inputs], axis=-1)
    for layer in p["layers"]:
        act = jax.nn.relu(rl.batch_norm(layer["bn"], rl.conv_batch(layer["conv"], act), eps))
        act = _unit_block(layer["block"], act, eps)
    return act


# ---------------------------------------------------------------------------
# Weight-update planes, merge and bias update

def _standardise(x: jax.Array) -> jax.Array:
    """Per-unit standardisation over the batch. x: [B, N]."""
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=0, keepdims=True) + 1e-6)


def _low_rank(r_bottom: jax.Array, r_top: jax.Array) -> jax.Array:
    """(1/B) mean_c sum_b r_bottom[b,:,c] outer r_top[b,:,c]: [B,Nb,C],[B,Nt,C] -> [Nb,Nt]."""
    batch, _, channels = r_top.shape
    return jnp.einsum("bic,bjc->ij", r_bottom, r_top) / (batch * channels)


def _symm(m: jax.Array) -> jax.Array:
    """(M + M^T)/sqrt(2) with a zero diagonal. m: [N, N]."""
    s = (m + m.T) / math.sqrt(2.0)
    return s * (1.0 - jnp.eye(m.shape[0], dtype=m.dtype))


def readout_all(readouts: dict, h: jax.Array) -> dict:
    """Every learned readout applied to h: name -> [B, N, num_grad_channels]."""
    names = READOUT_NAMES
    w = jnp.concatenate([readouts[n]["w"] for n in names], axis=1).astype(h.dtype)
    b = jnp.concatenate([readouts[n]["b"] for n in names], axis=0).astype(h.dtype)
    out = h @ w + b
    channels = readouts[names[0]]["w"].shape[1]
    return {n: out[..., i * channels:(i + 1) * channels] for i, n in enumerate(names)}


def normalize_weights(w: jax.Array) -> jax.Array:
    """W_hat: each column (a unit's receptive field) scaled to unit RMS. w: [N_in, N_out]."""
    return w * jax.lax.rsqrt(jnp.mean(jnp.square(w), axis=0, keepdims=True) + 1e-6)


def weight_planes(w: jax.Array, x_lower: jax.Array, x_upper: jax.Array,
                  r_lower: dict, r_upper: dict) -> dict:
    """The twelve named update planes of one layer, each [N_{l-1}, N_l].

    w: [N_{l-1}, N_l] (W^l or V^l); x_lower: [B, N_{l-1}]; x_upper: [B, N_l];
    r_lower / r_upper: ``readout_all`` of h^{l-1} / h^l.
    """
    batch = x_upper.shape[0]
    n_lower, n_upper = w.shape
    w_hat = normalize_weights(w)
    sign = jnp.sign(w_hat)
    sqr = jnp.sqrt(1.0 + jnp.square(w_hat)) - 1.0

    std_upper, std_lower = _standardise(x_upper), _standardise(x_lower)
    corr_upper = std_upper.T @ std_upper / batch / math.sqrt(n_upper)
    decorr = w_hat @ corr_upper
    decorr = decorr * jax.lax.rsqrt(jnp.mean(jnp.square(decorr) + 1e-8))

    def lowrr(plane):
        return _low_rank(r_lower[f"{plane}_bottom"], r_upper[f"{plane}_top"])

    s_upper = _symm(_low_rank(r_upper["lin_upper_symm_bottom"],
                              r_upper["lin_upper_symm_top"])) / math.sqrt(n_upper)
    p_upper = _low_rank(r_upper["lin_upper_psd_top"],
                        r_upper["lin_upper_psd_top"]) / math.sqrt(n_upper)
    s_lower = _symm(_low_rank(r_lower["lin_lower_symm_bottom"],
                              r_lower["lin_lower_symm_top"])) / math.sqrt(n_lower)
    s_upper_sqr = _symm(_low_rank(r_upper["sqr_upper_symm_bottom"],
                                  r_upper["sqr_upper_symm_top"])) / math.sqrt(n_upper)
    s_lower_sqr = _symm(_low_rank(r_lower["sqr_lower_symm_bottom"],
                                  r_lower["sqr_lower_symm_top"])) / math.sqrt(n_lower)
    planes = {
        "w_base": w_hat,
        "large_decay": jnp.square(w_hat) * sign,
        "decorr_x": decorr,
        "hebb": -(std_lower.T @ std_upper) / batch,
        "0_order": lowrr("0_order"),
        "rbf": jnp.exp(-jnp.square(w_hat)) * lowrr("rbf"),
        "1_order": w_hat * lowrr("1_order"),
        "lin_upper_symm": w_hat @ s_upper,
        "lin_upper_psd": w_hat @ p_upper,
        "lin_lower_symm": s_lower @ w_hat,
        "sqr_upper_symm": (sqr @ s_upper_sqr) * sign,
        "sqr_lower_symm": (s_lower_sqr @ sqr) * sign,
    }
    assert tuple(planes) == PLANE_NAMES
    return planes


def _column_normalize(p: jax.Array, eps: float) -> jax.Array:
    return p * jax.lax.rsqrt(eps + jnp.mean(jnp.square(p), axis=0, keepdims=True))


def merge_planes(merge: dict, planes: dict, w: jax.Array, config: RuleConfig) -> jax.Array:
    """Learned mix of the planes into dW: [N_{l-1}, N_l] (subtracted by the inner step)."""
    eps = config.column_norm_eps
    stacked = jnp.stack([_column_normalize(planes[n], eps) for n in PLANE_NAMES], axis=-1)
    count = len(PLANE_NAMES)
    dw = (stacked @ merge["w"].astype(w.dtype) + merge["b"].astype(w.dtype)) / count
    w_hat = planes["w_base"]
    # No-shrink projection: dW is subtracted, so a positive overlap with W_hat would
    # shrink W; remove that part, let perpendicular and growing updates pass.
    overlap = jax.nn.relu(jnp.mean(dw * w_hat))
    dw = dw - w_hat * overlap
    dw = _column_normalize(dw / math.sqrt(count), eps)
    # Constant growth along W that balances the inner step's (1 - lr) decay.
    return dw - w_hat * config.growth


def bias_update(theta: dict, h: jax.Array, config: RuleConfig) -> jax.Array:
    """db: [N] from h: [B, N, H]; biases cannot all be pushed up without bound."""
    db = jnp.mean(rl.linear(theta["bias_readout"], h)[..., 0], axis=0)
    db = db - jnp.minimum(jnp.mean(db), 0.0)
    return db * jax.lax.rsqrt(config.bias_norm_eps + jnp.mean(jnp.square(db)))


# ---------------------------------------------------------------------------
# The inner step

class RuleInternals(NamedTuple):
    """What one inner step computed, for inspection and tests."""

    hs: tuple  # h^0..h^L, [B, N_l, H]
    ds: tuple  # d^0..d^L, [B, N_l, delta_dim]
    dws: tuple  # dW^1..dW^L
    dvs: tuple  # dV^1..dV^L
    dbs: tuple  # db^1..db^L


def architecture_of(params: BaseParams, activation: str) -> Architecture:
    sizes = (params.w[0].shape[-2],) + tuple(w.shape[-1] for w in params.w)
    return Architecture(sizes, activation)


def check_inputs(params: BaseParams, x: jax.Array, config: RuleConfig) -> None:
    """Shape checks done in Python, before tracing, with errors naming the field."""
    if x.ndim != 2:
        raise ConfigError(f"inner batch x must be [batch, features], got shape {tuple(x.shape)}")
    if x.shape[1] != params.w[0].shape[0]:
        raise ConfigError(f"inner batch x has {x.shape[1]} features but phi.w[0] expects "
                          f"{params.w[0].shape[0]} inputs")
    if params.w[-1].shape[1] != config.top_units:
        raise ConfigError(f"the base model's top layer has {params.w[-1].shape[1]} units but "
                          f"rule.top_units is {config.top_units} (TopD mixes the top units "
                          f"as channels)")
    if x.shape[0] < 2:
        raise ConfigError(f"inner batch size must be at least 2 for batch norm, got {x.shape[0]}")


def rule_internals(theta: dict, params: BaseParams, x: jax.Array, activation: str,
                   config: RuleConfig) -> RuleInternals:
    """Everything the rule computes for one batch x: [B, N_0] (no labels)."""
    arch = architecture_of(params, activation)
    fwd = forward(params, x, arch, config.base_bn_eps)
    num_layers = arch.num_layers
    dtype = x.dtype
    # Index l = 0..L; layer 0 is the input, whose z is x and bias zero.
    zs = (fwd.xs[0],) + fwd.zs
    biases = (jnp.zeros((arch.input_size,), dtype),) + tuple(params.b)
    ws = (None,) + tuple(params.w) + (None,)  # ws[l] = W^l, the matrix below layer l

    d = top_d(theta, fwd.xs[-1], config).astype(dtype)
    hs, ds = [None] * (num_layers + 1), [None] * (num_layers + 1)
    for l in range(num_layers, -1, -1):
        ds[l] = d
        h = compute_h(theta, fwd.xs[l], zs[l], d, biases[l], ws[l], ws[l + 1], config)
        hs[l] = h
        if l >= 1:
            delta = d * jax.nn.sigmoid(zs[l])[..., None] + rl.linear(theta["to_delta"], h)
            d = jnp.einsum("bnc,mn->bmc", delta, params.v[l - 1])
            d = d * jax.lax.rsqrt(1e-6 + jnp.mean(jnp.square(d), axis=-1, keepdims=True))

    readouts = [readout_all(theta["readouts"], h) for h in hs]
    readouts_v = (readouts if config.identical_updates
                  else [readout_all(theta["readouts_v"], h) for h in hs])
    dws, dvs, dbs = [], [], []
    for l in range(1, num_layers + 1):
        w = params.w[l - 1]
        planes = weight_planes(w, fwd.xs[l - 1], fwd.xs[l], readouts[l - 1], readouts[l])
        dw = merge_planes(theta["merge_w"], planes, w, config)
        if config.identical_updates:
            dv = dw
        else:
            v = params.v[l - 1]
            planes_v = weight_planes(v, fwd.xs[l - 1], fwd.xs[l], readouts_v[l - 1],
                                     readouts_v[l])
            dv = merge_planes(theta["merge_v"], planes_v, v, config)
        dws.append(dw)
        dvs.append(dv)
        dbs.append(bias_update(theta, hs[l], config))
    return RuleInternals(tuple(hs), tuple(ds), tuple(dws), tuple(dvs), tuple(dbs))


def apply_updates(params: BaseParams, dws, dvs, dbs, lr: float) -> BaseParams:
    """The decaying inner step: p <- p (1 - lr) - lr dp for W, V and b."""
    decay = 1.0 - lr
    return BaseParams(
        tuple(w * decay - lr * dw for w, dw in zip(params.w, dws)),
        tuple(v * decay - lr * dv for v, dv in zip(params.v, dvs)),
        tuple(b * decay - lr * db for b, db in zip(params.b, dbs)),
    )


def inner_step(theta: dict, params: BaseParams, x: jax.Array, activation: str,
               config: RuleConfig) -> BaseParams:
    """phi_{t+1} = UnsupervisedUpdate(phi_t, x_t; theta). x: [B, N_0], no labels.

    ``activation`` and ``config`` are static (hashable) when jitted.
    """
    internals = rule_internals(theta, params, x, activation, config)
    return apply_updates(params, internals.dws, internals.dvs, internals.dbs, config.inner_lr)
