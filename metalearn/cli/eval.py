"""``metalearn eval``: the learned rule and baselines on held-out data, with a report.

    metalearn eval EXPORT                                 # digits, 200 inner steps, 3 seeds
    metalearn eval EXPORT --dataset fashion_mnist --image-size 28 --out reports/fm28
    metalearn eval EXPORT --sweep width --sweep-values 64,512,2048 --steps 30
    metalearn eval EXPORT --json                           # last line: one JSON object

EXPORT is a folder written by ``metalearn export``. See docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from metalearn.core.config import ACTIVATIONS, ConfigError

DEFAULT_BASELINES = ("random_init", "vae", "supervised", "pca", "protonet", "protonet_intact")
SWEEPS = ("width", "depth", "activation", "resolution")
DEFAULT_SWEEP_VALUES = {
    "width": "32,128,512,2048",
    "depth": "2,3,5,8,11",
    "activation": ",".join(a for a in ACTIVATIONS if a != "identity"),
    "resolution": "14,28",
}


def add_parser(subparsers) -> None:
    """Register ``eval`` (``plot`` lives in ``metalearn.evaluation.report``)."""
    p = subparsers.add_parser(
        "eval", help="evaluate an exported rule on held-out data against baselines",
        description="Train fresh base models with the learned rule on unlabelled data and "
                    "measure 10-shot accuracy of linear readouts along inner training, "
                    "against baselines; write a report folder (tables and plots).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="folder from `metalearn export`")
    p.add_argument("--dataset", default="digits",
                   help="source name (digits, fashion_mnist, two_moons, mnist, imdb, "
                        "imagenet16, file:PATH, ...); default digits")
    p.add_argument("--image-size", type=int, default=None,
                   help="14, 16, 28 or 0 (native); default 14 for images larger than "
                        "16 px, else native")
    p.add_argument("--group", help="class group of the source (e.g. held_out for imagenet16)")
    p.add_argument("--data-dir", help="TFDS data dir")
    p.add_argument("--steps", type=int, default=None,
                   help="inner steps of the learned rule (default 200; 50 with --sweep)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; 2 with --sweep)")
    p.add_argument("--width", type=int, default=128, help="hidden width (default 128)")
    p.add_argument("--depth", type=int, default=4, help="hidden layers (default 4)")
    p.add_argument("--activation", default="relu", choices=ACTIVATIONS)
    p.add_argument("--batch-size", type=int, default=128, help="unlabelled batch (128)")
    p.add_argument("--ways", type=int, default=10, help="classes per task (default 10)")
    p.add_argument("--shots", type=int, default=10, help="labelled examples per class (10)")
    p.add_argument("--test-size", type=int, default=1000, help="test examples (1000)")
    p.add_argument("--baselines", default=None,
                   help=f"comma list or 'none' (default {','.join(DEFAULT_BASELINES)}; "
                        f"none with --sweep)")
    p.add_argument("--baseline-steps", type=int, default=2000,
                   help="training steps of the VAE and the prototypical networks (2000)")
    p.add_argument("--supervised-steps", type=int, default=300,
                   help="Adam steps of the supervised baseline (300)")
    p.add_argument("--sweep", choices=SWEEPS, help="generalisation sweep of the learned rule")
    p.add_argument("--sweep-values", help="comma list (defaults: " + "; ".join(
        f"{k} {v}" for k, v in DEFAULT_SWEEP_VALUES.items()) + ")")
    p.add_argument("--out", help="report folder (default reports/eval-<dataset>-<time>)")
    p.add_argument("--json", action="store_true", help="last line: a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_eval)


def _default_image_size(dataset: str, data_dir: str | None) -> int:
    from tasks import sources
    ds = sources.load(dataset, data_dir)
    if ds.modality != "image":
        return 0
    return 14 if max(ds.shape[:2]) > 16 else 0


def _parse_baselines(text: str | None, sweep: str | None) -> tuple[str, ...]:
    if text is None:
        return () if sweep else DEFAULT_BASELINES
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(b.strip() for b in text.split(",") if b.strip())


def _sweep_configs(base, kind: str, values_text: str | None, dataset_image_size):
    """[(value, EvalConfig)] for a sweep."""
    from metalearn.evaluation.evaluate import DataConfig

    values = [v.strip() for v in (values_text or DEFAULT_SWEEP_VALUES[kind]).split(",")
              if v.strip()]
    configs = []
    for value in values:
        if kind == "activation":
            configs.append((value, dataclasses.replace(base, activation=value)))
            continue
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"--sweep-values for {kind} must be integers, got {value!r}")
        if kind == "width":
            configs.append((number, dataclasses.replace(base, width=number)))
        elif kind == "depth":
            configs.append((number, dataclasses.replace(base, depth=number)))
        else:
            if dataset_image_size is None:
                raise ConfigError(f"--sweep resolution needs an image dataset; "
                                  f"{base.data.dataset} is not one")
            data = DataConfig(**{**dataclasses.asdict(base.data), "image_size": number})
            configs.append((number, dataclasses.replace(base, data=data)))
    return configs


def run_eval(args) -> int:
    from metalearn.evaluation.evaluate import (DataConfig, EvalConfig, Progress, final_accuracies,
                                    run_evaluation)
    from metalearn.training.export import load_export
    from metalearn.evaluation.report import write_report

    started = time.monotonic()
    exported = load_export(args.checkpoint)  # fails fast on a wrong folder
    from tasks.sources import check_name, load
    check_name(args.dataset)
    image_size = (args.image_size if args.image_size is not None
                  else _default_image_size(args.dataset, args.data_dir))
    sweep = args.sweep
    data = DataConfig(dataset=args.dataset, image_size=image_size, group=args.group,
                      data_dir=args.data_dir, ways=args.ways, shots=args.shots,
                      test_size=args.test_size)
    config = EvalConfig(
        data=data, width=args.width, depth=args.depth, activation=args.activation,
        steps=args.steps if args.steps is not None else (50 if sweep else 200),
        seeds=args.seeds if args.seeds is not None else (2 if sweep else 3),
        batch_size=args.batch_size, baselines=_parse_baselines(args.baselines, sweep),
        baseline_steps=args.baseline_steps, supervised_steps=args.supervised_steps)
    out = args.out or os.path.join(
        "reports", f"eval-{args.dataset.replace(':', '_').replace('/', '_')}"
                   f"{'-' + sweep if sweep else ''}-{time.strftime('%Y%m%d-%H%M%S')}")
    progress = Progress(not args.quiet)
    progress(f"rule {exported.meta.get('run')} step {exported.step}; {args.dataset} "
             f"(image size {image_size or 'native'}); {config.seeds} seeds x "
             f"{config.steps} inner steps; baselines: {', '.join(config.baselines) or 'none'}",
             force=True)
    is_image = load(args.dataset, args.data_dir).modality == "image"
    runs = ([(None, config)] if not sweep else
            _sweep_configs(config, sweep, args.sweep_values, image_size if is_image else None))
    rows, seconds, first = [], {}, None
    for value, cfg in runs:
        if sweep:
            progress(f"sweep {sweep} = {value}", force=True)
        result = run_evaluation(cfg, exported.theta, exported.rule, progress=progress)
        first = first or result
        for row in result.rows:
            row.update({"dataset": args.dataset, "image_size": cfg.data.image_size,
                        "width": cfg.width, "depth": cfg.depth, "activation": cfg.activation})
            if sweep:
                row.update({"sweep": sweep, "sweep_value": str(value)})
        rows.extend(result.rows)
        for method, s in result.seconds.items():
            seconds[method] = seconds.get(method, 0.0) + s
    info = {"checkpoint": os.path.abspath(args.checkpoint), "run": exported.meta.get("run"),
            "rule_step": exported.step, "meta_loss": exported.meta.get("meta_loss"),
            "dataset": args.dataset, "image_size": image_size or "native",
            "input_size": first.data.input_size, "classes": first.task0.num_classes,
            "pool_examples": len(first.data.x_pool), "test_examples": len(first.task0.x_test),
            "width": config.width, "depth": config.depth, "activation": config.activation,
            "inner_steps": config.steps, "seeds": config.seeds, "batch_size": config.batch_size,
            "baselines": list(config.baselines), "baseline_steps": config.baseline_steps,
            "supervised_steps": config.supervised_steps, "sweep": sweep,
            "seconds_per_method": {k: round(v, 1) for k, v in seconds.items()}}
    model = f"{config.width}x{config.depth} {config.activation}"
    if sweep:
        model = f"{sweep} sweep (others as {model})"
    pixels = "resolution swept" if sweep == "resolution" else f"{image_size or 'native'} px"
    title = (f"{args.dataset} ({pixels}), {model}, "
             f"rule {exported.meta.get('run')}@{exported.step}")
    extras = None
    if not sweep:
        extras = {"params_init": first.params_init, "params_final": first.params_final,
                  "arch": first.arch, "rule": first.rule, "task": first.task0,
                  "image_shape": first.data.image_shape}
    paths = write_report(out, rows, title, info, extras)
    total = time.monotonic() - started
    finals = final_accuracies(rows) if not sweep else None
    if finals:
        for method, r in finals.items():
            print(f"{method:16s} step {r['step']:5d}  ridge {r['accuracy']:.3f} ± "
                  f"{r['accuracy_se']:.3f}  logistic {r['logreg_accuracy']:.3f} ± "
                  f"{r['logreg_accuracy_se']:.3f}", file=sys.stderr)
    print(f"report in {os.path.abspath(out)} ({', '.join(sorted(os.path.basename(p) for p in paths.values()))}); "
          f"{total:.0f} s", file=sys.stderr)
    if args.json:
        if sweep:
            summary = {}
            for value, _ in runs:
                part = [r for r in rows if r.get("sweep_value") == str(value)]
                summary[str(value)] = final_accuracies(part)
            payload = {"sweep": sweep, "values": summary}
        else:
            payload = {"methods": finals}
        payload.update({"dataset": args.dataset, "out": os.path.abspath(out),
                        "seconds": round(total, 1)})
        print(json.dumps(payload))
    return 0


__all__ = ["add_parser", "run_eval"]
