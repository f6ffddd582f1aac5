"""Run-like folders for export / eval tests, built with the real ``save_run_theta``."""

import os

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from metalearn.core.update_rule import init_theta
from metalearn.training.export import save_run_theta
from metalearn.training.run_dir import RunDir
from metalearn.training.segments import SegmentedTable


def make_run(run_dir, rule, step=7, perturb=0.0, metrics=True):
    """A run folder with theta_latest (init theta, optionally perturbed) and metrics."""
    os.makedirs(run_dir, exist_ok=True)
    flat, _ = ravel_pytree(init_theta(jax.random.key(0), rule))
    flat = np.asarray(flat, np.float32)
    if perturb:
        flat = flat + perturb * np.random.default_rng(1).normal(size=flat.shape).astype(np.float32)
    save_run_theta(RunDir(run_dir), flat, rule, step)
    if metrics:
        SegmentedTable(RunDir(run_dir).metrics).append([
            {"step": s, "meta_loss": loss, "meta_loss_rolling": rolling, "loss/glyphs": glyphs}
            for s, loss, rolling, glyphs in zip((step - 2, step, step + 3), (1.9, 1.5, 1.1),
                                                (1.95, 1.6, 1.2), (1.8, 1.4, 1.0))])
    return flat
