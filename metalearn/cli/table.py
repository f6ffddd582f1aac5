"""``metalearn table``: the held-out table of a rule, several data sets in one go.

    metalearn table pretrained:laptop                       # README's table: 5 seeds, 100/1000/3000
    metalearn table EXPORT --datasets fashion_mnist,two_moons,file:data/debian_bow.npz
    metalearn table EXPORT --horizons 100,300 --seeds 2 --baselines random_init --json

Writes OUT/heldout.md (the tables), OUT/heldout.json (summary and settings) and
OUT/rows.parquet (every seed's row). See docs/results.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from metalearn.core.config_io import ConfigError
from metalearn.evaluation.config import EvalConfig
from metalearn.evaluation.run import LEARNED, Progress
from metalearn.evaluation.table import TableConfig, markdown_table, run_table, summarise_table
from metalearn.training.export import checkpoint_label, load_export
from tasks.sources import check_name, load


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag}: need a comma list of integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "table", help="held-out table: a rule vs baselines on several data sets",
        description="Evaluate a rule on several held-out data sets at fixed numbers of "
                    "inner steps, against baselines, over paired seeds; write a markdown "
                    "table, JSON and per-seed rows.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="folder from `metalearn export`, or pretrained:laptop")
    defaults = TableConfig()
    p.add_argument("--datasets", default=",".join(defaults.datasets),
                   help="comma list of sources (default %(default)s; e.g. add "
                        "file:data/debian_bow.npz, see experiments/heldout/)")
    p.add_argument("--horizons", default=",".join(map(str, defaults.horizons)),
                   help="inner steps at which the learned rule is scored (default %(default)s)")
    p.add_argument("--seeds", type=int, default=defaults.seeds, help="paired seeds (5)")
    p.add_argument("--baselines", default=",".join(defaults.baselines),
                   help="comma list or none (default %(default)s)")
    p.add_argument("--versus", metavar="CHECKPOINT", default=None,
                   help="a second rule scored at the same horizons and seeds, with the "
                        "paired difference (e.g. the run's start: metalearn export RUN "
                        "--start --out START)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (default 4)")
    p.add_argument("--width", type=int, default=None, help="hidden width (default 128)")
    p.add_argument("--data-dir", default=None, help="TFDS data dir")
    p.add_argument("--out", help="output folder (default reports/table-<time>)")
    p.add_argument("--json", action="store_true", help="last line: the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args) -> int:
    started = time.monotonic()
    exported = load_export(args.checkpoint)
    versus = load_export(args.versus) if args.versus else None
    base = EvalConfig()
    data = dataclasses.replace(base.data, data_dir=args.data_dir)
    base = dataclasses.replace(base, data=data, depth=args.depth or base.depth,
                               width=args.width or base.width)
    config = TableConfig(datasets=_names(args.datasets),
                         horizons=_ints(args.horizons, "--horizons"), seeds=args.seeds,
                         baselines=_names(args.baselines), eval=base)
    for name in config.datasets:
        check_name(name)
        if name.startswith("file:"):  # your own data: checked (and memoised) up front
            load(name, args.data_dir, progress=False)
    out = args.out or os.path.join("reports", f"table-{time.strftime('%Y%m%d-%H%M%S')}")
    progress = Progress(not args.quiet)
    progress(f"rule {exported.meta.get('run')} step {exported.step} (inner lr "
             f"{exported.rule.inner_lr:g}); {', '.join(config.datasets)}; {config.seeds} "
             f"seeds; horizons {list(config.horizons)}", force=True)
    rows = run_table(config, exported.theta, exported.rule, progress,
                     versus=None if versus is None else (versus.theta, versus.rule))
    summary = summarise_table(rows, config.horizons)
    methods = [LEARNED, *config.baselines]
    source = checkpoint_label(args.checkpoint)
    text = (f"# Held-out table\n\nRule `{source}` (run {exported.meta.get('run')}, step "
            f"{exported.step}, inner lr {exported.rule.inner_lr:g}); base model "
            f"{config.eval.depth} x {config.eval.width} {config.eval.activation}; "
            f"{config.eval.data.ways}-way (or all classes) {config.eval.data.shots}-shot ridge "
            f"readout "
            f"accuracy on each set's test split, mean ± standard error over "
            f"{config.seeds} paired seeds. Regenerate: `metalearn table {args.checkpoint} "
            f"--datasets {','.join(config.datasets)} --horizons "
            f"{','.join(map(str, config.horizons))} --seeds {config.seeds} --baselines "
            f"{','.join(config.baselines) or 'none'}"
            f"{'' if versus is None else ' --versus ' + args.versus}`"
            + ("" if versus is None else
               f"\n\nVersus: `{checkpoint_label(args.versus)}` (run {versus.meta.get('run')}, "
               f"step {versus.step}{', its start' if versus.meta.get('selected') == 'start' else ''})")
            + "\n\n"
            + markdown_table(summary, config.horizons, methods))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "heldout.md"), "w") as f:
        f.write(text)
    payload = {"checkpoint": source, "rule_step": exported.step,
               "versus": None if versus is None else checkpoint_label(args.versus),
               "inner_lr": exported.rule.inner_lr, "horizons": list(config.horizons),
               "seeds": config.seeds, "datasets": list(config.datasets),
               "summary": summary, "seconds": round(time.monotonic() - started, 1),
               "out": os.path.abspath(out)}
    with open(os.path.join(out, "heldout.json"), "w") as f:
        json.dump(payload, f, indent=1)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items()
                                           if isinstance(v, (int, float, str))}
                                          for r in rows]), os.path.join(out, "rows.parquet"))
    print(text, file=sys.stderr)
    print(f"table in {os.path.abspath(out)}; {payload['seconds']:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(payload))
    return 0


__all__ = ["add_parser", "run"]
