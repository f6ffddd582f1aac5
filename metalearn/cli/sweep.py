"""``metalearn sweep``: Ray Tune sweeps of whole asynchronous meta-trainings.

    metalearn sweep experiments/sweeps/smoke.yaml --out sweeps/smoke
    metalearn sweep experiments/sweeps/curriculum.yaml --out sweeps/curriculum --address auto
    metalearn sweep --resume sweeps/smoke
    metalearn sweep experiments/sweeps/curriculum.yaml --address auto --storage s3://bucket/sweeps

See docs/sweeps.md; the trials are ``metalearn.distributed.sweep``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import ray

from metalearn.core.config import ConfigError
from metalearn.distributed.driver import init_ray
from metalearn.distributed.data_check import check_nodes
from metalearn.distributed import storage as storage_io
from metalearn.distributed.sweep import (SPEC_FILE, RESUME_FILE, TUNE_DIR, data_needs,
                                         run_sweep, write_outputs)
from metalearn.distributed.sweep_spec import load_spec


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="Ray Tune sweep of meta-trainings",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?",
                        help="sweep YAML (experiments/sweeps/*.yaml); with --resume, "
                             "by default the one the sweep started from")
    parser.add_argument("--out", help="output folder (default sweeps/<name>)")
    parser.add_argument("--resume", metavar="SWEEP_DIR",
                        help="continue the interrupted sweep in SWEEP_DIR (its spec and "
                             "storage are recorded there)")
    parser.add_argument("--address", help="join this Ray cluster (e.g. auto)")
    parser.add_argument("--storage", metavar="PATH_OR_URI",
                        help="where trials' checkpoints go (the spec's storage; default "
                             "OUT/tune): a folder every node mounts, or s3://bucket/prefix, "
                             "gs://...")
    parser.add_argument("--json", action="store_true",
                        help="last line of stdout: one JSON object (trials, errors, the "
                             "best trial's row of results.md, output folder)")
    parser.set_defaults(func=run)


def _resume_state(out: str) -> dict:
    """What ``--resume`` needs from a sweep's folder: its spec and storage."""
    path = os.path.join(out, RESUME_FILE)
    if not os.path.isdir(out):
        raise ConfigError(f"--resume {out}: no such folder")
    if not os.path.exists(path):
        raise ConfigError(f"nothing to resume in {out} (no {RESUME_FILE}: not a "
                          f"`metalearn sweep` output folder)")
    with open(path) as f:
        return json.load(f)


def run(args) -> int:
    if args.resume:
        out = os.path.abspath(args.resume)
        if args.out and os.path.abspath(args.out) != out:
            raise ConfigError(f"--out {args.out} and --resume {args.resume} name different "
                              f"folders: --resume SWEEP_DIR continues that folder")
        state = _resume_state(out)
        spec = load_spec(args.spec or state["spec"])
        storage = args.storage or state["storage"]
    else:
        if not args.spec:
            raise ConfigError("sweep: give a SPEC file (or --resume SWEEP_DIR)")
        spec = load_spec(args.spec)
        out = os.path.abspath(args.out or os.path.join("sweeps", spec.name))
        if os.path.exists(out) and os.listdir(out):
            raise ConfigError(f"{out} is not empty; choose a new --out or --resume {out}")
        storage = args.storage or spec.storage
    storage = storage_io.resolve(storage, os.path.join(out, TUNE_DIR))
    started = init_ray(args.address or "")
    start = time.monotonic()
    try:
        # Every node must read what the trials will (a missing ranking set would leave
        # the metric NaN and the ranking empty) and write to the checkpoint storage:
        # checked before anything is written.
        storage_io.check_writable(storage)
        nodes = check_nodes(data_needs(spec), f"sweep {spec.name}",
                            storage=storage if storage_io.is_uri(storage) else "")
        print(f"sweep {spec.name}: its data loads on all {nodes} node(s); checkpoints in "
              f"{storage}", file=sys.stderr)
        os.makedirs(out, exist_ok=True)
        if not args.resume:
            shutil.copy2(spec.path, os.path.join(out, SPEC_FILE))
        with open(os.path.join(out, RESUME_FILE), "w") as f:
            json.dump({"spec": spec.path, "storage": storage}, f)
        results = run_sweep(spec, out, resume=bool(args.resume), storage=storage)
        summary = write_outputs(results, spec, out, storage)
    finally:
        if started:
            ray.shutdown()
    errors = sum(r["status"] == "ERROR" for r in summary)
    print(f"sweep {spec.name}: {len(summary)} trials ({errors} errored) in "
          f"{(time.monotonic() - start) / 60:.1f} min; results in {out}/results.md, plot "
          f"{out}/meta_loss.png", file=sys.stderr)
    if args.json:
        print(json.dumps({"sweep": spec.name, "out": out, "metric": spec.metric,
                          "mode": spec.mode, "trials": len(summary), "errored": errors,
                          "best": summary[0] if summary else None}, default=str))
    return 1 if errors == len(summary) else 0


__all__ = ["add_parser", "run"]
