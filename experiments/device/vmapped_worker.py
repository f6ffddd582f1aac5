"""GPU check of vmapped multi-task workers: a real ``metalearn.training.worker.Worker`` (no Ray)
with ``worker.tasks_per_worker`` = T on real 10-way digits tasks (14x14, base model
196 -> 128 -> 32), the paper-size rule, U fixed; meta-gradients/s for each T.

    PYTHONPATH=. python3 experiments/device/vmapped_worker.py --tasks 1 8 32 --unroll 8

Compilation is timed apart (the first truncation of each T). The last line is JSON.
"""

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import yaml
from jax.flatten_util import ravel_pytree

from metalearn.training.schedules import Curriculum
from metalearn.training.config import load_config
from metalearn.core.update_rule import init_theta
from metalearn.training.worker import Worker

DIGITS_MIX = {
    "components": [{"source": "digits", "weight": 1.0, "ways": [10],
                    "preprocess": {"image_size": 14},
                    "augment": {"x_shift_prob": 0.25, "example_dropout_prob": 0.25,
                                "class_permutation_prob": 0.25}}],
    "architecture": {"min_layers": 2, "max_layers": 2, "min_width": 128, "max_width": 128,
                     "output_size": 32, "activations": ["relu"]},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--unroll", type=int, default=8)
    parser.add_argument("--truncations", type=int, default=5)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print(jax.devices(), flush=True)
    mix_path = os.path.join(tempfile.mkdtemp(), "digits.yaml")
    with open(mix_path, "w") as f:
        yaml.safe_dump(DIGITS_MIX, f)
    report = {"unroll": args.unroll, "preset": args.preset, "device": str(jax.devices()[0]),
              "set": args.set}
    curriculum = Curriculum(args.unroll, args.unroll, 1000.0, min_truncations=1000)
    for tasks in args.tasks:
        config = load_config(None, [f"rule_preset={args.preset}", f"tasks.mix={mix_path}",
                                    "tasks.architecture={}", "tasks.ways=[10]",
                                    f"worker.batch_size={args.batch_size}",
                                    f"worker.tasks_per_worker={tasks}",
                                    "worker.compilation_cache=none", *args.set])
        theta = np.asarray(ravel_pytree(init_theta(jax.random.key(0), config.rule))[0])
        worker = Worker(config, 0, 1)
        worker.set_theta("g", 0, theta)
        start = time.perf_counter()
        first = worker.run_truncation(curriculum)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        subs = [worker.run_truncation(curriculum) for _ in range(args.truncations)]
        seconds = (time.perf_counter() - start) / args.truncations
        finite = all(s.finite and s.count == tasks for s in [first] + subs)
        grad_s = float(np.mean([s.timings["grad_s"] for s in subs]))
        data_s = float(np.mean([s.timings["data_s"] for s in subs]))
        report[f"T{tasks}"] = {"meta_grads_per_s": tasks / seconds, "truncation_s": seconds,
                               "grad_s": grad_s, "data_s": data_s, "first_s": compile_s,
                               "finite": finite, "loss": subs[-1].loss,
                               "method": config.unroll.resolved_method()}
        print(f"T={tasks}: {tasks / seconds:.2f} meta-grads/s ({seconds:.3f} s per truncation, "
              f"data {data_s:.3f} s, first {compile_s:.1f} s, finite {finite})", flush=True)
    base = report[f"T{args.tasks[0]}"]["meta_grads_per_s"]
    for tasks in args.tasks:
        report[f"T{tasks}"]["speedup_vs_T{}".format(args.tasks[0])] = (
            report[f"T{tasks}"]["meta_grads_per_s"] / base)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
