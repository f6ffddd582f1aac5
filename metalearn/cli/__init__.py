"""The ``metalearn`` command line.

Each command lives in its own module, imported only when that command runs (JAX, Ray
and TFDS are slow to import). A command module exposes ``add_parser(subparsers)``,
which registers its parser and sets ``func`` to a callable taking the parsed
arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

# command -> (module, one-line help)
COMMANDS = {
    "bench": ("metalearn.cli.bench", "measure speed: inner-step, tasks, learner, scaling"),
    "chaos": ("metalearn.cli.chaos", "train while killing workers, the learner and a node; audit"),
    "data": ("metalearn.cli.data", "list, build, inspect and show data sources and tasks"),
    "eval": ("metalearn.cli.eval", "evaluate an exported rule on held-out data vs baselines"),
    "export": ("metalearn.cli.export", "export a run's theta as a self-describing checkpoint"),
    "plot": ("metalearn.cli.plot", "plot a run's meta-training curves per dataset"),
    "table": ("metalearn.cli.table", "held-out table of a rule vs baselines on several data sets"),
    "sweep": ("metalearn.cli.sweep", "Ray Tune sweeps of meta-trainings (ASHA, PBT)"),
    "train": ("metalearn.cli.train", "meta-train the update rule on Ray (asynchronous workers)"),
}


def version() -> str:
    """The installed distribution's version ("unknown" when run from a bare checkout)."""
    try:
        return importlib.metadata.version("metalearn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalearn",
        description="Meta-learn unsupervised update rules (Metz et al. 2019) with JAX and Ray.")
    parser.add_argument("--version", action="version", version=f"metalearn {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == wanted:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        # ``metalearn train`` handles the first SIGINT itself (a clean stop); this is a
        # second one, or an interrupt of another command. Files are written whole or not
        # at all, so a run folder is never corrupted by it.
        print(f"interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - user-facing errors become one clear line
        # Imported here: loading metalearn.core loads JAX, which ``--help`` never needs.
        from metalearn.core.config_io import ConfigError, RunError
        if isinstance(err, (ConfigError, FileNotFoundError)):  # bad input
            print(f"metalearn: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, RunError):  # a run that cannot go on
            print(f"metalearn: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
