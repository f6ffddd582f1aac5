"""The one storage format of theta: a self-describing orbax checkpoint ("an export"), a
run's ``theta_latest`` and ``theta_best`` and what ``metalearn export`` writes.

See docs/evaluation.md (Export) for its items and why exports are byte-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
from importlib.metadata import PackageNotFoundError, version

import jax
import numpy as np
import orbax.checkpoint as ocp

from metalearn.core.config import RuleConfig
from metalearn.core.config_io import ConfigError, from_dict, to_dict
from metalearn.core.theta import theta_spec
from metalearn.core.update_rule import init_theta
from metalearn.training.metrics import read_metrics
from metalearn.training.run_dir import RunDir

FORMAT = "metalearn-rule-export"
FORMAT_VERSION = 1
PRETRAINED_PREFIX = "pretrained:"  # checkpoint references to rules shipped with the package
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
    try:
        return version("metalearn")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def meta_loss_at(run: RunDir, step: int) -> dict:
    """Meta-losses logged in the run's metrics at ``step`` (the last row with
    ``step <= step``); empty when the run has no metrics yet."""
    try:
        table = read_metrics(run.path)
    except FileNotFoundError:
        return {}
    rows = [r for r in table.to_pylist() if r.get("step") is not None and r["step"] <= step]
    if not rows:
        return {}
    row = max(rows, key=lambda r: r["step"])
    out = {"metrics_step": int(row["step"])}
    for key, value in sorted(row.items()):
        if (key in ("meta_loss", "meta_loss_rolling") or key.startswith(("loss/", "eval/"))) \
                and isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def _to_nested_numpy(tree) -> dict:
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


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every save and restore at WARNING on absl; an export is one quiet call."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _handler():
    return ocp.CompositeCheckpointHandler(**{
        THETA_ITEM: ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False),
        META_ITEM: ocp.JsonCheckpointHandler()})


def write_export(out: str, theta, rule: RuleConfig, meta: dict, *, force: bool = False) -> str:
    """Write theta and ``meta`` (plus format fields and the rule config) to ``out``.

    The export is written beside ``out`` and renamed into place, so a reader (or a crash)
    sees either the old export or the new one, never a half-written folder."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not force:
            raise ConfigError(f"{out} exists; choose a new --out or pass --force")
        if not is_export(out):
            raise ConfigError(f"{out} exists and is not a metalearn export; refusing to "
                              f"replace it")
    theta = _to_nested_numpy(theta)
    spec = theta_spec(rule)
    spec.check_tree(theta, where="theta to export")
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rule": to_dict(rule),
                 "num_params": spec.num_params, **meta}
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.export-tmp")
    if os.path.exists(staging):
        shutil.rmtree(staging)
    with _quiet_orbax(), ocp.Checkpointer(_handler()) as checkpointer:
        checkpointer.save(staging, ocp.args.Composite(**{
            THETA_ITEM: ocp.args.PyTreeSave(theta), META_ITEM: ocp.args.JsonSave(full_meta)}))
    _normalise_orbax_files(staging)
    if os.path.exists(out):
        old = staging + "-old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)
    return out


def start_candidate(config, index: int) -> dict:
    """Initial theta number ``index`` of TrainConfig ``config``: 0 is the seed's own draw
    (``init_theta(key(learner.seed))``), the others fold their index into that key."""
    key = jax.random.key(config.learner.seed)
    return init_theta(key if index == 0 else jax.random.fold_in(key, index), config.rule)


def run_start_theta(config, run: RunDir | None = None) -> dict:
    """The initial theta of a run with TrainConfig ``config``: the one its learner starts
    from on a fresh run, and ``export --start`` gives: ``run``'s chosen start when it has
    one (``metalearn.training.start``), else candidate 0."""
    if run is not None and is_export(run.start):
        return load_export(run.start, config.rule).theta
    return start_candidate(config, 0)


def export_run(run_dir: str, out: str, *, force: bool = False, last: bool = False,
               start: bool = False) -> dict:
    """Export a run's theta to ``out`` with its provenance; returns the metadata.

    By default the best theta by validation (``<run>/theta_best``, metalearn.training.best)
    when the run has one, else the newest (``theta_latest``); ``last`` takes the newest;
    ``start`` the run's initial theta (made again from its config, as its learner made it:
    the baseline a run must beat). ``meta["selected"]`` says which: ``best``, ``last`` or
    ``start``."""
    run = RunDir(run_dir)
    if not os.path.isdir(run.path):
        raise FileNotFoundError(f"run folder {run.path} does not exist")
    if not is_export(run.theta):
        raise FileNotFoundError(f"{run.path} has no {RunDir.THETA}/: not a training run "
                                f"folder, or the run has not saved theta yet")
    if last and start:
        raise ConfigError("export: choose one of --last and --start")
    if start:
        config = run.read_config()
        chosen = ExportedRule(run_start_theta(config, run), config.rule, {"step": 0})
        selected, losses = "start", {}
    else:
        selected = "best" if not last and is_export(run.best) else "last"
        chosen = load_export(run.best if selected == "best" else run.theta)
        losses = meta_loss_at(run, chosen.step)
    meta = {
        "run": run.name,
        "run_config": run.read_config_dict(),
        "step": chosen.step,
        "selected": selected,
        "meta_loss": losses.get("meta_loss_rolling", losses.get("meta_loss")),
        "metrics": losses,
        "package_version": package_version(),
    }
    if start and is_export(run.start):  # which candidate, and the scores that chose it
        meta["start"] = {k: v for k, v in read_export_meta(run.start).items()
                         if k in ("candidate", "candidates", "scores", "score_column")}
    if selected == "best":
        meta["validation"] = {k: chosen.meta.get(k) for k in ("score", "score_column", "rank90")}
    write_export(out, chosen.theta, chosen.rule, meta, force=force)
    return meta


