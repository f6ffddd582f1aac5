"""Speed measurements of the core, each in one process and one run.

``measure_inner_step`` (``metalearn bench inner-step [--json] [--variants]``, whose
command line is ``metalearn.cli.bench``) measures, on the paper's evaluation base model
(196 -> 128 x4 -> 32, batch 128) and the paper-size rule:

* ``matmul_gflops_per_s``: dense float32 matmul throughput of this machine (jnp, 2048^3);
* ``inner_steps_per_s`` and ``gflops_per_s``: one jitted inner step; FLOPs from XLA's
  cost analysis of that single step (no loop, so the count is not the loop-body
  undercount that scans suffer);
* ``meta_grads_per_s`` for U = 10 with the default estimator, and
  ``meta_grad_over_forward`` = time of one U = 10 meta-gradient / time of 10 inner steps;
* ``python_overhead_frac``: the meta-gradient driver's Python and dispatch cost (one
  U-step truncation timed on a negligible-compute problem) over one truncation's time;
* ``compile_s``: compile time of the default estimator (it serves every U).

``variants=True`` also times and compiles the other estimators (stepwise with
recompute, rolled ``lax.scan``, fully unrolled scan) at U = 10 and the stepwise
estimator at U = 2 and U = 15; slow (minutes), for choosing defaults.

Every function returns numbers (a report dict); none parses arguments or prints.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from metalearn.core.base_model import Architecture, init_params
from metalearn.core.config import (EstimatorConfig, HorizonConfig, MetaObjectiveConfig, RuleConfig,
                                   UnrollConfig)
from metalearn.core.estimators import make_estimator, masked_scan
from metalearn.core.full_horizon import FullHorizonES, HorizonData, evaluation_points
from metalearn.core.meta_objective import LabelledPair, make_targets
from metalearn.core.population import PopulationData, PopulationProgram
from metalearn.core.theta import theta_spec
from metalearn.core.rule_layers import matmul_convs
from metalearn.core.unroll import Problem, TruncationBatch, make_meta_gradient, timed
from metalearn.core.update_rule import (NUM_INPUT_CHANNELS, NUM_WEIGHT_STATS, READOUT_NAMES,
                                        init_theta, inner_step, num_params)

PAPER_SIZES = (196, 128, 128, 128, 128, 32)
PAPER_BATCH = 128


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Dense float32 matmul throughput through XLA (GFLOP/s)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda m: m @ m)
    seconds, _ = timed(matmul, a, repeats=repeats)
    return 2.0 * size ** 3 / seconds / 1e9


def paper_problem(rule=None, batch: int = PAPER_BATCH, num_classes: int = 10, seed: int = 0):
    """Random inputs of the paper's evaluation shapes: (theta, phi, x, arch, rule)."""
    rule = rule or RuleConfig()
    arch = Architecture(PAPER_SIZES, "relu")
    keys = jax.random.split(jax.random.key(seed), 3)
    theta = init_theta(keys[0], rule)
    params = init_params(keys[1], arch, w_std=rule.init_w_std, b_std=rule.init_b_std)
    x = jax.random.normal(keys[2], (batch, arch.input_size))
    return theta, params, x, arch, rule


def random_truncation(steps: int, arch, objective, num_classes: int = 10,
                      batch: int = PAPER_BATCH, seed: int = 1):
    """A TruncationBatch of random data with class-balanced labelled pairs."""
    per_pair = num_classes * objective.samples_per_class
    keys = jax.random.split(jax.random.key(seed), 3)
    targets = make_targets(jnp.tile(jnp.arange(num_classes), objective.samples_per_class),
                           num_classes)
    targets = jnp.broadcast_to(targets, (steps, objective.num_draws) + targets.shape)
    shape = (steps, objective.num_draws, per_pair, arch.input_size)
    pair = LabelledPair(jax.random.normal(keys[0], shape), targets,
                        jax.random.normal(keys[1], shape), targets)
    return TruncationBatch(jax.random.normal(keys[2], (steps, batch, arch.input_size)), pair)


