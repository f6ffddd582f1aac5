"""``metalearn data``: list, build, inspect and show data sources, and sample tasks.

    metalearn data list [--json]
    metalearn data build NAME [source options]
    metalearn data fetch fashion_mnist --from DIR [--cache-dir DIR] [--json]
    metalearn data fetch NAME --data-dir DIR      # a TFDS source: TFDS downloads it
    metalearn data info NAME [--json] [source options]
    metalearn data sample --seed S [--mix FILE] [--config TRAIN] [--step N] [--json] [source options]
    metalearn data show NAME --out FILE.png [--rows R --cols C --seed S] [source options]

Source options: --data-dir DIR (TFDS data dir), --fashion-mnist-dir DIR, --download,
--cache-dir DIR, --no-cache, --glyph-blocks a,b (subset of Unicode blocks),
--glyph-max-fonts N, --glyph-bundled-only. Errors about missing data print as one line saying what to
install or pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import matplotlib
import numpy as np

from tasks.glyphs import glyph_config
from tasks.idx import fetch_fashion_mnist
from metalearn.core.config_io import ConfigError, resolve_config
from metalearn.training.config import load_config
from metalearn.training.schedules import curriculum_at
from tasks.sampler import TaskSampler, load_mix
from tasks.sources import SourceOptions, load, registry

DEFAULT_MIX = "local"  # the packaged task mix of the local default
LENGTH_STREAM = 5  # numpy stream [seed, 5] of ``data sample``'s task-length draws


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="list, build, inspect and show data sources "
                                   "and tasks")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = commands.add_parser("list", help="registered sources and what each needs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_list)

    p = commands.add_parser("build", help="build (and cache) a source")
    p.add_argument("name", help="source name or file:PATH")
    add_source_args(p)
    p.set_defaults(func=run_build)

    p = commands.add_parser(
        "fetch", help="make a source available on this machine: Fashion-MNIST from IDX "
        "files you have (--from), a TFDS source by TFDS's download (asked for here)")
    p.add_argument("name", help="fashion_mnist (or fashion_mnist_val: the same files), or "
                                "a TFDS source such as cifar10")
    p.add_argument("--from", dest="from_dir", default=None,
                   help="folder holding the four Fashion-MNIST IDX files (gzipped or not)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    add_source_args(p)
    p.set_defaults(func=run_fetch)

    p = commands.add_parser("info", help="classes, examples, shape (and glyph groups)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    add_source_args(p)
    p.set_defaults(func=run_info)

    p = commands.add_parser("sample", help="draw the task of a seed and describe it")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--mix", default=None, help=f"task mix: a packaged name (local, paper, tiny) or a YAML file (default {DEFAULT_MIX})")
    p.add_argument("--config", default=None,
                   help="training config whose curriculum draws the task's length: a "
                        "packaged name (local, paper) or a YAML file (default local)")
    p.add_argument("--step", type=int, default=0,
                   help="learner step at which the task starts (the curriculum ramps with "
                        "it; default 0)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    add_source_args(p)
    p.set_defaults(func=run_sample)

    p = commands.add_parser("show", help="save a grid of examples as a PNG")
    p.add_argument("name")
    p.add_argument("--out", required=True, help="output .png path")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--cols", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="which classes/examples are shown")
    add_source_args(p)
    p.set_defaults(func=run_show)


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The source options (``source_options`` reads them back)."""
    g = p.add_argument_group("source options")
    g.add_argument("--data-dir", default=None,
                   help="TFDS data dir prepared elsewhere (default $TFDS_DATA_DIR)")
    g.add_argument("--fashion-mnist-dir", default=None,
                   help="folder of Fashion-MNIST IDX files (default Debian's "
                        "/usr/share/datasets/fashion-mnist, else the copy `metalearn data "
                        "fetch fashion_mnist --from DIR` made)")
    g.add_argument("--download", action="store_true",
                   help="let TFDS download and prepare (needs TensorFlow and internet)")
    g.add_argument("--cache-dir", default=None,
                   help="parquet cache (default $METALEARN_CACHE or ~/.cache/metalearn)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    g.add_argument("--glyph-blocks", default=None,
                   help="comma-separated Unicode blocks to render (default all)")
    g.add_argument("--glyph-max-fonts", type=int, default=None,
                   help="render from at most N fonts (quick looks)")
    g.add_argument("--glyph-bundled-only", action="store_true",
                   help="only matplotlib's bundled fonts (what a bare machine has)")


