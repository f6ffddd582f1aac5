"""The evaluation report: results tables (parquet + markdown) and PNG plots.

Files written by ``write_report`` into the output folder:

* ``results.parquet``: one row per (method, seed, evaluation step) with both readouts;
* ``summary.parquet``, ``results.md``: mean and standard error over seeds, and the mean
  collapse diagnostics ``rank90`` / ``w_growth``; ``results.md`` has the final step per
  method and a method x step table at every evaluated horizon;
* ``accuracy_vs_steps.png``: 10-shot accuracy of every method along its training;
* ``receptive_fields.png``: first-layer weights of the learned-rule base model (seed 0)
  before and after inner training, one tile per unit;
* ``representation_pca.png``: PCA of the 32-d top-layer representation of the test set
  before and after inner training, coloured by class, with explained variance;
* ``sweep.png`` (with ``--vary``): accuracy against the swept setting.

``write_eval_report`` adds ``info.json`` and the title of a ``metalearn eval`` run.
``plot_meta_training(rows, run_dir)`` draws a run's metrics table (``metalearn plot``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.decomposition import PCA

from metalearn.evaluation.baselines import BASELINES
from metalearn.evaluation.rollout import base_features
from metalearn.evaluation.run import LEARNED, summarise
from metalearn.evaluation.sweep import SweepResult

# Colours fixed per method so figures compare across datasets.
COLOURS = {LEARNED: "tab:red", **{name: b.colour for name, b in BASELINES.items()}}
LABELS = {LEARNED: "learned rule", **{name: b.label for name, b in BASELINES.items()}}


def _plt():
    # The backend is chosen when the first plot is drawn, not when this module is imported
    # (an importer with its own backend keeps it until then).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _write_parquet(rows: Sequence[dict], path: str) -> None:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)


def _fmt(mean: float, se: float) -> str:
    return "n/a" if not math.isfinite(mean) else f"{mean:.3f} ± {se:.3f}"


def _diag(value, fmt: str) -> str:
    return "" if value is None else "n/a" if not math.isfinite(value) else format(value, fmt)


def horizon_table(rows: Sequence[dict]) -> list[str]:
    """Markdown lines of a method x step table: each cell the ridge accuracy ± se, then
    ``rank90`` (r) and ``w_growth`` (W x) where the method has them."""
    steps = sorted({r["step"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in sorted(
        rows, key=lambda r: (r["method"] != LEARNED, r["method"]))))
    cells = {(r["method"], r["step"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for method in methods:
        out = []
        for step in steps:
            r = cells.get((method, step))
            if r is None:
                out.append("")
                continue
            text = _fmt(r["accuracy"], r["accuracy_se"])
            if r.get("rank90") is not None:
                text += f", r {_diag(r['rank90'], '.1f')}"
            if r.get("w_growth") is not None:
                text += f", W x{_diag(r['w_growth'], '.2f')}"
            out.append(text)
        lines.append(f"| {method} | " + " | ".join(out) + " |")
    return lines


def markdown_table(summary: Sequence[dict], title: str, info: dict) -> str:
    """Final accuracies per method, the per-horizon table (accuracy and collapse
    diagnostics at every evaluated step), then every evaluation point in long form."""
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if v is not None]  # None: not known
    lines += ["", "Accuracy: mean ± standard error over seeds, 10-shot linear readouts on "
              "the test set. r: principal components explaining 90% of the variance of "
              "the test set's top-layer representation (rank90; 1-2 = collapsed); W x: "
              "growth of the first layer's weight norm since step 0 (w_growth), both "
              "averaged over seeds.", ""]
    sweeps = sorted({(r.get("sweep"), str(r.get("sweep_value"))) for r in summary},
                    key=lambda t: (str(t[0]), _sort_key(t[1])))
    for sweep, value in sweeps:
        rows = [r for r in summary if (r.get("sweep"), str(r.get("sweep_value"))) ==
                (sweep, value)]
        if sweep is not None:
            lines += [f"## {sweep} = {value}", ""]
        finals: dict[str, dict] = {}
        for r in rows:
            if r["method"] not in finals or r["step"] > finals[r["method"]]["step"]:
                finals[r["method"]] = r
        lines += ["| method | steps | ridge accuracy | logistic accuracy | seeds |",
                  "|---|---:|---:|---:|---:|"]
        for method, r in finals.items():
            lines.append(f"| {method} | {r['step']} | {_fmt(r['accuracy'], r['accuracy_se'])} "
                         f"| {_fmt(r['logreg_accuracy'], r['logreg_accuracy_se'])} "
                         f"| {r['seeds']} |")
        lines += ["", "Per horizon (ridge accuracy, rank90, weight growth):", ""]
        lines += horizon_table(rows)
        lines += ["", "<details><summary>every evaluation point</summary>", "",
                  "| method | step | ridge accuracy | logistic accuracy | rank90 | w_growth |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["method"], r["step"])):
            lines.append(f"| {r['method']} | {r['step']} | "
                         f"{_fmt(r['accuracy'], r['accuracy_se'])} | "
                         f"{_fmt(r['logreg_accuracy'], r['logreg_accuracy_se'])} | "
                         f"{_diag(r.get('rank90'), '.1f')} | "
                         f"{_diag(r.get('w_growth'), '.2f')} |")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def _sort_key(value: str):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def plot_accuracy(summary: Sequence[dict], path: str, title: str) -> None:
    """Accuracy (ridge, with standard-error bands) against each method's training steps;
    methods without training (PCA, random init) as horizontal lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    max_step = max([r["step"] for r in summary] + [1])
    for ax, metric, name in ((axes[0], "accuracy", "ridge readout"),
                             (axes[1], "logreg_accuracy", "logistic-regression readout")):
        for method in dict.fromkeys(r["method"] for r in summary):
            rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["step"])
            steps = np.array([r["step"] for r in rows], float)
            mean = np.array([r[metric] for r in rows])
            se = np.array([r[f"{metric}_se"] for r in rows])
            colour, label = COLOURS.get(method), LABELS.get(method, method)
            if len(rows) == 1:
                ax.axhline(mean[0], color=colour, ls="--", label=label)
                ax.axhspan(mean[0] - se[0], mean[0] + se[0], color=colour, alpha=0.15)
            else:
                ax.plot(steps, mean, "o-", color=colour, label=label, ms=3)
                ax.fill_between(steps, mean - se, mean + se, color=colour, alpha=0.2)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(0, max_step * 1.1)
        ax.set_xlabel("training steps (inner steps for the learned rule)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("10-shot test accuracy")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tiles(w: np.ndarray, image_shape, max_units: int) -> list[np.ndarray]:
    units = min(w.shape[1], max_units)
    h, wd = image_shape[:2]
    c = image_shape[2] if len(image_shape) > 2 else 1
    tiles = []
    for j in range(units):
        tile = w[:, j].reshape(h, wd, c)
        tile = tile.mean(axis=-1) if c > 1 else tile[..., 0]
        tiles.append(tile)
    return tiles


def plot_receptive_fields(w_before: np.ndarray, w_after: np.ndarray, image_shape, path: str,
                          title: str, max_units: int = 32) -> None:
    """First-layer weights [N_0, N_1] as images (one tile per unit, each scaled to its own
    range) before and after training; for vector data, the matrices as heat maps."""
    plt = _plt()
    if image_shape is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, w, name in ((axes[0], w_before, "before"), (axes[1], w_after, "after")):
            lim = float(np.abs(w).max()) or 1.0
            im = ax.imshow(w[:, :max_units].T, cmap="RdBu_r", vmin=-lim, vmax=lim,
                           aspect="auto")
            ax.set_title(f"{name}: W1 (units x inputs)")
            fig.colorbar(im, ax=ax)
    else:
        cols = 8
        rows = math.ceil(min(w_before.shape[1], max_units) / cols)
        fig, axes = plt.subplots(rows, 2 * cols + 1, figsize=(2 * cols * 0.9 + 0.5, rows * 0.95))
        axes = np.atleast_2d(axes)
        for ax in axes.ravel():
            ax.axis("off")
        for offset, w, name in ((0, w_before, "before"), (cols + 1, w_after, "after")):
            for j, tile in enumerate(_tiles(w, image_shape, max_units)):
                lim = float(np.abs(tile).max()) or 1.0
                axes[j // cols, offset + j % cols].imshow(tile, cmap="RdBu_r", vmin=-lim,
                                                          vmax=lim)
            axes[0, offset + cols // 2].set_title(f"{name} inner training", fontsize=9)
    change = float(np.linalg.norm(w_after - w_before) / (np.linalg.norm(w_before) or 1.0))
    fig.suptitle(f"{title}\nfirst-layer receptive fields (||W_after - W_before|| / "
                 f"||W_before|| = {change:.3g})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_representation_pca(reps: dict, labels: np.ndarray, path: str, title: str) -> None:
    """reps: name -> [N, 32] representations of the same examples. For each: scatter of
    the first two principal components by class, and the explained variance ratio."""
    plt = _plt()
    fig, axes = plt.subplots(2, len(reps), figsize=(5 * len(reps), 8.5), squeeze=False)
    for i, (name, rep) in enumerate(reps.items()):
        rep = np.asarray(rep, np.float64)
        if not np.isfinite(rep).all():
            axes[0, i].set_title(f"{name}: non-finite representation")
            continue
        pca = PCA(n_components=min(rep.shape[1], rep.shape[0])).fit(rep)
        proj = pca.transform(rep)
        ax = axes[0, i]
        scatter = ax.scatter(proj[:, 0], proj[:, 1] if proj.shape[1] > 1 else 0 * proj[:, 0],
                             c=labels, cmap="tab10", s=6, alpha=0.7)
        ax.set_title(f"{name}: first two principal components")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(*scatter.legend_elements(), fontsize=6, title="class", loc="best")
        ratio = pca.explained_variance_ratio_
        ax = axes[1, i]
        ax.bar(np.arange(1, len(ratio) + 1), ratio, color="tab:blue", label="per component")
        ax.plot(np.arange(1, len(ratio) + 1), np.cumsum(ratio), "k.-", label="cumulative")
        ax.set_xlabel("principal component")
        ax.set_ylabel("explained variance ratio")
        ax.set_ylim(0, 1.02)
        k90 = int(np.searchsorted(np.cumsum(ratio), 0.9) + 1)
        ax.set_title(f"{name}: {k90} components explain 90%")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(summary: Sequence[dict], path: str, title: str) -> None:
    """Learned rule: accuracy at step 0 (random init) and at the last step per value."""
    plt = _plt()
    rows = [r for r in summary if r["method"] == LEARNED and r.get("sweep")]
    sweep = rows[0]["sweep"]
    values = sorted({str(r["sweep_value"]) for r in rows}, key=_sort_key)
    last = max(r["step"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(len(values))
    for step, style, label in ((0, "s--", "before inner training (step 0)"),
                               (last, "o-", f"after {last} inner steps")):
        pts = [next((r for r in rows if str(r["sweep_value"]) == v and r["step"] == step),
                    None) for v in values]
        mean = np.array([p["accuracy"] if p else np.nan for p in pts])
        se = np.array([p["accuracy_se"] if p else 0.0 for p in pts])
        ax.errorbar(x, mean, yerr=se, fmt=style, capsize=3, label=label,
                    color="tab:gray" if step == 0 else "tab:red")
    ax.set_xticks(x, values)
    ax.set_xlabel(sweep)
    ax.set_ylabel("10-shot test accuracy (ridge)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str, rows: Sequence[dict], title: str, info: dict,
                 extras: dict | None = None) -> dict:
    """Tables and plots; returns {name: path}. ``extras`` may hold ``params_init``,
    ``params_final``, ``arch``, ``rule``, ``task`` (seed 0) and ``image_shape`` for the
    receptive-field and representation plots."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarise(rows)
    paths = {"results": os.path.join(out_dir, "results.parquet"),
             "summary": os.path.join(out_dir, "summary.parquet"),
             "markdown": os.path.join(out_dir, "results.md")}
    _write_parquet(rows, paths["results"])
    _write_parquet(summary, paths["summary"])
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(summary, title, info))
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    if any(r.get("sweep") for r in summary):
        paths["sweep"] = os.path.join(out_dir, "sweep.png")
        plot_sweep(summary, paths["sweep"], title)
    else:
        paths["accuracy"] = os.path.join(out_dir, "accuracy_vs_steps.png")
        plot_accuracy(summary, paths["accuracy"], title)
    extras = extras or {}
    if extras.get("params_final") is not None:
        before, after = extras["params_init"], extras["params_final"]
        paths["receptive_fields"] = os.path.join(out_dir, "receptive_fields.png")
        plot_receptive_fields(np.asarray(before.w[0]), np.asarray(after.w[0]),
                              extras.get("image_shape"), paths["receptive_fields"], title)
        task, arch, rule = extras["task"], extras["arch"], extras["rule"]
        x = np.concatenate([task.x_train, task.x_test])
        reps = {"before inner training": base_features(before, arch, rule.base_bn_eps)(x),
                "after inner training": base_features(after, arch, rule.base_bn_eps)(x)}
        n = len(task.x_train)
        reps = {k: v[n:] for k, v in reps.items()}
        paths["representation_pca"] = os.path.join(out_dir, "representation_pca.png")
        plot_representation_pca(reps, task.y_test, paths["representation_pca"],
                                 f"{title}: 32-d representation of the test set")
    return paths


def write_eval_report(out_dir: str, result: SweepResult, source: dict) -> dict:
    """The report of a ``metalearn eval`` run (``run_sweep``'s result) with ``info.json``;
    ``source`` describes the rule (``checkpoint``, ``run``, ``rule_step``, ``meta_loss``)
    and leads the info. Returns {name: path} as ``write_report``."""
    config, sweep, first = result.config, result.sweep, result.first
    image_size = config.data.image_size
    info = {**source, "dataset": config.data.dataset, "image_size": image_size or "native",
            "input_size": first.data.input_size, "classes": first.task0.num_classes,
            "pool_examples": len(first.data.x_pool), "test_examples": len(first.task0.x_test),
            "width": config.width, "depth": config.depth, "activation": config.activation,
            "inner_steps": config.steps, "seeds": config.seeds, "batch_size": config.batch_size,
            "baselines": list(config.baselines), "baseline_steps": config.baseline_steps,
            "supervised_steps": config.supervised_steps, "sweep": sweep,
            "seconds_per_method": {k: round(v, 1) for k, v in result.seconds.items()}}
    model = f"{config.width}x{config.depth} {config.activation}"
    if sweep:
        model = f"{sweep} sweep (others as {model})"
    pixels = "resolution swept" if sweep == "resolution" else f"{image_size or 'native'} px"
    title = (f"{config.data.dataset} ({pixels}), {model}, "
             f"rule {source.get('run')}@{source.get('rule_step')}")
    extras = None
    if not sweep:
        extras = {"params_init": first.params_init, "params_final": first.params_final,
                  "arch": first.arch, "rule": first.rule, "task": first.task0,
                  "image_shape": first.data.image_shape}
    return write_report(out_dir, result.rows, title, info, extras)


# ---------------------------------------------------------------------------
# meta-training curves

def plot_meta_training(rows: list[dict], run_dir: str, out: str | None = None,
                       best: tuple[list[tuple[int, float]], str] | None = None) -> str:
    """Meta-training curves from a run's metrics ``rows`` (one dict a learner step, as
    ``metalearn.training.metrics.read_metric_rows`` gives them): the rolling meta-loss and the per-dataset meta-train losses (``loss/<dataset>``) against
    learner steps, with the held-out evaluator's ``eval/<dataset>/meta_loss`` beside them
    and its accuracies (``eval/<dataset>/accuracy``, and the long-horizon
    ``eval/<dataset>/accuracy@<h>`` dashed) in a second panel when present.
    ``best``: the exported best's score by step and its column (``training.best.best_so_far``),
    drawn as a step line over the accuracies. ``out`` defaults to ``meta_training.png``
    in ``run_dir``; the title is its name."""
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no metrics rows yet")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    train_cols = [c for c in columns if c.startswith("loss/")]
    eval_loss = [c for c in columns if c.startswith("eval/") and c.endswith("/meta_loss")]
    eval_acc = [c for c in columns if c.startswith("eval/") and c.endswith("/accuracy")]
    # Long-horizon accuracies (``eval/<dataset>/accuracy@<h>``), only in some rows.
    long_acc = [c for c in columns if c.startswith("eval/") and "/accuracy@" in c]

    def series(col):
        pts = [(r["step"], r[col]) for r in rows
               if r.get(col) is not None and r.get("step") is not None
               and math.isfinite(r[col])]
        return np.array(pts, float).reshape(-1, 2)

    theta_cols = [c for c in columns if c.startswith("theta/merge_w/")]

    plt = _plt()
    panels = 1 + bool(eval_acc or long_acc) + bool(theta_cols)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    cmap = plt.get_cmap("tab10")
    for i, col in enumerate(train_cols):
        s = series(col)
        ax.plot(s[:, 0], s[:, 1], color=cmap(i % 10), label=f"meta-train {col[5:]}")
    for i, col in enumerate(eval_loss):
        s = series(col)
        ax.plot(s[:, 0], s[:, 1], "o--", ms=3, color=cmap((len(train_cols) + i) % 10),
                label=f"held-out {col[5:-10]}")
    if "meta_loss_rolling" in columns:
        s = series("meta_loss_rolling")
        ax.plot(s[:, 0], s[:, 1], "k-", lw=2, alpha=0.6, label="all (rolling)")
    ax.set_xlabel("learner step")
    ax.set_ylabel("meta-objective (ridge loss)")
    ax.set_title("meta-training curves per dataset")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    panel = 1
    if eval_acc or long_acc:
        ax = axes[0, panel]
        panel += 1
        for i, col in enumerate(eval_acc):
            s = series(col)
            ax.plot(s[:, 0], s[:, 1], "o-", ms=3, color=cmap((len(train_cols) + i) % 10),
                    label=col[5:-9])
        for i, col in enumerate(long_acc):
            s = series(col)
            ax.plot(s[:, 0], s[:, 1], "s--", ms=3,
                    color=cmap((len(train_cols) + len(eval_acc) + i) % 10),
                    label=col[5:].replace("/accuracy@", " @") + " inner steps")
        if best is not None:
            points, column = best
            s = np.array(points, float).reshape(-1, 2)
            ax.step(s[:, 0], s[:, 1], "k-", where="post", lw=1.5, alpha=0.7,
                    label=f"best so far ({column[5:]}, exported)")
        ax.set_xlabel("learner step")
        ax.set_ylabel("10-shot accuracy (validation / held out)")
        ax.set_title("continuous evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if theta_cols:
        ax = axes[0, panel]
        for i, col in enumerate(theta_cols):
            pts = [(r["wall_s"] / 60.0, r[col]) for r in rows
                   if r.get(col) is not None and r.get("wall_s") is not None]
            s = np.array(pts, float).reshape(-1, 2)
            ax.plot(s[:, 0], s[:, 1], color=plt.get_cmap("tab20")(i % 20),
                    label=col[len("theta/merge_w/"):])
        ax.set_xlabel("meta-training wall time (minutes)")
        ax.set_ylabel("mixing weight")
        ax.set_title("the rule's merge weights")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "meta_training.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["write_report", "write_eval_report", "plot_meta_training", "plot_accuracy",
           "plot_receptive_fields", "plot_representation_pca", "plot_sweep", "markdown_table",
           "horizon_table",
           "COLOURS", "LABELS"]