def xla_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (NaN where
    the backend gives none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def compiled_inner_step(theta, params, x, activation, rule):
    """(compiled step, compile seconds, XLA FLOPs of one step)."""
    start = time.perf_counter()
    compiled = jax.jit(inner_step, static_argnums=(3, 4)).lower(
        theta, params, x, activation, rule).compile()
    compile_s = time.perf_counter() - start
    return compiled, compile_s, xla_flops(compiled)


def analytic_inner_step_flops(sizes, rule, batch: int) -> float:
    """Multiply-add FLOPs (x2) of one inner step's convolutions and matmuls.

    Elementwise work (batch norms, activations, normalisations) is left out, so this is
    a lower bound; it is backend-independent, unlike XLA's cost analysis (which on GPU
    leaves out convolutions that run as library calls).
    """
    b, k, h = batch, rule.kernel, rule.compute_h_size
    top, c_top, delta = rule.top_units, rule.top_delta_size, rule.delta_dim

    def conv(units, c_in, c_out, kernel=k):
        return 2.0 * b * units * kernel * c_in * c_out

    flops = conv(top, 1, c_top, rule.top_first_kernel)
    flops += rule.top_unit_mix_layers * conv(c_top, top, top)
    flops += rule.top_delta_layers * conv(top, c_top, c_top) + conv(top, c_top, delta)
    first_in = NUM_WEIGHT_STATS + 1 + NUM_INPUT_CHANNELS + delta
    readout_channels = len(READOUT_NAMES) * rule.num_grad_channels
    for n in sizes:  # ComputeH and readouts, every layer including the input
        flops += conv(n, first_in, h) + rule.compute_h_layers * conv(n, h, h)
        flops += (1 + rule.compute_h_layers) * 2 * conv(n, h, h)
        flops += 2.0 * b * n * h * readout_channels
    c = rule.num_grad_channels
    for lower, upper in zip(sizes[:-1], sizes[1:]):
        flops += 2.0 * b * lower * upper  # base-model forward
        flops += 2.0 * b * upper * h * delta + 2.0 * b * upper * delta * lower  # d^{l-1}
        flops += 2.0 * b * c * (3 * lower * upper + 3 * upper * upper + 2 * lower * lower)
        flops += 2.0 * b * upper * upper + 2.0 * b * lower * upper  # correlations
        flops += 2.0 * lower * upper * upper * 4 + 2.0 * lower * lower * upper * 2  # planes
    return flops


def time_inner_step(rule=None, repeats: int = 3) -> float:
    """Seconds per inner step of the (paper-size by default) rule on the paper's model."""
    theta, params, x, arch, rule = paper_problem(rule)
    compiled, _, _ = compiled_inner_step(theta, params, x, arch.activation, rule)
    seconds, _ = timed(compiled, theta, params, x, repeats=repeats)
    return seconds


def _time_meta_gradient(estimator, theta, params, batch, repeats):
    start = time.perf_counter()
    jax.block_until_ready(estimator(theta, params, batch))
    first = time.perf_counter() - start
    seconds, result = timed(estimator, theta, params, batch, repeats=repeats)
    return seconds, max(first - seconds, 0.0), result


def driver_overhead_s(objective, unroll, steps: int, repeats: int = 10) -> float:
    """Seconds of one U-step truncation of ``unroll``'s estimator on a problem whose
    compute is negligible (2 units, batch 4): the driver's Python and dispatch cost."""
    rule = RuleConfig(top_delta_size=2, top_delta_layers=0, top_unit_mix_layers=0,
                      compute_h_size=2, compute_h_layers=0, delta_dim=1,
                      num_grad_channels=1, top_units=2)
    arch = Architecture((2, 2), "relu")
    tiny_objective = dataclasses.replace(objective, num_draws=1, samples_per_class=1)
    batch = random_truncation(steps, arch, tiny_objective, num_classes=2, batch=4)
    estimator = make_meta_gradient("relu", rule, tiny_objective, unroll)
    theta = init_theta(jax.random.key(0), rule)
    params = init_params(jax.random.key(1), arch)
    seconds, _, _ = _time_meta_gradient(estimator, theta, params, batch, repeats)
    return seconds


def measure_inner_step(*, small: bool = False, unroll: int = 10, repeats: int = 3,
                       variants: bool = False,
                       log: Callable[[str], None] = lambda message: None) -> dict:
    """The ``metalearn bench inner-step`` report (see the module docstring for its keys).

    small: the small rule preset instead of the paper size; unroll: U of the
    meta-gradient; variants: also compare the estimators (slow). ``log`` receives
    progress lines.
    """
    rule = RuleConfig.small() if small else RuleConfig()
    objective = MetaObjectiveConfig()
    steps = unroll
    report: dict = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                    "rule": "small" if small else "paper",
                    "base_model": list(PAPER_SIZES), "batch": PAPER_BATCH, "unroll": steps}

    log("[1/4] float32 matmul throughput ...")
    report["matmul_gflops_per_s"] = matmul_gflops(repeats=repeats + 2)

    log("[2/4] inner step (compile, XLA cost analysis, time) ...")
    theta, params, x, arch, rule = paper_problem(rule)
    report["theta_params"] = num_params(theta)
    compiled, compile_s, flops = compiled_inner_step(theta, params, x, arch.activation, rule)
    step_s, _ = timed(compiled, theta, params, x, repeats=repeats)
    analytic = analytic_inner_step_flops(arch.sizes, rule, PAPER_BATCH)
    report.update(inner_step_compile_s=compile_s, flops_per_inner_step=flops,
                  flops_source="xla_cost_analysis(single step)", inner_step_s=step_s,
                  analytic_flops_per_inner_step=analytic,
                  analytic_gflops_per_s=analytic / step_s / 1e9,
                  inner_steps_per_s=1.0 / step_s, gflops_per_s=flops / step_s / 1e9)
    report["matmul_fraction"] = report["gflops_per_s"] / report["matmul_gflops_per_s"]

    log(f"[3/4] U={steps} meta-gradient with the default estimator ...")
    unroll_config = UnrollConfig()
    batch = random_truncation(steps, arch, objective)
    estimator = make_meta_gradient(arch.activation, rule, objective, unroll_config)
    grad_s, compile_grad_s, result = _time_meta_gradient(estimator, theta, params, batch,
                                                         repeats)
    report.update(estimator=f"{estimator.method}/{unroll_config.residuals}", meta_grad_s=grad_s,
                  meta_grads_per_s=1.0 / grad_s, meta_grad_compile_s=compile_grad_s,
                  meta_grad_over_forward=grad_s / (steps * step_s),
                  meta_grad_finite=bool(result.finite))

    log("[4/4] Python overhead of the meta-gradient driver ...")
    overhead = driver_overhead_s(objective, unroll_config, steps)
    report["python_overhead_s"] = overhead
    report["python_overhead_frac"] = overhead / grad_s

    if variants:
        report["variants"] = _variants(theta, params, arch, rule, objective, steps, step_s,
                                       repeats, log)
    return report


