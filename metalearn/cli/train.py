"""``metalearn train``: asynchronous meta-training on Ray.

    metalearn train                                  # experiments/local.yaml, 10 minutes
    metalearn train --config experiments/paper.yaml --address auto
    metalearn train --resume runs/20261126-120000 --minutes 30
    metalearn train --set learner.meta_batch=8 --set curriculum.unroll_ramp_steps=2000

Resume order: with ``--resume RUN`` the run's own ``config.yaml`` is the base (or
``--config`` if given), then ``--set`` overrides, then the command-line limits; the
learner continues from the newest readable checkpoint of RUN. Everything is validated
before the run folder is touched.
"""

from __future__ import annotations

import os
import sys
import time


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="meta-train the update rule (Ray)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training config YAML (default experiments/local.yaml)")
    parser.add_argument("--out", help="run folder (default runs/<date>-<time>)")
    parser.add_argument("--minutes", type=float, help="wall-clock budget (0: none)")
    parser.add_argument("--steps", type=int, help="stop at this learner step (0: none)")
    parser.add_argument("--workers", type=int, help="worker actors (default: one per CPU)")
    parser.add_argument("--address", help="join this Ray cluster (e.g. auto)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. learner.meta_batch=8 (repeatable)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard scalars to RUN/tensorboard")
    parser.set_defaults(func=run)


def resolve(args):
    """(config, run_dir, resume) from the arguments; raises ConfigError on bad input."""
    from metalearn.core.config import ConfigError
    from metalearn.distributed.driver import (check_resume_compatible, is_run_dir,
                                              read_run_config)
    from metalearn.core.config import to_dict
    from metalearn.training.config import apply_overrides, config_from_dict, load_config

    overrides = list(args.set)
    for name, key in (("minutes", "run.minutes"), ("steps", "run.steps"),
                      ("workers", "worker.num_workers"), ("address", "run.address")):
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.tensorboard:
        overrides.append("run.tensorboard=true")
    if args.resume:
        saved = read_run_config(args.resume)
        if args.config:
            config = load_config(args.config, overrides)
        else:
            config = config_from_dict(apply_overrides(to_dict(saved), overrides))
        check_resume_compatible(saved, config, args.resume)
        checkpoints = os.path.join(args.resume, "checkpoints")
        if not any(name.isdigit() for name in os.listdir(checkpoints)):
            raise ConfigError(f"{args.resume} has no complete checkpoint to resume from")
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise ConfigError("--out and --resume name different folders; a resumed run "
                              "continues in its own folder")
        return config, os.path.abspath(args.resume), True
    config = load_config(args.config, overrides)
    run_dir = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(run_dir) and os.listdir(run_dir):
        what = "a run" if is_run_dir(run_dir) else "not empty"
        raise ConfigError(f"{run_dir} is {what}; choose a new --out"
                          + (" or use --resume" if what == "a run" else ""))
    return config, os.path.abspath(run_dir), False


def run(args) -> int:
    from metalearn.distributed.driver import train

    config, run_dir, resume = resolve(args)
    summary = train(config, run_dir, resume=resume)
    print(f"done: steps {summary.start_step} -> {summary.final_step} in "
          f"{summary.wall_s / 60:.1f} min; checkpoint at step {summary.checkpoint_step}; "
          f"worker restarts {summary.worker_failures}, learner restarts "
          f"{summary.learner_restarts}; dropped stale {summary.dropped_stale}, non-finite "
          f"{summary.dropped_nonfinite}; run folder {run_dir}", file=sys.stderr)
    return 0


__all__ = ["add_parser", "resolve", "run"]
