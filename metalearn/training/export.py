"""``metalearn export RUN_DIR --out PATH``: a self-describing checkpoint of theta.

An export is one orbax checkpoint folder with two items:

* ``theta``: the rule's parameters as a nested dict of float32 arrays (the names of
  ``update_rule.init_theta``), written as plain zarr arrays (no OCDBT: its data files
  get random names, so two exports would differ);
* ``meta``: JSON with ``format`` (``metalearn-rule-export``), ``format_version``, the
  rule config (``rule``), the run folder's name and training config (``run``,
  ``run_config``), the learner ``step``, the ``meta_loss`` logged at that step
  (``metrics.parquet``), ``num_params`` and the ``package_version``.

Loading (``load_export``) needs nothing but that folder. Orbax stamps wall-clock times
and the destination path into its bookkeeping files; ``export_run`` rewrites them to
fixed values, so exports of the same run and step are byte-identical wherever they are
written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np

from metalearn.core.config import ConfigError, RuleConfig, from_dict, to_dict

FORMAT = "metalearn-rule-export"
FORMAT_VERSION = 1
THETA_ITEM = "theta"
META_ITEM = "meta"
_COMMIT_TEXT = "Checkpoint commit was successful"


@dataclasses.dataclass(frozen=True)
class ExportedRule:
    """A loaded export: theta (nested dict of numpy float32), its rule config, metadata."""

    theta: dict
    rule: RuleConfig
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("metalearn")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def meta_loss_at(run_dir: str, step: int) -> dict:
    """Meta-losses logged in ``metrics.parquet`` at ``step`` (the last row with
    ``step <= step``); empty when the run has no metrics yet."""
    path = os.path.join(run_dir, "metrics.parquet")
    if not os.path.exists(path):
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "step" not in table.column_names or table.num_rows == 0:
        return {}
    rows = [r for r in table.to_pylist() if r.get("step") is not None and r["step"] <= step]
    if not rows:
        return {}
    row = max(rows, key=lambda r: r["step"])
    out = {"metrics_step": int(row["step"])}
    for key, value in sorted(row.items()):
        if (key in ("meta_loss", "meta_loss_rolling") or key.startswith("loss/")
                or key.startswith("eval/")) and isinstance(value, (int, float)) \
                and math.isfinite(value):
            out[key] = float(value)
    return out


def _read_run_config(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)


def _to_nested_numpy(tree) -> dict:
    import jax
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _normalise_orbax_files(path: str) -> None:
    """Make orbax's bookkeeping independent of time and destination."""
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if name == "commit_success.txt":
                with open(full, "w") as f:
                    f.write(_COMMIT_TEXT)
            elif name == "_CHECKPOINT_METADATA":
                with open(full) as f:
                    data = json.load(f)
                for key in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
                    if key in data:
                        data[key] = 0
                with open(full, "w") as f:
                    json.dump(data, f, sort_keys=True)


def _handler():
    import orbax.checkpoint as ocp
    return ocp.CompositeCheckpointHandler(**{
        THETA_ITEM: ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False),
        META_ITEM: ocp.JsonCheckpointHandler()})


def write_export(out: str, theta, rule: RuleConfig, meta: dict, *, force: bool = False) -> str:
    """Write theta and ``meta`` (plus format fields and the rule config) to ``out``."""
    import logging

    import orbax.checkpoint as ocp

    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not force:
            raise ConfigError(f"{out} exists; choose a new --out or pass --force")
        if not is_export(out):
            raise ConfigError(f"{out} exists and is not a metalearn export; refusing to "
                              f"replace it")
    theta = _to_nested_numpy(theta)
    check_theta_shape(theta, rule, where="theta to export")
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rule": to_dict(rule),
                 "num_params": int(sum(a.size for a in _leaves(theta))), **meta}
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.export-tmp")
    if os.path.exists(staging):
        shutil.rmtree(staging)
    # orbax logs every save at WARNING on absl; an export is one quiet call.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        with ocp.Checkpointer(_handler()) as checkpointer:
            checkpointer.save(staging, ocp.args.Composite(**{
                THETA_ITEM: ocp.args.PyTreeSave(theta),
                META_ITEM: ocp.args.JsonSave(full_meta)}))
    finally:
        absl_logger.setLevel(level)
    _normalise_orbax_files(staging)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def _leaves(tree) -> list:
    import jax
    return jax.tree.leaves(tree)