def _variants(theta, params, arch, rule, objective, steps, step_s, repeats,
              log: Callable[[str], None]) -> dict:
    out = {}
    candidates = {
        "stepwise/recompute": UnrollConfig(method="stepwise", residuals="recompute"),
        "stepwise/store": UnrollConfig(method="stepwise", residuals="store"),
        "scan/rolled": UnrollConfig(method="scan", scan_buckets=(steps,)),
        "scan/unrolled": UnrollConfig(method="scan", scan_unroll=True, scan_buckets=(steps,)),
    }
    batch = random_truncation(steps, arch, objective)
    for name, unroll in candidates.items():
        log(f"  variant {name} ...")
        estimator = make_meta_gradient(arch.activation, rule, objective, unroll)
        seconds, compile_s, _ = _time_meta_gradient(estimator, theta, params, batch,
                                                    max(1, repeats - 1))
        out[name] = {"meta_grad_s": seconds, "compile_s": compile_s,
                     "over_forward": seconds / (steps * step_s)}
    # The default estimator compiles once for every U: show U = 2 and U = 15 reuse it.
    estimator = make_meta_gradient(arch.activation, rule, objective, UnrollConfig())
    for u in (2, 15):
        log(f"  stepwise U={u} ...")
        seconds, compile_s, _ = _time_meta_gradient(
            estimator, theta, params, random_truncation(u, arch, objective), 1)
        out[f"stepwise/store U={u}"] = {"meta_grad_s": seconds, "compile_s": compile_s,
                                        "over_forward": seconds / (u * step_s)}
    return out



