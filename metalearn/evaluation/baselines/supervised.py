"""Supervised baseline: the base architecture (same widths, depth, batch norm and, where
it has a gradient, the same activation) plus a softmax head, trained with Adam 3e-3 on
exactly the task's labelled examples (10 per class), full batch. Features are its 32-d
top layer, scored with the same readouts as every method; the head's own test accuracy
is reported as ``head_accuracy``.

The step activation has zero gradient almost everywhere, so a gradient-trained model
uses ReLU in its place (``activation`` in the rows says which one ran).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.core.base_model import Architecture, BaseParams, features
from metalearn.evaluation.baselines.common import dense_init, feature_fn, train
from metalearn.evaluation.readout import eval_points_for, evaluate_features

LEARNING_RATE = 3e-3


def trainable_activation(activation: str) -> str:
    return "relu" if activation in ("step",) else activation


def run(task, arch, config, progress=None) -> list[dict]:
    activation = trainable_activation(arch.activation)
    arch = Architecture(arch.sizes, activation)
    key_body, key_head = jax.random.split(jax.random.key(task.seed + 11))
    body = dense_init(key_body, arch.sizes)
    params = {"w": [l["w"] for l in body],
              "b": [jnp.zeros_like(l["b"]) for l in body],
              "head": dense_init(key_head, (arch.output_size, task.num_classes))[0]}

    def feats(params, x):
        phi = BaseParams(tuple(params["w"]), tuple(params["w"]), tuple(params["b"]))
        return features(phi, x, arch, 1e-5)

    def logits(params, x):
        return feats(params, x) @ params["head"]["w"] + params["head"]["b"]

    def loss(params, x, y, key):
        del key
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y))

    x_train, y_train = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
    feats_jit, logits_jit = jax.jit(feats), jax.jit(logits)

    def on_point(step, params):
        row = evaluate_features(feature_fn(feats_jit, params), task, config.ridge)
        # The head on the same joint batch the readouts use (batch-norm statistics).
        joint = np.concatenate([task.x_train, task.x_test])
        pred = np.asarray(jnp.argmax(logits_jit(params, jnp.asarray(joint)), axis=1))
        row["head_accuracy"] = float(np.mean(pred[len(task.x_train):] == task.y_test))
        return {"step": step, **row, "activation": activation}

    return train(loss, params, optax.adam(LEARNING_RATE), lambda step: (x_train, y_train),
                 config.supervised_steps, eval_points_for(config.supervised_steps), on_point,
                 progress, "supervised")
