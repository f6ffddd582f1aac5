"""Truncated unrolls and their meta-gradients (docs/rule.md).

A truncation applies U inner steps to phi, evaluates the meta-objective after every
step, and differentiates the mean of those U losses with respect to theta; phi at the
start of the truncation is a constant. The final phi seeds the next truncation.

Two interchangeable estimators (``UnrollConfig.method``), checked equal in the tests:

* ``stepwise`` (default): a jitted (inner step + meta-objective) and its VJP, driven
  forwards then backwards from Python. One compilation serves every U, so the
  curriculum's varying U never recompiles; the backward sweep either reuses each
  step's stored VJP residuals (``residuals="store"``) or recomputes that step's
  forward (``"recompute"``, memory of one step: rematerialisation for long unrolls).
* ``scan``: the truncation as one ``lax.scan`` differentiated by ``jax.grad``. U is
  bucketed (``scan_buckets``): padded to the next bucket with a 0/1 step mask, so
  each bucket compiles once. ``remat`` checkpoints the scan body.

Both are pure functions of (theta, phi, batches). For several tasks of one
architecture (GPU workers), ``make_meta_gradient(..., num_tasks=T)`` vmaps every
jitted piece over a leading task axis of phi and batches (theta is shared) and returns
one gradient per task.

Non-finite losses or gradients are reported in ``TruncationResult.finite``, never
hidden or zeroed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core.base_model import BaseParams, check_params
from metalearn.core.config import ConfigError, MetaObjectiveConfig, RuleConfig, UnrollConfig
from metalearn.core.meta_objective import LabelledPair, check_pair, meta_objective
from metalearn.core.update_rule import architecture_of, check_inputs, inner_step


class TruncationBatch(NamedTuple):
    """Data of one truncation of U steps.

    inner_x: [U, B, N_0] unlabelled inner batches;
    pair: LabelledPair whose fields carry a leading U axis: [U, M, B_l, ...].
    """

    inner_x: Any
    pair: LabelledPair

    @property
    def num_steps(self) -> int:
        return int(self.inner_x.shape[-3])


class TruncationResult(NamedTuple):
    """params: phi after the truncation; loss: mean meta-objective over its steps;
    grad: d loss / d theta; step_losses: [U]; finite: loss and grad all finite
    (with a leading task axis on every field when vmapped)."""

    params: BaseParams
    loss: Any
    grad: Any
    step_losses: Any
    finite: Any


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description shared by every jitted function of an unroll: the rule's
    inner step and meta-objective on one activation.

    Any hashable object with the same ``step`` method can stand in for it (the
    estimators' known-answer tests unroll a small system whose exact full-horizon
    gradient is known); only a ``Problem`` gets the shape checks of ``validate``.
    """

    activation: str
    rule: RuleConfig
    objective: MetaObjectiveConfig

    def step(self, theta, params: BaseParams, x, pair: LabelledPair):
        """One inner step, then the meta-objective of the new phi. x: [B, N_0]."""
        new_params = self.advance(theta, params, x)
        return new_params, self.loss(new_params, pair)

    def advance(self, theta, params: BaseParams, x) -> BaseParams:
        """One inner step of the rule. x: [B, N_0]."""
        return inner_step(theta, params, x, self.activation, self.rule)

    def loss(self, params: BaseParams, pair: LabelledPair):
        """The meta-objective of phi on one labelled pair (M draws)."""
        arch = architecture_of(params, self.activation)
        return meta_objective(params, pair, arch, self.objective, self.rule.base_bn_eps)


def step_and_loss(theta, params: BaseParams, x, pair: LabelledPair, problem: Problem):
    """``problem.step``: one inner step, then the meta-objective of the new phi."""
    return problem.step(theta, params, x, pair)


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves])


# ---------------------------------------------------------------------------
# scan

def truncation_loss_scan(theta, params: BaseParams, batch: TruncationBatch, mask,
                         problem: Problem, unroll: bool = False, remat: bool = False):
    """Mean meta-objective over the steps where mask is 1. mask: [U] of 0/1.

    Returns (loss, (final phi, per-step losses)). Masked steps leave phi unchanged.
    """

    def body(phi, inputs):
        x, pair, keep = inputs
        new_phi, loss = step_and_loss(theta, phi, x, pair, problem)
        new_phi = jax.tree.map(lambda a, b: jnp.where(keep > 0, a, b), new_phi, phi)
        return new_phi, loss * keep

    if remat:
        body = jax.checkpoint(body)
    final, losses = jax.lax.scan(body, params, (batch.inner_x, batch.pair, mask),
                                 unroll=bool(unroll))
    return jnp.sum(losses) / jnp.sum(mask), (final, losses)