def save_run_theta(run: RunDir, theta_flat: np.ndarray, rule: RuleConfig, step: int, *,
                   to: str | None = None, **meta) -> str:
    """Write the learner's theta (flat [P]) at ``step`` to the run's ``theta_latest`` (or
    the export ``to``, with ``meta``)."""
    theta = theta_spec(rule).unravel(np.asarray(theta_flat, np.float32))
    return write_export(to or run.theta, theta, rule,
                        {"step": int(step), "run": run.name, **meta}, force=True)


def load_theta(path: str):
    """(theta pytree, rule config, step) from an export, ``pretrained:NAME`` or a run
    folder (its best theta by validation, else its newest)."""
    exported = load_export(path)
    return exported.theta, exported.rule, exported.step


def pretrained_root() -> str:
    """The folder of the rules that ship with the package (``metalearn/pretrained``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "pretrained")


def pretrained_names() -> list[str]:
    root = pretrained_root()
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if is_export(os.path.join(root, n)))


def resolve_checkpoint(ref: str) -> str:
    """A checkpoint reference -> its folder: ``pretrained:NAME`` names a rule shipped with
    the package (``metalearn/pretrained/NAME``, an export with its provenance in
    ``PROVENANCE.md``); a training run's folder gives the theta ``metalearn export``
    takes by default (``theta_best`` by validation, else ``theta_latest``); anything else
    is a path and is returned unchanged."""
    ref = os.fspath(ref)
    if not ref.startswith(PRETRAINED_PREFIX):
        if os.path.isdir(ref) and not is_export(ref):
            run = RunDir(ref)
            for saved in (run.best, run.theta):
                if is_export(saved):
                    return saved
        return ref
    name = ref[len(PRETRAINED_PREFIX):]
    names = pretrained_names()
    if name not in names:
        raise ConfigError(f"{ref}: no such pretrained rule; this package ships "
                          f"{', '.join(PRETRAINED_PREFIX + n for n in names) or 'none'}")
    return os.path.join(pretrained_root(), name)


def checkpoint_label(ref: str) -> str:
    """How reports name a checkpoint: ``pretrained:NAME`` as given, a path made absolute."""
    ref = os.fspath(ref)
    return ref if ref.startswith(PRETRAINED_PREFIX) else os.path.abspath(ref)


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_ITEM, "metadata")) and os.path.isdir(
        os.path.join(path, THETA_ITEM))


def read_export_meta(path: str) -> dict:
    """The JSON metadata of an export (cheap; no arrays are read)."""
    path = os.path.abspath(resolve_checkpoint(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not is_export(path):
        raise ConfigError(f"{path} is not a metalearn export (no {META_ITEM}/metadata and "
                          f"{THETA_ITEM}/ items) nor a training run with a saved theta")
    try:
        with open(os.path.join(path, META_ITEM, "metadata")) as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable metalearn export: {META_ITEM}/metadata "
                          f"is not JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise ConfigError(f"{path} is an orbax checkpoint but not a metalearn export "
                          f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ConfigError(f"{path} has export format version {meta['format_version']}; this "
                          f"metalearn ({package_version()}) reads up to {FORMAT_VERSION}")
    missing = [key for key in ("rule", "step") if key not in meta]
    if missing:
        raise ConfigError(f"{path}: the export's metadata lacks {', '.join(missing)}; it is "
                          f"damaged: export the run again (`metalearn export`)")
    return meta


def load_export(path: str, rule: RuleConfig | None = None) -> ExportedRule:
    """Load an export (a folder or ``pretrained:NAME``). With ``rule``, also check theta
    has that rule's shapes."""
    path = resolve_checkpoint(path)
    meta = read_export_meta(path)
    try:
        saved_rule = from_dict(RuleConfig, meta["rule"], "rule")
    except ConfigError as err:
        raise ConfigError(f"{path}: the export's rule config does not load in this "
                          f"metalearn ({package_version()}): {err}") from None
    try:
        with _quiet_orbax(), ocp.Checkpointer(_handler()) as checkpointer:
            restored = checkpointer.restore(os.path.abspath(path), ocp.args.Composite(**{
                THETA_ITEM: ocp.args.PyTreeRestore()}))
    except Exception as err:  # noqa: BLE001 - a damaged export is bad input, one line
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise ConfigError(f"{path}: cannot read theta from the export ({message}); it is "
                          f"damaged: export the run again (`metalearn export`)") from None
    theta = _to_nested_numpy(dict(restored[THETA_ITEM]))
    theta_spec(saved_rule).check_tree(theta, where=f"theta in {path}")
    if rule is not None and rule != saved_rule:
        theta_spec(rule).check_tree(theta, where=f"theta in {path}")
    return ExportedRule(theta, saved_rule, meta)


__all__ = ["ExportedRule", "PRETRAINED_PREFIX", "checkpoint_label", "export_run", "is_export",
           "load_export", "load_theta", "pretrained_names", "pretrained_root", "read_export_meta",
           "resolve_checkpoint", "save_run_theta", "write_export"]