def source_options(args, base=None):
    """SourceOptions from the command line, over ``base`` (a mix's ``sources``)."""
    options = base or SourceOptions()
    changes = {}
    if args.data_dir:
        changes["data_dir"] = args.data_dir
    if args.fashion_mnist_dir:
        changes["fashion_mnist_dir"] = args.fashion_mnist_dir
    if args.download:
        changes["download"] = True
    if args.cache_dir:
        changes["cache_dir"] = args.cache_dir
    if args.no_cache:
        changes["use_cache"] = False
    glyphs = dict(options.glyphs)
    if args.glyph_blocks:
        glyphs["blocks"] = [b.strip() for b in args.glyph_blocks.split(",") if b.strip()]
    if args.glyph_max_fonts is not None:
        glyphs["max_fonts"] = args.glyph_max_fonts
    if args.glyph_bundled_only:
        glyphs["system_fonts"] = False
    if glyphs != options.glyphs:
        changes["glyphs"] = glyphs
    options = dataclasses.replace(options, **changes)
    if "glyphs" in changes:  # validate now, with field names in the error
        glyph_config(options)
    return options


def _load(args):
    return load(args.name, options=source_options(args), progress=True)  # bar on stderr


def run_list(args) -> int:
    rows = [{"name": s.name, "description": s.description, "needs": s.needs}
            for s in sorted(registry().values(), key=lambda s: s.name)]
    rows.append({"name": "file:PATH", "description": "your own .parquet or .npz with x and y",
                 "needs": "the file"})
    if args.json:
        print(json.dumps({"sources": rows}))
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{width}}  {r['description']}  [needs: {r['needs']}]")
    return 0


def run_build(args) -> int:
    dataset = _load(args)
    s = dataset.summary()
    print(f"{s['name']}: {s['num_examples']} examples, {s['num_classes']} classes, "
          f"shape {s['shape']} ({s['modality']})")
    return 0


def run_fetch(args) -> int:
    options = source_options(args)
    if args.name in ("fashion_mnist", "fashion_mnist_val"):
        if not args.from_dir:
            raise ConfigError(
                "metalearn data fetch fashion_mnist needs --from DIR, a folder with the four "
                "IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, as published by "
                "Zalando Research); metalearn downloads nothing by itself")
        result = fetch_fashion_mnist(args.from_dir, options)
        # Both splits, built now: the cache is ready and the files are proven readable.
        for name in ("fashion_mnist", "fashion_mnist_val"):
            load(name, options=dataclasses.replace(options, fashion_mnist_dir=result["dir"]),
                 progress=False)
        print(f"fashion_mnist: {result['test']} test and {result['train']} train examples "
              f"copied to {result['dir']}; fashion_mnist and fashion_mnist_val now read them")
    else:
        if args.from_dir:
            raise ConfigError(f"--from is for fashion_mnist; {args.name} is fetched by its "
                              f"own loader (a TFDS source: --data-dir DIR)")
        if args.name not in registry():
            raise ConfigError(f"unknown source {args.name!r}; `metalearn data list` shows them")
        # The user asked for this source to be fetched: TFDS may download it.
        dataset = load(args.name, options=dataclasses.replace(options, download=True),
                       progress=True)
        result = {"dir": options.data_dir or os.environ.get("TFDS_DATA_DIR"),
                  "examples": dataset.num_examples}
        print(f"{args.name}: {dataset.num_examples} examples ready")
    if args.json:
        print(json.dumps({"name": args.name, **result}))
    return 0


def run_info(args) -> int:
    dataset = _load(args)
    s = dataset.summary()
    info = s.pop("info")
    s["info"] = {k: v for k, v in info.items() if k != "fonts"}
    if "fonts" in info:
        s["info"]["fonts"] = info["fonts"]
        s["num_fonts"] = len(info["fonts"])
    if not args.json:
        print(f"{s['name']}: {s['num_examples']} examples, {s['num_classes']} classes, "
              f"shape {s['shape']} {s['dtype']} ({s['modality']})")
        e = s["examples_per_class"]
        print(f"examples per class: min {e['min']}, mean {e['mean']:.1f}, max {e['max']}")
        if s["groups"]:
            print("groups: " + ", ".join(f"{k} ({v})" for k, v in s["groups"].items()))
        if "num_fonts" in s:
            print(f"fonts: {s['num_fonts']}")
    else:
        print(json.dumps(s))
    return 0