def export_run(run_dir: str, out: str, *, force: bool = False) -> dict:
    """Export the run's ``theta_latest.npz`` to ``out``; returns the written metadata."""
    from metalearn.training.checkpoint import THETA_FILE, load_theta

    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if not os.path.exists(os.path.join(run_dir, THETA_FILE)):
        raise FileNotFoundError(f"{run_dir} has no {THETA_FILE}: not a training run folder, "
                                f"or the run has not saved theta yet")
    theta, rule, step = load_theta(run_dir)
    losses = meta_loss_at(run_dir, step)
    meta = {
        "run": os.path.basename(run_dir.rstrip(os.sep)),
        "run_config": _read_run_config(run_dir),
        "step": int(step),
        "meta_loss": losses.get("meta_loss_rolling", losses.get("meta_loss")),
        "metrics": losses,
        "package_version": package_version(),
    }
    write_export(out, theta, rule, meta, force=force)
    return meta


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_ITEM, "metadata")) and os.path.isdir(
        os.path.join(path, THETA_ITEM))


def read_export_meta(path: str) -> dict:
    """The JSON metadata of an export (cheap; no arrays are read)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not is_export(path):
        from metalearn.training.checkpoint import THETA_FILE
        hint = (f"; it looks like a training run: export it first with "
                f"`metalearn export {path} --out EXPORT_DIR`"
                if os.path.exists(os.path.join(path, THETA_FILE)) else "")
        raise ConfigError(f"{path} is not a metalearn export (no {META_ITEM}/metadata and "
                          f"{THETA_ITEM}/ items){hint}")
    with open(os.path.join(path, META_ITEM, "metadata")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is an orbax checkpoint but not a metalearn export "
                          f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ConfigError(f"{path} has export format version {meta['format_version']}; this "
                          f"metalearn ({package_version()}) reads up to {FORMAT_VERSION}")
    return meta


def _shape_template(rule: RuleConfig) -> dict:
    import functools

    import jax

    from metalearn.core.update_rule import init_theta
    return jax.eval_shape(functools.partial(init_theta, config=rule), jax.random.key(0))


def check_theta_shape(theta, rule: RuleConfig, where: str = "checkpoint theta") -> None:
    """Raise ConfigError naming the first entry where theta and ``rule`` disagree."""
    import jax

    want = {jax.tree_util.keystr(p): tuple(s.shape)
            for p, s in jax.tree_util.tree_leaves_with_path(_shape_template(rule))}
    have = {jax.tree_util.keystr(p): tuple(np.shape(a))
            for p, a in jax.tree_util.tree_leaves_with_path(theta)}
    if want == have:
        return
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        first = (f"theta{missing[0]} missing" if missing else f"theta{extra[0]} unexpected")
    else:
        key = next(k for k in sorted(want) if want[k] != have[k])
        first = f"theta{key} has shape {have[key]}, the rule needs {want[key]}"
    raise ConfigError(f"{where} does not match the rule config ({sum(map(math.prod, have.values()))} "
                      f"parameters vs {sum(map(math.prod, want.values()))}): {first}")


def load_export(path: str, rule: RuleConfig | None = None) -> ExportedRule:
    """Load an export. With ``rule``, also check theta has that rule's shapes."""
    import logging

    import orbax.checkpoint as ocp

    meta = read_export_meta(path)
    saved_rule = from_dict(RuleConfig, meta["rule"], "rule")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        with ocp.Checkpointer(_handler()) as checkpointer:
            restored = checkpointer.restore(os.path.abspath(path), ocp.args.Composite(**{
                THETA_ITEM: ocp.args.PyTreeRestore()}))
    finally:
        absl_logger.setLevel(level)
    theta = _to_nested_numpy(dict(restored[THETA_ITEM]))
    check_theta_shape(theta, saved_rule, where=f"theta in {path}")
    if rule is not None and rule != saved_rule:
        check_theta_shape(theta, rule, where=f"theta in {path}")
    return ExportedRule(theta, saved_rule, meta)


# ---------------------------------------------------------------------------
# command line

def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a run's theta as a self-describing orbax checkpoint",
        description="Write RUN_DIR's latest theta, its rule config and provenance (run, "
                    "step, meta-loss, package version) to a standalone orbax checkpoint.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run folder")
    parser.add_argument("--out", required=True, help="export folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing export")
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    meta = export_run(args.run_dir, args.out, force=args.force)
    if args.json:
        print(json.dumps({"out": os.path.abspath(args.out), **meta}, default=str))
    else:
        loss = meta["meta_loss"]
        print(f"exported {meta['run']} step {meta['step']} "
              f"(meta-loss {'n/a' if loss is None else f'{loss:.4f}'}) to "
              f"{os.path.abspath(args.out)}", file=sys.stderr)
    return 0


__all__ = ["ExportedRule", "export_run", "load_export", "read_export_meta", "write_export",
           "check_theta_shape", "is_export", "add_parser"]
