"""Truncated backprop over several tasks in one compiled program, against the stepwise
driver a CPU worker runs (issue 21: ">= 1.5x meta-gradients/s per core").

One process, the small rule on the evaluation base model (196 -> 128 x4 -> 32), random
data, U inner steps per truncation. Four ways, each timed as the median of 3 calls after
a compiling one:

* ``stepwise T=1``: ``MetaGradient`` with ``unroll.method: stepwise``, one task (what a
  CPU worker does: one jitted inner step and its VJP per step, from Python);
* ``program T=1``: the truncation as one jitted ``lax.scan`` and its gradient;
* ``program per-task T``: T tasks vmapped in one program, a theta gradient per task
  (what ``GradientEstimator`` computes for a vmapped worker);
* ``program grad-of-mean T``: the gradient of the mean over the T tasks, taken once.

``--unroll`` unrolls the scan (no XLA while loop; compiles several times longer).

    PYTHONPATH=. python experiments/estimators/tasks_in_one_program.py --steps 8 --tasks 4
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from metalearn.core.base_model import Architecture, init_params
from metalearn.core.bench import random_truncation, timed
from metalearn.core.config import MetaObjectiveConfig, RuleConfig, UnrollConfig
from metalearn.core.estimators import masked_scan
from metalearn.core.rule_layers import matmul_convs
from metalearn.core.unroll import MetaGradient, Problem
from metalearn.core.update_rule import init_theta

SIZES = (196, 128, 128, 128, 128, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="U, inner steps a truncation")
    parser.add_argument("--tasks", type=int, default=4, help="T, tasks in one program")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--unroll", action="store_true", help="unroll the scan")
    args = parser.parse_args()

    rule, objective = RuleConfig.small(), MetaObjectiveConfig()
    arch = Architecture(SIZES, "relu")
    problem = Problem("relu", rule, objective)
    keys = jax.random.split(jax.random.key(0), 2 + args.tasks)

    def params(key):
        return init_params(key, arch, w_std=rule.init_w_std, b_std=rule.init_b_std)

    def stack(trees):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)

    theta = init_theta(keys[0], rule)
    one = (params(keys[1]), random_truncation(args.steps, arch, objective, batch=args.batch))
    many = (stack([params(k) for k in keys[2:]]),
            stack([random_truncation(args.steps, arch, objective, batch=args.batch,
                                     seed=10 + i) for i in range(args.tasks)]))
    mask = jnp.ones((args.steps,))

    def truncation_loss(theta, phi, batch):
        def step(phi, x, pair):
            return problem.step(theta, phi, x, pair)
        return jnp.mean(masked_scan(step, phi, batch, mask, unroll=args.unroll)[1])

    def program_one(theta, phi, batch):
        with matmul_convs(True):
            return jax.value_and_grad(truncation_loss)(theta, phi, batch)

    def program_per_task(theta, phi, batch):
        with matmul_convs(True):
            return jax.vmap(jax.value_and_grad(truncation_loss), in_axes=(None, 0, 0))(
                theta, phi, batch)

    def program_mean(theta, phi, batch):
        def mean_loss(theta):
            return jnp.mean(jax.vmap(truncation_loss, in_axes=(None, 0, 0))(theta, phi,
                                                                              batch))
        with matmul_convs(True):
            return jax.value_and_grad(mean_loss)(theta)

    stepwise = MetaGradient(problem, UnrollConfig(method="stepwise"))
    runs = [("stepwise T=1", lambda th, p, b: stepwise(th, p, b).grad, one, 1),
            ("program T=1", jax.jit(program_one), one, 1),
            (f"program per-task T={args.tasks}", jax.jit(program_per_task), many, args.tasks),
            (f"program grad-of-mean T={args.tasks}", jax.jit(program_mean), many,
             args.tasks)]
    print(f"U={args.steps} batch={args.batch} unroll={args.unroll} "
          f"devices={jax.devices()}", flush=True)
    for name, fn, (phi, batch), tasks in runs:
        start = time.perf_counter()
        jax.block_until_ready(fn(theta, phi, batch))
        first = time.perf_counter() - start
        seconds, _ = timed(fn, theta, phi, batch, repeats=3)
        print(f"{name:32s} {seconds:7.3f} s a call  {tasks / seconds:6.3f} meta-grads/s  "
              f"(first call {first:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
