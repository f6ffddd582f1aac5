"""Does the truncation bias show on the rule's Oja-like core, and does PES remove it?

Left free, truncated meta-gradients pushed the core's two merge weights (hebb up,
decorr_x down) towards Hebbian collapse (docs/results.md, "free-core drift"). This
script asks both estimators for the gradient of the *same* meta-objective (the sum
over a task's truncations of each truncation's mean meta-loss) with respect to those
two weights only, on the same tasks, data and theta:

* truncated backprop: the sum of the per-truncation gradients, phi held constant at
  each truncation's start (what meta-training follows);
* PES restricted to the two weights (the other entries of theta are not perturbed, so
  its variance is that of a 2-d problem): an unbiased estimate of the gradient through
  the whole inner run.

Usage (about 1 minute per task on one core):
    python experiments/estimators/core_bias.py --rule pretrained:laptop --tasks 6 \
        --truncations 100 --unroll 6 --pairs 8

Prints, per task and as mean +- standard error over tasks, d(objective)/d(hebb) and
d(objective)/d(decorr_x) from each estimator (negative: increasing the weight lowers
the meta-loss, so meta-training would increase it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from metalearn.core.base_model import init_params
from metalearn.core.config import EstimatorConfig, UnrollConfig
from metalearn.core.estimators import make_estimator
from metalearn.core.theta import theta_spec
from metalearn.training.config import load_config
from metalearn.training.export import load_theta
from metalearn.training.task_mix import resolve_mix
from tasks.sampler import TaskSampler

CORE = ("merge_w.w:hebb", "merge_w.w:decorr_x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", default="pretrained:laptop", help="export or pretrained:NAME")
    parser.add_argument("--config", default="local", help="training config (task mix, batch)")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--truncations", type=int, default=100)
    parser.add_argument("--unroll", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--layers", type=int, default=2, help="hidden layers of the base model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    theta, rule, _ = load_theta(args.rule)
    config = load_config(args.config)
    arch_bounds = dataclasses.replace(config.tasks.architecture, min_layers=args.layers,
                                      max_layers=args.layers)
    config = dataclasses.replace(config, rule=rule, tasks=dataclasses.replace(
        config.tasks, architecture=arch_bounds))
    spec = theta_spec(rule)
    core = spec.mask(CORE)
    positions = [int(np.flatnonzero(spec.mask([name]))[0]) for name in CORE]  # flat index

    sampler = TaskSampler(resolve_mix(config.tasks), data_dir=config.tasks.data_dir)
    objective = config.objective
    rows = []
    for t in range(args.tasks):
        seed = args.seed * 1000 + t
        task = sampler.sample(seed)
        params = init_params(jax.random.key(seed), task.arch, w_std=rule.init_w_std,
                             b_std=rule.init_b_std)
        estimators = {name: make_estimator(task.arch.activation, rule, objective,
                                           UnrollConfig(),
                                           EstimatorConfig(name, perturbation_std=args.sigma,
                                                           pairs=args.pairs),
                                           trainable=core.astype(np.float32))
                      for name in ("truncated", "pes")}
        states = {name: est.init(seed, params) for name, est in estimators.items()}
        totals = {name: np.zeros(2) for name in estimators}
        start = time.perf_counter()
        losses = []
        for _ in range(args.truncations):
            batch = task.truncation_batch(args.unroll, config.worker.batch_size,
                                          objective.num_draws, objective.samples_per_class)
            for name, est in estimators.items():
                estimate, states[name] = est(theta, states[name], batch)
                flat = np.asarray(ravel_pytree(estimate.grad)[0])
                totals[name] += flat[positions]
                if name == "truncated":
                    losses.append(float(estimate.loss))
        row = {"task": seed, "arch": list(task.arch.sizes), "steps": args.truncations * args.unroll,
               "loss_first": losses[0], "loss_last": losses[-1],
               "seconds": time.perf_counter() - start}
        for name, total in totals.items():
            row[f"{name}/hebb"], row[f"{name}/decorr_x"] = map(float, total)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print("\nmean +- standard error over tasks of d(sum of truncation losses)/d(weight):")
    for key in ("truncated/hebb", "pes/hebb", "truncated/decorr_x", "pes/decorr_x"):
        values = np.asarray([r[key] for r in rows])
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        print(f"  {key:20s} {values.mean():+9.4f} +- {se:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
