"""Collapse diagnostics of a base model trained by a learned rule (pure numpy).

Learned rules can look good for tens of inner steps and then collapse at long horizons:
the 32-d top-layer representation ends up spanned by one or two directions, and the
first-layer weights grow by an order of magnitude. Two numbers make that visible in
``metalearn eval`` rows and in the continuous evaluator's long-horizon columns:

* ``components_for_variance(features)`` (``rank90`` in rows): how many principal
  components explain 90% of the variance of the test set's representation. An
  isotropic 32-d representation needs ~29, a collapsed one 1-2, a constant one 0.
* ``weight_growth(params_init, params)`` (``w_growth``): ||W^1|| / ||W^1_init||
  (Frobenius), the growth of the first layer's forward weights over inner training.
"""

from __future__ import annotations

import numpy as np


def components_for_variance(features: np.ndarray, fraction: float = 0.9) -> int:
    """Principal components needed to explain ``fraction`` of the variance of
    ``features`` [N, F] (rows are examples; centred here).

    A representation without variance (constant, e.g. every unit dead) returns 0: there
    is nothing to explain, and 0 sorts below every representation that carries any
    information. Raises ValueError on non-finite features (callers that may see a
    diverged model check first: ``rank90`` of such a model is NaN in the rows).
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {x.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not np.isfinite(x).all():
        raise ValueError("features are not finite")
    centred = x - x.mean(axis=0, keepdims=True)
    # Squared singular values of the centred data = variance along each component.
    variances = np.linalg.svd(centred, compute_uv=False) ** 2
    total = float(variances.sum())
    # Centring identical rows leaves rounding noise (~eps^2 of the features' second
    # moment), not variance; float32 features that differ at all give >= ~1e-14 of it.
    scale = float(np.square(x).sum()) + np.finfo(np.float64).tiny
    if total <= 1e-20 * scale:
        return 0
    explained = np.cumsum(variances) / total
    # A hair of tolerance: rank-k data explains exactly 1.0 in theory, 1 - 1e-16 here.
    return int(np.searchsorted(explained, fraction - 1e-9) + 1)


def weight_growth(params_init, params) -> float:
    """||W^1|| / ||W^1_init|| (Frobenius) of the first layer's forward weights
    (``BaseParams.w[0]``, [N_0, N_1]). NaN if either is non-finite or W^1_init is 0."""
    before = np.asarray(params_init.w[0], np.float64)
    after = np.asarray(params.w[0], np.float64)
    if before.shape != after.shape:
        raise ValueError(f"first-layer shapes differ: {before.shape} vs {after.shape}")
    norm_before, norm_after = np.linalg.norm(before), np.linalg.norm(after)
    if not (np.isfinite(norm_before) and np.isfinite(norm_after)) or norm_before == 0:
        return float("nan")
    return float(norm_after / norm_before)


def rank90(features: np.ndarray) -> float:
    """``components_for_variance(features, 0.9)`` as a float row value; NaN for a
    diverged (non-finite) representation, so means over seeds skip it."""
    features = np.asarray(features)
    if not np.isfinite(features).all():
        return float("nan")
    return float(components_for_variance(features, 0.9))


__all__ = ["components_for_variance", "weight_growth", "rank90"]
