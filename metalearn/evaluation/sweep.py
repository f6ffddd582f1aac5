"""What ``metalearn eval`` runs: one evaluation, or a generalisation sweep of the learned
rule over one setting (``SWEEPS``), as a list of configs run one after another.

Rows are tagged with the dataset, image size and base model of their config (and
``sweep`` / ``sweep_value`` in a sweep), so the rows of every run go into one table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from metalearn.core.config import ACTIVATIONS, RuleConfig
from metalearn.core.config_io import ConfigError
from metalearn.evaluation.config import EvalConfig
from metalearn.evaluation.data import is_image_dataset
from metalearn.evaluation.run import EvalResult, Progress, final_accuracies, run_evaluation

SWEEPS = ("width", "depth", "activation", "resolution")
DEFAULT_SWEEP_VALUES = {
    "width": "32,128,512,2048",
    "depth": "2,3,5,8,11",
    "activation": ",".join(a for a in ACTIVATIONS if a != "identity"),
    "resolution": "14,28",
}


def sweep_configs(base: EvalConfig, kind: str, values_text: str | None
                  ) -> list[tuple[Any, EvalConfig]]:
    """[(value, EvalConfig)] of sweep ``kind`` over ``values_text`` (a comma list; the
    kind's ``DEFAULT_SWEEP_VALUES`` if None), every other setting as in ``base``."""
    if kind not in SWEEPS:
        raise ConfigError(f"unknown sweep {kind!r}; choose one of {', '.join(SWEEPS)}")
    values = [v.strip() for v in (values_text or DEFAULT_SWEEP_VALUES[kind]).split(",")
              if v.strip()]
    configs = []
    for value in values:
        if kind == "activation":
            configs.append((value, dataclasses.replace(base, activation=value)))
            continue
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"--values for {kind} must be integers, got {value!r}")
        if kind == "width":
            configs.append((number, dataclasses.replace(base, width=number)))
        elif kind == "depth":
            configs.append((number, dataclasses.replace(base, depth=number)))
        else:
            if not is_image_dataset(base.data.dataset, base.data.data_dir):
                raise ConfigError(f"--vary resolution needs an image dataset; "
                                  f"{base.data.dataset} is not one")
            data = dataclasses.replace(base.data, image_size=number)
            configs.append((number, dataclasses.replace(base, data=data)))
    return configs


@dataclasses.dataclass
class SweepResult:
    """The rows of every run of ``run_sweep`` and what the report needs of them."""

    config: EvalConfig  # the base config (the only one without a sweep)
    sweep: str | None
    runs: list[tuple[Any, EvalConfig]]  # (swept value, config); [(None, config)] without
    rows: list[dict]
    seconds: dict  # method -> wall seconds over all runs
    first: EvalResult  # the first run's result (data sizes, seed-0 model for the plots)

    def finals(self) -> dict:
        """Per method, the summary at its last evaluation point; in a sweep, that per
        swept value (``{str(value): {method: ...}}``)."""
        if not self.sweep:
            return final_accuracies(self.rows)
        return {str(value): final_accuracies([r for r in self.rows
                                              if r.get("sweep_value") == str(value)])
                for value, _ in self.runs}


def run_sweep(config: EvalConfig, theta, rule: RuleConfig, *, sweep: str | None = None,
              values_text: str | None = None, progress: Progress | None = None
              ) -> SweepResult:
    """``config`` alone, or sweep ``sweep`` of it over ``values_text``."""
    progress = progress or Progress(False)
    runs = [(None, config)] if not sweep else sweep_configs(config, sweep, values_text)
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    first = None
    for value, cfg in runs:
        if sweep:
            progress(f"sweep {sweep} = {value}", force=True)
        result = run_evaluation(cfg, theta, rule, progress=progress)
        first = first or result
        for row in result.rows:
            row.update({"dataset": cfg.data.dataset, "image_size": cfg.data.image_size,
                        "width": cfg.width, "depth": cfg.depth, "activation": cfg.activation})
            if sweep:
                row.update({"sweep": sweep, "sweep_value": str(value)})
        rows.extend(result.rows)
        for method, s in result.seconds.items():
            seconds[method] = seconds.get(method, 0.0) + s
    return SweepResult(config, sweep, runs, rows, seconds, first)


__all__ = ["SWEEPS", "DEFAULT_SWEEP_VALUES", "sweep_configs", "SweepResult", "run_sweep"]
