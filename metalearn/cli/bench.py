"""``metalearn bench``: speed measurements, each in one process and one run.

    metalearn bench inner-step [--json] [--variants] [--rule R]  inner step, meta-gradient,
                                                                 matmul (metalearn.core.bench)
    metalearn bench estimators [--json] [--unroll U] [--pairs K]  cost of one truncation's
                                                                 gradient per estimator
                                                                 (metalearn.core.bench)
    metalearn bench population [--json] [--pairs K] [--steps T]  a full-horizon ES task's
                                                                 population: looped, vmapped,
                                                                 and the population engine
                                                                 (metalearn.core.bench)
    metalearn bench tasks [--mix FILE] [--json]                  data side of a truncation
                                                                 (tasks.bench)
    metalearn bench learner [--json]                             gradients/s one learner
                                                                 ingests (Ray)
    metalearn bench scaling [--json] [--config FILE]             meta-gradients/s, 1 vs 2
                                                                 workers (Ray)
    metalearn bench metrics [--json] [--steps N]                 metrics flush time at step
                                                                 1,000 vs 100,000
                                                                 (metalearn.training.bench)

The measuring lives beside the code it measures (``metalearn.core.bench``,
``tasks.bench``, ``metalearn.distributed.bench``) and returns report dicts; this module
parses the arguments, prints progress to stderr and the summary to stdout. The last line
with ``--json`` is the report as one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from metalearn.cli.data import DEFAULT_MIX, add_source_args, source_options
from metalearn.core.bench import measure_estimators, measure_inner_step, measure_population
from metalearn.distributed.bench import measure_learner, measure_scaling
from metalearn.training.bench import measure_metrics
from metalearn.training.config import load_config
from tasks.bench import measure_tasks
from metalearn.core.config_io import resolve_config
from tasks.sampler import load_mix


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure speed")
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    inner = benches.add_parser("inner-step", help="inner step, meta-gradient and matmul speed")
    inner.add_argument("--json", action="store_true", help="last line: one JSON object")
    inner.add_argument("--variants", action="store_true",
                       help="also compare the meta-gradient estimators (slow)")
    inner.add_argument("--unroll", type=int, default=10, help="U for the meta-gradient")
    inner.add_argument("--repeats", type=int, default=3)
    inner.add_argument("--rule", choices=("paper", "small"), default="paper",
                       help="rule size: the paper's (default) or the small preset")
    inner.set_defaults(func=run_inner_step)

    est = benches.add_parser("estimators", help="cost per gradient of truncated backprop, "
                             "ES, PES and the hybrid, in one run")
    est.add_argument("--json", action="store_true", help="last line: one JSON object")
    est.add_argument("--unroll", type=int, default=6, help="U of the truncation (default 6)")
    est.add_argument("--pairs", type=int, default=4, help="antithetic pairs (default 4)")
    est.add_argument("--batch", type=int, default=64, help="inner batch (default 64)")
    est.add_argument("--repeats", type=int, default=3)
    est.add_argument("--rule", choices=("paper", "small"), default="small",
                     help="rule size: the small preset (default) or the paper's")
    est.add_argument("--no-grouped", action="store_true",
                     help="skip timing the ES family with grouped convolutions")
    est.set_defaults(func=run_estimators)

    pop = benches.add_parser("population", help="one full-horizon ES task: its population "
                             "stepped member by member, vmapped, and in the population "
                             "engine's program, in one run")
    pop.add_argument("--json", action="store_true", help="last line: one JSON object")
    pop.add_argument("--pairs", type=int, default=2, help="antithetic pairs (default 2)")
    pop.add_argument("--steps", type=int, default=20, help="inner steps (default 20)")
    pop.add_argument("--batch", type=int, default=128, help="inner batch (default 128)")
    pop.add_argument("--repeats", type=int, default=2)
    pop.add_argument("--meta-steps", type=int, default=2,
                     help="the engine's learner updates per call (default 2)")
    pop.add_argument("--tasks", type=int, default=2,
                     help="the engine's tasks per update (default 2)")
    pop.set_defaults(func=run_population)

    p = benches.add_parser("tasks", help="task draw + inner batch + labelled pair, "
                           "as a fraction of one inner step")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--mix", default=None, help=f"task mix: a packaged name (local, paper, tiny) or a YAML file (default {DEFAULT_MIX})")
    p.add_argument("--tasks", type=int, default=300, help="seeds timed")
    p.add_argument("--batch", type=int, default=128, help="inner batch size")
    p.add_argument("--draws", type=int, default=5, help="M labelled pairs")
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--skip-inner-step", action="store_true",
                   help="do not time the inner step (no ratio)")
    add_source_args(p)
    p.set_defaults(func=run_tasks)

    learner = benches.add_parser("learner", help="gradients/s one learner ingests (Ray)")
    learner.add_argument("--json", action="store_true")
    learner.add_argument("--seconds", type=float, default=15.0)
    learner.add_argument("--workers", type=int, default=4, help="synthetic workers")
    learner.add_argument("--meta-batch", type=int, default=256)
    learner.set_defaults(func=run_learner)

    scaling = benches.add_parser("scaling", help="meta-gradients/s with 1 and 2 workers")
    scaling.add_argument("--json", action="store_true")
    scaling.add_argument("--config", help="training config: packaged name or YAML (default local)")
    scaling.add_argument("--seconds", type=float, default=15.0, help="timed phase length")
    scaling.add_argument("--rounds", type=int, default=3,
                         help="alternating 1-worker / 2-worker phase pairs")
    scaling.add_argument("--unroll", type=int, default=4, help="U of every truncation")
    scaling.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    scaling.set_defaults(func=run_scaling)

    metrics = benches.add_parser("metrics", help="metrics flush time at step 1,000 vs "
                                 "100,000 (append-only segments vs rewriting one file)")
    metrics.add_argument("--json", action="store_true", help="last line: one JSON object")
    metrics.add_argument("--steps", type=int, default=100_000,
                         help="rows of the synthetic run (default 100,000)")
    metrics.add_argument("--rows-per-flush", type=int, default=10,
                         help="rows a flush writes (default 10)")
    metrics.set_defaults(func=run_metrics)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _finish(args, summary: str, report: dict) -> int:
    print(summary, flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------
# inner-step

def run_inner_step(args) -> int:
    report = measure_inner_step(small=args.rule == "small", unroll=args.unroll, repeats=args.repeats,
                                variants=args.variants, log=_log)
    return _finish(args, format_inner_step(report), report)


def format_inner_step(r: dict) -> str:
    lines = [
        f"device: {r['device']} ({r['backend']}), rule: {r['rule']} "
        f"({r['theta_params']:,} theta params), base model {r['base_model']}, batch {r['batch']}",
        f"matmul:       {r['matmul_gflops_per_s']:8.1f} GFLOP/s",
        f"inner step:   {r['inner_step_s'] * 1e3:8.1f} ms  {r['inner_steps_per_s']:.2f} steps/s  "
        f"{r['gflops_per_s']:.1f} GFLOP/s ({100 * r['matmul_fraction']:.0f}% of matmul; "
        f"{r['flops_per_inner_step'] / 1e9:.2f} GFLOP/step by {r['flops_source']})",
        f"              analytic conv+matmul count: {r['analytic_flops_per_inner_step'] / 1e9:.2f}"
        f" GFLOP/step -> {r['analytic_gflops_per_s']:.1f} GFLOP/s",
        f"meta-grad U={r['unroll']}: {r['meta_grad_s']:8.3f} s  {r['meta_grads_per_s']:.3f}/s  "
        f"{r['meta_grad_over_forward']:.2f}x the time of {r['unroll']} inner steps "
        f"[{r['estimator']}]; compile {r['meta_grad_compile_s']:.1f} s (once for every U)",
        f"python overhead: {100 * r['python_overhead_frac']:.2f}% of a truncation "
        f"({r['python_overhead_s'] * 1e3:.1f} ms per truncation, timed on a "
        f"negligible-compute problem)",
    ]
    for name, v in r.get("variants", {}).items():
        lines.append(f"  {name:22s} {v['meta_grad_s']:7.3f} s ({v['over_forward']:.2f}x fwd), "
                     f"compile {v['compile_s']:.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# estimators

def run_estimators(args) -> int:
    for name in ("unroll", "pairs", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"metalearn bench estimators: --{name} must be >= 1")
    _log(f"timing one U={args.unroll} truncation's gradient per estimator ...")
    report = measure_estimators(small=args.rule == "small", unroll=args.unroll,
                                pairs=args.pairs, batch=args.batch, repeats=args.repeats,
                                grouped_convs=not args.no_grouped, log=_log)
    return _finish(args, format_estimators(report), report)


def format_estimators(r: dict) -> str:
    lines = [f"device: {r['device']} ({r['backend']}), rule: {r['rule']} "
             f"({r['theta_params']:,} theta params), base model {r['base_model']}, "
             f"batch {r['batch']}, U={r['unroll']}, {r['pairs']} antithetic pairs",
             f"{'estimator':14s} {'s/gradient':>10s} {'x truncated':>11s} {'FLOP ratio':>10s} "
             f"{'x FLOP ratio':>12s} {'compile s':>9s} {'cos(g, truncated)':>17s}"]
    for name, v in r["estimators"].items():
        lines.append(f"{name:14s} {v['seconds']:10.3f} {v['over_truncated']:11.2f} "
                     f"{v['flop_ratio']:10.2f} {v['over_flop_ratio']:12.2f} "
                     f"{v['compile_s']:9.1f} {v['cosine_to_truncated']:17.3f}"
                     + ("" if v["finite"] else "  NOT FINITE"))
    grouped = {k: v for k, v in r["estimators"].items() if "grouped_over_matmul" in v}
    if grouped:
        lines.append("grouped convolutions over batched matmuls (same estimator): " + ", ".join(
            f"{k.split('/')[0]} {v['grouped_over_matmul']:.2f}x" for k, v in grouped.items()))
    refs = r.get("references", {})
    for name, v in refs.items():
        lines.append(f"{name:20s} {v['seconds']:10.3f} s (compile {v['compile_s']:.1f} s)")
    if "meta_grad_over_forward" in r:
        lines.append(f"truncated meta-gradient over forward: {r['meta_grad_over_forward']:.2f}x; "
                     f"truncated as one program: {r['program_speedup']:.2f}x the default's "
                     f"speed")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# population

def run_population(args) -> int:
    for name in ("pairs", "steps", "batch", "repeats", "meta_steps", "tasks"):
        if getattr(args, name) < 1:
            raise SystemExit(f"metalearn bench population: --{name.replace('_', '-')} "
                             f"must be >= 1")
    _log(f"timing one full-horizon task ({2 * args.pairs} members x {args.steps} steps) ...")
    report = measure_population(pairs=args.pairs, steps=args.steps, batch=args.batch,
                                repeats=args.repeats, meta_steps=args.meta_steps,
                                tasks=args.tasks, log=_log)
    return _finish(args, format_population(report), report)


def format_population(r: dict) -> str:
    lines = [f"device: {r['device']} ({r['backend']}), base model {r['base_model']}, batch "
             f"{r['batch']}, {r['members']} members x {r['steps']} inner steps",
             f"{'mode':6s} {'s/task':>8s} {'ms/member-step':>15s} {'x loop':>7s} {'compile s':>9s}"]
    for name, v in r["modes"].items():
        lines.append(f"{name:6s} {v['seconds']:8.2f} {v['ms_per_member_step']:15.1f} "
                     f"{v['over_loop']:7.2f} {v['compile_s']:9.1f}")
    lines.append(f"loop and vmap fitnesses agree within {r['max_fitness_difference']:.2e}")
    program = r["modes"]["program"]
    lines.append(f"population engine: {program['tasks_per_call']} tasks per call, "
                 f"{r['program_tasks_per_s_over_loop']:.2f}x the tasks/s of the member loop "
                 f"(a CPU worker) in this process")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# tasks

def run_tasks(args) -> int:
    mix = load_mix(resolve_config(args.mix or DEFAULT_MIX, "tasks"))
    mix = dataclasses.replace(mix, sources=source_options(args, mix.sources))
    report = measure_tasks(mix, args.mix or DEFAULT_MIX, tasks=args.tasks, batch=args.batch,
                           draws=args.draws, samples_per_class=args.samples_per_class,
                           inner_step=not args.skip_inner_step, log=_log)
    return _finish(args, format_tasks(report), report)


def format_tasks(report: dict) -> str:
    lines = [f"task draw + inner batch ({report['batch']}) + labelled pair ({report['draws']} "
             f"draws x {report['samples_per_class']}/class): mean "
             f"{report['task_s'] * 1e3:.2f} ms, median {report['task_median_s'] * 1e3:.2f} ms, "
             f"p95 {report['task_p95_s'] * 1e3:.2f} ms, CPU {report['task_cpu_s'] * 1e3:.2f} ms"]
    for name, c in report["components"].items():
        lines.append(f"  {name:20s} {c['mean_s'] * 1e3:7.2f} ms  ({c['tasks']} tasks)")
    if "ratio" in report:
        lines.append(f"inner step {report['inner_step_s'] * 1e3:.1f} ms -> ratio "
                     f"{100 * report['ratio']:.2f}% (target < 5%)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# learner and scaling (Ray)

def run_learner(args) -> int:
    report = measure_learner(seconds=args.seconds, workers=args.workers,
                             meta_batch=args.meta_batch, log=_log)
    return _finish(args, format_learner(report), report)


def format_learner(report: dict) -> str:
    return (f"learner: {report['grads_per_s']:.0f} gradients/s ingested through Ray "
            f"({report['updates_per_s']:.2f} updates/s of {report['meta_batch']}; learner busy "
            f"{100 * report['learner_busy_fraction']:.0f}% of the time, "
            f"{report['learner_busy_grads_per_s']:.0f}/s of busy time); through the driver "
            f"loop {report['driver_loop_grads_per_s']:.0f}/s; in-process "
            f"{report['in_process_grads_per_s']:.0f}/s; theta {report['theta_params']:,} "
            f"parameters; dropped stale {report['dropped_stale']}")


def run_scaling(args) -> int:
    config = load_config(args.config, args.set)
    report = measure_scaling(config, seconds=args.seconds, rounds=args.rounds,
                             unroll=args.unroll, log=_log)
    return _finish(args, format_scaling(report), report)


def run_metrics(args) -> int:
    at = (1_000, args.steps) if args.steps > 1_000 else (args.steps,)
    report = measure_metrics(steps=args.steps, rows_per_flush=args.rows_per_flush, at=at,
                             log=_log)
    return _finish(args, format_metrics(report), report)


def format_metrics(report: dict) -> str:
    lines = [f"metrics flush ({report['rows_per_flush']} rows of {report['columns']} "
             f"columns a flush; window of {report['window']:,} steps before each point):"]
    for p in report["points"]:
        lines.append(f"  step {p['step']:>7,}: median {p['median_ms']:6.2f} ms, mean "
                     f"{p['mean_ms']:6.2f} ms (merges included), max {p['max_ms']:7.1f} ms; "
                     f"rewriting one file {p['rewrite_whole_ms']:8.1f} ms")
    if "median_ratio" in report:
        lines.append(f"  last/first: median {report['median_ratio']:.2f}x, mean "
                     f"{report['mean_ratio']:.2f}x; rewriting one file "
                     f"{report['rewrite_whole_ratio']:.0f}x")
    lines.append(f"  {report['files']} segment files for {report['steps']:,} rows; reading "
                 f"them all back {report['read_all_s']:.2f} s")
    return "\n".join(lines)


def format_scaling(report: dict) -> str:
    return (f"scaling: 1 worker {report['grads_per_s_1']:.3f} meta-grads/s, 2 workers "
            f"{report['grads_per_s_2']:.3f}/s, speedup {report['speedup']:.2f}x (cores "
            f"{report['cores']}, arch {report['arch']}, U={report['unroll']})")


__all__ = ["add_parser", "format_inner_step", "format_population", "run_population", "format_learner", "format_metrics",
           "format_scaling", "run_metrics",
           "format_tasks", "run_inner_step", "run_learner", "run_scaling", "run_tasks"]