def meta_gradient_scan(theta, params: BaseParams, batch: TruncationBatch, mask,
                       problem: Problem, unroll: bool = False,
                       remat: bool = False) -> TruncationResult:
    """Pure, vmappable truncated meta-gradient through a ``lax.scan``."""
    grad_fn = jax.value_and_grad(truncation_loss_scan, has_aux=True)
    (loss, (final, losses)), grad = grad_fn(theta, params, batch, mask, problem, unroll, remat)
    return TruncationResult(final, loss, grad, losses,
                            jnp.logical_and(jnp.isfinite(loss), _all_finite(grad)))


def pad_to_bucket(batch: TruncationBatch, size: int):
    """Pad a truncation's batches to ``size`` steps (repeating the last); return mask."""
    steps = batch.num_steps
    if steps > size:
        raise ValueError(f"cannot pad {steps} steps into a bucket of {size}")

    def pad(a, trailing_dims):
        # The step axis sits before the trailing dims (after a task axis, if any).
        a = jnp.asarray(a)
        axis = a.ndim - trailing_dims
        if size == steps:
            return a
        last = jax.lax.slice_in_dim(a, steps - 1, steps, axis=axis)
        return jnp.concatenate([a] + [last] * (size - steps), axis=axis)

    inner = pad(batch.inner_x, 3)
    pair = LabelledPair(*[pad(f, 4) for f in batch.pair])
    mask = jnp.concatenate([jnp.ones((steps,)), jnp.zeros((size - steps,))])
    return TruncationBatch(inner, pair), mask


def check_truncation(problem: Problem, params: BaseParams, batch: TruncationBatch,
                     num_tasks: int | None = None) -> None:
    """Python-side shape checks of one truncation's phi and data (errors name the
    field), before anything is traced. With ``num_tasks`` every leaf has a leading task
    axis."""
    lead = 1 if num_tasks else 0
    if num_tasks and batch.inner_x.shape[0] != num_tasks:
        raise ConfigError(f"batch.inner_x has {batch.inner_x.shape[0]} tasks on its leading "
                          f"axis, the estimator was built for num_tasks={num_tasks}")
    if batch.inner_x.ndim != 3 + lead:
        raise ConfigError(f"batch.inner_x must be [{'tasks, ' if lead else ''}steps, batch, "
                          f"features], got shape {tuple(batch.inner_x.shape)}")
    if batch.num_steps < 1:
        raise ConfigError(f"a truncation needs at least one inner step, got {batch.num_steps}")
    one = jax.tree.map(lambda a: a[0], params) if lead else params
    arch = architecture_of(one, problem.activation)
    check_params(one, arch)
    check_inputs(one, batch.inner_x[(0,) * (1 + lead)], problem.rule)
    pair = LabelledPair(*[f[(0,) * (1 + lead)] for f in batch.pair])
    check_pair(pair, num_classes=1, input_size=arch.input_size)
    for name, field in zip(LabelledPair._fields, batch.pair):
        if field.shape[lead] != batch.num_steps:
            raise ConfigError(f"batch.pair.{name} has {field.shape[lead]} steps, "
                              f"batch.inner_x has {batch.num_steps}")


# ---------------------------------------------------------------------------
# stepwise

