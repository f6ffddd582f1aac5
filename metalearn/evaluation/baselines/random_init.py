"""Random-init features: the base model exactly as the learned rule starts it."""

from __future__ import annotations

import jax

from metalearn.core.base_model import init_params
from metalearn.core.config import RuleConfig
from metalearn.evaluation.readout import evaluate_features
from metalearn.evaluation.rollout import base_features


def run(task, arch, config, progress=None) -> list[dict]:
    rule = RuleConfig()  # its init scales (w 0.01, b 0.1) and batch-norm eps
    params = init_params(jax.random.key(task.seed), arch, w_std=rule.init_w_std,
                         b_std=rule.init_b_std)
    return [{"step": 0, **evaluate_features(base_features(params, arch, rule.base_bn_eps),
                                            task, config.ridge)}]
