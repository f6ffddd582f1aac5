"""``metalearn sweep``: Ray Tune sweeps of whole asynchronous meta-trainings.

    metalearn sweep experiments/sweeps/smoke.yaml --out sweeps/smoke
    metalearn sweep experiments/sweeps/curriculum.yaml --out sweeps/curriculum --address auto
    metalearn sweep --resume sweeps/smoke

Each trial is one ``metalearn train`` session inside a Tune function trainable; how it
reserves resources, reports, checkpoints and resumes, and the output folder's files, are
in docs/sweeps.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile

import matplotlib
import pyarrow as pa
import pyarrow.parquet as pq
import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

from metalearn.core.config import ConfigError
from metalearn.core.config_io import from_dict
from metalearn.distributed import storage as storage_io
from metalearn.distributed.data_check import ranked_dataset
from metalearn.distributed.driver import RAY
from metalearn.distributed.sweep_spec import Domain, SweepSpec, trial_config, trial_mix
from metalearn.training.events import read_jsonl
from metalearn.training.loop import Callback, TrainingLoop
from metalearn.training.run_dir import RunDir
from metalearn.training.runner import train
from metalearn.training.session import Session
from tasks.registry import SourceOptions
from tasks.sampler import MixConfig

SPEC_FILE = "sweep.yaml"
TUNE_DIR = "tune"
SWEEP_META = "sweep.json"
REPORTS_FILE = "reports.jsonl"
RESUME_FILE = "resume.json"  # the sweep's spec file and checkpoint storage, for --resume


def tune_domain(domain: Domain):
    """Tune's search-space entry of ``domain``."""
    if domain.kind == "grid":
        return tune.grid_search(list(domain.args))
    if domain.kind == "choice":
        return tune.choice(list(domain.args))
    return getattr(tune, domain.kind)(*domain.args)


def param_space(spec: SweepSpec) -> dict:
    return {e.key: e.value if e.domain is None else tune_domain(e.domain) for e in spec.search}


def resources(spec: SweepSpec):
    trial = spec.trial
    cpus = trial_config(spec, {}).worker.cpus_per_worker
    return tune.PlacementGroupFactory(
        [{"CPU": trial.learner_cpus}] + [{"CPU": cpus}] * trial.workers,
        strategy="SPREAD" if trial.spread else "PACK")


# ---------------------------------------------------------------------------
# the trainable

class TrialReporter(Callback):
    """Reports a trial's progress to Tune every ``trial.report_every`` learner steps, each
    report with a checkpoint of exactly its ``step`` and the newest held-out evaluation
    measured at or before it; the ``done`` report at ``trial.steps`` is sent in ``on_end``,
    after the final evaluation. Why each of these: docs/sweeps.md (How a trial runs)."""

    def __init__(self, spec: SweepSpec, run: RunDir, trial_id: str, start_step: int,
                 extra: dict):
        self.every, self.last = spec.trial.report_every, spec.trial.steps
        self.metric = spec.metric
        self.run, self.trial_id, self.extra = run, trial_id, extra
        self.reported = start_step  # the step of the last report (or the restored one)
        self.pending: tuple[int, str] | None = None  # (checkpoint step, its copy)
        self.final: tuple[dict, str] | None = None  # the done report, sent in on_end

    def _stage(self, loop: TrainingLoop) -> tuple[int, str]:
        step = loop.checkpoint()
        staging = tempfile.mkdtemp(prefix=f"metalearn-report-{self.trial_id}-")
        self.run.copy_to(staging, up_to_step=step)
        with open(os.path.join(staging, SWEEP_META), "w") as f:
            json.dump({"trial_id": self.trial_id, "step": step}, f)
        return step, staging

    def _report(self, loop: TrainingLoop, row: dict, staging: str,
                at_end: bool = False) -> None:
        if row["step"] >= self.last and not at_end:
            self.final = (row, staging)  # reported in on_end, with the final evaluation
            self.reported = row["step"]
            return
        try:
            values = {**loop.metrics.latest_evaluation(row["step"]), **row}
            metrics = {k: v for k, v in values.items() if isinstance(v, (int, float, str))}
            metrics.setdefault(self.metric, math.nan)
            metrics.update(self.extra, worker_failures=loop.worker_failures,
                           learner_restarts=loop.learner_restarts)
            if row["step"] >= self.last:
                metrics["done"] = True
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(staging))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.reported = row["step"]

    def on_end(self, loop: TrainingLoop) -> None:
        if self.final is not None:
            (row, staging), self.final = self.final, None
            self._report(loop, row, staging, at_end=True)

    def on_row(self, loop: TrainingLoop, row: dict) -> None:
        if row["step"] <= self.reported:
            return
        if self.pending is not None:
            step, staging = self.pending
            if row["step"] < step:
                return  # rows the staged checkpoint already holds
            self.pending = None
            if row["step"] == step:
                self._report(loop, row, staging)
                return
            shutil.rmtree(staging, ignore_errors=True)  # skipped (a restarted learner)
        if row["step"] < self.last and row["step"] // self.every <= self.reported // self.every:
            return  # no report boundary crossed since the last report
        step, staging = self._stage(loop)
        if step == row["step"]:
            self._report(loop, row, staging)
        else:
            self.pending = (step, staging)

    def discard(self) -> None:
        for held in (self.pending, self.final):
            if held is not None:
                shutil.rmtree(held[1], ignore_errors=True)
        self.pending = self.final = None