def task_length(config_ref: str | None, step: int, seed: int) -> dict:
    """The length a task started at learner ``step`` would get from the curriculum of
    training config ``config_ref``: the worker's draws (truncations, then each U), made
    here from a stream of ``seed`` so the command is reproducible. A worker draws from
    its own stream, so a training run gives this task its own length from the same
    distribution."""
    if step < 0:
        raise ConfigError(f"--step must be >= 0, got {step}")
    curriculum = curriculum_at(load_config(config_ref).curriculum, step)
    rng = np.random.default_rng([seed, LENGTH_STREAM])
    truncations = curriculum.sample_truncations(rng)
    unrolls = rng.integers(curriculum.unroll_low, curriculum.unroll_high + 1, truncations)
    return {"learner_step": step, "truncations": truncations,
            "inner_steps": int(unrolls.sum()), "curriculum": curriculum.describe(),
            "mean_inner_steps": round(curriculum.mean_task_steps(), 1)}


def run_sample(args) -> int:
    mix = load_mix(resolve_config(args.mix or DEFAULT_MIX, "tasks"))
    mix = dataclasses.replace(mix, sources=source_options(args, mix.sources))
    sampler = TaskSampler(mix, progress=True)
    task = sampler.sample(args.seed)
    meta = task.metadata()
    meta["length"] = task_length(args.config, args.step, args.seed)
    if args.json:
        print(json.dumps(meta))
    else:
        aug = {k: v for k, v in meta["augmentations"].items() if v and k != "targets"}
        names = ", ".join(meta["class_names"][:12]) + (" ..." if task.num_classes > 12 else "")
        print(f"seed {meta['seed']}: {meta['component']} {task.num_classes}-way [{names}]")
        print(f"  arch {meta['arch']['sizes']} {meta['arch']['activation']}, "
              f"K = {meta['num_targets']} targets {meta['augmentations']['targets']}")
        length = meta["length"]
        print(f"  length (a task started at learner step {length['learner_step']}): "
              f"{length['truncations']} truncations, {length['inner_steps']} inner steps; "
              f"{length['curriculum']}")
        print(f"  augmentations: {', '.join(aug) or 'none'}")
    return 0


def run_show(args) -> int:
    matplotlib.use("Agg")
    # pyplot after choosing the backend, and only here: no other subcommand draws.
    import matplotlib.pyplot as plt

    dataset = _load(args)
    rng = np.random.default_rng(args.seed)
    n = args.rows * args.cols
    index = dataset.class_index
    # One example per class, as many classes as fit, classes in id order.
    classes = np.sort(rng.choice(dataset.num_classes, min(n, dataset.num_classes),
                                 replace=False))
    picks = index.order[index.offsets[classes]
                        + (rng.random(classes.size) * index.counts[classes]).astype(np.int64)]
    if dataset.modality == "image":
        images = dataset.x[picks]
        if images.shape[0] < n:  # few classes: fill the grid with more examples
            more = rng.integers(dataset.num_examples, size=n - images.shape[0])
            images = np.concatenate([images, dataset.x[np.sort(more)]])
        h, w = images.shape[1:3]
        grid = np.zeros((args.rows * (h + 1), args.cols * (w + 1)) + images.shape[3:], np.uint8)
        for k, img in enumerate(images[:n]):
            r, c = divmod(k, args.cols)
            grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
        scale = max(2, 112 // h)  # screen pixels per input pixel: ~112 px per example
        fig = plt.figure(figsize=(grid.shape[1] * scale / 100, grid.shape[0] * scale / 100),
                         dpi=100)
        ax = fig.add_axes([0, 0, 1, 1])
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, interpolation="nearest")
        ax.axis("off")
    elif dataset.shape == (2,):
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.scatter(dataset.x[:, 0], dataset.x[:, 1], c=dataset.y, s=4, cmap="coolwarm")
        ax.set_title(dataset.name)
    else:
        fig, ax = plt.subplots(figsize=(10, 4))
        rows = dataset.x[np.sort(rng.integers(dataset.num_examples, size=min(n, 64)))]
        ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="gray")
        ax.set_title(f"{dataset.name}: {rows.shape[0]} examples x {rows.shape[1]} features")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"wrote {args.out} ({dataset.name}, {min(n, dataset.num_classes)} classes shown)")
    return 0
