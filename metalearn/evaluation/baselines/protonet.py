"""Prototypical networks (Snell et al. 2017), fully connected 3 x 128, trained
episodically, as in the paper's Figure 2: with a fresh random permutation of the input
features in every episode (``protonet``) or with intact inputs (``protonet_intact``).

Episodes are drawn from the task's labelled pool (the same classes as the test set, a
more generous supply of labels than any other method gets): N-way (all of the task's
classes), 10 support and 10 query examples per class; loss is the softmax over negative
squared distances to the class prototypes; Adam 1e-3. Evaluation applies a permutation
never used in training to the task's inputs, because the tasks the learned rule is
meta-trained for permute their inputs (every other method here is fully connected with
i.i.d. initialisation, so its results do not depend on the permutation). Features are
the 128-d embeddings, scored with the same readouts as every method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.evaluation.baselines.common import dense_init, mlp, feature_fn, train
from metalearn.evaluation.data import Task
from metalearn.evaluation.readout import eval_points_for, evaluate_features

HIDDEN = (128, 128, 128)
LEARNING_RATE = 1e-3
SHOTS = 10
QUERIES = 10


def embed(params, x):
    return mlp(params, x, bn=False)


_embed = jax.jit(embed)


def episode_loss(params, support, query, key):
    """support, query: [K, n, D] (class-major) -> prototypical cross-entropy."""
    del key
    k, n_s, d = support.shape
    protos = jnp.mean(embed(params, support.reshape(-1, d)).reshape(k, n_s, -1), axis=1)
    q = embed(params, query.reshape(-1, d))
    dist = jnp.sum(jnp.square(q[:, None, :] - protos[None]), axis=-1)
    labels = jnp.repeat(jnp.arange(k), query.shape[1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(-dist, labels))


def run(task: Task, arch, config, progress=None, *, permute: bool = True) -> list[dict]:
    rng = np.random.default_rng([task.seed, 6, int(permute)])
    dim = task.x_pool.shape[1]
    by_class = [np.flatnonzero(task.y_pool == c) for c in range(task.num_classes)]
    params = dense_init(jax.random.key(task.seed + 13), (dim, *HIDDEN))

    def batches(step):
        idx = np.stack([rng.choice(ids, SHOTS + QUERIES, replace=len(ids) < SHOTS + QUERIES)
                        for ids in by_class])
        x = task.x_pool[idx]  # [K, S + Q, D]
        if permute:
            x = x[..., rng.permutation(dim)]
        return jnp.asarray(x[:, :SHOTS]), jnp.asarray(x[:, SHOTS:])

    eval_perm = np.random.default_rng([task.seed, 7]).permutation(dim)
    permuted_task = Task(task.x_pool[:, eval_perm], task.y_pool, task.x_train[:, eval_perm],
                         task.y_train, task.x_test[:, eval_perm], task.y_test,
                         task.num_classes, task.seed)

    def on_point(step, params):
        feats = feature_fn(_embed, params)
        return {"step": step, **evaluate_features(feats, permuted_task, config.ridge)}

    name = "protonet" if permute else "protonet_intact"
    return train(episode_loss, params, optax.adam(LEARNING_RATE), batches,
                 config.baseline_steps, eval_points_for(config.baseline_steps), on_point,
                 progress, name)