def measure_estimators(*, small: bool = True, unroll: int = 6, pairs: int = 4,
                       batch: int = 64, repeats: int = 3,
                       estimators: tuple[str, ...] = ("truncated", "es", "pes", "hybrid"),
                       base_model: tuple[int, ...] = PAPER_SIZES, rule: RuleConfig | None = None,
                       grouped_convs: bool = True,
                       log: Callable[[str], None] = lambda message: None) -> dict:
    """The ``metalearn bench estimators`` report: the cost of one truncation's gradient
    with each meta-gradient estimator, measured in one process on one U-step truncation
    of the same data (the evaluation base model, 196 -> 128 x4 -> 32; the small rule by
    default, the local recipe's).

    Per estimator: ``seconds`` (median of ``repeats`` after a warm-up), ``compile_s``
    (first call minus a warm one), ``over_truncated`` (the cost ratio), and
    ``cosine_to_truncated``: the cosine between its gradient and truncated backprop's on
    that truncation (ES-family estimates are noisy: about sqrt(pairs / trainable dims)
    at this sigma when the two target gradients agree).

    ``flop_ratio``: the estimator's FLOPs over truncated backprop's, from XLA's cost
    analysis of one inner step: F = the forward step with its meta-objective, G = its
    value and gradient in theta and phi (what truncated backprop does per step). ES and
    PES step 1 + 2K particles forwards, (1 + 2K) F / G; hybrid adds 2K particles to
    backprop, 1 + 2K F / G. ``over_flop_ratio`` = ``over_truncated`` / ``flop_ratio``:
    1.0 means the estimator runs at truncated backprop's FLOP rate.

    ``grouped_convs`` (default on): the ES family is also timed with the rule's
    convolutions left as XLA's grouped convolutions over the per-particle theta (the
    entries ``<name>/grouped``; ``grouped_over_matmul``: their time over the default's).

    Two references on the same truncation: ``forward``, the center trajectory alone
    (U inner steps and their meta-objectives in one compiled scan), giving
    ``meta_grad_over_forward`` = truncated / forward; and ``truncated/scan``, truncated
    backprop as one compiled program (``unroll.method: scan``), giving
    ``program_speedup`` = the default truncated time / the program's (on CPU the default
    is the stepwise driver, one jitted step and its VJP per inner step from Python).
    """
    rule_name = "custom" if rule is not None else ("small" if small else "paper")
    rule = rule or (RuleConfig.small() if small else RuleConfig())
    objective = MetaObjectiveConfig()
    arch = Architecture(tuple(base_model), "relu")
    keys = jax.random.split(jax.random.key(0), 2)
    theta = init_theta(keys[0], rule)
    params = init_params(keys[1], arch, w_std=rule.init_w_std, b_std=rule.init_b_std)
    data = random_truncation(unroll, arch, objective, batch=batch)
    report: dict = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                    "rule": rule_name, "theta_params": num_params(theta),
                    "base_model": list(base_model), "batch": batch, "unroll": unroll,
                    "pairs": pairs, "estimators": {}}
    forward_flops, backprop_flops = step_flops(Problem(arch.activation, rule, objective),
                                               theta, params, data)
    report["step_flops"] = {"forward": forward_flops, "backprop": backprop_flops}
    flop_ratio = {"truncated": 1.0,
                  "es": (1 + 2 * pairs) * forward_flops / backprop_flops,
                  "pes": (1 + 2 * pairs) * forward_flops / backprop_flops,
                  "hybrid": 1.0 + 2 * pairs * forward_flops / backprop_flops}
    runs = [(name, name, True) for name in estimators]
    if grouped_convs:
        runs += [(f"{name}/grouped", name, False) for name in estimators
                 if name in ("es", "pes", "hybrid")]
    reference = None
    for label, name, matmul in runs:
        log(f"  {label} ...")
        estimator = make_estimator(arch.activation, rule, objective, UnrollConfig(),
                                   EstimatorConfig(name, pairs=pairs))
        if hasattr(estimator, "matmul_convs"):
            estimator.matmul_convs = matmul  # read when its particle step is traced
        state = estimator.init(0, params)

        def call(estimator=estimator, state=state):
            return estimator(theta, state, data)[0]

        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
        seconds, estimate = timed(call, repeats=repeats)
        flat = ravel_pytree(estimate.grad)[0]
        if reference is None:
            reference = flat
        cosine = float(jnp.dot(flat, reference)
                       / (jnp.linalg.norm(flat) * jnp.linalg.norm(reference) + 1e-30))
        report["estimators"][label] = {"seconds": seconds,
                                       "compile_s": max(first - seconds, 0.0),
                                       "finite": bool(estimate.finite),
                                       "cosine_to_truncated": cosine,
                                       "flop_ratio": flop_ratio.get(name, float("nan"))}
    report["references"] = _references(arch, rule, objective, theta, params, data, repeats,
                                       log)
    base = report["estimators"][estimators[0]]["seconds"]
    if estimators[0] == "truncated":
        report["meta_grad_over_forward"] = base / report["references"]["forward"]["seconds"]
        report["program_speedup"] = (base
                                     / report["references"]["truncated/scan"]["seconds"])
    for label, entry in report["estimators"].items():
        entry["over_truncated"] = entry["seconds"] / base
        entry["over_flop_ratio"] = entry["over_truncated"] / entry["flop_ratio"]
        if label.endswith("/grouped"):
            entry["grouped_over_matmul"] = (
                entry["seconds"] / report["estimators"][label.split("/")[0]]["seconds"])
    return report


