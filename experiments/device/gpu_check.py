"""GPU check of the core (run on a CUDA machine): the inner-step benchmark, then
meta-gradients/s with T tasks vmapped in one estimator (what a GPU worker does).

    PYTHONPATH=. python3 experiments/device/gpu_check.py
"""

import argparse
import json
import time

import jax

from metalearn.cli.bench import run_inner_step
from metalearn.core import bench
from metalearn.core.config import MetaObjectiveConfig, UnrollConfig
from metalearn.core.unroll import make_meta_gradient


def vmapped_throughput(tasks_list=(1, 4, 16), steps=10, unroll=UnrollConfig()):
    theta, params, _, arch, rule = bench.paper_problem()
    objective = MetaObjectiveConfig()
    out = {}
    for tasks in tasks_list:
        estimator = make_meta_gradient(arch.activation, rule, objective, unroll,
                                       num_tasks=tasks)
        batched_params = jax.tree.map(lambda a: jax.numpy.stack([a] * tasks), params)
        one = bench.random_truncation(steps, arch, objective)
        batch = jax.tree.map(lambda a: jax.numpy.stack([a] * tasks), one)
        start = time.perf_counter()
        jax.block_until_ready(estimator(theta, batched_params, batch))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(3):
            result = jax.block_until_ready(estimator(theta, batched_params, batch))
        seconds = (time.perf_counter() - start) / 3
        out[tasks] = {"meta_grads_per_s": tasks / seconds, "seconds": seconds,
                      "first_call_s": compile_s, "finite": bool(result.finite.all())}
        print(f"{unroll.method}/{unroll.residuals} T={tasks}: {tasks / seconds:.2f} meta-grads/s ({seconds:.3f} s per call)",
              flush=True)
    return out


if __name__ == "__main__":
    import sys
    print(jax.devices(), flush=True)
    if "--estimators" in sys.argv:
        # Stored residuals of 16 paper-size tasks exceed an 80 GB card: compare the
        # rematerialising and scan estimators at a task count that fits.
        for unroll in (UnrollConfig(residuals="recompute"),
                       UnrollConfig(method="scan", scan_buckets=(10,))):
            print(json.dumps({f"{unroll.method}/{unroll.residuals}":
                              vmapped_throughput((1, 8), unroll=unroll)}), flush=True)
    else:
        args = argparse.Namespace(json=True, variants=False, unroll=10, repeats=3, small=False)
        run_inner_step(args)
        print(json.dumps({"vmapped": vmapped_throughput()}))
