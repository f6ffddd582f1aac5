"""Plot the estimator comparison (docs/estimators.md) from its run folders and tables.

    python experiments/estimators/plot_comparison.py --runs DIR --out docs/estimators_comparison.png

DIR holds cmp-<estimator>/ (run folders of `metalearn train`), table-<estimator>/ and
optionally table-init/ (`metalearn table` outputs, heldout.json). Left: the live
long-horizon evaluation (`eval/fashion_mnist/accuracy@1000`, one seed, the evaluator's
own inputs) against meta-training wall time; right: the held-out table at 100 / 1,000 /
3,000 inner steps of each run's final rule.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from metalearn.training.metrics import read_metrics  # noqa: E402

ESTIMATORS = ("truncated", "pes", "es", "hybrid")
COLORS = {"truncated": "C0", "pes": "C1", "es": "C2", "hybrid": "C3", "init": "grey"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    fig, (live, table) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in ESTIMATORS:
        path = os.path.join(args.runs, f"cmp-{name}")
        if os.path.exists(path):
            rows = read_metrics(path).to_pandas()
            rows = rows.dropna(subset=["eval/fashion_mnist/accuracy@1000"])
            line, = live.plot(rows.wall_s / 60, rows["eval/fashion_mnist/accuracy@1000"],
                              "o-", label=name, color=COLORS[name])
            for _, r in rows.iterrows():
                live.annotate(f"r{int(r['eval/fashion_mnist/rank90@1000'])}",
                              (r.wall_s / 60, r["eval/fashion_mnist/accuracy@1000"]),
                              fontsize=7, color=line.get_color())
    live.set(xlabel="meta-training wall time (min)", ylabel="accuracy after 1,000 inner steps",
             title="live evaluation (1 seed; rN = rank90)")
    live.legend()
    names = ("init",) + ESTIMATORS
    for name in names:
        path = os.path.join(args.runs, f"table-{name}", "heldout.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)["summary"]
        learned = [s for s in summary if s["method"] == "learned"]
        label = "untrained start" if name == "init" else name
        table.errorbar([s["step"] for s in learned], [s["accuracy"] for s in learned],
                       yerr=[s["accuracy_se"] for s in learned], marker="o", capsize=3,
                       label=label, color=COLORS[name], linestyle="--" if name == "init" else "-")
        for s in summary:
            if s["method"] == "random_init":
                table.axhline(s["accuracy"], color="black", linewidth=0.8)
                table.text(100, s["accuracy"] + 0.005, "random-init features", fontsize=7)
    table.set(xscale="log", xlabel="inner steps on held-out Fashion-MNIST",
              ylabel="10-shot accuracy", title="held-out table after 10 minutes (2 seeds)")
    table.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