def _references(arch, rule, objective, theta, params, data: TruncationBatch, repeats: int,
                log: Callable[[str], None]) -> dict:
    """Seconds (and compile seconds) of the forward-only truncation and of truncated
    backprop as one program on ``data`` (see ``measure_estimators``)."""
    problem = Problem(arch.activation, rule, objective)
    mask = jnp.ones((data.num_steps,))

    def forward(theta, params, data, mask):
        with matmul_convs():
            def step(phi, x, pair):
                return problem.step(theta, phi, x, pair)
            return masked_scan(step, params, data, mask)[1]

    runs = {"forward": jax.jit(forward)}
    program = make_estimator(arch.activation, rule, objective,
                             UnrollConfig(method="scan", remat=True,
                                          scan_buckets=(data.num_steps,)))
    program_state = program.init(0, params)
    runs["truncated/scan"] = lambda theta, params, data, mask: program(
        theta, program_state, data)[0].grad
    out = {}
    for label, call in runs.items():
        log(f"  {label} ...")
        start = time.perf_counter()
        jax.block_until_ready(call(theta, params, data, mask))
        first = time.perf_counter() - start
        seconds, _ = timed(call, theta, params, data, mask, repeats=repeats)
        out[label] = {"seconds": seconds, "compile_s": max(first - seconds, 0.0)}
    return out


def step_flops(problem: Problem, theta, params, data: TruncationBatch) -> tuple[float, float]:
    """XLA's FLOPs of one inner step of ``data``'s first step: (forward with the
    meta-objective, value and gradient of that loss in theta and phi)."""
    x = data.inner_x[0]
    pair = type(data.pair)(*(f[0] for f in data.pair))

    def loss(theta, params):
        return problem.step(theta, params, x, pair)[1]

    def flops(fn, *args) -> float:
        return xla_flops(jax.jit(fn).lower(*args).compile())

    return flops(loss, theta, params), flops(jax.value_and_grad(loss, argnums=(0, 1)),
                                             theta, params)


