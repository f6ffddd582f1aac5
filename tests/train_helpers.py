"""A tiny but real training setup for the learner/worker/driver tests (compiles fast)."""

import os

import yaml

from metalearn.core.config import to_dict
from metalearn.training.config import config_from_dict

TINY_RULE = {"top_units": 8, "top_delta_size": 4, "compute_h_size": 6, "delta_dim": 3}

TINY_MIX = {
    "components": [{"source": "digits", "weight": 1.0, "ways": [3],
                    "preprocess": {"image_size": 0}}],
    "architecture": {"min_layers": 2, "max_layers": 2, "min_width": 8, "max_width": 8,
                     "output_size": 8, "activations": ["relu"]},
}


def tiny_config(tmp_path, **sections):
    """A TrainConfig on a 3-way digits mix, 8x8 inputs, a 64-8-8 base model, U = 2."""
    mix_path = os.path.join(str(tmp_path), "tiny_mix.yaml")
    with open(mix_path, "w") as f:
        yaml.safe_dump(TINY_MIX, f)
    values = {
        "rule_preset": "small",
        "rule": dict(TINY_RULE),
        "objective": {"num_draws": 2, "samples_per_class": 3},
        "learner": {"meta_batch": 2, "max_staleness": 4, "checkpoint_minutes": 10.0},
        "curriculum": {"unroll_start": [2, 2], "unroll_end": [2, 2],
                       "truncations_std_start": 2.0, "truncations_std_end": 2.0},
        "worker": {"batch_size": 8, "num_workers": 2},
        "tasks": {"mix": mix_path},
        "run": {"minutes": 3.0, "progress_every_s": 1.0, "metrics_flush_s": 1.0},
    }
    for section, overrides in sections.items():
        if isinstance(overrides, dict):
            values[section] = {**values.get(section, {}), **overrides}
        else:
            values[section] = overrides
    return config_from_dict(values)


def config_dict(config):
    return to_dict(config)
