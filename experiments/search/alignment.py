"""Does the meta-training objective rank rules as held-out data does? (docs/results.md)

Scores rules on tasks of a training mix (the class-only meta-objective, 10-shot ridge
accuracy and rank90 after a whole inner run, the same tasks, initialisations and batches
for every rule) so they can be compared with their validation accuracy:

    python experiments/search/alignment.py --rules paper,oja,hebb,EXPORT --tasks 10 \\
        --depth 4 --steps 100 --inner-lr 0.03 [--mix local] [--regression-targets]

``--shots 10,30,60`` scores several meta-objective sizes on the same runs, ``--ridge`` sets
the readout's penalty, and each line also gives the held-out error of a ridge readout of
the input pixels from the features (``reconstruction``: 1 recovers nothing); ``--mix
FILE`` takes any task mix, e.g. one component of ``fashion_mnist_val`` to score rules on
validation with the same protocol.

A rule is an export folder, ``pretrained:NAME`` or a named merge setting of the small
rule at the paper's initialisation: ``paper`` (every plane 0.1), ``oja`` (hebb 3,
decorr_x 1.35, others 0: the screened Oja-like core of docs/results.md), ``hebb``
(hebb 3 alone). Prints one line per rule: the mean loss (and per task family), accuracy
and rank90. Costs about ``tasks x rules x steps x 0.07 s`` on one core at depth 4.
"""

from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core.base_model import features, init_params
from metalearn.core.config import PLANE_NAMES, MetaObjectiveConfig, RuleConfig
from metalearn.core.meta_objective import (LabelledPair, meta_objective, ridge_accuracy,
                                          solve_ridge)
from metalearn.core.update_rule import init_theta, inner_step
from metalearn.evaluation.diagnostics import rank90
from metalearn.training.config import load_config
from metalearn.training.export import load_theta
from metalearn.training.task_mix import resolve_mix
from tasks.sampler import TaskSampler

PRESETS = {"paper": {}, "oja": {"hebb": 3.0, "decorr_x": 1.35}, "hebb": {"hebb": 3.0}}


def rule_theta(name: str, rule: RuleConfig):
    if name in PRESETS:
        theta = init_theta(jax.random.key(0), rule)
        weights = dict.fromkeys(PLANE_NAMES, 0.1 if name == "paper" else 0.0)
        weights.update(PRESETS[name])
        theta["merge_w"] = {"w": jnp.asarray([weights[n] for n in PLANE_NAMES], jnp.float32),
                            "b": theta["merge_w"]["b"]}
        return theta
    theta, _, _ = load_theta(name)
    return jax.tree.map(jnp.asarray, theta)


def reconstruction_error(f_train: np.ndarray, x_train: np.ndarray, f_test: np.ndarray,
                         x_test: np.ndarray, ridge: float) -> float:
    """How much of the input a ridge readout of the features recovers on held-out examples.

    f_*: [B, F] features; x_*: [B, D] inputs. Returns the test squared error of the
    readout relative to predicting the train mean (1: nothing recovered, 0: everything).
    """
    weights = np.asarray(solve_ridge(jnp.asarray(f_train), jnp.asarray(x_train), ridge))
    pred = f_test @ weights[:-1] + weights[-1]  # the last row is the unpenalised bias
    baseline = np.sum(np.square(x_test - x_train.mean(0)))
    return float(np.sum(np.square(pred - x_test)) / baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="paper,oja,hebb")
    parser.add_argument("--mix", default="local")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--inner-lr", type=float, default=0.03)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--shots", default="10",
                        help="comma-separated labelled examples per class of the meta-objective "
                             "(each is scored; the readout accuracy uses the first)")
    parser.add_argument("--ridge", type=float, default=0.1)
    parser.add_argument("--regression-targets", action="store_true",
                        help="score with the augmentation targets too (the paper's)")
    args = parser.parse_args()
    rule = RuleConfig.small(inner_lr=args.inner_lr)
    shots = [int(v) for v in args.shots.split(",")]
    objectives = {k: MetaObjectiveConfig(regression_targets=args.regression_targets,
                                         samples_per_class=k, ridge=args.ridge) for k in shots}
    config = load_config("local", [f"tasks.mix={args.mix}",
                                   f"tasks.architecture.min_layers={args.depth}",
                                   f"tasks.architecture.max_layers={args.depth}",
                                   f"tasks.architecture.min_width={args.width}",
                                   f"tasks.architecture.max_width={args.width}"])
    sampler = TaskSampler(resolve_mix(config.tasks))
    thetas = {name: rule_theta(name, rule) for name in args.rules.split(",")}
    step = jax.jit(lambda theta, phi, x: inner_step(theta, phi, x, "relu", rule))
    loss_fn = jax.jit(meta_objective, static_argnums=(2, 3, 4))
    feats = jax.jit(features, static_argnums=(2, 3))
    results: dict[str, list] = collections.defaultdict(list)
    for i in range(args.tasks):
        task = sampler.sample(args.seed + i)
        arch = task.arch
        xs = task.inner_batch(args.steps * args.batch).reshape(args.steps, args.batch, -1)
        pairs = {k: LabelledPair(*map(jnp.asarray, task.labelled_pair(
            5, k, regression_targets=args.regression_targets))) for k in shots}
        pair = pairs[shots[0]]
        phi0 = init_params(jax.random.key(i), arch, w_std=rule.init_w_std,
                           b_std=rule.init_b_std)
        n, m = task.num_classes, pair.x_train.shape[1]
        for name, theta in thetas.items():
            phi = phi0
            for t in range(args.steps):
                phi = step(theta, phi, xs[t])
            losses = [float(loss_fn(phi, pairs[k], arch, objectives[k], rule.base_bn_eps))
                      for k in shots]
            f = np.asarray(feats(phi, np.concatenate([pair.x_train[0], pair.x_test[0]]), arch,
                                 rule.base_bn_eps))
            labels = [np.argmax(np.asarray(y[0, :, :n]), 1) for y in (pair.y_train,
                                                                       pair.y_test)]
            accuracy = float(ridge_accuracy(f[:m], labels[0], f[m:], labels[1], n, args.ridge))
            recon = reconstruction_error(f[:m], np.asarray(pair.x_train[0]), f[m:],
                                         np.asarray(pair.x_test[0]), args.ridge)
            results[name].append((task.component, losses, accuracy, rank90(f[m:]), recon))
        print(f"task {i + 1}/{args.tasks}: {task.component}, {n}-way", flush=True)
    print(f"mix {args.mix}, depth {args.depth} x {args.width}, {args.steps} steps at "
          f"{args.inner_lr:g}, batch {args.batch}, "
          f"{'all' if args.regression_targets else 'class'} targets, shots {shots} "
          f"(losses in that order), ridge {args.ridge:g}")
    for name, rows in results.items():
        by_family = collections.defaultdict(list)
        for component, losses, *_ in rows:
            by_family[component.split("/")[0]].append(losses[0])
        families = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(by_family.items()))
        losses = np.asarray([r[1] for r in rows], float).mean(0)
        array = np.asarray([r[2:] for r in rows], float)
        print(f"{name:20s} loss {' / '.join(f'{v:.3f}' for v in losses)} ({families}) "
              f"accuracy {array[:, 0].mean():.3f} rank90 {array[:, 1].mean():.1f} "
              f"reconstruction {array[:, 2].mean():.3f}")


if __name__ == "__main__":
    main()