def run_trial(params: dict, spec: SweepSpec) -> None:
    """Tune function trainable: one asynchronous meta-training (the Ray runner), reported
    by a ``TrialReporter`` with its checkpoints."""
    config = trial_config(spec, params)
    trial_id = tune.get_context().get_trial_id()
    run = RunDir(tempfile.mkdtemp(prefix=f"metalearn-{trial_id}-"))
    extra = {"trial_id": trial_id, "restored_from": "", "restored_step": -1}
    checkpoint = tune.get_checkpoint()
    resume = checkpoint is not None
    start_step = 0
    if resume:
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, run.path, dirs_exist_ok=True)
        with open(os.path.join(run.path, SWEEP_META)) as f:
            donor = json.load(f)
        extra["restored_from"], extra["restored_step"] = donor["trial_id"], donor["step"]
        start_step = donor["step"]
        print(f"trial {trial_id}: restoring step {donor['step']} of trial "
              f"{donor['trial_id']}", file=sys.stderr)
    reporter = TrialReporter(spec, run, trial_id, start_step, extra)
    try:
        train(Session.of(config, run, resume=resume, mix=trial_mix(spec, config)), RAY,
              num_workers=spec.trial.workers, callbacks=[reporter])
    finally:
        reporter.discard()
        shutil.rmtree(run.path, ignore_errors=True)


# ---------------------------------------------------------------------------
# Tune setup

def make_scheduler(spec: SweepSpec):
    options = spec.scheduler  # FifoScheduler, AshaScheduler or PbtScheduler (sweep_spec)
    if options.type == "fifo":
        return FIFOScheduler()
    if options.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=spec.trial.steps,
                             grace_period=options.grace_period or spec.trial.report_every,
                             reduction_factor=options.reduction_factor)
    # A choice mutates as a list: PBT then moves to a neighbouring value.
    mutations = {e.key: list(e.domain.args) if e.domain.kind == "choice"
                 else tune_domain(e.domain) for e in options.mutations}
    return PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=options.perturbation_interval or spec.trial.report_every,
        hyperparam_mutations=mutations,
        quantile_fraction=options.quantile_fraction,
        resample_probability=options.resample_probability,
        synch=options.synch)


def trainable(spec: SweepSpec):
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec),
                               resources(spec))


