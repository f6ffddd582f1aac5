"""The maths of metalearn, pure JAX over pytrees (docs/rule.md, docs/architecture.md).

The bottom floor: it imports nothing else of metalearn. The public names are below;
the modules (``config``, ``config_io``, ``base_model``, ``rule_layers``,
``update_rule``, ``meta_objective``, ``unroll``, ``theta``, ``bench``) hold the rest.

    rule = RuleConfig.small()
    theta = init_theta(key, rule)                        # the learned rule's parameters
    params = init_params(key, Architecture.mlp(196, [128] * 4, 32, "relu"))
    params = inner_step(theta, params, x, "relu", rule)  # one unsupervised update
    grad = make_meta_gradient("relu", rule, objective, unroll)(theta, params, batch)
"""

from metalearn.core.base_model import (Architecture, BaseParams, ForwardPass, features,
                                       forward, init_params)
from metalearn.core.config import (ACTIVATIONS, MetaObjectiveConfig, RuleConfig,
                                   UnrollConfig)
from metalearn.core.config_io import (ConfigError, apply_overrides, from_dict, load,
                                      read_yaml, to_dict)
from metalearn.core.meta_objective import (LabelledPair, make_pair, meta_objective,
                                           ridge_accuracy)
from metalearn.core.theta import ThetaSpec, theta_spec
from metalearn.core.unroll import (MetaGradient, TruncationBatch, TruncationResult,
                                   make_meta_gradient)
from metalearn.core.update_rule import init_theta, inner_step

__all__ = [
    "ACTIVATIONS", "Architecture", "BaseParams", "ConfigError", "ForwardPass",
    "LabelledPair", "MetaGradient", "MetaObjectiveConfig", "RuleConfig", "ThetaSpec",
    "TruncationBatch", "TruncationResult", "UnrollConfig",
    "apply_overrides", "features", "forward", "from_dict", "init_params", "init_theta",
    "inner_step", "load", "make_meta_gradient", "make_pair", "meta_objective",
    "read_yaml", "ridge_accuracy", "theta_spec", "to_dict",
]
