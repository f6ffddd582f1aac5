"""``metalearn chaos``: train on a local multi-node Ray cluster while killing workers and
the learner, removing a node and interrupting the driver; then audit the run folder.

    metalearn chaos                                   # 30 minutes, the full schedule
    metalearn chaos --minutes 3 --worker-kill-s 20 --learner-kill-s 70
    metalearn chaos --check runs/20261204-120000      # audit any run folder, no chaos

The exit code is 0 when every audit check passes, 1 otherwise (``metalearn.training.audit``
lists the checks; ``metalearn.distributed.chaos`` the schedule).
"""

from __future__ import annotations

import json
import os
import sys
import time

from metalearn.distributed.chaos import ChaosPlan, ChaosRun
from metalearn.training.audit import audit_run


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chaos", help="train while breaking the cluster, then audit",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--check", metavar="RUN_DIR", help="only audit this run folder")
    p.add_argument("--out", help="output folder (default chaos/<date>-<time>)")
    p.add_argument("--minutes", type=float, default=30.0, help="training time (default 30)")
    p.add_argument("--worker-kill-s", type=float, default=30.0,
                   help="kill a random worker every this many seconds (default 30)")
    p.add_argument("--learner-kill-s", type=float, default=300.0,
                   help="kill the learner every this many seconds (default 300)")
    p.add_argument("--node-loss-at", type=float, default=0.4,
                   help="remove a worker node at this fraction of the time (default 0.4)")
    p.add_argument("--interrupt-at", type=float, default=0.6,
                   help="SIGINT the driver and resume at this fraction (default 0.6)")
    p.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--config", default="smoke",
                   help="training config (default smoke: the chaos is the point)")
    p.add_argument("--checkpoint-minutes", type=float, default=1.0,
                   help="learner.checkpoint_minutes: the most work a learner kill may "
                        "lose (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the chaos schedule's choices")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config value (repeatable)")
    p.add_argument("--json", action="store_true", help="last line: the audit as JSON")
    p.set_defaults(func=run_chaos)


def run_chaos(args) -> int:
    if args.check:
        report = audit_run(args.check)
    else:
        plan = ChaosPlan(minutes=args.minutes, worker_kill_s=args.worker_kill_s,
                         learner_kill_s=args.learner_kill_s, node_loss_at=args.node_loss_at,
                         interrupt_at=args.interrupt_at, nodes=args.nodes,
                         cpus_per_node=args.cpus_per_node, config=args.config,
                         checkpoint_minutes=args.checkpoint_minutes, seed=args.seed,
                         overrides=tuple(args.set))
        out = args.out or os.path.join("chaos", time.strftime("%Y%m%d-%H%M%S"))
        report = ChaosRun(plan, out, log=lambda m: print(m, file=sys.stderr,
                                                         flush=True)).run()
    print(report.format())
    if args.json:
        print(json.dumps(report.as_dict()))
    return 0 if report.ok else 1


__all__ = ["add_parser", "run_chaos"]
