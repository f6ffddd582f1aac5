"""Variational auto-encoder baseline (docs/evaluation.md): encoder and decoder 3 x 128 with
batch norm, latent 32, Adam 1e-4, trained on the unlabelled pool; features are the
posterior means. Images in [0, 1] use a Bernoulli likelihood, other data a unit Gaussian.

The paper trains for 100k steps and notes that few-shot accuracy falls late in training
while the VAE objective still improves; ``--baseline-steps`` sets the budget here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.evaluation.baselines.common import dense_init, mlp, feature_fn, train
from metalearn.evaluation.readout import eval_points_for, evaluate_features

HIDDEN = (128, 128, 128)
LATENT = 32
LEARNING_RATE = 1e-4
BATCH = 128


def init(key, input_size: int) -> dict:
    k_enc, k_dec = jax.random.split(key)
    return {"enc": dense_init(k_enc, (input_size, *HIDDEN, 2 * LATENT)),
            "dec": dense_init(k_dec, (LATENT, *HIDDEN, input_size))}


def encode(params, x):
    out = mlp(params["enc"], x, bn=True)
    return out[:, :LATENT], out[:, LATENT:]


@jax.jit
def _means(params, x):
    return encode(params, x)[0]


def loss_fn(params, x, key, *, bernoulli: bool):
    """Negative ELBO per example: reconstruction + KL(q(z|x) || N(0, I))."""
    mu, logvar = encode(params, x)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
    out = mlp(params["dec"], z, bn=True)
    if bernoulli:
        recon = jnp.sum(optax.sigmoid_binary_cross_entropy(out, x), axis=1)
    else:
        recon = 0.5 * jnp.sum(jnp.square(out - x), axis=1)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mu) - 1.0 - logvar, axis=1)
    return jnp.mean(recon + kl)


def run(task, arch, config, progress=None) -> list[dict]:
    pool = task.x_pool
    bernoulli = bool(pool.min() >= 0.0 and pool.max() <= 1.0)
    rng = np.random.default_rng([task.seed, 5])
    params = init(jax.random.key(task.seed + 7), pool.shape[1])

    def loss(params, x, key):
        return loss_fn(params, x, key, bernoulli=bernoulli)

    def batches(step):
        return (jnp.asarray(pool[rng.integers(0, len(pool), BATCH)]),)

    def on_point(step, params):
        feats = feature_fn(_means, params)
        return {"step": step, **evaluate_features(feats, task, config.ridge)}

    return train(loss, params, optax.adam(LEARNING_RATE), batches, config.baseline_steps,
                 eval_points_for(config.baseline_steps), on_point, progress, "vae")
