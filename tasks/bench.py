"""``metalearn bench tasks``: cost of the data side of a truncation step.

Measures, over many seeds of a task mix, the seconds to draw a task and assemble one
unlabelled inner batch plus one labelled pair (M draws, class-balanced), and divides
by the seconds of one inner step of the paper-size rule on the paper's base model
(``metalearn.core.bench.time_inner_step``, measured in the same run). Target: ratio < 5%.
The last line with ``--json`` is one JSON object with ``task_s``, ``inner_step_s``,
``ratio`` and per-component means.
"""

from __future__ import annotations

import json
import sys
import time


def add_bench_parsers(benches) -> None:
    from metalearn.cli.data import DEFAULT_MIX, _source_args

    p = benches.add_parser("tasks", help="task draw + inner batch + labelled pair, "
                           "as a fraction of one inner step")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--mix", default=None, help=f"task mix YAML (default {DEFAULT_MIX})")
    p.add_argument("--tasks", type=int, default=300, help="seeds timed")
    p.add_argument("--batch", type=int, default=128, help="inner batch size")
    p.add_argument("--draws", type=int, default=5, help="M labelled pairs")
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--skip-inner-step", action="store_true",
                   help="do not time the inner step (no ratio)")
    _source_args(p)
    p.set_defaults(func=run_tasks)


def time_tasks(sampler, num_tasks: int, batch: int, draws: int, spc: int,
               first_seed: int = 1_000_000) -> dict:
    """Seconds per (draw + inner batch + labelled pair): mean, median, p95, per component."""
    import numpy as np

    for seed in range(first_seed - 20, first_seed):  # warm tables and caches
        task = sampler.sample(seed)
        task.inner_batch(batch)
        task.labelled_pair(draws, spc)
    times, by_component = [], {}
    cpu_start = time.process_time()
    for seed in range(first_seed, first_seed + num_tasks):
        start = time.perf_counter()
        task = sampler.sample(seed)
        task.inner_batch(batch)
        task.labelled_pair(draws, spc)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        by_component.setdefault(task.component, []).append(elapsed)
    cpu = (time.process_time() - cpu_start) / num_tasks
    t = np.asarray(times)
    # task_cpu_s: this process's CPU seconds per task, a fairer figure than wall time
    # when other processes share the cores.
    return {"task_s": float(t.mean()), "task_cpu_s": cpu, "task_median_s": float(np.median(t)),
            "task_p95_s": float(np.percentile(t, 95)),
            "components": {k: {"mean_s": float(np.mean(v)), "tasks": len(v)}
                           for k, v in sorted(by_component.items())}}


def run_tasks(args) -> int:
    import dataclasses

    from metalearn.cli.data import DEFAULT_MIX, source_options
    from tasks.sampler import TaskSampler, load_mix

    mix = load_mix(args.mix or DEFAULT_MIX)
    mix = dataclasses.replace(mix, sources=source_options(args, mix.sources))
    print(f"[1/2] timing {args.tasks} tasks of {args.mix or DEFAULT_MIX} ...", file=sys.stderr)
    sampler = TaskSampler(mix, progress=True)
    report = {"mix": args.mix or DEFAULT_MIX, "tasks": args.tasks, "batch": args.batch,
              "draws": args.draws, "samples_per_class": args.samples_per_class}
    report.update(time_tasks(sampler, args.tasks, args.batch, args.draws,
                             args.samples_per_class))
    if not args.skip_inner_step:
        print("[2/2] timing one inner step of the paper-size rule ...", file=sys.stderr)
        from metalearn.core.bench import time_inner_step
        report["inner_step_s"] = time_inner_step()
        report["ratio"] = report["task_s"] / report["inner_step_s"]
    print(f"task draw + inner batch ({args.batch}) + labelled pair ({args.draws} draws x "
          f"{args.samples_per_class}/class): mean {report['task_s'] * 1e3:.2f} ms, "
          f"median {report['task_median_s'] * 1e3:.2f} ms, p95 {report['task_p95_s'] * 1e3:.2f} ms, "
          f"CPU {report['task_cpu_s'] * 1e3:.2f} ms")
    for name, c in report["components"].items():
        print(f"  {name:20s} {c['mean_s'] * 1e3:7.2f} ms  ({c['tasks']} tasks)")
    if "ratio" in report:
        print(f"inner step {report['inner_step_s'] * 1e3:.1f} ms -> ratio "
              f"{100 * report['ratio']:.2f}% (target < 5%)")
    if args.json:
        print(json.dumps(report))
    return 0