def report_log(fallback: str):
    """A Tune callback appending every result Tune processes, as it processes it, to
    ``<experiment>/reports.jsonl`` (one flat JSON object a line), or to ``fallback``
    when the experiment is not on this disk. ``history.parquet`` is built from it, not
    from Tune's ``result.json``, which can lose reports (docs/sweeps.md, Output folder).
    """
    class ReportLog(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            row = flatten_dict({**result, "trial_dir": os.path.basename(trial.path)})
            folder = os.path.dirname(trial.path)
            path = (os.path.join(folder, REPORTS_FILE) if os.path.isdir(folder)
                    else fallback)  # storage elsewhere (a bucket): the driver's folder
            with open(path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    return ReportLog()


def data_needs(spec: SweepSpec) -> list[tuple[str, SourceOptions]]:
    """(source, options) pairs every node must be able to load for ``spec``'s trials: the
    dataset the metric ranks on, and the components of each trial's task mix."""
    base = trial_config(spec, {})
    needs = []
    ranked = ranked_dataset(spec.metric)
    if ranked:
        needs.append((ranked, SourceOptions(data_dir=base.evaluator.data_dir)))
    for values in spec.mixes.values():
        mix = from_dict(MixConfig, values)
        options = (dataclasses.replace(mix.sources, data_dir=str(base.tasks.data_dir))
                   if base.tasks.data_dir else mix.sources)
        needs += [(component.source, options) for component in mix.components]
    return [need for i, need in enumerate(needs) if need not in needs[:i]]  # unhashable


def search_algorithm(spec: SweepSpec):
    """Tune's searcher for ``spec.search_alg`` (None: the variant generator)."""
    alg = spec.search_alg
    if alg.type == "random":
        return None
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "qmc": optuna.samplers.QMCSampler}
    return OptunaSearch(sampler=samplers[alg.sampler](seed=alg.seed))


def experiment_location(spec: SweepSpec, out: str, storage: str = "") -> str:
    """Tune's experiment folder of the sweep: ``<storage>/<name>``, by default in
    ``OUT/tune`` (a path, or a URI such as ``s3://bucket/prefix/<name>``)."""
    return storage_io.join(storage_io.resolve(storage, os.path.join(out, TUNE_DIR)),
                           spec.name)


def reports_path(spec: SweepSpec, out: str, storage: str = "") -> str:
    """The driver's ``reports.jsonl``: in the experiment folder when that is on this
    disk (it moves with it), else in the output folder."""
    experiment = experiment_location(spec, out, storage)
    folder = out if storage_io.is_uri(experiment) else experiment
    return os.path.join(folder, REPORTS_FILE)


def tracker_callbacks(spec: SweepSpec, out: str) -> list:
    if not spec.loggers:
        return []
    from metalearn.distributed.tune_loggers import logger_callbacks  # wandb, mlflow
    return logger_callbacks(spec.loggers, spec.name, out)


def run_sweep(spec: SweepSpec, out: str, *, resume: bool = False, storage: str = ""):
    """Run (or continue) the sweep in ``out``, its checkpoints in ``storage`` (default
    ``out/tune``); returns the ResultGrid."""
    out = os.path.abspath(out)
    experiment = experiment_location(spec, out, storage)
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise ConfigError(f"nothing to resume in {out} (no Tune experiment "
                              f"{spec.name} in {experiment})")
        tuner = tune.Tuner.restore(experiment, trainable(spec),
                                   resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable(spec),
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                search_alg=search_algorithm(spec),
                scheduler=make_scheduler(spec),
                max_concurrent_trials=spec.max_concurrent or None,
                reuse_actors=False),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=storage_io.resolve(storage, os.path.join(out, TUNE_DIR)),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                callbacks=[report_log(reports_path(spec, out, storage)),
                           *tracker_callbacks(spec, out)], verbose=1))
    return tuner.fit()


# ---------------------------------------------------------------------------
# results

def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _finite(value) -> bool:
    return math.isfinite(_number(value))


