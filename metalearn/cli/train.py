"""``metalearn train``: asynchronous meta-training on Ray.

    metalearn train                                  # the packaged local default, 10 minutes
    metalearn train --config paper --address auto    # the paper's run, on a cluster
    metalearn train --resume runs/20261126-120000 --minutes 30
    metalearn train --set learner.meta_batch=8 --set curriculum.unroll_ramp_steps=2000

Resume order: with ``--resume RUN`` the run's own ``config.yaml`` is the base (or
``--config`` if given), then ``--set`` overrides, then the command-line limits; the
learner continues from the newest readable checkpoint of RUN. Everything is validated
before the run folder is touched. A resume that changes what is trained (anything but
budget, placement, bookkeeping and the evaluator: ``metalearn.training.session``) is
refused unless ``--allow-config-change``; every session's config is kept in
``RUN/configs/``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from metalearn.distributed.driver import RAY
from metalearn.training.local import LOCAL
from metalearn.training.population import POPULATION
from metalearn.training.runner import train
from metalearn.training.progress import ProgressLine
from metalearn.training.session import describe_changes, resolve_session
from metalearn.training.trackers import LOGGERS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="meta-train the update rule (Ray)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training config: a packaged name (local, paper) "
                                         "or a YAML file (default: local)")
    parser.add_argument("--out", help="run folder (default runs/<date>-<time>)")
    parser.add_argument("--minutes", type=float, help="wall-clock budget (0: none)")
    parser.add_argument("--steps", type=int, help="stop at this learner step (0: none)")
    parser.add_argument("--workers", type=int, help="worker actors (default: one per CPU)")
    parser.add_argument("--address", help="Ray cluster to join (auto: the one started on "
                                          "this machine; local: a new private Ray). Default: "
                                          "RAY_ADDRESS, else a cluster running here, else a "
                                          "new local Ray")
    parser.add_argument("--runner", choices=("ray", "local", "population"),
                        help="ray: learner and worker actors (default); local: one "
                             "process, no Ray (debugging); population: one process whose "
                             "compiled program makes worker.meta_steps learner updates "
                             "per call (es_full)")
    parser.add_argument("--mix", help="task mix: a packaged name (local, paper, tiny) or a "
                                      "YAML file (tasks.mix)")
    parser.add_argument("--data-dir", help="TFDS data dir for the mix's TFDS sources "
                                           "(tasks.data_dir)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: train the next steps with a config that "
                             "differs from the run's in what is trained (each session's "
                             "config is kept in RUN_DIR/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. learner.meta_batch=8 (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="last line of stdout: one JSON object (steps, wall time, "
                             "checkpoint, restarts, run folder)")
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                        help="TensorBoard scalars in RUN/tensorboard (run.tensorboard; on in "
                             "the packaged configs): --no-tensorboard turns them off")
    parser.add_argument("--logger", action="append", choices=LOGGERS, metavar="NAME",
                        help="also log to wandb or mlflow (run.loggers; repeatable; "
                             "WANDB_MODE=offline and a local MLflow database work offline)")
    parser.set_defaults(func=run)


def resolve(args):
    """The ``Session`` the arguments ask for; raises ConfigError on bad input."""
    overrides = list(args.set)
    for name, key in (("minutes", "run.minutes"), ("steps", "run.steps"),
                      ("workers", "worker.num_workers"), ("address", "run.address"),
                      ("runner", "run.runner"), ("mix", "tasks.mix"),
                      ("data_dir", "tasks.data_dir")):
        value = getattr(args, name, None)  # (a Namespace built by hand may lack some)
        if value is not None:
            overrides.append(f"{key}={value}")
    tensorboard = getattr(args, "tensorboard", None)
    if tensorboard is not None:
        overrides.append(f"run.tensorboard={str(tensorboard).lower()}")
    loggers = getattr(args, "logger", None)
    if loggers:
        overrides.append(f"run.loggers=[{', '.join(dict.fromkeys(loggers))}]")
    session = resolve_session(args.config, overrides, args.out, args.resume,
                              allow_config_change=getattr(args, "allow_config_change", False))
    if session.changes:
        print(f"resuming {session.run.path} with a changed config: "
              f"{describe_changes(list(session.changes))}", file=sys.stderr)
    return session


def run(args) -> int:
    session = resolve(args)
    config, run_dir = session.config, session.run
    callbacks = [ProgressLine(config.run.progress_every_s)]
    runners = {runner.name: runner for runner in (LOCAL, POPULATION, RAY)}
    summary = train(session, runners[config.run.runner], callbacks=callbacks)
    if getattr(args, "json", False):
        print(json.dumps({"run": run_dir.path, "start_step": summary.start_step,
                          "final_step": summary.final_step,
                          "checkpoint_step": summary.checkpoint_step,
                          "wall_s": round(summary.wall_s, 3),
                          "worker_failures": summary.worker_failures,
                          "learner_restarts": summary.learner_restarts,
                          "dropped_stale": summary.dropped_stale,
                          "dropped_nonfinite": summary.dropped_nonfinite,
                          "signal": summary.signal or None}))
    if summary.signal:
        # 128 + the signal's number, as a shell reports a process the signal ended.
        code = 128 + int(getattr(signal, summary.signal))
        print(f"stopped by {summary.signal} at step {summary.final_step}: the final "
              f"checkpoint and metrics are written; continue with: metalearn train "
              f"--resume {run_dir.path}", file=sys.stderr)
        return code
    print(f"done: steps {summary.start_step} -> {summary.final_step} in "
          f"{summary.wall_s / 60:.1f} min; checkpoint at step {summary.checkpoint_step}; "
          f"worker restarts {summary.worker_failures}, learner restarts "
          f"{summary.learner_restarts}; dropped stale {summary.dropped_stale}, non-finite "
          f"{summary.dropped_nonfinite}; run folder {run_dir.path}", file=sys.stderr)
    return 0


__all__ = ["add_parser", "resolve", "run"]
