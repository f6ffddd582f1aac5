"""``metalearn eval``: the learned rule and baselines on held-out data, with a report.

    metalearn eval EXPORT                                 # digits, 200 inner steps, 3 seeds
    metalearn eval pretrained:laptop --dataset fashion_mnist  # the rule shipped with the package
    metalearn eval EXPORT --dataset fashion_mnist --image-size 28 --out reports/fm28
    metalearn eval EXPORT --vary width --values 64,512,2048 --steps 30
    metalearn eval EXPORT --config eval.yaml --set data.pool_size=5000 --set ridge=0.3
    metalearn eval EXPORT --json                           # last line: one JSON object

The JSON object: ``methods`` (per method its final-step summary and its ``curve``, the
summary at every evaluated horizon with ``lr_steps`` = ``inner_lr`` x step, ``rank90``
and ``w_growth``), ``inner_lr`` (the rule's), ``dataset``, ``out``, ``seconds``; with
``--vary``, ``values`` (per swept value, the same per method) instead of ``methods``.

EXPORT is a folder written by ``metalearn export``. Settings are an ``EvalConfig``
(``metalearn.evaluation.config``): ``--config`` file first, then ``--set`` overrides,
then the flags below. See docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from metalearn.core.config import ACTIVATIONS
from metalearn.core.config_io import ConfigError, apply_overrides, from_dict, read_yaml
from metalearn.evaluation.baselines import BASELINES, NAMES
from metalearn.evaluation.config import EvalConfig
from metalearn.evaluation.data import default_image_size
from metalearn.evaluation.report import write_eval_report
from metalearn.evaluation.run import Progress, curves
from metalearn.evaluation.sweep import DEFAULT_SWEEP_VALUES, SWEEPS, run_sweep
from metalearn.training.export import checkpoint_label, load_export
from tasks.sources import check_name

# flag (argparse dest) -> EvalConfig field; a flag that is given wins over --config / --set.
FLAG_FIELDS = {
    "dataset": "data.dataset", "image_size": "data.image_size", "group": "data.group",
    "data_dir": "data.data_dir", "ways": "data.ways", "shots": "data.shots",
    "test_size": "data.test_size", "steps": "steps", "seeds": "seeds", "width": "width",
    "depth": "depth", "activation": "activation", "batch_size": "batch_size",
    "baselines": "baselines", "baseline_steps": "baseline_steps",
    "supervised_steps": "supervised_steps",
}
# What the command runs when neither flag, --set nor --config says (else EvalConfig's
# defaults): (without --vary, with --vary). The image size defaults by dataset.
COMMAND_DEFAULTS = {"steps": (200, 50), "seeds": (3, 2), "baselines": (NAMES, ())}


def add_parser(subparsers) -> None:
    """Register ``eval`` (``plot`` lives in ``metalearn.cli.plot``)."""
    p = subparsers.add_parser(
        "eval", help="evaluate an exported rule on held-out data against baselines",
        description="Train fresh base models with the learned rule on unlabelled data and "
                    "measure 10-shot accuracy of linear readouts along inner training, "
                    "against baselines; write a report folder (tables and plots).",
        epilog="baselines: " + "; ".join(f"{name} ({b.description})"
                                         for name, b in BASELINES.items()) + ".")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="folder from `metalearn export`, or pretrained:laptop (the rule "
                        "that ships with the package)")
    p.add_argument("--config", metavar="EVAL.yaml",
                   help="evaluation config (EvalConfig fields: data.dataset, width, steps, "
                        "baselines, ...); --set and the flags below win over its values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. data.pool_size=5000 or ridge=0.3 "
                        "(repeatable)")
    p.add_argument("--dataset",
                   help="source name (digits, fashion_mnist, two_moons, mnist, imdb, "
                        "imagenet16, file:PATH, ...); default digits")
    p.add_argument("--image-size", type=int, default=None,
                   help="14, 16, 28 or 0 (native); default 14 for images larger than "
                        "16 px, else native")
    p.add_argument("--group", help="class group of the source (e.g. held_out for imagenet16)")
    p.add_argument("--data-dir", help="TFDS data dir")
    p.add_argument("--steps", type=int, default=None,
                   help="inner steps of the learned rule (default 200; 50 with --vary)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; 2 with --vary)")
    p.add_argument("--width", type=int, help="hidden width (default 128)")
    p.add_argument("--depth", type=int, help="hidden layers (default 4)")
    p.add_argument("--activation", choices=ACTIVATIONS, help="default relu")
    p.add_argument("--batch-size", type=int, help="unlabelled batch (128)")
    p.add_argument("--ways", type=int, help="classes per task (default 10)")
    p.add_argument("--shots", type=int, help="labelled examples per class (10)")
    p.add_argument("--test-size", type=int, help="test examples (1000)")
    p.add_argument("--baselines", default=None, type=_parse_baselines,
                   help=f"comma list or 'none' (default {','.join(NAMES)}; "
                        f"none with --vary)")
    p.add_argument("--baseline-steps", type=int,
                   help="training steps of the VAE and the prototypical networks (2000)")
    p.add_argument("--supervised-steps", type=int,
                   help="Adam steps of the supervised baseline (300)")
    p.add_argument("--vary", choices=SWEEPS,
                   help="generalisation sweep of the learned rule: vary one setting")
    p.add_argument("--values", help="comma list (defaults: " + "; ".join(
        f"{k} {v}" for k, v in DEFAULT_SWEEP_VALUES.items()) + ")")
    p.add_argument("--out", help="report folder (default reports/eval-<dataset>-<time>)")
    p.add_argument("--json", action="store_true", help="last line: a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_eval)


def _parse_baselines(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(b.strip() for b in text.split(",") if b.strip())


def _is_set(values: dict, dotted: str) -> bool:
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(values: dict, dotted: str, value) -> None:
    """Set ``a.b`` in nested dict ``values`` (copying the mapping on the way)."""
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        child = node.get(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part} must be a mapping, got {type(child).__name__}")
        node[part] = child = dict(child)
        node = child
    node[leaf] = value


def resolve_config(args) -> EvalConfig:
    """The EvalConfig of the command line: ``--config``, then ``--set``, then the flags,
    then the command's defaults for what none of them set."""
    values = read_yaml(args.config, "evaluation config") if args.config else {}
    if not isinstance(values, dict):
        raise ConfigError(f"{args.config}: must be a mapping, got {type(values).__name__}")
    values = apply_overrides(values, args.set)
    for name, field in FLAG_FIELDS.items():
        if getattr(args, name) is not None:
            _put(values, field, getattr(args, name))
    config = from_dict(EvalConfig, values)
    check_name(config.data.dataset)
    changes = {name: pair[bool(args.vary)] for name, pair in COMMAND_DEFAULTS.items()
               if not _is_set(values, name)}
    if not _is_set(values, "data.image_size"):
        changes["data"] = dataclasses.replace(
            config.data, image_size=default_image_size(config.data.dataset,
                                                       config.data.data_dir))
    return dataclasses.replace(config, **changes)