def measure_population(*, pairs: int = 2, steps: int = 20, batch: int = 128,
                       base_model: tuple[int, ...] = (196, 128, 128, 32),
                       rule: RuleConfig | None = None, repeats: int = 2,
                       meta_steps: int = 2, tasks: int = 2,
                       log: Callable[[str], None] = lambda message: None) -> dict:
    """The ``metalearn bench population`` report: one full-horizon ES task (``es_full``,
    2K members trained ``steps`` inner steps on the same data, merge weights trainable)
    with the population stepped member by member (``loop``: what a worker does on CPU),
    in one vmapped call per step (``vmap``), and in the population engine's compiled
    program (``program``: ``meta_steps`` learner updates of ``tasks`` tasks per call,
    whole runs and the update inside), in one process. Per mode: seconds per task
    (median of ``repeats`` after a warm-up), milliseconds per member-step, the ratio to
    ``loop`` and compile seconds; loop and vmap's fitnesses must agree
    (``max_fitness_difference``)."""
    rule = rule or RuleConfig.small(inner_lr=3e-2)
    objective = MetaObjectiveConfig()
    arch = Architecture(tuple(base_model), "relu")
    keys = jax.random.split(jax.random.key(0), 2)
    theta = init_theta(keys[0], rule)
    params = init_params(keys[1], arch, w_std=rule.init_w_std, b_std=rule.init_b_std)
    at = evaluation_points(steps, 2)
    data = random_truncation(len(at), arch, objective, batch=batch)
    inner = jax.random.normal(jax.random.key(3), (steps, batch, arch.input_size))
    horizon_data = HorizonData(inner, data.pair, at)
    trainable = theta_spec(rule).mask(["merge_w"])
    report: dict = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                    "base_model": list(base_model), "batch": batch, "steps": steps,
                    "pairs": pairs, "members": 2 * pairs, "modes": {}}
    fitness = {}
    for mode in ("loop", "vmap"):
        log(f"  {mode} ...")
        estimator = FullHorizonES(Problem(arch.activation, rule, objective), theta,
                                  EstimatorConfig("es_full", perturbation_std=0.3,
                                                  pairs=pairs),
                                  HorizonConfig(steps=steps, points=2, population=mode),
                                  trainable)

        def call(estimator=estimator):
            return estimator(theta, params, horizon_data, 0)[0]

        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        seconds, estimate = timed(call, repeats=repeats)
        fitness[mode] = estimate.fitness
        report["modes"][mode] = {"seconds": seconds, "compile_s": max(first - seconds, 0.0),
                                 "ms_per_member_step": 1e3 * seconds / (2 * pairs * steps)}
    # The population engine: K meta-steps of M tasks (this task's data for each) with an
    # optax update inside one compiled program; seconds per task = per call / (K M).
    k, m = meta_steps, tasks
    log(f"  program ({k} meta-steps x {m} tasks per call) ...")
    program = PopulationProgram(Problem(arch.activation, rule, objective), theta,
                                EstimatorConfig("es_full", perturbation_std=0.3, pairs=pairs),
                                HorizonConfig(steps=steps, points=2), optax.adam(1e-3), at,
                                trainable=trainable)

    def tile(a):
        a = jnp.asarray(a)
        return jnp.broadcast_to(a, (k, m) + a.shape)

    keys = np.random.default_rng(0).integers(0, 2 ** 32, size=(k, m, 2), dtype=np.uint32)
    population = PopulationData(jax.tree.map(tile, params), tile(inner),
                                jax.tree.map(tile, horizon_data.pairs), keys)
    flat = ravel_pytree(theta)[0]
    opt_state = optax.adam(1e-3).init(flat)
    _, compile_s = program.compiled(flat, opt_state, population)
    seconds, _ = timed(lambda: program(flat, opt_state, population), repeats=repeats)
    report["modes"]["program"] = {"seconds": seconds / (k * m), "compile_s": compile_s,
                                  "ms_per_member_step": 1e3 * seconds / (k * m * 2 * pairs
                                                                         * steps),
                                  "tasks_per_call": k * m}
    for entry in report["modes"].values():
        entry["over_loop"] = entry["seconds"] / report["modes"]["loop"]["seconds"]
    report["max_fitness_difference"] = float(abs(fitness["loop"] - fitness["vmap"]).max())
    report["program_tasks_per_s_over_loop"] = 1.0 / report["modes"]["program"]["over_loop"]
    return report