class MetaGradient:
    """Callable ``(theta, params, batch) -> TruncationResult`` for one problem.

    Holds the jitted pieces, so build one per (activation, configs) and reuse it:
    compilation happens on the first call for each set of shapes.
    """

    def __init__(self, problem: Problem, unroll: UnrollConfig, num_tasks: int | None = None):
        self.problem = problem
        self.unroll = unroll
        self.method = unroll.resolved_method()
        self.num_tasks = num_tasks
        self.timings: dict[str, float] = {}
        vm = (lambda f, axes: jax.vmap(f, in_axes=axes)) if num_tasks else (lambda f, axes: f)

        def fwd(theta, params, x, pair):
            return step_and_loss(theta, params, x, pair, problem)

        def fwd_store(theta, params, x, pair):
            return jax.vjp(lambda th, ph: fwd(th, ph, x, pair), theta, params)

        def bwd_recompute(theta, params, x, pair, g_params, weight):
            _, pullback = fwd_store(theta, params, x, pair)
            return pullback((g_params, weight))

        tasks = 0 if num_tasks else None
        self._fwd = jax.jit(vm(fwd, (None, tasks, tasks, tasks)))
        self._fwd_store = jax.jit(vm(fwd_store, (None, tasks, tasks, tasks)))
        self._pull = jax.jit(vm(lambda pb, ct: pb(ct), (tasks, tasks)))
        self._bwd = jax.jit(vm(bwd_recompute, (None, tasks, tasks, tasks, tasks, tasks)))
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,))
        self._finite = jax.jit(vm(lambda loss, g: jnp.logical_and(jnp.all(jnp.isfinite(loss)),
                                                                  _all_finite(g)), (tasks, tasks)))
        scan = functools.partial(meta_gradient_scan, problem=problem,
                                 unroll=unroll.scan_unroll, remat=unroll.remat)
        self._scan = jax.jit(vm(scan, (None, tasks, tasks, None)))

    def __call__(self, theta, params: BaseParams, batch: TruncationBatch) -> TruncationResult:
        if isinstance(self.problem, Problem):
            self.validate(params, batch)
        if self.method == "scan":
            return self._call_scan(theta, params, batch)
        return self._call_stepwise(theta, params, batch)

    def validate(self, params: BaseParams, batch: TruncationBatch) -> None:
        """Python-side shape checks (errors name the field), before anything is traced."""
        check_truncation(self.problem, params, batch, self.num_tasks)

    def _call_scan(self, theta, params, batch):
        padded, mask = pad_to_bucket(batch, self.unroll.bucket(batch.num_steps))
        result = self._scan(theta, params, padded, mask)
        steps = batch.num_steps
        return result._replace(step_losses=result.step_losses[..., :steps])

    def _call_stepwise(self, theta, params, batch):
        steps = batch.num_steps
        task = (lambda a, t: a[:, t]) if self.num_tasks else (lambda a, t: a[t])
        xs = [task(batch.inner_x, t) for t in range(steps)]
        pairs = [type(batch.pair)(*[task(f, t) for f in batch.pair]) for t in range(steps)]
        store = self.unroll.residuals == "store"

        # Forward sweep.
        history, pullbacks, losses = [params], [], []
        for t in range(steps):
            if store:
                (new_params, loss), pullback = self._fwd_store(theta, history[-1], xs[t], pairs[t])
                pullbacks.append(pullback)
            else:
                new_params, loss = self._fwd(theta, history[-1], xs[t], pairs[t])
            history.append(new_params)
            losses.append(loss)

        # Backward sweep: the loss is the mean of the U step losses.
        weight = jnp.full(jnp.shape(losses[0]), 1.0 / steps, jnp.result_type(losses[0]))
        g_params = jax.tree.map(jnp.zeros_like, history[-1])
        g_theta = None
        for t in range(steps - 1, -1, -1):
            if store:
                g_th, g_params = self._pull(pullbacks[t], (g_params, weight))
                pullbacks[t] = None  # free residuals as soon as they are used
            else:
                # (At t = 0 the phi cotangent is computed and dropped: phi at the start
                # of a truncation is a constant. A theta-only VJP would spare that
                # work at the price of one more compilation.)
                g_th, g_params = self._bwd(theta, history[t], xs[t], pairs[t], g_params, weight)
            g_theta = g_th if g_theta is None else self._add(g_theta, g_th)

        step_losses = jnp.stack(losses, axis=-1)
        loss = jnp.mean(step_losses, axis=-1)
        return TruncationResult(history[-1], loss, g_theta, step_losses,
                                self._finite(step_losses, g_theta))


def make_meta_gradient(activation: str, rule: RuleConfig = RuleConfig(),
                       objective: MetaObjectiveConfig = MetaObjectiveConfig(),
                       unroll: UnrollConfig = UnrollConfig(),
                       num_tasks: int | None = None) -> MetaGradient:
    """Build the truncated meta-gradient estimator for one activation and configs."""
    return MetaGradient(Problem(activation, rule, objective), unroll, num_tasks)


def timed(fn: Callable, *args, repeats: int = 3, **kwargs) -> tuple[float, Any]:
    """Median wall time of ``fn(*args)`` after one warm-up call (blocks on results)."""
    out = jax.block_until_ready(fn(*args, **kwargs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out
