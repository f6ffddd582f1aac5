"""The start of a fresh run: the best of ``learner.start_candidates`` initial thetas by
validation (``choose_start``, ``<run>/theta_start``). See docs/training.md (The start).

The paper's initialisation fixes the merge weights and draws the rest of theta at
random; some draws are destructive rules (features worse than random init's) that a
search over the merge weights does not repair (docs/results.md). Scoring a few draws on
the validation split, as the best theta is scored, and starting from the best keeps
every seed's start usable.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, NamedTuple

import numpy as np

from metalearn.core.theta import theta_spec
from metalearn.evaluation.continuous import ContinuousEvaluator
from metalearn.training.best import selection_score
from metalearn.training.config import TrainConfig
from metalearn.training.events import append_event
from metalearn.training.export import is_export, start_candidate, write_export
from metalearn.training.messages import error_line
from metalearn.training.run_dir import RunDir


class StartChoice(NamedTuple):
    meta: dict  # what ``theta_start`` records: candidate, candidates, scores, score_column
    row: dict | None  # the chosen candidate's evaluation row at step 0 (None: unscored)
    theta: np.ndarray  # [P] the chosen start, flat


def choose_start(config: TrainConfig, run: RunDir,
                 evaluator: Callable[[], Any] | None = None) -> StartChoice | None:
    """Score candidates 0..N-1 (``export.start_candidate``) as the continuous evaluation
    scores a run's start (short and long rollouts, ``best.selection_score``) and write
    the best to ``run.start`` (ties: the lowest index). None, and nothing written, for
    one candidate or when ``run.start`` exists already. Without a validation score (the
    evaluator off or failing, its data missing) candidate 0, the seed's own draw, is the
    start, and the metadata says why.

    evaluator: builds the object whose ``evaluate(step, theta, short=, long=)`` gives an
    evaluation row (default: a ``ContinuousEvaluator`` of ``config.evaluator``)."""
    count = config.learner.start_candidates
    if count <= 1 or is_export(run.start):
        return None
    rows: list[dict] = []
    scores: list[float | None] = []
    column, why = None, ""
    if config.evaluator.enabled and config.evaluator.long_every:
        try:
            scorer = (evaluator() if evaluator is not None else
                      ContinuousEvaluator(config.evaluator, config.rule, config.objective))
            for index in range(count):
                row = scorer.evaluate(0, start_candidate(config, index), short=True, long=True)
                scored = selection_score(config.evaluator, row)
                rows.append(row)
                scores.append(scored[0] if scored and math.isfinite(scored[0]) else None)
                column = column or (scored[1] if scored else None)
                print(f"start candidate {index + 1}/{count}: "
                      f"{'no score' if scored is None else format(scored[0], '.3f')} "
                      f"({column or 'validation'})", file=sys.stderr, flush=True)
        except Exception as err:  # noqa: BLE001 - no validation must not stop a run
            why, rows, scores = error_line(err), [], []
    else:
        why = "the evaluator's long rollouts are off (evaluator.enabled, long_every)"
    ranked = [(s, -i) for i, s in enumerate(scores) if s is not None]
    chosen = -max(ranked)[1] if ranked else 0
    if not ranked:
        why = why or "no candidate got a finite validation score"
        print(f"start candidates not scored ({why}): starting from candidate 1, the "
              f"seed's own draw", file=sys.stderr)
    meta = {"step": 0, "run": run.name, "candidate": chosen, "candidates": count,
            "scores": scores, "score_column": column, "unscored_because": why or None}
    theta = start_candidate(config, chosen)
    write_export(run.start, theta, config.rule, meta, force=True)
    append_event(run.path, "start_chosen", **{k: v for k, v in meta.items() if k != "run"})
    return StartChoice(meta, rows[chosen] if ranked else None,
                       theta_spec(config.rule).ravel(theta))


__all__ = ["StartChoice", "choose_start"]
