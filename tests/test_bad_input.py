"""Bad input, table-driven: every user-facing input that is wrong gets one line
``metalearn: error: ...`` naming the field or file, exit code 2, no traceback, before
Ray starts and before any folder is created or touched.

Each case: (id, setup, expected). ``setup(w)`` writes the bad input under ``w.root``
(a ``World``) and returns the argv of ``metalearn.cli.main``; ``expected`` is a
substring the line must hold (the field or file, and what is wrong). A pre-existing run
folder (``w.run``) is hashed before and after every case.
"""

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from metalearn.cli import main
from metalearn.training.config import config_to_yaml
from metalearn.training.export import pretrained_root
from metalearn.training.run_dir import RunDir
from train_helpers import tiny_config

ARCH = {"min_layers": 2, "max_layers": 2, "min_width": 8, "max_width": 8, "output_size": 8,
        "activations": ["relu"]}


@dataclasses.dataclass
class World:
    root: str
    config: str  # a valid tiny training config file
    run: str  # a pre-existing run folder (config.yaml, configs/, a checkpoint)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def new_out(self) -> str:  # a folder no case may create
        return self.path("never")

    def train(self, *args: str) -> list[str]:
        return ["train", "--config", self.config, "--out", self.new_out(), *args]

    def npz(self, name: str, x, y) -> str:
        path = self.path(f"{name}.npz")
        np.savez(path, x=x, y=y)
        return path

    def write_file_mix(self, name: str, data: str, ways=(2,)) -> str:
        """A task mix file of the one ``file:`` source ``data``."""
        mix = self.path(f"{name}_mix.yaml")
        with open(mix, "w") as f:
            yaml.safe_dump({"components": [{"source": f"file:{data}", "ways": list(ways),
                                            "preprocess": {"image_size": 0}}],
                            "architecture": ARCH}, f)
        return mix

    def file_mix(self, name: str, data: str, ways=(2,)) -> list[str]:
        """train argv with a task mix of the one ``file:`` source ``data``."""
        return self.train("--set", f"tasks.mix={self.write_file_mix(name, data, ways)}")

    def mix(self, name: str, values: dict) -> list[str]:
        mix = self.path(f"{name}_mix.yaml")
        with open(mix, "w") as f:
            yaml.safe_dump(values, f)
        return self.train("--set", f"tasks.mix={mix}")

    def sweep(self, name: str, **values) -> list[str]:
        spec = {"name": name, "base": self.config,
                "trial": {"workers": 1, "steps": 4, "report_every": 2}, **values}
        path = self.path(f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(spec, f)
        return ["sweep", path, "--out", self.new_out()]

    def export(self, name: str, edit) -> str:
        """A copy of the packaged export with ``edit(meta dict, folder)`` applied."""
        folder = self.path(name)
        shutil.copytree(os.path.join(pretrained_root(), "laptop"), folder)
        meta_path = os.path.join(folder, "meta", "metadata")
        with open(meta_path) as f:
            meta = json.load(f)
        if edit(meta, folder) is not False:
            with open(meta_path, "w") as f:
                json.dump(meta, f)
        return folder

    def folder(self, name: str, files: dict) -> str:
        """A folder holding ``files`` (relative path -> text)."""
        base = self.path(name)
        for rel, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(base, rel)), exist_ok=True)
            with open(os.path.join(base, rel), "w") as f:
                f.write(text)
        os.makedirs(base, exist_ok=True)
        return base


def _x(rows=40, dim=5):
    return np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)


def _y(rows=40):
    return np.arange(rows) % 2


def _with(value, row=3, col=2):
    x = _x()
    x[row, col] = value
    return x


def _other_rule(meta, folder):
    meta["rule"]["compute_h_size"] += 1


def _drop_leaf(meta, folder):
    shutil.rmtree(os.path.join(folder, "theta", "merge_w.w"))
    return False


def _bad_json(meta, folder):
    with open(os.path.join(folder, "meta", "metadata"), "w") as f:
        f.write("{not json")
    return False


