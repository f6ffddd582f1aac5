"""``metalearn sweep``: Ray Tune sweeps of whole asynchronous meta-trainings.

    metalearn sweep experiments/sweeps/smoke.yaml --out sweeps/smoke
    metalearn sweep experiments/sweeps/curriculum.yaml --out sweeps/curriculum --address auto
    metalearn sweep experiments/sweeps/smoke.yaml --out sweeps/smoke --resume

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
from metalearn.distributed.sweep import (SPEC_FILE, TUNE_DIR, data_needs, run_sweep,
                                         write_outputs)
from metalearn.distributed.sweep_spec import load_spec


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="Ray Tune sweep of meta-trainings",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="sweep YAML (experiments/sweeps/*.yaml)")
    parser.add_argument("--out", help="output folder (default sweeps/<name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep in --out")
    parser.add_argument("--address", help="join this Ray cluster (e.g. auto)")
    parser.add_argument("--json", action="store_true",
                        help="last line of stdout: one JSON object (trials, errors, the "
                             "best trial's row of results.md, output folder)")
    parser.set_defaults(func=run)


def run(args) -> int:
    spec = load_spec(args.spec)
    out = os.path.abspath(args.out or os.path.join("sweeps", spec.name))
    if args.resume:
        if not os.path.isdir(os.path.join(out, TUNE_DIR)):
            raise ConfigError(f"nothing to resume in {out}")
    elif os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"{out} is not empty; choose a new --out or use --resume")
    started = init_ray(args.address or "")
    start = time.monotonic()
    try:
        # Every node must read what the trials will (a missing ranking set would leave
        # the metric NaN and the ranking empty): checked before anything is written.
        nodes = check_nodes(data_needs(spec), f"sweep {spec.name}")
        print(f"sweep {spec.name}: its data loads on all {nodes} node(s)", file=sys.stderr)
        os.makedirs(out, exist_ok=True)
        shutil.copy2(spec.path, os.path.join(out, SPEC_FILE))
        results = run_sweep(spec, out, resume=args.resume)
        summary = write_outputs(results, spec, out)
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
