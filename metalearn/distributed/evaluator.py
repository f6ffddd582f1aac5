"""Ray actor around ``metalearn.evaluation.continuous.ContinuousEvaluator``.

See docs/evaluation.md (Continuous evaluation during meta-training).
"""

from __future__ import annotations

import ray

from metalearn.core.config_io import to_dict
from metalearn.distributed.actors import claim_cpus, thread_env


@ray.remote(max_restarts=-1, max_task_retries=0)
class EvaluatorActor:
    """The held-out data and fixed evaluation tasks of a ``ContinuousEvaluator``; the driver
    hands it the latest theta and merges the returned row into the run's metrics.
    Configs cross the actor boundary as plain dicts (validated by ``from_dict``), theta as
    numpy (zero-copy through the object store); JAX is imported after the actor has
    pinned itself to one core (``claim_cpus``), like the workers."""

    def __init__(self, eval_config: dict, rule: dict, objective: dict | None = None):
        claim_cpus(1)
        # Imported here, after the cores are claimed: these load JAX (see actors.py).
        from metalearn.core.config import MetaObjectiveConfig, RuleConfig, from_dict
        from metalearn.evaluation.config import ContinuousEvalConfig
        from metalearn.evaluation.continuous import ContinuousEvaluator

        self.config = from_dict(ContinuousEvalConfig, dict(eval_config), "evaluator")
        self.evaluator = ContinuousEvaluator(
            self.config, from_dict(RuleConfig, dict(rule), "rule"),
            from_dict(MetaObjectiveConfig, dict(objective or {}), "objective"))

    def evaluate(self, step: int, theta, short: bool = True, long: bool = False) -> dict:
        """Metrics row for ``theta`` (flat numpy vector or pytree) at learner ``step``:
        the short rollout's columns and/or the long-horizon ones."""
        return self.evaluator.evaluate(step, theta, short=short, long=long)

    def every(self) -> int:
        return self.config.every


def start_evaluator(eval_config, rule, objective=None, reserve: bool = True):
    """Start the actor (typed configs in, dicts across the boundary), on one thread.

    ``reserve=False`` schedules it without reserving a Ray CPU: on a laptop whose every
    core runs a worker, a small evaluation budget shares a core rather than waiting
    forever for a free one.
    """
    return EvaluatorActor.options(
        num_cpus=1 if reserve else 0, runtime_env={"env_vars": thread_env(1)}).remote(
        to_dict(eval_config), to_dict(rule), to_dict(objective) if objective else None)


class RayEvaluator:
    """The evaluator actor as ``training.continuous_evaluation``'s asynchronous
    evaluator: ``submit`` hands it theta (the object ref the workers get) and returns at
    once; ``poll`` waits for the row with ``ray.wait``."""

    def __init__(self, config):
        self.actor = start_evaluator(config.evaluator, config.rule, config.objective,
                                     reserve=False)
        self.ref = None

    def submit(self, step: int, theta, due: dict) -> None:
        self.ref = self.actor.evaluate.remote(step, theta, **due)

    def poll(self, timeout_s: float) -> dict | None:
        done, _ = ray.wait([self.ref], timeout=timeout_s)
        if not done:
            return None
        ref, self.ref = self.ref, None
        return ray.get(ref)

    def resolve(self, theta):
        return ray.get(theta) if isinstance(theta, ray.ObjectRef) else theta

    def close(self) -> None:
        ray.kill(self.actor, no_restart=True)


__all__ = ["EvaluatorActor", "RayEvaluator", "start_evaluator"]

