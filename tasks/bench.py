"""What ``metalearn bench tasks`` measures: the cost of the data side of a truncation step.

Over many seeds of a task mix, the seconds to draw a task and assemble one unlabelled
inner batch plus one labelled pair (M draws, class-balanced), divided by the seconds of
one inner step of the paper-size rule on the paper's base model
(``metalearn.core.bench.time_inner_step``, measured in the same run). Target: ratio < 5%.
``measure_tasks`` returns the report (``task_s``, ``inner_step_s``, ``ratio`` and
per-component means); the command line is ``metalearn.cli.bench``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from metalearn.core.bench import time_inner_step
from tasks.sampler import MixConfig, TaskSampler


def time_tasks(sampler, num_tasks: int, batch: int, draws: int, spc: int,
               first_seed: int = 1_000_000) -> dict:
    """Seconds per (draw + inner batch + labelled pair): mean, median, p95, per component."""
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


def measure_tasks(mix: MixConfig, mix_name: str, *, tasks: int = 300, batch: int = 128,
                  draws: int = 5, samples_per_class: int = 10, inner_step: bool = True,
                  log: Callable[[str], None] = lambda message: None) -> dict:
    """The ``metalearn bench tasks`` report of ``mix`` (``mix_name``: how it is reported).

    Times ``tasks`` seeds, then (``inner_step``) one inner step of the paper-size rule;
    ``ratio`` = task seconds / inner-step seconds. ``log`` receives progress lines.
    """
    log(f"[1/2] timing {tasks} tasks of {mix_name} ...")
    sampler = TaskSampler(mix, progress=True)
    report = {"mix": mix_name, "tasks": tasks, "batch": batch, "draws": draws,
              "samples_per_class": samples_per_class}
    report.update(time_tasks(sampler, tasks, batch, draws, samples_per_class))
    if inner_step:
        log("[2/2] timing one inner step of the paper-size rule ...")
        report["inner_step_s"] = time_inner_step()
        report["ratio"] = report["task_s"] / report["inner_step_s"]
    return report
