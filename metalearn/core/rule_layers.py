"""Building blocks of the learned rule: 1-d convolutions over the batch or unit axis,
the rule's batch norm, and linear readouts, each as (init, apply) over plain dicts.

The rule acts on per-layer tensors laid out batch-first, [B, N, C] (examples, units,
channels). Two convolutions exist (docs/rule.md):

* ``conv_batch``: slides along B, each unit separately (mixes neighbouring examples,
  a learned pooling of batch statistics, since batch order is random);
* ``conv_units``: slides along N, each example separately.

Both are "same"-padded. By default they are ``lax.conv_general_dilated`` with
dimension numbers that treat the other axis as the convolution's batch; on XLA's CPU
backend this measured faster than im2col + matmul for one theta. Under ``vmap`` over
per-particle weights (the ES family: every particle has its own theta) a convolution
becomes a grouped convolution, which XLA runs far below its FLOP rate; inside
``matmul_convs()`` the same convolutions are traced as im2col + one matmul, which
``vmap`` turns into a batched matmul (``metalearn bench estimators`` measures both).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax import lax


def init_conv(key: jax.Array, kernel: int, c_in: int, c_out: int, scale: float = 1.0) -> dict:
    """Conv params: w [kernel, c_in, c_out] (fan-in scaled), b [c_out] zeros."""
    std = scale / math.sqrt(kernel * c_in)
    return {"w": std * jax.random.truncated_normal(key, -2.0, 2.0, (kernel, c_in, c_out)),
            "b": jnp.zeros((c_out,))}


def init_linear(key: jax.Array, c_in: int, c_out: int, scale: float = 1.0) -> dict:
    std = scale / math.sqrt(c_in)
    return {"w": std * jax.random.truncated_normal(key, -2.0, 2.0, (c_in, c_out)),
            "b": jnp.zeros((c_out,))}


def init_bn(channels: int) -> dict:
    """The rule's batch norm has a learned offset only."""
    return {"offset": jnp.zeros((channels,))}


# Read while tracing (see ``matmul_convs``); a context variable, so a thread tracing
# one estimator does not switch another thread's tracing.
_MATMUL_CONVS: contextvars.ContextVar[bool] = contextvars.ContextVar("matmul_convs",
                                                                    default=False)


@contextlib.contextmanager
def matmul_convs(enabled: bool = True):
    """Trace the rule's convolutions as im2col + matmul inside this block.

    The choice is made when a function is traced (jit caches what was traced), so wrap
    the tracing call: e.g. the body of a function vmapped over per-particle theta.
    """
    token = _MATMUL_CONVS.set(bool(enabled))
    try:
        yield
    finally:
        _MATMUL_CONVS.reset(token)


def matmul_convs_enabled() -> bool:
    """Whether convolutions traced now become matmuls (inside ``matmul_convs()``)."""
    return _MATMUL_CONVS.get()


def _conv_matmul(x: jax.Array, w: jax.Array, axis: int) -> jax.Array:
    """The same "same"-padded cross-correlation as ``_conv`` as one matmul.

    x: [B, N, C_in]; w: [kernel, C_in, C_out] -> [B, N, C_out]. The kernel's shifted
    copies of x are stacked on the channel axis ([B, N, kernel * C_in]), so the
    contraction is a single dot whose batch dimension vmap can add.
    """
    kernel = w.shape[0]
    pad = kernel // 2
    widths = [(0, 0)] * 3
    widths[axis] = (pad, kernel - 1 - pad)
    padded = jnp.pad(x, widths)
    length = x.shape[axis]
    shifted = [lax.slice_in_dim(padded, k, k + length, axis=axis) for k in range(kernel)]
    stacked = jnp.concatenate(shifted, axis=-1)
    return stacked @ w.reshape(kernel * w.shape[1], w.shape[2])


def _conv(x: jax.Array, params: dict, axis: int) -> jax.Array:
    if _MATMUL_CONVS.get():
        return _conv_matmul(x, params["w"].astype(x.dtype), axis) + params["b"].astype(x.dtype)
    kernel = params["w"].shape[0]
    other = 1 - axis
    dims = lax.ConvDimensionNumbers(lhs_spec=(other, 2, axis), rhs_spec=(2, 1, 0),
                                    out_spec=(other, 2, axis))
    pad = kernel // 2
    y = lax.conv_general_dilated(x, params["w"].astype(x.dtype), (1,), [(pad, pad)],
                                 dimension_numbers=dims)
    return y + params["b"].astype(x.dtype)


def conv_batch(params: dict, x: jax.Array) -> jax.Array:
    """x: [B, N, C_in] -> [B, N, C_out], sliding along the batch axis."""
    return _conv(x, params, axis=0)


def conv_units(params: dict, x: jax.Array) -> jax.Array:
    """x: [B, N, C_in] -> [B, N, C_out], sliding along the unit axis."""
    return _conv(x, params, axis=1)


def batch_norm(params: dict, x: jax.Array, eps: float) -> jax.Array:
    """Normalise each channel over batch and unit axes (current statistics), add offset.

    x: [B, N, C] -> [B, N, C]
    """
    mean = jnp.mean(x, axis=(0, 1), keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=(0, 1), keepdims=True)
    return centred * lax.rsqrt(var + eps) + params["offset"].astype(x.dtype)


def linear(params: dict, x: jax.Array) -> jax.Array:
    """x: [..., C_in] -> [..., C_out]."""
    return x @ params["w"].astype(x.dtype) + params["b"].astype(x.dtype)
