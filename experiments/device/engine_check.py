"""Device check of the one-program estimators (issue 21), prepared for a GPU session.

One short script, every figure from one process on one device:

1. the pre-engine vmapped worker path (``MetaGradient`` with ``num_tasks=T``: stepwise
   with recomputed residuals, and the scan form) on the paper-size rule at U = 8;
2. the one-program truncated estimator (``make_estimator(..., num_tasks=T)`` with
   ``method: scan`` and remat) at the same shapes for several T: meta-gradients/s, achieved TFLOP/s (XLA's cost analysis of
   the compiled program) and peak device memory;
3. ES with ``pairs`` x T antithetic pairs per program call, accumulated over calls to
   at least 1,024 pairs per update: seconds per update.

    PYTHONPATH=. python3 experiments/device/engine_check.py            # on the device
    PYTHONPATH=. python3 experiments/device/engine_check.py --smoke    # tiny, any CPU

Prints one JSON line per measurement; a measurement that does not fit in memory prints
its error and the script goes on.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from metalearn.core import bench
from metalearn.core.base_model import Architecture, init_params
from metalearn.core.config import EstimatorConfig, MetaObjectiveConfig, RuleConfig, UnrollConfig
from metalearn.core.estimators import make_estimator
from metalearn.core.unroll import make_meta_gradient
from metalearn.core.update_rule import init_theta


def _stack(tree, tasks: int):
    return jax.tree.map(lambda a: jnp.stack([a] * tasks), tree)


def _peak_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", float("nan")))


def _timed(call, repeats: int) -> tuple[float, float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(call())
    return (time.perf_counter() - start) / repeats, first, out


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run(smoke: bool, steps: int, tasks_list: tuple[int, ...], es_pairs: int,
        es_tasks: int, update_pairs: int, repeats: int) -> None:
    if smoke:
        rule = RuleConfig.small(top_units=8, top_delta_size=4, top_delta_layers=0,
                                top_unit_mix_layers=1, compute_h_size=6,
                                compute_h_layers=0, delta_dim=3)
        arch, batch_size = Architecture((16, 12, 8), "relu"), 16
    else:
        rule, arch, batch_size = RuleConfig(), Architecture(bench.PAPER_SIZES, "relu"), 128
    objective = MetaObjectiveConfig()
    theta = init_theta(jax.random.key(0), rule)
    params = init_params(jax.random.key(1), arch, w_std=rule.init_w_std, b_std=rule.init_b_std)
    one = bench.random_truncation(steps, arch, objective, batch=batch_size)
    _emit({"devices": [str(d) for d in jax.devices()], "rule": "micro" if smoke else "paper",
           "base_model": list(arch.sizes), "batch": batch_size, "unroll": steps})

    baselines = {"stepwise/recompute": UnrollConfig(method="stepwise", residuals="recompute"),
                 "scan": UnrollConfig(method="scan", scan_buckets=(steps,))}
    for name, unroll in baselines.items():
        tasks = tasks_list[0]
        try:
            estimator = make_meta_gradient(arch.activation, rule, objective, unroll,
                                           num_tasks=tasks)
            phi, data = _stack(params, tasks), _stack(one, tasks)
            seconds, first, _ = _timed(lambda: estimator(theta, phi, data), repeats)
            _emit({"path": f"pre-engine {name}", "tasks": tasks,
                   "meta_grads_per_s": tasks / seconds, "seconds": seconds,
                   "first_call_s": first, "peak_bytes": _peak_bytes()})
        except Exception as error:  # noqa: BLE001 - out of memory: report and go on
            _emit({"path": f"pre-engine {name}", "tasks": tasks, "error": str(error)[:300]})

    for tasks in tasks_list:
        try:
            estimator = make_estimator(arch.activation, rule, objective,
                                       UnrollConfig(method="scan", remat=True,
                                                    scan_buckets=(steps,)),
                                       num_tasks=tasks)
            state = estimator.init(list(range(tasks)), _stack(params, tasks))
            data = _stack(one, tasks)
            start = time.perf_counter()
            flops = _program_flops(estimator, theta, state, data)
            compile_s = time.perf_counter() - start
            seconds, first, (estimate, _) = _timed(lambda: estimator(theta, state, data),
                                                   repeats)
            _emit({"path": "engine truncated", "tasks": tasks,
                   "meta_grads_per_s": tasks / seconds, "seconds": seconds,
                   "compile_s": compile_s, "tflops_per_s": flops / seconds / 1e12,
                   "peak_bytes": _peak_bytes(),
                   "finite": bool(jnp.all(estimate.finite))})
        except Exception as error:  # noqa: BLE001
            _emit({"path": "engine truncated", "tasks": tasks, "error": str(error)[:300]})

    calls = -(-update_pairs // (es_pairs * es_tasks))
    try:
        estimator = make_estimator(arch.activation, rule, objective,
                                   UnrollConfig(scan_buckets=(steps,)),
                                   EstimatorConfig("es", perturbation_std=0.01, pairs=es_pairs),
                                   num_tasks=es_tasks)
        data = _stack(one, es_tasks)

        def update():
            grads = []
            for call in range(calls):
                state = estimator.init(list(range(call * es_tasks, (call + 1) * es_tasks)),
                                       _stack(params, es_tasks))
                grads.append(estimator(theta, state, data)[0].grad)
            return jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=(0, 1)), *grads)

        seconds, first, _ = _timed(update, max(1, repeats // 2))
        _emit({"path": "engine es", "pairs_per_update": calls * es_pairs * es_tasks,
               "pairs_per_call": es_pairs * es_tasks, "calls": calls,
               "seconds_per_update": seconds, "first_update_s": first,
               "peak_bytes": _peak_bytes()})
    except Exception as error:  # noqa: BLE001
        _emit({"path": "engine es", "error": str(error)[:300]})


def _program_flops(estimator, theta, state, data) -> float:
    """FLOPs of one call of the estimator's compiled program (XLA's cost analysis)."""
    from metalearn.core.estimators import _pad_steps

    padded, mask = _pad_steps(data, data.num_steps)
    return bench.xla_flops(estimator._program.lower(theta, state, padded, mask, None).compile())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny rule, for any CPU")
    parser.add_argument("--unroll", type=int, default=8)
    parser.add_argument("--tasks", default="8,32,128", help="T values of the engine")
    parser.add_argument("--es-pairs", type=int, default=16, help="pairs per task per call")
    parser.add_argument("--es-tasks", type=int, default=8)
    parser.add_argument("--update-pairs", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(args.smoke, args.unroll, tuple(int(t) for t in args.tasks.split(",")),
        args.es_pairs, args.es_tasks, args.update_pairs, args.repeats)


if __name__ == "__main__":
    main()
