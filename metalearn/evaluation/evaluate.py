"""Evaluation of a learned rule on held-out data (SPEC section 6).

The protocol, per seed:

1. a dataset is split once (seeded) into an unlabelled *pool* and a labelled *test* set;
   when it has more classes than ``ways``, each seed picks its own class subset;
2. a fresh base model (``Architecture``: input -> width x depth -> 32) is initialised and
   the learned rule trains it on unlabelled batches drawn from the pool;
3. at evaluation points along inner training, ``shots`` labelled examples per class are
   drawn from the pool (the same draw for every method of that seed), the model's 32-d
   top-layer features of those and of the test set are computed in one batch (they share
   batch-norm statistics, as in the meta-objective), and two linear readouts are fitted:
   the meta-objective's closed-form ridge (``ridge_accuracy``) and a logistic regression;
4. accuracy on the test set is averaged over seeds (mean and standard error).

``run_evaluation`` does this for the learned rule and the baselines
(``metalearn.evaluation.baselines``); ``ContinuousEvaluator`` is the small-budget version used
during meta-training (see ``metalearn.distributed.evaluator``).

Inner steps run as one jitted ``inner_step`` per step, dispatched from Python. A
``lax.fori_loop`` / ``lax.scan`` over the paper-size rule was 5-7x slower per step on
XLA's CPU backend here (2.6 s vs 0.4-0.6 s per step, 4 x 128 model, loaded machine);
see NOTES-APIS.md on rolled loops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Callable, Sequence

import numpy as np

from metalearn.core.config import ACTIVATIONS, ConfigError, MetaObjectiveConfig, RuleConfig

FeatureFn = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------
# data

@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data and how much of it.

    dataset: a ``tasks.sources`` name (``digits``, ``fashion_mnist``, ``two_moons``,
      ``mnist``, ``imdb``, ``imagenet16``, ``file:PATH``...).
    image_size: 0 keeps the native resolution; 14, 16 or 28 resizes images.
    group: restrict classes to a source group (e.g. ``held_out`` of ``imagenet16``).
    ways: classes per task; datasets with more classes draw a subset per seed.
    shots: labelled examples per class for the readouts (the paper's 10-shot).
    test_size: labelled test examples (at most).
    pool_size: unlabelled examples the rule and the unsupervised baselines train on.
    """

    dataset: str = "digits"
    image_size: int = 0
    group: str | None = None
    data_dir: str | None = None
    ways: int = 10
    shots: int = 10
    test_size: int = 1000
    pool_size: int = 10000
    split_seed: int = 0

    def __post_init__(self):
        from tasks.preprocess import IMAGE_SIZES
        if self.image_size not in (0, *IMAGE_SIZES):
            raise ConfigError(f"image size must be one of {list(IMAGE_SIZES)} or 0 (native), "
                              f"got {self.image_size}")
        for name in ("ways", "shots", "test_size", "pool_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.ways < 2:
            raise ConfigError(f"ways must be at least 2, got {self.ways}")


@dataclasses.dataclass(frozen=True)
class EvalData:
    """A dataset split for evaluation. x_*: [N, D] float32; y_*: [N] int class ids."""

    name: str
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    image_shape: tuple[int, ...] | None  # (H, W, C) for images, None for vectors

    @property
    def input_size(self) -> int:
        return int(self.x_pool.shape[1])


def load_data(config: DataConfig, progress: bool = False) -> EvalData:
    """Load, preprocess (resize, flatten, scale to [0, 1]) and split a dataset."""
    from tasks import sources
    from tasks.preprocess import PreprocessConfig, prepared, scale

    ds = sources.load(config.dataset, config.data_dir, progress=progress)
    pre = PreprocessConfig(image_size=config.image_size)
    if ds.modality == "image":
        x = prepared(ds, pre)
        image_shape = tuple(int(s) for s in x.shape[1:])
        x = scale(x.reshape(x.shape[0], -1), pre, "image")
    else:
        if config.image_size:
            raise ConfigError(f"{config.dataset} is not an image dataset; --image-size does "
                              f"not apply")
        x, image_shape = ds.x.astype(np.float32), None
    y = ds.y.astype(np.int64)
    classes = np.arange(ds.num_classes)
    if config.group is not None:
        if config.group not in ds.groups:
            raise ConfigError(f"{config.dataset} has no class group {config.group!r}; groups: "
                              f"{', '.join(sorted(ds.groups)) or 'none'}")
        classes = np.asarray(ds.groups[config.group])
    keep = np.isin(y, classes)
    x, y = x[keep], y[keep]
    # Relabel to 0..C-1 so class ids index arrays.
    remap = np.full(int(y.max()) + 1, -1, np.int64)
    remap[classes] = np.arange(len(classes))
    y = remap[y]
    rng = np.random.default_rng(config.split_seed)
    order = rng.permutation(len(y))
    n_test = min(config.test_size, len(y) // 3)
    test, pool = order[:n_test], order[n_test:n_test + config.pool_size]
    counts = np.bincount(y[pool], minlength=len(classes))
    if counts.min() < config.shots:
        raise ConfigError(f"{config.dataset}: class {int(counts.argmin())} has only "
                          f"{int(counts.min())} pool examples, fewer than --shots "
                          f"{config.shots}")
    return EvalData(config.dataset, np.ascontiguousarray(x[pool]), y[pool],
                    np.ascontiguousarray(x[test]), y[test], len(classes), image_shape)


@dataclasses.dataclass(frozen=True)
class Task:
    """One seed's task: a class subset (relabelled 0..K-1), its unlabelled pool, the
    ``shots``-per-class labelled draw and the test set."""

    x_pool: np.ndarray
    y_pool: np.ndarray  # labels of the pool: used only by supervised / protonet baselines
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    seed: int


def make_task(data: EvalData, seed: int, ways: int, shots: int) -> Task:
    rng = np.random.default_rng([seed, 1])
    k = min(ways, data.num_classes)
    classes = (np.arange(k) if k == data.num_classes
               else np.sort(rng.choice(data.num_classes, k, replace=False)))
    remap = np.full(data.num_classes, -1, np.int64)
    remap[classes] = np.arange(k)
    in_pool, in_test = remap[data.y_pool] >= 0, remap[data.y_test] >= 0
    x_pool, y_pool = data.x_pool[in_pool], remap[data.y_pool[in_pool]]
    x_test, y_test = data.x_test[in_test], remap[data.y_test[in_test]]
    chosen = np.concatenate([rng.choice(np.flatnonzero(y_pool == c), shots, replace=False)
                             for c in range(k)])
    return Task(x_pool, y_pool, x_pool[chosen], y_pool[chosen], x_test, y_test, k, seed)


# ---------------------------------------------------------------------------
# readouts

def logistic_accuracy(f_train, y_train, f_test, y_test) -> float:
    """Test accuracy of an L2-regularised logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_train)
    clf = LogisticRegression(C=1.0, max_iter=2000)
    clf.fit(scaler.transform(f_train), y_train)
    return float(np.mean(clf.predict(scaler.transform(f_test)) == y_test))


def readout_accuracies(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray,
                       y_test: np.ndarray, num_classes: int, ridge: float = 0.1) -> dict:
    """{"ridge_accuracy", "logreg_accuracy"} of features [N, F]; NaN if non-finite."""
    if not (np.isfinite(f_train).all() and np.isfinite(f_test).all()):
        return {"ridge_accuracy": float("nan"), "logreg_accuracy": float("nan")}
    from metalearn.core.meta_objective import ridge_accuracy

    ridge_acc = float(ridge_accuracy(np.asarray(f_train, np.float32), y_train,
                                     np.asarray(f_test, np.float32), y_test, num_classes, ridge))
    return {"ridge_accuracy": ridge_acc,
            "logreg_accuracy": logistic_accuracy(f_train, y_train, f_test, y_test)}


def evaluate_features(feature_fn: FeatureFn, task: Task, ridge: float = 0.1) -> dict:
    """Readout accuracies of ``feature_fn`` on the task's labelled draw and test set.

    Train and test examples pass through ``feature_fn`` in one batch (batch norm)."""
    n = len(task.y_train)
    feats = np.asarray(feature_fn(np.concatenate([task.x_train, task.x_test])))
    return readout_accuracies(feats[:n], task.y_train, feats[n:], task.y_test,
                              task.num_classes, ridge)


# ---------------------------------------------------------------------------
# the learned rule

def architecture(input_size: int, width: int, depth: int, activation: str,
                 output_size: int = 32):
    from metalearn.core.base_model import Architecture
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of "
                          f"{', '.join(ACTIVATIONS)}")
    if depth < 1 or width < 1:
        raise ConfigError(f"width and depth must be positive, got width {width}, depth {depth}")
    return Architecture.mlp(input_size, [width] * depth, output_size, activation)


@functools.lru_cache(maxsize=None)
def _jitted():
    import jax

    from metalearn.core.base_model import features
    from metalearn.core.update_rule import inner_step
    return (jax.jit(inner_step, static_argnums=(3, 4)),
            jax.jit(features, static_argnums=(2, 3)))


def check_rule_fits(rule: RuleConfig, arch) -> None:
    if arch.output_size != rule.top_units:
        raise ConfigError(f"the base model's top layer has {arch.output_size} units but the "
                          f"rule's TopD needs rule.top_units = {rule.top_units}")


def base_features(params, arch, bn_eps: float) -> FeatureFn:
    _, feat = _jitted()
    return lambda x: np.asarray(feat(params, x, arch, bn_eps))


def learned_rule_curve(theta, rule: RuleConfig, arch, task: Task, eval_points: Sequence[int],
                       *, batch_size: int = 128, ridge: float = 0.1,
                       on_step: Callable[[int], None] | None = None,
                       keep_params: bool = False) -> tuple[list[dict], dict]:
    """Train a fresh base model with the rule; readout accuracies at ``eval_points``.

    Returns (rows with ``step``, ``ridge_accuracy``, ``logreg_accuracy``;
    extras: ``params_init`` / ``params_final`` when ``keep_params``).
    """
    import jax
    import jax.numpy as jnp

    from metalearn.core.base_model import init_params

    check_rule_fits(rule, arch)
    step_fn, _ = _jitted()
    points = sorted(set(int(p) for p in eval_points))
    rng = np.random.default_rng([task.seed, 2])
    params = init_params(jax.random.key(task.seed), arch, w_std=rule.init_w_std,
                         b_std=rule.init_b_std)
    theta = jax.tree.map(jnp.asarray, theta)
    extras = {"params_init": jax.tree.map(np.asarray, params)} if keep_params else {}
    pool = task.x_pool
    rows, step = [], 0
    for point in points:
        while step < point:
            x = pool[rng.integers(0, len(pool), batch_size)]
            params = step_fn(theta, params, x, arch.activation, rule)
            step += 1
            if on_step is not None:
                on_step(step)
        acc = evaluate_features(base_features(params, arch, rule.base_bn_eps), task, ridge)
        rows.append({"step": point, **acc})
    if keep_params:
        extras["params_final"] = jax.tree.map(np.asarray, params)
    return rows, extras


def eval_points_for(steps: int, num: int = 6) -> list[int]:
    """0, then ``num - 1`` roughly geometric points up to ``steps``."""
    if steps <= 0:
        return [0]
    grid = np.geomspace(max(1, steps / 2 ** (num - 2)), steps, num - 1)
    return sorted({0, *(int(round(g)) for g in grid), steps})


# ---------------------------------------------------------------------------
# a full evaluation

METHODS = ("learned", "random_init", "vae", "supervised", "pca", "protonet", "protonet_intact")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation: data, base model, budget, baselines."""

    data: DataConfig = DataConfig()
    width: int = 128
    depth: int = 4
    activation: str = "relu"
    steps: int = 200  # inner steps of the learned rule
    seeds: int = 3
    batch_size: int = 128
    ridge: float = 0.1
    baselines: tuple[str, ...] = ("random_init", "vae", "supervised", "pca", "protonet")
    baseline_steps: int = 2000  # training steps of the VAE and prototypical networks
    supervised_steps: int = 300

    def __post_init__(self):
        object.__setattr__(self, "baselines", tuple(self.baselines))
        unknown = [b for b in self.baselines if b not in METHODS or b == "learned"]
        if unknown:
            raise ConfigError(f"unknown baseline {unknown[0]!r}; choose from "
                              f"{', '.join(m for m in METHODS if m != 'learned')}")
        for name in ("steps", "baseline_steps", "supervised_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be positive, got {self.seeds}")
        if self.batch_size < 2:
            raise ConfigError(f"batch size must be at least 2, got {self.batch_size}")
        architecture(1, self.width, self.depth, self.activation)


class Progress:
    """Rate-limited progress lines on stderr (one line per update when not a TTY)."""

    def __init__(self, enabled: bool = True, every_s: float = 5.0, stream=None):
        self.enabled = enabled
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.last = -math.inf
        self.start = time.monotonic()

    def __call__(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        self.stream.write(f"[{now - self.start:6.0f}s] {text}\n")
        self.stream.flush()


@dataclasses.dataclass
class EvalResult:
    """Per-seed rows and what the report draws from."""

    rows: list[dict]  # method, seed, step, ridge_accuracy, logreg_accuracy (+ extras)
    config: EvalConfig
    data: EvalData
    seconds: dict  # method -> wall seconds
    params_init: object = None  # the learned run's base model, seed 0, before training
    params_final: object = None  # ... and after
    arch: object = None
    rule: RuleConfig | None = None
    task0: Task | None = None


def run_evaluation(config: EvalConfig, theta, rule: RuleConfig, *,
                   data: EvalData | None = None, progress: Progress | None = None
                   ) -> EvalResult:
    """The learned rule and ``config.baselines`` on ``config.data``, over seeds."""
    from metalearn.evaluation import baselines as bl

    progress = progress or Progress(False)
    data = data or load_data(config.data)
    arch = architecture(data.input_size, config.width, config.depth, config.activation,
                        rule.top_units)
    check_rule_fits(rule, arch)
    points = eval_points_for(config.steps)
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    result = EvalResult(rows, config, data, seconds, arch=arch, rule=rule)
    tasks = [make_task(data, seed, config.data.ways, config.data.shots)
             for seed in range(config.seeds)]
    result.task0 = tasks[0]
    started = time.monotonic()
    for task in tasks:
        def on_step(step, seed=task.seed):
            progress(f"learned rule: seed {seed + 1}/{config.seeds}, inner step "
                     f"{step}/{config.steps}")
        curve, extras = learned_rule_curve(theta, rule, arch, task, points,
                                           batch_size=config.batch_size, ridge=config.ridge,
                                           on_step=on_step, keep_params=task.seed == 0)
        if task.seed == 0:
            result.params_init = extras["params_init"]
            result.params_final = extras["params_final"]
        rows.extend({"method": "learned", "seed": task.seed, **r} for r in curve)
        progress(f"learned rule: seed {task.seed + 1}/{config.seeds} done, accuracy "
                 f"{curve[-1]['ridge_accuracy']:.3f}", force=True)
    seconds["learned"] = time.monotonic() - started
    for name in config.baselines:
        started = time.monotonic()
        for task in tasks:
            progress(f"baseline {name}: seed {task.seed + 1}/{config.seeds}", force=True)
            curve = bl.run(name, task, arch, config, progress)
            rows.extend({"method": name, "seed": task.seed, **r} for r in curve)
        seconds[name] = time.monotonic() - started
    return result


def summarise(rows: Sequence[dict], metric: str = "ridge_accuracy") -> list[dict]:
    """Mean and standard error over seeds per (method, step) (+ sweep columns)."""
    keys = ("sweep", "sweep_value", "method", "step")
    groups: dict[tuple, list[float]] = {}
    logreg: dict[tuple, list[float]] = {}
    for row in rows:
        key = tuple(row.get(k) for k in keys)
        groups.setdefault(key, []).append(row[metric])
        logreg.setdefault(key, []).append(row["logreg_accuracy"])
    out = []
    for key, values in groups.items():
        entry = dict(zip(keys, key))
        for name, vals in (("accuracy", values), ("logreg_accuracy", logreg[key])):
            arr = np.asarray(vals, np.float64)
            finite = arr[np.isfinite(arr)]
            entry[name] = float(finite.mean()) if finite.size else float("nan")
            entry[f"{name}_se"] = (float(finite.std(ddof=1) / math.sqrt(finite.size))
                                   if finite.size > 1 else 0.0)
        entry["seeds"] = len(values)
        entry["diverged"] = int(np.sum(~np.isfinite(np.asarray(values, np.float64))))
        out.append({k: v for k, v in entry.items() if v is not None or k in ("step",)})
    return out


def final_accuracies(rows: Sequence[dict]) -> dict:
    """Per method, the summary at its last evaluation point."""
    final: dict[str, dict] = {}
    for entry in summarise(rows):
        method = entry["method"]
        if method not in final or entry["step"] > final[method]["step"]:
            final[method] = entry
    return {m: {"accuracy": e["accuracy"], "accuracy_se": e["accuracy_se"],
                "logreg_accuracy": e["logreg_accuracy"],
                "logreg_accuracy_se": e["logreg_accuracy_se"], "step": e["step"],
                "seeds": e["seeds"]} for m, e in final.items()}


# ---------------------------------------------------------------------------
# continuous evaluation during meta-training

@dataclasses.dataclass(frozen=True)
class ContinuousEvalConfig:
    """Small-budget evaluation of the latest theta during meta-training.

    every: learner steps between evaluations.
    datasets: held-out sources (each evaluated at ``image_size``, native if 0).
    steps: inner steps per rollout; seeds: rollouts per dataset.
    """

    enabled: bool = True
    every: int = 100
    datasets: tuple[str, ...] = ("digits",)
    image_size: int = 0
    width: int = 128
    depth: int = 2
    activation: str = "relu"
    steps: int = 20
    seeds: int = 1
    batch_size: int = 128
    test_size: int = 500
    shots: int = 10
    data_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if self.every < 1:
            raise ConfigError(f"evaluator.every must be positive, got {self.every}")
        if not self.datasets:
            raise ConfigError("evaluator.datasets must name at least one dataset")
        for name in ("steps", "seeds", "test_size", "shots"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluator.{name} must be positive, got "
                                  f"{getattr(self, name)}")
        architecture(1, self.width, self.depth, self.activation)


class ContinuousEvaluator:
    """Rolls a theta out on held-out datasets; returns metrics columns for the run.

    ``evaluate(step, theta)`` with theta a pytree or the learner's flat vector returns
    ``{"step": step, "eval/<dataset>/meta_loss": ..., "eval/<dataset>/accuracy": ...,
    "eval/<dataset>/logreg_accuracy": ..., "eval_s": ...}``: the meta-objective
    (mean over the rollout's inner steps, fixed labelled draws) and the final 10-shot
    ridge / logistic accuracy, each averaged over ``seeds``. Data, tasks and labelled
    draws are fixed at construction, so successive thetas are compared on the same tasks.
    """

    def __init__(self, config: ContinuousEvalConfig, rule: RuleConfig,
                 objective: MetaObjectiveConfig = MetaObjectiveConfig()):
        import jax

        from metalearn.core.meta_objective import make_pair, meta_objective

        self.config, self.rule, self.objective = config, rule, objective
        self._datasets = []
        self.skipped: dict[str, str] = {}
        for name in config.datasets:
            try:
                data = load_data(DataConfig(dataset=name, image_size=config.image_size,
                                            data_dir=config.data_dir, shots=config.shots,
                                            test_size=config.test_size))
            except FileNotFoundError as err:
                # A held-out set missing on this machine must not stop meta-training.
                self.skipped[name] = str(err)
                print(f"continuous evaluation: skipping {name}: {err}", file=sys.stderr)
                continue
            arch = architecture(data.input_size, config.width, config.depth,
                                config.activation, rule.top_units)
            tasks = [make_task(data, seed, 10, config.shots) for seed in range(config.seeds)]
            pairs = []
            for task in tasks:
                rng = np.random.default_rng([task.seed, 3])
                k, spc = task.num_classes, objective.samples_per_class
                draws = []
                for _ in range(objective.num_draws):
                    tr = np.concatenate([rng.choice(np.flatnonzero(task.y_pool == c), spc)
                                         for c in range(k)])
                    te = np.concatenate([rng.choice(np.flatnonzero(task.y_test == c), spc)
                                         for c in range(k)])
                    draws.append((task.x_pool[tr], task.y_pool[tr], task.x_test[te],
                                  task.y_test[te]))
                pairs.append(make_pair(*(np.stack(d) for d in zip(*draws)), k))
            self._datasets.append((name, arch, tasks, pairs))
        if not self._datasets:
            raise ConfigError(f"evaluator.datasets: none of {list(config.datasets)} is "
                              f"available here ({'; '.join(self.skipped.values())})")
        self._loss = jax.jit(meta_objective, static_argnums=(2, 3, 4))

    def _unravel(self, theta):
        if isinstance(theta, np.ndarray) or getattr(theta, "ndim", None) == 1:
            from metalearn.training.checkpoint import theta_unravel
            size, unravel = theta_unravel(self.rule)
            flat = np.asarray(theta, np.float32)
            if flat.shape != (size,):
                raise ConfigError(f"theta has {flat.size} parameters; rule config needs {size}")
            return unravel(flat)
        return theta

    def evaluate(self, step: int, theta) -> dict:
        import jax
        import jax.numpy as jnp

        from metalearn.core.base_model import init_params

        started = time.monotonic()
        theta = jax.tree.map(jnp.asarray, self._unravel(theta))
        step_fn, _ = _jitted()
        row: dict = {"step": int(step)}
        for name, arch, tasks, pairs in self._datasets:
            losses, accs, logregs = [], [], []
            for task, pair in zip(tasks, pairs):
                rng = np.random.default_rng([task.seed, 4])
                params = init_params(jax.random.key(task.seed), arch,
                                     w_std=self.rule.init_w_std, b_std=self.rule.init_b_std)
                step_losses = []
                for _ in range(self.config.steps):
                    x = task.x_pool[rng.integers(0, len(task.x_pool), self.config.batch_size)]
                    params = step_fn(theta, params, x, arch.activation, self.rule)
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
        row["eval_s"] = time.monotonic() - started
        return row


__all__ = ["DataConfig", "EvalData", "Task", "load_data", "make_task", "readout_accuracies",
           "evaluate_features", "learned_rule_curve", "EvalConfig", "EvalResult",
           "run_evaluation", "summarise", "final_accuracies", "ContinuousEvalConfig",
           "ContinuousEvaluator", "Progress", "architecture", "eval_points_for", "METHODS"]