def run_eval(args) -> int:
    started = time.monotonic()
    exported = load_export(args.checkpoint)  # fails fast on a wrong folder
    config = resolve_config(args)
    dataset, image_size, sweep = config.data.dataset, config.data.image_size, args.vary
    out = args.out or os.path.join(
        "reports", f"eval-{dataset.replace(':', '_').replace('/', '_')}"
                   f"{'-' + sweep if sweep else ''}-{time.strftime('%Y%m%d-%H%M%S')}")
    progress = Progress(not args.quiet)
    progress(f"rule {exported.meta.get('run')} step {exported.step}; {dataset} "
             f"(image size {image_size or 'native'}); {config.seeds} seeds x "
             f"{config.steps} inner steps; baselines: {', '.join(config.baselines) or 'none'}",
             force=True)
    result = run_sweep(config, exported.theta, exported.rule, sweep=sweep,
                       values_text=args.values, progress=progress)
    source = {"checkpoint": checkpoint_label(args.checkpoint), "run": exported.meta.get("run"),
              "rule_step": exported.step, "meta_loss": exported.meta.get("meta_loss")}
    paths = write_eval_report(out, result, source)
    total = time.monotonic() - started
    finals = result.finals()
    if not sweep:
        for method, r in finals.items():
            print(f"{method:16s} step {r['step']:5d}  ridge {r['accuracy']:.3f} ± "
                  f"{r['accuracy_se']:.3f}  logistic {r['logreg_accuracy']:.3f} ± "
                  f"{r['logreg_accuracy_se']:.3f}", file=sys.stderr)
    names = ", ".join(sorted(os.path.basename(p) for p in paths.values()))
    print(f"report in {os.path.abspath(out)} ({names}); {total:.0f} s", file=sys.stderr)
    if args.json:
        inner_lr = exported.rule.inner_lr
        if sweep:
            for value, methods in finals.items():
                _add_curves(methods, [r for r in result.rows if r.get("sweep_value") == value],
                            inner_lr)
            payload = {"sweep": sweep, "values": finals}
        else:
            payload = {"methods": _add_curves(finals, result.rows, inner_lr)}
        payload.update({"dataset": dataset, "inner_lr": inner_lr, "out": os.path.abspath(out),
                        "seconds": round(total, 1)})
        print(json.dumps(payload))
    return 0


def _add_curves(finals: dict, rows: list[dict], inner_lr: float) -> dict:
    """Give each method of ``finals`` its ``curve``: the summary at every evaluated step
    with ``lr_steps`` = inner_lr x step, the amount of inner training, so that rules with
    different inner learning rates compare at equal inner training (baselines' steps are
    their own optimiser's; their lr_steps uses the rule's inner_lr all the same)."""
    for method, points in curves(rows).items():
        if method in finals:
            finals[method]["curve"] = [{"step": p["step"], "lr_steps": inner_lr * p["step"],
                                        **{k: v for k, v in p.items() if k != "step"}}
                                       for p in points]
    return finals


__all__ = ["add_parser", "run_eval", "resolve_config"]
