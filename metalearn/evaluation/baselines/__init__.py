"""Baselines of ``metalearn eval``, and the one registry of their names (``BASELINES``).

Each baseline trains (or builds) a feature extractor on the same data, base architecture
and labelled examples as the learned rule, and is scored with the same readouts
(``metalearn.evaluation.readout.evaluate_features``). Its module exposes
``run(task, arch, config, progress, **options) -> rows``: one row per evaluation point
along its own training, ``{"step", "ridge_accuracy", "logreg_accuracy", ...}``.

Everything that needs baseline names (``EvalConfig`` validation and defaults, the
``--baselines`` flag of ``metalearn eval``, the report's legend and colours) reads them
from ``BASELINES``. The registry names each baseline's module rather than importing it,
like ``metalearn.cli.COMMANDS``: configs (``EvalConfig`` is part of the training config's
import chain) validate names without importing JAX and optax; a module is imported when
its baseline first runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from metalearn.core.config_io import ConfigError


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One registered baseline: its module's ``run`` and how reports name it."""

    name: str
    description: str  # one line: what is trained, what the features are
    label: str  # legend label in the report's plots
    colour: str  # matplotlib colour, fixed so figures compare across datasets
    module: str  # module whose ``run(task, arch, config, progress, **options)`` runs it
    options: tuple[tuple[str, Any], ...] = ()  # keyword arguments of that ``run``
    default: bool = True  # in ``EvalConfig``'s default list (``metalearn eval`` runs all)

    def run(self, task, arch, config, progress=None) -> list[dict]:
        """Rows of this baseline on ``task`` (see the module docstring)."""
        module = importlib.import_module(self.module)
        return module.run(task, arch, config, progress, **dict(self.options))


_PACKAGE = __name__

BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("random_init", "the base model at initialisation, exactly as the rule starts it, "
             "untrained", "random init", "tab:gray", f"{_PACKAGE}.random_init"),
    Baseline("vae", "variational auto-encoder, 3 x 128 with batch norm, latent 32, Adam 1e-4, "
             "on the unlabelled pool, features from the posterior means", "VAE", "tab:blue",
             f"{_PACKAGE}.vae"),
    Baseline("supervised", "the base architecture plus a softmax head, Adam 3e-3 on exactly "
             "the task's labelled examples, features from its 32-d top layer",
             "supervised (10/class)", "tab:green", f"{_PACKAGE}.supervised"),
    Baseline("pca", "the top 32 principal components of the unlabelled pool", "PCA",
             "tab:orange", f"{_PACKAGE}.pca"),
    Baseline("protonet", "prototypical network, fully connected 3 x 128, episodic on the "
             "labelled pool with a fresh input permutation per episode",
             "protonet (permuted)", "tab:purple", f"{_PACKAGE}.protonet",
             (("permute", True),)),
    Baseline("protonet_intact", "the same prototypical network trained on intact inputs",
             "protonet (intact)", "plum", f"{_PACKAGE}.protonet", (("permute", False),),
             default=False),
)}

NAMES: tuple[str, ...] = tuple(BASELINES)
DEFAULTS: tuple[str, ...] = tuple(name for name, b in BASELINES.items() if b.default)


def check(names) -> None:
    """Raise ConfigError naming the first of ``names`` that is not a registered baseline."""
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(NAMES)}")


def run(name: str, task, arch, config, progress=None) -> list[dict]:
    """Rows of baseline ``name`` on ``task`` (see the module docstring)."""
    check((name,))
    return BASELINES[name].run(task, arch, config, progress)


__all__ = ["Baseline", "BASELINES", "NAMES", "DEFAULTS", "check", "run"]
