"""``metalearn export RUN_DIR --out PATH``: a self-describing checkpoint of a run's theta
(the format is described in ``metalearn.training.export`` and docs/evaluation.md)."""

from __future__ import annotations

import json
import os
import sys

from metalearn.core.config_io import ConfigError
from metalearn.distributed.storage import local_copy
from metalearn.distributed.sweep import best_checkpoint
from metalearn.training.export import export_run


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a run's theta as a self-describing orbax checkpoint",
        description="Write RUN_DIR's best theta by validation (its newest with --last, or "
                    "when the run has no validation score), its rule config and provenance "
                    "(run, step, meta-loss, validation score, package version) to a "
                    "standalone orbax checkpoint.")
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                        help="training run folder, or a sweep trial's checkpoint (a "
                             "folder or a URI such as s3://...); or --best SWEEP_DIR")
    parser.add_argument("--best", metavar="SWEEP_DIR",
                        help="export the best trial of a `metalearn sweep` output folder "
                             "(its first row in results.md): that trial's newest checkpoint, "
                             "its best theta by validation")
    parser.add_argument("--out", required=True, help="export folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing export")
    parser.add_argument("--last", action="store_true",
                        help="export the run's newest theta, not its best by validation")
    parser.add_argument("--start", action="store_true",
                        help="export the run's initial theta (its own baseline, for "
                             "metalearn table --versus)")
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    if (args.run_dir is None) == (args.best is None):
        raise ConfigError("export: give RUN_DIR or --best SWEEP_DIR (one of them)")
    location = args.run_dir
    if args.best:
        location, row = best_checkpoint(args.best)
        print(f"best trial {row['trial_id']} of {args.best}: {location}", file=sys.stderr)
    with local_copy(location) as run_dir:  # a checkpoint in a bucket: downloaded
        meta = export_run(run_dir, args.out, force=args.force, last=args.last,
                          start=args.start)
    if args.json:
        print(json.dumps({"out": os.path.abspath(args.out), **meta}, default=str))
    else:
        loss = meta["meta_loss"]
        if meta["selected"] == "start":
            which = "initial theta (its start)"
        elif meta["selected"] == "best":
            val = meta["validation"]
            which = f"best by validation ({val['score_column']} {val['score']:.3f})"
        else:
            which = "newest" + ("" if args.last else " (the run has no validation score)")
        print(f"exported {meta['run']} step {meta['step']}, its {which}"
              f"{'' if loss is None else f' (meta-loss {loss:.4f})'}, to "
              f"{os.path.abspath(args.out)}", file=sys.stderr)
    return 0


__all__ = ["add_parser"]
