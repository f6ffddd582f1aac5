"""Small pieces shared by the trained baselines: dense layers, batch norm, a training loop."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def dense_init(key: jax.Array, sizes: Sequence[int]) -> list[dict]:
    """He-normal weights and zero biases for a chain of dense layers."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        layers.append({"w": jax.random.normal(sub, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
                       "b": jnp.zeros((n_out,))})
    return layers


def batch_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Normalise over the batch with its own statistics (no running averages: every
    evaluation passes train and test examples through in one batch)."""
    mean = jnp.mean(x, axis=0, keepdims=True)
    var = jnp.var(x, axis=0, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def mlp(layers: list[dict], x: jax.Array, *, bn: bool, act=jax.nn.relu,
        last_linear: bool = True) -> jax.Array:
    """Dense layers with ReLU (and batch norm before it); the last is linear if asked."""
    for i, layer in enumerate(layers):
        x = x @ layer["w"]
        last = i == len(layers) - 1
        if last and last_linear:
            return x + layer["b"]
        if bn:
            x = batch_norm(x)
        x = act(x + layer["b"])
    return x


def train(loss_fn: Callable, params, opt, batches: Callable[[int], tuple], steps: int,
          eval_points: Sequence[int], on_point: Callable[[int, object], dict],
          progress=None, label: str = "") -> list[dict]:
    """Adam-style loop: ``loss_fn(params, *batch, key)``; ``on_point(step, params)``
    gives the row at each evaluation point (step 0 is before any update)."""
    opt_state = opt.init(params)

    @jax.jit
    def update(params, opt_state, key, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    points = sorted(set(int(p) for p in eval_points))
    key = jax.random.key(0)
    rows, step = [], 0
    for point in points:
        while step < point:
            key, sub = jax.random.split(key)
            params, opt_state, loss = update(params, opt_state, sub, *batches(step))
            step += 1
            if progress is not None:
                progress(f"{label}: step {step}/{steps}")
        row = on_point(step, params)
        if step > 0:
            row["train_loss"] = float(loss)
        rows.append(row)
    return rows


def feature_fn(jitted: Callable, params) -> Callable[[np.ndarray], np.ndarray]:
    """x -> features with ``jitted(params, x)``; params stay arguments (a closure over
    them would make jit bake them in as constants and recompile at every point)."""
    return lambda x: np.asarray(jitted(params, jnp.asarray(x, jnp.float32)))
