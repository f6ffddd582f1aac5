"""Baselines for ``metalearn eval``: each trains (or builds) a feature extractor on the
same data, base architecture and labelled examples as the learned rule, and is scored
with the same readouts (``metalearn.evaluation.evaluate.evaluate_features``).

Every baseline module exposes ``run(task, arch, config, progress) -> rows``: one row
per evaluation point along its own training, ``{"step", "ridge_accuracy",
"logreg_accuracy", ...}``.

* ``random_init``: the base model at initialisation (no training).
* ``vae``: a variational auto-encoder, 3 x 128 with batch norm, latent 32, Adam 1e-4,
  trained on the unlabelled pool; features are the posterior means.
* ``supervised``: the base architecture plus a softmax head trained with Adam 3e-3 on
  exactly the task's 10 labelled examples per class; features are its 32-d top layer.
* ``pca``: the top 32 principal components of the unlabelled pool.
* ``protonet`` / ``protonet_intact``: prototypical networks (fully connected 3 x 128)
  trained episodically on the labelled pool with a fresh input permutation per episode /
  with intact inputs, evaluated on the task under a permutation never seen in training.
"""

from __future__ import annotations

import importlib

MODULES = {
    "random_init": "metalearn.evaluation.baselines.random_init",
    "vae": "metalearn.evaluation.baselines.vae",
    "supervised": "metalearn.evaluation.baselines.supervised",
    "pca": "metalearn.evaluation.baselines.pca",
    "protonet": "metalearn.evaluation.baselines.protonet",
    "protonet_intact": "metalearn.evaluation.baselines.protonet",
}


def run(name: str, task, arch, config, progress=None) -> list[dict]:
    """Rows of baseline ``name`` on ``task`` (see the module docstring)."""
    from metalearn.core.config import ConfigError
    if name not in MODULES:
        raise ConfigError(f"unknown baseline {name!r}; choose from {', '.join(MODULES)}")
    module = importlib.import_module(MODULES[name])
    if name.startswith("protonet"):
        return module.run(task, arch, config, progress, permute=(name == "protonet"))
    return module.run(task, arch, config, progress)
