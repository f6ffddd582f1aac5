"""The one description of theta's structure for a rule config: ``ThetaSpec``.

theta is a nested dict of float32 arrays (``init_theta``'s names). Everything that
moves theta between processes or files works on it through its spec:

* ``shapes``: leaf path (``jax.tree_util.keystr``) -> shape, worked out with
  ``jax.eval_shape`` (nothing is allocated);
* ``ravel`` / ``unravel``: theta <-> one flat float32 vector [P] in
  ``jax.flatten_util.ravel_pytree`` order (what the learner updates and workers receive);
* ``check_flat`` / ``check_tree`` / ``check_compatible``: a ConfigError naming the first
  leaf where a vector, a tree or another rule's theta disagrees with this one.

``theta_spec(rule)`` is cached per rule config (configs are frozen and hashable), so
the shapes are computed once per process however many callers ask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import numpy as np

from metalearn.core.config import PLANE_NAMES, RuleConfig
from metalearn.core.config_io import ConfigError
from metalearn.core.update_rule import init_theta


@dataclasses.dataclass(frozen=True)
class ThetaSpec:
    """Structure, shapes and flat layout of theta for one ``RuleConfig``."""

    rule: RuleConfig
    shapes: dict  # keystr path -> shape tuple, in ravel order
    num_params: int
    _unravel: Callable = dataclasses.field(repr=False, compare=False)

    def ravel(self, theta) -> np.ndarray:
        """theta pytree -> [P] float32 numpy vector (on the host: JAX need not be up)."""
        self.check_tree(theta)
        leaves = jax.tree.leaves(theta)
        if not leaves:
            return np.zeros(0, np.float32)
        return np.concatenate([np.ravel(np.asarray(leaf, np.float32)) for leaf in leaves])

    def unravel(self, flat):
        """[P] vector -> theta pytree (numpy leaves from numpy, jax leaves from jax)."""
        self.check_flat(flat)
        return self._unravel(flat)

    def check_flat(self, flat, where: str = "theta") -> None:
        shape = tuple(np.shape(flat))
        if shape != (self.num_params,):
            raise ConfigError(f"{where} has shape {shape}; the rule config needs a flat "
                              f"vector of {self.num_params} parameters")

    def check_tree(self, theta, where: str = "theta") -> None:
        """Raise ConfigError naming the first leaf where ``theta`` differs from the spec."""
        have = _shapes_of(theta)
        _raise_on_difference(have, self.shapes, where, "the rule needs")

    def mask(self, selectors, where: str = "frozen") -> np.ndarray:
        """[P] bool: True at the parameters ``selectors`` name. A selector is a leaf path,
        dotted (``merge_w.w``; a prefix such as ``compute_h`` takes every leaf below it),
        optionally with ``:PLANE`` to take one entry of a merge vector
        (``merge_w.w:hebb``, planes as in ``PLANE_NAMES``)."""
        index = jax.tree.map(np.asarray, self._unravel(np.arange(self.num_params,
                                                                 dtype=np.float32)))
        leaves = {_dotted(path): np.asarray(leaf).astype(np.int64)
                  for path, leaf in jax.tree_util.tree_leaves_with_path(index)}
        out = np.zeros(self.num_params, bool)
        for selector in selectors:
            path, _, plane = selector.partition(":")
            chosen = [v for k, v in leaves.items() if k == path or k.startswith(path + ".")]
            if not chosen:
                raise ConfigError(f"{where}: {selector!r} names no theta leaf; leaves: "
                                  f"{', '.join(sorted(leaves))}")
            if plane:
                if len(chosen) != 1 or chosen[0].shape != (len(PLANE_NAMES),):
                    raise ConfigError(f"{where}: {selector!r}: ':PLANE' needs a merge "
                                      f"vector such as merge_w.w")
                if plane not in PLANE_NAMES:
                    raise ConfigError(f"{where}: {selector!r}: unknown plane {plane!r}; "
                                      f"planes: {', '.join(PLANE_NAMES)}")
                out[chosen[0][PLANE_NAMES.index(plane)]] = True
            else:
                for v in chosen:
                    out[v.ravel()] = True
        return out

    def check_compatible(self, other: "ThetaSpec", where: str) -> None:
        """Raise ConfigError if ``other``'s theta cannot stand in for this one."""
        _raise_on_difference(other.shapes, self.shapes, where, "this rule config has")


def _dotted(path) -> str:
    """A tree path as a dotted name (``merge_w.w``, ``compute_h.layers.0.bn.offset``)."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _shapes_of(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _raise_on_difference(have: dict, want: dict, where: str, want_name: str) -> None:
    if have == want:
        return
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        first = f"theta{missing[0]} missing" if missing else f"theta{extra[0]} unexpected"
    else:
        key = next(k for k in want if want[k] != have[k])
        first = f"theta{key} has shape {have[key]}, {want_name} {want[key]}"
    raise ConfigError(f"{where} does not match the rule config "
                      f"({sum(map(math.prod, have.values()))} parameters vs "
                      f"{sum(map(math.prod, want.values()))}): {first}")


@functools.lru_cache(maxsize=32)
def theta_spec(rule: RuleConfig) -> ThetaSpec:
    """The (cached) ``ThetaSpec`` of ``rule``."""
    # Shapes only: nothing here starts JAX's backend (a runner may still choose how many
    # CPU devices it starts with after the config is read).
    template = jax.eval_shape(lambda: init_theta(jax.random.key(0), config=rule))
    leaves, treedef = jax.tree.flatten(template)
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    offsets = np.cumsum([0] + sizes)

    def unravel(flat):  # numpy in, numpy out; jax (or traced) in, jax out
        return treedef.unflatten([flat[int(a):int(b)].reshape(leaf.shape)
                                  for a, b, leaf in zip(offsets[:-1], offsets[1:], leaves)])

    return ThetaSpec(rule=rule, shapes=_shapes_of(template), num_params=int(offsets[-1]),
                     _unravel=unravel)


__all__ = ["ThetaSpec", "theta_spec"]