CASES = [
    # --- training configs
    ("config-unknown-key", lambda w: w.train("--set", "learner.meta_bach=3"),
     "unknown config key learner.meta_bach"),
    ("config-wrong-type", lambda w: w.train("--set", "learner.meta_batch=abc"),
     "learner.meta_batch must be an integer"),
    ("config-out-of-range", lambda w: w.train("--set", "learner.meta_batch=0"),
     "learner.meta_batch must be >= 1"),
    ("config-nan", lambda w: w.train("--set", "learner.clip_norm=.nan"),
     "learner.clip_norm must be positive"),
    ("config-negative-flag", lambda w: w.train("--minutes", "-1"), "run.minutes"),
    ("config-progress", lambda w: w.train("--set", "run.progress_every_s=-1"),
     "run.progress_every_s must be >= 0"),
    ("config-evaluator-dataset",
     lambda w: w.train("--set", "evaluator.enabled=true", "--set", "evaluator.datasets=[digitz]"),
     "evaluator.datasets[0]: unknown source 'digitz'"),
    ("config-not-yaml", lambda w: ["train", "--config", w.folder("broken", {
        "c.yaml": "a: [\n"}) + "/c.yaml", "--out", w.new_out()], "c.yaml: not valid YAML"),
    ("config-missing", lambda w: ["train", "--config", w.path("nope.yaml"), "--out",
                                  w.new_out()], "config file not found"),
    ("out-is-a-file", lambda w: ["train", "--config", w.config, "--out", w.config],
     "is a file; choose a new --out"),
    ("out-is-a-run", lambda w: ["train", "--config", w.config, "--out", w.run],
     "is a run; choose a new --out or use --resume"),
    # --- task mixes
    ("mix-unknown-source", lambda w: w.mix("unknown", {"components": [{"source": "digitz"}]}),
     "components[0].source: unknown source 'digitz'"),
    ("mix-negative-weight", lambda w: w.mix("neg", {"components": [
        {"source": "digits", "weight": -1}]}), "components[0].weight must be a finite number"),
    ("mix-inf-weight", lambda w: w.mix("inf", {"components": [
        {"source": "digits", "weight": float("inf")}]}), "components[0].weight"),
    ("mix-zero-weights", lambda w: w.mix("zero", {"components": [
        {"source": "digits", "weight": 0}]}), "need at least one component with weight > 0"),
    ("mix-missing", lambda w: w.train("--set", "tasks.mix=tinyy"),
     "no packaged task mix named 'tinyy'"),
    # --- file: data
    ("file-nan", lambda w: w.file_mix("nan", w.npz("nan", _with(np.nan), _y())),
     "nan.npz: features x have NaN or inf values in 1 of 40 rows (first: row 3)"),
    ("file-inf", lambda w: w.file_mix("inf", w.npz("inf", _with(np.inf), _y())),
     "inf.npz: features x have NaN or inf"),
    ("file-empty", lambda w: w.file_mix("empty", w.npz(
        "empty", np.zeros((0, 5), np.float32), np.zeros(0, np.int64))), "empty.npz: no data"),
    ("file-one-class", lambda w: w.file_mix("one", w.npz("one", _x(), np.zeros(40, int))),
     "one.npz: labels y have a single class"),
    ("file-labels-length", lambda w: w.file_mix("short", w.npz("short", _x(), _y(30))),
     "short.npz: x has 40 rows but y has 30 labels"),
    ("file-x-1d", lambda w: w.file_mix("x1d", w.npz("x1d", _x()[:, 0], _y())),
     "x1d.npz: features x must be [N, D], [N, H, W] or [N, H, W, C]"),
    ("file-x-channels", lambda w: w.file_mix("x4d", w.npz(
        "x4d", np.zeros((40, 4, 4, 2), np.uint8), _y())), "with C = 1 or 3, got shape"),
    ("file-y-float", lambda w: w.file_mix("yf", w.npz("yf", _x(), _y().astype(float))),
     "yf.npz: labels y must be a 1-d integer array"),
    ("file-too-few-classes", lambda w: w.file_mix("ways", w.npz("ways", _x(), _y()),
                                                  ways=(3,)),
     "3-way tasks need 3 classes but file:"),
    ("file-not-npz", lambda w: w.file_mix("garbage", w.folder("g", {"x.npz": "text"})
                                          + "/x.npz"), "x.npz: cannot read it as .npz"),
    ("file-not-parquet", lambda w: w.file_mix("garbage_pq", w.folder(
        "gp", {"x.parquet": "text"}) + "/x.parquet"), "x.parquet: cannot read it as parquet"),
    ("file-missing", lambda w: w.file_mix("gone", w.path("gone.npz")),
     "components[0].source: data file"),
    ("file-in-eval", lambda w: ["eval", "pretrained:laptop", "--dataset",
                                "file:" + w.npz("eval_nan", _with(np.nan), _y()),
                                "--out", w.new_out()], "eval_nan.npz: features x have NaN"),
    ("file-in-table", lambda w: ["table", "pretrained:laptop", "--datasets",
                                 "file:" + w.npz("table_one", _x(), np.ones(40, int)),
                                 "--out", w.new_out()], "table_one.npz: labels y have a single"),
    # --- resume
    ("resume-changed-config", lambda w: ["train", "--resume", w.run, "--set",
                                         "learner.meta_batch=4"],
     "with a changed config: learner.meta_batch 2 -> 4; pass --allow-config-change"),
    ("resume-allowed-but-bad-data", lambda w: [
        "train", "--resume", w.run, "--allow-config-change", "--set",
        "tasks.mix=" + w.write_file_mix("resume", w.npz("resume_nan", _with(np.nan), _y()))],
     "resume_nan.npz: features x have NaN"),
    ("resume-other-project", lambda w: ["train", "--resume", w.folder("other", {
        "config.yaml": "model: resnet50\nepochs: 3\n", "checkpoints/best.pt": "weights"})],
     "config.yaml is not a metalearn training config: unknown config key epochs"),
    ("resume-not-a-run", lambda w: ["train", "--resume", w.folder("notes", {
        "notes.txt": "hello"})], "is not a metalearn run folder"),
    ("resume-no-checkpoint", lambda w: ["train", "--resume", w.folder("nockpt", {
        "config.yaml": open(w.config).read(), "checkpoints/.keep": "",
        "events.jsonl": '{"event": "session_start", "step": 0}\n'})],
     "has no complete checkpoint to resume from"),
    ("resume-config-not-yaml", lambda w: ["train", "--resume", w.folder("badyaml", {
        "config.yaml": "a: [\n", "checkpoints/.keep": ""})], "not valid YAML"),
    ("resume-missing", lambda w: ["train", "--resume", w.path("missing")],
     "run folder not found"),
    ("resume-theta-shape", lambda w: ["train", "--resume", w.run, "--allow-config-change",
                                      "--set", "rule.compute_h_size=7"],
     "this config's theta does not match the rule config"),
    # --- sweep specs
    ("sweep-bad-key", lambda w: w.sweep("bad_key", serach={}), "unknown sweep key serach"),
    ("sweep-search-key", lambda w: w.sweep("search_key", search={
        "learner.meta_bach": {"grid": [1, 2]}}), "search.learner.meta_bach"),
    ("sweep-low-above-high", lambda w: w.sweep("low_high", search={
        "learner.clip_norm": {"uniform": [5.0, 1.0]}}),
     "search.learner.clip_norm.uniform: low 5.0 > high 1.0"),
    ("sweep-log-zero", lambda w: w.sweep("log0", search={
        "learner.clip_norm": {"loguniform": [0.0, 1.0]}}),
     "search.learner.clip_norm.loguniform needs 0 < low"),
    ("sweep-negative", lambda w: w.sweep("neg", search={
        "learner.clip_norm": {"uniform": [-1.0, 1.0]}}),
     "search.learner.clip_norm = -1.0: learner.clip_norm must be positive"),
    ("sweep-high-end", lambda w: w.sweep("high", search={
        "learner.max_staleness": {"randint": [0, 0]}}), "randint needs low < high"),
    ("sweep-range-on-int", lambda w: w.sweep("int", search={
        "learner.meta_batch": {"uniform": [2.0, 8.0]}}),
     "search.learner.meta_batch: uniform draws floats"),
    ("sweep-trial-limit", lambda w: w.sweep("limit", search={"run.steps": {"grid": [1, 2]}}),
     "search.run.steps: run.steps is set by trial.steps"),
    ("sweep-set-bad", lambda w: w.sweep("set_bad", set={"learner.meta_batch": 0}),
     "learner.meta_batch must be >= 1"),
    ("sweep-num-samples", lambda w: w.sweep("samples", num_samples=0),
     "num_samples must be >= 1"),
    ("sweep-metric", lambda w: w.sweep("metric", metric="meta_los"),
     "metric: 'meta_los' is not a column"),
    ("sweep-asha", lambda w: w.sweep("asha", scheduler={"type": "asha",
                                                        "reduction_factor": 1}),
     "scheduler.reduction_factor must be > 1"),
    ("pbt-mutation-key", lambda w: w.sweep("mut_key", scheduler={"type": "pbt", "mutations": {
        "learner.clip_nrm": {"uniform": [1.0, 2.0]}}}),
     "scheduler.mutations.learner.clip_nrm"),
    ("pbt-mutation-range", lambda w: w.sweep("mut_range", scheduler={
        "type": "pbt", "mutations": {"learner.clip_norm": {"uniform": [2.0, 1.0]}}}),
     "scheduler.mutations.learner.clip_norm.uniform: low 2.0 > high 1.0"),
    ("pbt-mutation-value", lambda w: w.sweep("mut_value", scheduler={
        "type": "pbt", "mutations": {"learner.meta_batch": {"choice": [0, 2]}}}),
     "scheduler.mutations.learner.meta_batch = 0: learner.meta_batch must be"),
    ("pbt-mutation-theta", lambda w: w.sweep("mut_theta", scheduler={
        "type": "pbt", "mutations": {"rule.compute_h_size": {"choice": [6, 8]}}}),
     "scheduler.mutations.rule.compute_h_size = 8: PBT trials continue"),
    ("pbt-mutation-kind", lambda w: w.sweep("mut_grid", scheduler={
        "type": "pbt", "mutations": {"learner.clip_norm": {"grid": [1.0, 2.0]}}}),
     "scheduler.mutations.learner.clip_norm: use choice, uniform or loguniform"),
    ("pbt-quantile", lambda w: w.sweep("quantile", scheduler={
        "type": "pbt", "quantile_fraction": 0.9,
        "mutations": {"learner.clip_norm": {"uniform": [1.0, 2.0]}}}),
     "scheduler.quantile_fraction must be in [0, 0.5]"),
    ("sweep-missing", lambda w: ["sweep", w.path("nospec.yaml")], "sweep spec not found"),
    # --- exports
    ("export-not-an-export", lambda w: ["eval", w.folder("plain", {"a.txt": "x"}), "--out",
                                        w.new_out()], "is not a metalearn export"),
    ("export-a-run-folder", lambda w: ["table", w.run, "--out", w.new_out()],
     "is not a metalearn export"),
    ("export-other-rule", lambda w: ["eval", w.export("other_rule", _other_rule), "--out",
                                     w.new_out()], "does not match the rule config"),
    ("export-other-version", lambda w: ["table", w.export("newer", lambda m, f: m[
        "rule"].update(zzz=1)), "--out", w.new_out()],
     "the export's rule config does not load in this metalearn"),
    ("export-bad-metadata", lambda w: ["eval", w.export("bad_json", _bad_json), "--out",
                                       w.new_out()], "meta/metadata is not JSON"),
    ("export-damaged-theta", lambda w: ["eval", w.export("no_leaf", _drop_leaf), "--out",
                                        w.new_out()], "cannot read theta from the export"),
    ("export-no-such-pretrained", lambda w: ["eval", "pretrained:nope"],
     "no such pretrained rule"),
]


def folder_hashes(folder) -> dict:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = ""
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad_input"))
    config = tiny_config(root)
    path = os.path.join(root, "tiny.yaml")
    with open(path, "w") as f:
        f.write(config_to_yaml(config))
    run = RunDir(os.path.join(root, "run"))  # a run as create leaves it, one checkpoint
    run.create(config)
    os.makedirs(os.path.join(run.checkpoints, "3", "state"))
    with open(os.path.join(run.checkpoints, "3", "state", "data"), "wb") as f:
        f.write(b"checkpoint bytes")
    with open(os.path.join(run.path, "metrics.parquet"), "wb") as f:
        f.write(b"rows")
    return World(root, path, run.path)


@pytest.mark.parametrize("setup, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(world, setup, expected, capsys):
    import ray

    argv = setup(world)
    capsys.readouterr()
    before = folder_hashes(world.run)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("metalearn: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert folder_hashes(world.run) == before
    assert not os.path.exists(world.new_out())


def test_the_table_has_unique_ids():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
