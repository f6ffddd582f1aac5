"""Continuous evaluation during meta-training: ``ContinuousEvaluator``, the small-budget
version of ``metalearn eval`` that the driver's evaluator actor
(``metalearn.distributed.evaluator``) or the local runner runs on the latest theta.

Two kinds of rollout: a short one every ``evaluator.every`` learner steps (the
meta-objective and the final accuracy after ``evaluator.steps`` inner steps), and a long
one every ``evaluator.long_every`` steps, measured at the fixed ``evaluator.horizons``
(accuracy, ``rank90``, ``w_growth``): rules that look good for tens of inner steps can
collapse at a thousand, and only a held-out measure at a fixed horizon compares thetas
of different runs (the training meta-loss depends on the unroll lengths and tasks drawn).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core.config import MetaObjectiveConfig, RuleConfig
from metalearn.core.config_io import ConfigError
from metalearn.core.meta_objective import make_pair, meta_objective
from metalearn.core.theta import theta_spec
from metalearn.evaluation.config import ContinuousEvalConfig, DataConfig
from metalearn.evaluation.data import default_image_size, load_data, make_task
from metalearn.evaluation.diagnostics import weight_growth
from metalearn.evaluation.readout import evaluate_features
from metalearn.evaluation.rollout import (CONTINUOUS_STREAM, architecture, base_features,
                                          rollout)

DRAW_STREAM = 3  # numpy stream [task seed, 3] of the meta-objective's labelled draws


class ContinuousEvaluator:
    """Rolls a theta out on held-out datasets; returns metrics columns for the run.

    ``evaluate(step, theta)`` with theta a pytree or the learner's flat vector returns
    ``{"step": step, "eval/<dataset>/meta_loss": ..., "eval/<dataset>/accuracy": ...,
    "eval/<dataset>/logreg_accuracy": ..., "eval_s": ...}``: the meta-objective
    (mean over the rollout's inner steps, fixed labelled draws) and the final 10-shot
    ridge / logistic accuracy, each averaged over ``seeds``. With ``long=True`` it adds,
    for each long dataset and horizon h, ``eval/<dataset>/accuracy@<h>`` (ridge),
    ``eval/<dataset>/rank90@<h>`` and ``eval/<dataset>/w_growth@<h>`` (means over seeds
    of finite values) and ``eval_long_s``; ``short=False`` leaves the short columns out.
    Data, tasks and labelled draws are fixed at construction, so successive thetas are
    compared on the same tasks.
    """

    def __init__(self, config: ContinuousEvalConfig, rule: RuleConfig,
                 objective: MetaObjectiveConfig = MetaObjectiveConfig()):
        self.config, self.rule, self.objective = config, rule, objective
        # Rollouts may take fewer steps at a larger inner lr (the horizon that matters is
        # inner_lr x steps); the rule's own lr is what exports and reports use.
        self.rollout_rule = (rule if not config.inner_lr
                             else dataclasses.replace(rule, inner_lr=config.inner_lr))
        self._datasets = []
        self.skipped: dict[str, str] = {}
        for name in config.datasets:
            try:
                # 0: the resolution `metalearn eval` and `table` use (14 px for images
                # larger than 16 px), so validation selects on the protocol that reports.
                image_size = config.image_size or default_image_size(name, config.data_dir)
                data = load_data(DataConfig(dataset=name, image_size=image_size,
                                            data_dir=config.data_dir, shots=config.shots,
                                            test_size=config.test_size))
            except FileNotFoundError as err:
                # A held-out set missing on this machine must not stop meta-training.
                self.skipped[name] = str(err)
                print(f"continuous evaluation: skipping {name}: {err}", file=sys.stderr)
                continue
            arch = architecture(data.input_size, config.width, config.depth,
                                config.activation, rule.top_units)
            count = max(config.seeds, config.long_seeds)
            tasks = [make_task(data, seed, 10, config.shots) for seed in range(count)]
            pairs = [self._labelled_pair(task) for task in tasks]
            self._datasets.append((name, arch, tasks, pairs))
        if not self._datasets:
            raise ConfigError(f"evaluator.datasets: none of {list(config.datasets)} is "
                              f"available here ({'; '.join(self.skipped.values())})")
        available = [d[0] for d in self._datasets]
        # Empty long_datasets: the first dataset that loaded (a missing one gives way).
        wanted = (config.long_datasets or available[:1]) if config.long_every else ()
        self.long_datasets = tuple(d for d in self._datasets if d[0] in wanted)
        self._loss = jax.jit(meta_objective, static_argnums=(2, 3, 4))

    def _labelled_pair(self, task):
        """The meta-objective's fixed labelled draws of ``task`` (train from the pool,
        test from the test set, ``samples_per_class`` each)."""
        rng = np.random.default_rng([task.seed, DRAW_STREAM])
        k, spc = task.num_classes, self.objective.samples_per_class
        draws = []
        for _ in range(self.objective.num_draws):
            tr = np.concatenate([rng.choice(np.flatnonzero(task.y_pool == c), spc)
                                 for c in range(k)])
            te = np.concatenate([rng.choice(np.flatnonzero(task.y_test == c), spc)
                                 for c in range(k)])
            draws.append((task.x_pool[tr], task.y_pool[tr], task.x_test[te], task.y_test[te]))
        return make_pair(*(np.stack(d) for d in zip(*draws)), k)

    def _unravel(self, theta):
        if isinstance(theta, np.ndarray) or getattr(theta, "ndim", None) == 1:
            spec = theta_spec(self.rule)
            flat = np.asarray(theta, np.float32)
            if flat.shape != (spec.num_params,):
                raise ConfigError(f"theta has {flat.size} parameters; rule config needs "
                                  f"{spec.num_params}")
            return spec.unravel(flat)
        return theta

    def evaluate(self, step: int, theta, *, short: bool = True, long: bool = False) -> dict:
        """The metrics columns of ``theta`` at learner ``step`` (see the class)."""
        started = time.monotonic()
        theta = jax.tree.map(jnp.asarray, self._unravel(theta))
        row: dict = {"step": int(step)}
        if short:
            row.update(self._short(theta))
            row["eval_s"] = time.monotonic() - started
        if long and self.long_datasets:
            started = time.monotonic()
            row.update(self._long(theta))
            row["eval_long_s"] = time.monotonic() - started
        return row

    def _short(self, theta) -> dict:
        row = {}
        for name, arch, tasks, pairs in self._datasets:
            losses, accs, logregs = [], [], []
            seeds = self.config.seeds
            for task, pair in zip(tasks[:seeds], pairs[:seeds]):
                step_losses = []
                for k, params in rollout(theta, self.rollout_rule, arch, task.x_pool,
                                         seed=task.seed,
                                         steps=self.config.steps,
                                         batch_size=self.config.batch_size,
                                         stream=CONTINUOUS_STREAM):
                    if k > 0:
                        step_losses.append(self._loss(params, pair, arch, self.objective,
                                                      self.rule.base_bn_eps))
                losses.append(float(np.mean([float(v) for v in step_losses])))
                acc = evaluate_features(base_features(params, arch, self.rule.base_bn_eps),
                                        task)
                accs.append(acc["ridge_accuracy"])
                logregs.append(acc["logreg_accuracy"])
            row[f"eval/{name}/meta_loss"] = float(np.mean(losses))
            row[f"eval/{name}/accuracy"] = float(np.mean(accs))
            row[f"eval/{name}/logreg_accuracy"] = float(np.mean(logregs))
        return row

    def _long(self, theta) -> dict:
        """One rollout per seed to the largest horizon, measured at every horizon."""
        horizons = set(self.config.horizons)
        row = {}
        seeds = self.config.long_seeds or self.config.seeds
        for name, arch, tasks, _ in self.long_datasets:
            values: dict[str, list[float]] = {}
            for task in tasks[:seeds]:
                # The same seed and stream as the short rollout: its first steps are the
                # short rollout's, so the two kinds of column describe one trajectory.
                for k, params in rollout(theta, self.rollout_rule, arch, task.x_pool,
                                         seed=task.seed,
                                         steps=max(horizons),
                                         batch_size=self.config.batch_size,
                                         stream=CONTINUOUS_STREAM):
                    if k == 0:
                        params_init = params
                    if k not in horizons:
                        continue
                    acc = evaluate_features(base_features(params, arch,
                                                          self.rule.base_bn_eps), task)
                    for metric, value in (("accuracy", acc["ridge_accuracy"]),
                                          ("rank90", acc["rank90"]),
                                          ("w_growth", weight_growth(params_init, params))):
                        values.setdefault(f"eval/{name}/{metric}@{k}", []).append(value)
            for column, vals in values.items():
                arr = np.asarray(vals, np.float64)
                finite = arr[np.isfinite(arr)]  # a diverged seed: NaN, skipped
                row[column] = float(finite.mean()) if finite.size else float("nan")
        return row


__all__ = ["ContinuousEvaluator"]
