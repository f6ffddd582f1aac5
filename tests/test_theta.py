"""ThetaSpec: selecting theta entries by path and plane (the learner's frozen mask)."""

import jax
import numpy as np
import pytest

from metalearn.core.config import PLANE_NAMES, ConfigError, RuleConfig
from metalearn.core.theta import theta_spec
from metalearn.core.update_rule import init_theta


def test_mask_selects_planes_and_subtrees():
    rule = RuleConfig.small(merge_init=0.0, merge_init_planes={"hebb": 3.0, "decorr_x": 1.35})
    spec = theta_spec(rule)
    flat = spec.ravel(init_theta(jax.random.key(0), rule))
    mask = spec.mask(["merge_w.w:hebb", "merge_w.w:decorr_x"])
    assert mask.sum() == 2 and sorted(flat[mask].tolist()) == pytest.approx([1.35, 3.0])
    whole = spec.mask(["merge_w.w"])
    assert whole.sum() == len(PLANE_NAMES) and np.all(whole[mask])
    sub = spec.mask(["compute_h"])
    tree = spec.unravel(sub.astype(np.float32))
    assert all(np.all(np.asarray(v) == 1) for v in jax.tree.leaves(tree["compute_h"]))
    assert not np.any(np.asarray(tree["merge_w"]["w"]))


@pytest.mark.parametrize("selector,message", [
    ("nope", "'nope' names no theta leaf"),
    ("merge_w.w:heb", "unknown plane 'heb'"),
    ("compute_h:hebb", "':PLANE' needs a merge vector"),
])
def test_bad_selectors_name_themselves(selector, message):
    with pytest.raises(ConfigError, match=message):
        theta_spec(RuleConfig.small()).mask([selector], "learner.frozen")
