"""Typed configuration for the update rule, the meta-objective and the unroll.

Every constant of the method lives here, with the paper's value as the default
(the paper's, docs/rule.md; where paper and reference code differ, the comment says which
one the default follows). Configs are frozen dataclasses: hashable, so they can be
static arguments of ``jax.jit``, and serialisable to plain dicts for run folders,
YAML files and Ray Tune ``param_space``.

``from_dict`` rejects unknown keys and wrongly typed values with an error that
names the dotted path of the field (``rule.compute_h_size``), which is what a user
who mistyped a YAML key or a ``--set`` override needs to see.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Any, Literal

import jax

from metalearn.core.config_io import (  # noqa: F401 (ConfigError, from_dict, to_dict: re-exported)
    AtLeastOne, Bound, ConfigError, Fraction, NonNegative, Positive, check_fields, from_dict,
    to_dict)

__all__ = ["ACTIVATIONS", "ESTIMATORS", "PLANE_NAMES", "ConfigError", "EstimatorConfig",
           "HorizonConfig", "MetaObjectiveConfig", "RuleConfig", "UnrollConfig", "from_dict",
           "to_dict"]


# Meta-gradient estimators (``EstimatorConfig.kind``; metalearn.core.estimators).
# The last two score a perturbation over a whole inner run (metalearn.core.full_horizon).
Estimator = Literal["truncated", "es", "pes", "hybrid", "es_full", "guided_es"]
ESTIMATORS: tuple[str, ...] = typing.get_args(Estimator)

ACTIVATIONS = ("relu", "leaky_relu", "swish", "tanh", "sigmoid", "step", "identity")

# The twelve weight-update planes of the rule (docs/rule.md), in the order of the merge's
# mixing weights (``metalearn.core.update_rule`` computes them).
PLANE_NAMES = (
    "w_base",          # W_hat
    "large_decay",     # W_hat^2 * sign(W_hat)
    "decorr_x",        # W_hat @ corr(x^l), unit-RMS
    "hebb",            # -corr(x^{l-1}, x^l)
    "0_order",         # LowRR(h^l, h^{l-1})
    "rbf",             # exp(-W_hat^2) * LowRR
    "1_order",         # W_hat * LowRR
    "lin_upper_symm",  # W_hat @ S_u
    "lin_upper_psd",   # W_hat @ P_u
    "lin_lower_symm",  # S_l @ W_hat
    "sqr_upper_symm",  # ((sqrt(1 + W_hat^2) - 1) @ S_u') * sign(W_hat)
    "sqr_lower_symm",  # (S_l' @ (sqrt(1 + W_hat^2) - 1)) * sign(W_hat)
)


@dataclasses.dataclass(frozen=True)
class RuleConfig:
    """Sizes and constants of the learned UnsupervisedUpdate (docs/rule.md).

    Defaults are the paper's / reference implementation's; ``RuleConfig.small()``
    is a preset with narrow channels for fast local runs.
    """

    # TopD (docs/rule.md)
    top_units: AtLeastOne = 32  # N_L: TopD mixes the top layer's units as channels.
    top_delta_size: AtLeastOne = 64  # channels of TopD's convs over the batch axis
    top_delta_layers: NonNegative = 2  # 64 -> 64 convs after the unit mixing
    top_unit_mix_layers: NonNegative = 2  # units-as-channels convs (fixed at 2 in the reference)
    top_first_kernel: AtLeastOne = 5  # kernel of TopD's first conv over the batch (reference)
    # ComputeH (docs/rule.md)
    compute_h_size: AtLeastOne = 64  # channels of h
    compute_h_layers: NonNegative = 1  # extra conv + unit block rounds after the first
    kernel: AtLeastOne = 3  # kernel of every other conv in the rule
    delta_dim: AtLeastOne = 32  # channels of the top-down signal d and delta
    positional_period: float = 4.0 * math.pi  # p_j = linspace(0, period, N_l) (SPEC 2.3)
    # Weight planes and merge (docs/rule.md)
    num_grad_channels: AtLeastOne = 4  # channels of each low-rank readout
    merge_init: float = 0.1  # initial mixing weight of every plane ...
    # ... except these (plane name, weight) pairs, in YAML a mapping: e.g. the local
    # recipe's Oja-like start {hebb: 3.0, decorr_x: 1.35} with merge_init 0 (docs/rule.md).
    merge_init_planes: tuple[tuple[str, float], ...] = ()
    column_norm_eps: Positive = 1.0  # P / sqrt(eps + mean_col P^2) (reference)
    growth: float = 1.0 / 7.0  # dW -= W_hat * growth (the reference's "arbitrary" 1/7)
    identical_updates: bool = True  # V receives W's dW; False gives V its own merge
    # Bias update (docs/rule.md)
    bias_norm_eps: Positive = 0.5  # the bias update's normaliser (reference)
    # Constants nobody tunes, kept here (not in code) so each has one named value that
    # exported rules record with their sizes (docs/rule.md).
    rule_bn_eps: Positive = 1e-3  # batch norm inside the rule
    base_bn_eps: Positive = 1e-6  # batch norm of the base model
    # Inner optimisation
    # paper 3e-4, reference 1e-4
    inner_lr: Annotated[float, Bound(0, 1, open_low=True, open_high=True)] = 3e-4
    # Base-model initialisation
    init_w_std: Positive = 0.01  # phi_0 ~ N(0, std^2) (reference)
    init_b_std: Positive = 0.1
    # theta initialisation scale for the rule's convs and linears (fan-in scaled)
    theta_init_scale: Positive = 1.0

    @classmethod
    def small(cls, **overrides: Any) -> "RuleConfig":
        """Narrow preset for laptops and tests: same structure, ~10x fewer FLOPs."""
        values = dict(top_delta_size=16, top_delta_layers=1, compute_h_size=16,
                      delta_dim=8, num_grad_channels=2)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        check_fields(self, "rule")
        for name in ("kernel", "top_first_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ConfigError(f"rule.{name} must be odd for 'same' padding, "
                                  f"got {getattr(self, name)}")
        if isinstance(self.merge_init_planes, dict):  # built in Python with a dict
            object.__setattr__(self, "merge_init_planes",
                               tuple((str(k), float(v)) for k, v in self.merge_init_planes.items()))
        unknown = [name for name, _ in self.merge_init_planes if name not in PLANE_NAMES]
        if unknown:
            raise ConfigError(f"rule.merge_init_planes: unknown plane {unknown[0]!r}; planes: "
                              f"{', '.join(PLANE_NAMES)}")


@dataclasses.dataclass(frozen=True)
class MetaObjectiveConfig:
    """Few-shot ridge-regression meta-objective (docs/rule.md)."""

    ridge: Positive = 0.1  # lambda; the bias column is not penalised
    num_draws: AtLeastOne = 5  # M labelled pairs averaged per evaluation
    samples_per_class: AtLeastOne = 10
    add_ridge_penalty: bool = True  # reference adds ridge * sum(w^2) / B to the loss
    normalize_predictions: bool = True
    # The paper's targets append a task's augmentation parameters (rotation, shifts) to
    # the one-hot labels. On the local glyph tasks those dominate the loss and reward a
    # rule that collapses the representation onto a few directions (docs/results.md);
    # False scores the class labels alone.
    regression_targets: bool = True

    def __post_init__(self):
        check_fields(self, "objective")


@dataclasses.dataclass(frozen=True)
class HorizonConfig:
    """Inner runs of the full-horizon estimators (``es_full``, ``guided_es``; docs/estimators.md).

    steps: inner steps of one task's run. inner_lr: the run's inner learning rate (0: the
      rule's ``inner_lr``); a search may take fewer steps at a larger rate, since the
      horizon that matters is inner_lr x steps, while the exported rule keeps
      ``rule.inner_lr``. points: evenly spaced steps at which the meta-objective is
      measured (fresh labelled draws at each). fitness: ``mean`` over the points or the
      ``final`` point only. shaping: how a task's member fitnesses enter the estimate:
      ``none`` (raw differences: unbiased for the smoothed fitness, but tasks whose loss
      moves more weigh more), ``normalize`` (each task's 2K fitnesses standardised, so
      every task, easy or hard, gets an equal say in the direction) or ``ranks``
      (centred ranks in [-0.5, 0.5]). guide_alpha, guide_dims, surrogate_steps: ``guided_es``'s
      share of isotropic noise, number of surrogate gradients kept, and the truncation
      length of its truncated-backprop surrogate. population: how the 2K members are
      stepped: ``vmap`` (one jitted call for all, the accelerator's way), ``loop`` (one
      jitted call per member: on XLA's CPU backend a vmapped population measured 2.2x
      slower per member than a loop, ``metalearn bench population``) or ``auto``
      (``loop`` on CPU, ``vmap`` elsewhere).
    """

    steps: AtLeastOne = 300
    inner_lr: Fraction = 0.0  # 0: the rule's
    points: AtLeastOne = 10
    fitness: Literal["mean", "final"] = "mean"
    shaping: Literal["none", "normalize", "ranks"] = "none"
    guide_alpha: Annotated[float, Bound(0, 1, open_low=True)] = 0.5
    guide_dims: AtLeastOne = 2
    surrogate_steps: AtLeastOne = 4
    population: Literal["auto", "vmap", "loop"] = "auto"

    def __post_init__(self):
        check_fields(self, "horizon")
        if self.points > self.steps:
            raise ConfigError(f"horizon.points ({self.points}) cannot exceed horizon.steps "
                              f"({self.steps})")

    def resolved_population(self, backend: str | None = None) -> str:
        if self.population != "auto":
            return self.population
        return "loop" if (backend or jax.default_backend()) == "cpu" else "vmap"


@dataclasses.dataclass(frozen=True)
class UnrollConfig:
    """How a truncation is differentiated (docs/estimators.md; which estimator runs is
    ``EstimatorConfig``).

    Each truncation estimator runs a whole truncation as one compiled ``lax.scan``,
    vmapped over tasks; U is padded to the next of ``scan_buckets`` (the padded steps are
    skipped), so each (architecture, bucket) compiles once.

    method, residuals: how truncated backprop (``metalearn.core.unroll.MetaGradient``,
    also guided ES's surrogate) differentiates:
      ``auto`` (default): ``stepwise`` on CPU, ``scan`` on GPU/TPU.
      ``stepwise``: one jitted inner step forward and its jitted VJP driven backwards from
        Python; compiles once for every U. ``residuals`` (stepwise only): ``store`` every
        step's VJP residuals or ``recompute`` each step's forward (memory of one step).
      ``scan``: the whole truncation in one ``lax.scan`` under ``jax.grad``.
    remat: ``jax.checkpoint`` the scan body (memory of one step; on XLA:CPU also faster).
    scan_unroll: fully unroll the scan (fast on CPU, long compiles).
    """

    method: Literal["auto", "stepwise", "scan"] = "auto"
    residuals: Literal["recompute", "store"] = "store"
    scan_unroll: bool = False
    remat: bool = False
    scan_buckets: tuple[int, ...] = (4, 8, 16)

    def __post_init__(self):
        check_fields(self, "unroll")
        if not self.scan_buckets or any(int(b) <= 0 for b in self.scan_buckets):
            raise ConfigError(f"unroll.scan_buckets must be positive sizes, got "
                              f"{self.scan_buckets!r}")
        object.__setattr__(self, "scan_buckets", tuple(sorted(int(b) for b in self.scan_buckets)))

    def resolved_method(self, backend: str | None = None) -> str:
        """The estimator ``auto`` stands for on ``backend`` (default: JAX's default)."""
        if self.method != "auto":
            return self.method
        if backend is None:
            backend = jax.default_backend()
        # On CPU, XLA differentiates a rolled scan slowly and per-call dispatch is cheap
        # next to a step; on accelerators a step is ~ms and per-call latency dominates.
        return "stepwise" if backend == "cpu" else "scan"

    def bucket(self, num_steps: int) -> int:
        """Smallest bucket that holds ``num_steps`` (or ``num_steps`` itself if larger)."""
        for size in self.scan_buckets:
            if num_steps <= size:
                return size
        return num_steps


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """What a truncation's meta-gradient estimates (docs/estimators.md).

    kind: ``truncated`` (default, the paper's): backprop through the truncation's U
      steps, phi at its start held constant; ``es``: antithetic evolution strategies over
      the truncation (``pairs`` pairs theta +- eps, eps ~ N(0, perturbation_std^2));
      ``pes``: persistent ES (Vicol et al. 2021), unbiased over the inner run so far;
      ``hybrid``: truncated backprop and ES weighted by inverse variances, estimated
      online with an EMA of ``variance_decay`` (Metz et al. 2019); ``es_full`` /
      ``guided_es``: one antithetic perturbation held for a whole inner run of
      ``horizon.steps`` steps (``metalearn.core.full_horizon``).
    """

    kind: Estimator = "truncated"
    perturbation_std: Positive = 0.01
    pairs: AtLeastOne = 4
    variance_decay: Fraction = 0.9  # the hybrid's EMA (Metz et al. 2019's value)

    def __post_init__(self):
        check_fields(self, "estimator")
