"""PCA features: the top principal components (at most 32) of the unlabelled pool."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA

from metalearn.evaluation.readout import evaluate_features

NUM_COMPONENTS = 32


def fit(x_pool: np.ndarray, seed: int = 0, num_components: int = NUM_COMPONENTS):
    k = min(num_components, x_pool.shape[1], x_pool.shape[0])
    return PCA(n_components=k, random_state=seed).fit(x_pool)


def run(task, arch, config, progress=None) -> list[dict]:
    pca = fit(task.x_pool, task.seed)
    row = evaluate_features(pca.transform, task, config.ridge)
    return [{"step": 0, **row,
             "explained_variance": float(np.sum(pca.explained_variance_ratio_))}]
