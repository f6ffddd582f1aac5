"""metalearn export: bit-exact round trip, identical bytes, clear errors."""

import os

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from eval_helpers import make_run
from metalearn.cli import main
from metalearn.core.config import ConfigError, RuleConfig
from metalearn.training.export import export_run, load_export, load_theta, read_export_meta


def _tree_bytes(root):
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_round_trip_bit_exact_and_identical_exports(tmp_path, tiny_rule):
    run = tmp_path / "run-a"
    flat = make_run(run, tiny_rule, step=7, perturb=0.3)
    meta = export_run(str(run), str(tmp_path / "e1"))
    export_run(str(run), str(tmp_path / "sub" / "e2"))
    assert meta["step"] == 7 and meta["run"] == "run-a"
    assert meta["meta_loss"] == pytest.approx(1.6)  # rolling loss of the row at step 7
    loaded = load_export(str(tmp_path / "e1"))
    restored, _ = ravel_pytree(loaded.theta)
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(restored), flat)  # bit-exact
    assert loaded.rule == tiny_rule and loaded.step == 7
    assert loaded.meta["package_version"] and loaded.meta["num_params"] == flat.size
    a, b = _tree_bytes(tmp_path / "e1"), _tree_bytes(tmp_path / "sub" / "e2")
    assert a.keys() == b.keys() and len(a) > 5
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_a_different_rule_shape_is_a_clear_error(tmp_path, tiny_rule):
    make_run(tmp_path / "run", tiny_rule)
    export_run(str(tmp_path / "run"), str(tmp_path / "e"))
    other = RuleConfig.small(top_units=8, compute_h_size=10)
    with pytest.raises(ConfigError, match=r"does not match the rule config.*theta\["):
        load_export(str(tmp_path / "e"), rule=other)
    # Same shapes but another constant is fine.
    load_export(str(tmp_path / "e"), rule=RuleConfig.small(
        top_units=8, top_delta_size=4, compute_h_size=6, delta_dim=3, inner_lr=1e-4))


def test_metadata_claiming_another_rule_is_rejected(tmp_path, tiny_rule):
    import json
    make_run(tmp_path / "run", tiny_rule)
    export_run(str(tmp_path / "run"), str(tmp_path / "e"))
    path = tmp_path / "e" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["rule"]["compute_h_size"] = 12
    path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"does not match the rule config \(1697 parameters"):
        load_export(str(tmp_path / "e"))


def test_not_an_export(tmp_path, tiny_rule):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="is not a metalearn export"):
        load_export(str(tmp_path / "plain"))
    make_run(tmp_path / "run", tiny_rule)
    # A run folder reads as the theta `metalearn export` takes (here its newest, step 7).
    assert read_export_meta(str(tmp_path / "run"))["step"] == 7
    assert load_theta(str(tmp_path / "run"))[2] == 7
    with pytest.raises(FileNotFoundError):
        load_export(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="theta_latest"):
        export_run(str(tmp_path / "plain"), str(tmp_path / "x"))


def test_cli_export_and_refusals(tmp_path, tiny_rule, capsys):
    make_run(tmp_path / "run", tiny_rule, metrics=False)
    out = str(tmp_path / "e")
    assert main(["export", str(tmp_path / "run"), "--out", out]) == 0
    assert load_export(out).meta["meta_loss"] is None  # no metrics yet: said, not invented
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metalearn: error:") and "--force" in err and "\n" not in err
    assert main(["export", str(tmp_path / "run"), "--out", out, "--force"]) == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "notes"),
                 "--force"]) == 2
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_pretrained_names_resolve_to_packaged_exports(tmp_path, tiny_rule, monkeypatch):
    from metalearn.training import export as export_lib

    root = tmp_path / "pretrained"
    make_run(tmp_path / "run", tiny_rule, step=3)
    export_run(str(tmp_path / "run"), str(root / "mine"))
    (root / "not-an-export").mkdir()
    monkeypatch.setattr(export_lib, "pretrained_root", lambda: str(root))
    assert export_lib.pretrained_names() == ["mine"]
    loaded = load_export("pretrained:mine")
    assert loaded.step == 3 and loaded.rule == tiny_rule
    assert read_export_meta("pretrained:mine")["step"] == 3
    assert export_lib.resolve_checkpoint("some/path") == "some/path"
    with pytest.raises(ConfigError, match="pretrained:nope: no such pretrained rule; this "
                                          "package ships pretrained:mine"):
        load_export("pretrained:nope")


def test_shipped_pretrained_rule_loads_and_beats_random_features():
    """pretrained:laptop is in the package, says where it came from, and its features beat
    random-init features on held-out Fashion-MNIST after 100 inner steps (2 paired seeds;
    docs/results.md has the full table)."""
    from metalearn.evaluation.baselines import random_init
    from metalearn.evaluation.config import DataConfig, EvalConfig
    from metalearn.evaluation.data import load_data, make_task
    from metalearn.evaluation.rollout import architecture, learned_rule_curve
    from metalearn.training.export import pretrained_names, pretrained_root

    assert "laptop" in pretrained_names()
    rule = load_export("pretrained:laptop")
    assert rule.rule.inner_lr == pytest.approx(3e-3) and rule.step > 0
    provenance = open(os.path.join(pretrained_root(), "laptop", "PROVENANCE.md")).read()
    for needed in ("commit", "metalearn train", "learner step", "| fashion_mnist"):
        assert needed in provenance
    data = load_data(DataConfig(dataset="fashion_mnist", image_size=14, test_size=500))
    arch = architecture(data.input_size, 128, 4, "relu", rule.rule.top_units)
    gains = []
    for seed in range(2):
        task = make_task(data, seed, 10, 10)
        rows, _ = learned_rule_curve(rule.theta, rule.rule, arch, task, [100])
        base = random_init.run(task, arch, EvalConfig())
        gains.append(rows[-1]["ridge_accuracy"] - base[-1]["ridge_accuracy"])
    assert np.mean(gains) > 0.05, gains