def collect(results, spec: SweepSpec, reports: list[dict] = (), storage: str = ""):
    """(summary rows, history rows) of a ResultGrid and its ``reports.jsonl`` rows;
    checkpoints in a bucket are listed by URI (with ``storage``'s scheme and query)."""
    by_trial: dict = {}
    for row in reports:
        by_trial.setdefault(row.get("trial_dir"), []).append(row)
    summary, history = [], []
    for result in results:
        rows = by_trial.get(os.path.basename(str(result.path)), [])
        # The trial's own rows name it; result.metrics may be a donor's last result
        # (Tune hands a restored trial the metrics of the checkpoint it starts from).
        trial_id = rows[-1].get("trial_id") if rows else os.path.basename(str(result.path))
        for row in rows:
            eval_step = _number(row.get("eval_step"))
            entry = {
                "trial_id": trial_id, "step": int(row.get("step", -1)),
                "training_iteration": int(row.get("training_iteration", 0)),
                "meta_loss": float(row.get("meta_loss", math.nan)),
                "meta_loss_rolling": float(row.get("meta_loss_rolling", math.nan)),
                "lr": float(row.get("lr", math.nan)),
                "unroll_max": int(row.get("unroll_max", -1)),
                # the step of the newest held-out evaluation the report carries
                "eval_step": int(eval_step) if math.isfinite(eval_step) else -1,
                "restored_from": str(row.get("restored_from", "") or ""),
                "restored_step": int(row.get("restored_step", -1)),
                "config": json.dumps({k[len("config/"):]: row[k] for k in row
                                      if k.startswith("config/")}, default=str),
            }
            # the sweep's metric as reported (NaN: not measured yet)
            entry.setdefault(spec.metric, _number(row.get(spec.metric)))
            history.append(entry)
        # NaN: not measured yet (a held-out metric before the first evaluation)
        losses = [r[spec.metric] for r in rows if _finite(r.get(spec.metric))]
        best = (min if spec.mode == "min" else max)(losses) if losses else math.nan
        last = rows[-1] if rows else {}
        final_step = int(last.get("step", -1))
        status = ("ERROR" if result.error else "DONE" if final_step >= spec.trial.steps
                  else "STOPPED")  # stopped early by the scheduler (or out of time)
        entry = {"trial_id": trial_id, "status": status,
                 "reports": len(rows),
                 "final_step": final_step,
                 f"final_{spec.metric}": _number(last.get(spec.metric)),
                 f"best_{spec.metric}": float(best),
                 "exploits": len({r.get("restored_step") for r in rows
                                  if r.get("restored_from") not in (None, "", trial_id)}),
                 "wall_s": float(last.get("time_total_s", math.nan)),
                 # The trial's newest kept checkpoint: a copy of its run folder, whose
                 # theta_best is its best theta by validation so far (``export --best``).
                 "checkpoint": (storage_io.uri_of(result.checkpoint.path,
                                                  result.checkpoint.filesystem, storage)
                                if result.checkpoint else "")}
        for key, value in sorted((result.config or {}).items()):
            entry[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        summary.append(entry)
    summary.sort(key=lambda r: (math.isnan(r[f"best_{spec.metric}"]),
                                r[f"best_{spec.metric}"] * (1 if spec.mode == "min" else -1)))
    return summary, history


def _markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)\n"
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(history: list[dict], spec: SweepSpec, path: str) -> None:
    matplotlib.use("Agg")  # chosen at the first plot, not at import (see evaluation.report)
    import matplotlib.pyplot as plt

    # A metric other than the meta-loss (a held-out accuracy) gets a panel of its own.
    extra = spec.metric not in ("meta_loss", "meta_loss_rolling")
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(15 if extra else 8, 5),
                             squeeze=False)
    ax = axes[0, 0]
    trials = list(dict.fromkeys(r["trial_id"] for r in history))
    for index, trial in enumerate(trials):
        rows = [r for r in history if r["trial_id"] == trial]
        color = plt.cm.tab10(index % 10)
        ax.plot([r["step"] for r in rows], [r["meta_loss_rolling"] for r in rows], "-o",
                color=color, markersize=3, label=trial)
        ax.plot([r["step"] for r in rows], [r["meta_loss"] for r in rows], ":",
                color=color, alpha=0.5)
        for previous, row in zip(rows, rows[1:]):
            if row["restored_from"] and row["restored_from"] != previous["restored_from"]:
                ax.annotate(f"from {row['restored_from'][-5:]}", (row["step"],
                            row["meta_loss_rolling"]), fontsize=7, color=color)
        pts = [(r["step"], r[spec.metric]) for r in rows if _finite(r.get(spec.metric))]
        if extra and pts:  # the metric's own panel
            axes[0, 1].plot(*zip(*pts), "-o", color=color, markersize=3, label=trial)
    ax.set_xlabel("learner step")
    ax.set_ylabel("meta-loss (solid: rolling mean, dotted: meta-batch)")
    ax.set_title(f"sweep {spec.name}: {len(trials)} trials, scheduler "
                 f"{spec.scheduler.type}")
    ax.grid(alpha=0.3)
    if trials:
        ax.legend(fontsize=7, ncol=2)
    if extra:
        ax = axes[0, 1]
        ax.set_xlabel("learner step")
        ax.set_ylabel(spec.metric)
        ax.set_title(f"the sweep's metric ({spec.mode})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_checkpoint(sweep_dir: str) -> tuple[str, dict]:
    """(checkpoint folder or URI, summary row) of the sweep's first-ranked trial whose
    checkpoint exists, from ``SWEEP_DIR/results.parquet`` (the order results.md shows).
    A URI (checkpoints in a bucket) is read with ``storage.local_copy``."""
    path = os.path.join(sweep_dir, "results.parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{sweep_dir} has no results.parquet: not a finished "
                                f"`metalearn sweep` output folder (resume it to finish)")
    for row in pq.read_table(path).to_pylist():
        if row.get("checkpoint") and storage_io.exists(row["checkpoint"]):
            return row["checkpoint"], row
    raise FileNotFoundError(f"{path}: no trial has a checkpoint that this machine can "
                            f"read (a sweep from before checkpoints were listed, or "
                            f"storage it cannot reach)")


def write_outputs(results, spec: SweepSpec, out: str, storage: str = "") -> list[dict]:
    reports = read_jsonl(reports_path(spec, out, storage))
    summary, history = collect(results, spec, reports, storage)
    if summary:
        pq.write_table(pa.Table.from_pylist(summary), os.path.join(out, "results.parquet"))
    if history:
        pq.write_table(pa.Table.from_pylist(history), os.path.join(out, "history.parquet"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Sweep {spec.name}\n\nSpec: `{spec.path}`; metric `{spec.metric}` "
                f"({spec.mode}), scheduler `{spec.scheduler.type}`; sorted by "
                f"the best value reached.\n\n")
        f.write(_markdown(summary))
    plot(history, spec, os.path.join(out, "meta_loss.png"))
    return summary


__all__ = ["best_checkpoint", "collect", "experiment_location",
           "report_log", "reports_path", "run_sweep", "run_trial", "search_algorithm",
           "write_outputs"]
