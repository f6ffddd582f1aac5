"""The base model: an MLP with batch norm that the learned rule trains (docs/rule.md).

phi = BaseParams(w, v, b), one entry per layer l = 1..L:
  w[l-1]: [N_{l-1}, N_l]  forward weights W^l
  v[l-1]: [N_{l-1}, N_l]  backward weights V^l (used only by the update rule)
  b[l-1]: [N_l]           bias added after batch norm

Forward: z^l = BatchNorm(x^{l-1} W^l) + b^l, x^l = act(z^l), top layer activated too.
Batch norm uses the current batch's statistics and has no scale.

Sizes are data, not code: an ``Architecture`` is a frozen, hashable description
(layer sizes and activation name) that jitted functions take as a static argument.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from metalearn.core.config import ACTIVATIONS, ConfigError


class BaseParams(NamedTuple):
    """phi: per-layer forward weights, backward weights and biases (tuples of arrays)."""

    w: tuple  # of [N_{l-1}, N_l]
    v: tuple  # of [N_{l-1}, N_l]
    b: tuple  # of [N_l]


class ForwardPass(NamedTuple):
    """Every layer's activity: xs[0] is the input, xs[l] = act(zs[l-1])."""

    xs: tuple  # L+1 arrays, [B, N_l]
    zs: tuple  # L arrays, [B, N_l] (pre-activations of layers 1..L)


def _step(x):
    # Heaviside; its derivative is zero almost everywhere, which is the point of the
    # paper's generalisation test: the rule never differentiates the activation.
    return (x > 0).astype(x.dtype)


_ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
    "swish": jax.nn.swish,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "step": _step,
    "identity": lambda x: x,
}
assert tuple(_ACTIVATION_FNS) == ACTIVATIONS


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return _ACTIVATION_FNS[name]
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; choose one of "
                          f"{', '.join(ACTIVATIONS)}") from None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Layer sizes (input first, N_L last) and the activation, by name."""

    sizes: tuple[int, ...]
    activation: str = "relu"

    def __post_init__(self):
        sizes = tuple(self.sizes)
        object.__setattr__(self, "sizes", sizes)
        if len(sizes) < 2:
            raise ConfigError(f"architecture.sizes needs an input size and at least one "
                              f"layer, got {list(sizes)}")
        for i, n in enumerate(sizes):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ConfigError(f"architecture.sizes[{i}] must be a positive integer, "
                                  f"got {n!r}")
        activation_fn(self.activation)  # raises on an unknown name

    @classmethod
    def mlp(cls, input_size: int, hidden: Sequence[int], output_size: int = 32,
            activation: str = "relu") -> "Architecture":
        return cls((input_size, *hidden, output_size), activation)

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def input_size(self) -> int:
        return self.sizes[0]

    @property
    def output_size(self) -> int:
        return self.sizes[-1]

    def num_params(self) -> int:
        return sum(2 * a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))


def _truncated_normal(key, shape, std, dtype):
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


def init_params(key: jax.Array, arch: Architecture, *, w_std: float = 0.01,
                b_std: float = 0.1, dtype=jnp.float32) -> BaseParams:
    """Truncated-normal W, V (std ``w_std``) and b (std ``b_std``), as the reference."""
    ws, vs, bs = [], [], []
    for n_in, n_out in zip(arch.sizes[:-1], arch.sizes[1:]):
        key, kw, kv, kb = jax.random.split(key, 4)
        ws.append(_truncated_normal(kw, (n_in, n_out), w_std, dtype))
        vs.append(_truncated_normal(kv, (n_in, n_out), w_std, dtype))
        bs.append(_truncated_normal(kb, (n_out,), b_std, dtype))
    return BaseParams(tuple(ws), tuple(vs), tuple(bs))


def check_params(params: BaseParams, arch: Architecture) -> None:
    """Raise a ConfigError naming the layer whose shapes disagree with ``arch``."""
    if not (len(params.w) == len(params.v) == len(params.b) == arch.num_layers):
        raise ConfigError(f"phi has {len(params.w)} layers but architecture.sizes "
                          f"{list(arch.sizes)} describes {arch.num_layers}")
    for l, (n_in, n_out) in enumerate(zip(arch.sizes[:-1], arch.sizes[1:]), start=1):
        for name, arr, want in (("w", params.w[l - 1], (n_in, n_out)),
                                ("v", params.v[l - 1], (n_in, n_out)),
                                ("b", params.b[l - 1], (n_out,))):
            if tuple(arr.shape[-len(want):]) != want:
                raise ConfigError(f"phi.{name}[{l - 1}] (layer {l}) has shape "
                                  f"{tuple(arr.shape)}, expected {want}")


def batch_norm(x: jax.Array, eps: float) -> jax.Array:
    """Normalise each unit over the batch with the current statistics, no scale.

    x: [B, N] -> [B, N]
    """
    mean = jnp.mean(x, axis=0, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=0, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps)


def forward(params: BaseParams, x: jax.Array, arch: Architecture,
            bn_eps: float = 1e-6) -> ForwardPass:
    """Run the MLP on a batch x: [B, N_0]; return every x^l and z^l."""
    act = activation_fn(arch.activation)
    xs, zs = [x], []
    for w, b in zip(params.w, params.b):
        z = batch_norm(xs[-1] @ w, bn_eps) + b
        zs.append(z)
        xs.append(act(z))
    return ForwardPass(tuple(xs), tuple(zs))


def features(params: BaseParams, x: jax.Array, arch: Architecture,
             bn_eps: float = 1e-6) -> jax.Array:
    """Top-layer representation x^L: [B, N_L]."""
    return forward(params, x, arch, bn_eps).xs[-1]
