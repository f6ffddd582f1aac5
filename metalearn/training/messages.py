"""The typed messages of the training loop (docs/architecture.md, "one gradient"):

    driver --WorkOrder--> worker --Submission--> learner --LearnerReply--> worker --> driver
"""

from __future__ import annotations

import dataclasses
import traceback
from typing import Any

import numpy as np

from metalearn.training.schedules import Curriculum


def error_line(err: BaseException, limit: int = 300) -> str:
    """A failure as one line of at most ``limit`` characters, for events and reports: the
    last line of ``TypeName: message`` (a Ray error's message ends with the exception the
    remote code raised)."""
    text = "".join(traceback.format_exception_only(type(err), err)).strip()
    return (text.splitlines()[-1] if text else type(err).__name__)[:limit]


@dataclasses.dataclass(frozen=True)
class ThetaHandle:
    """A published theta version: the learner incarnation (``generation``), the
    ``version`` and a transport-specific ``payload`` (the flat [P] float32 vector in
    process, an object-store reference on Ray). A worker fetches the payload only when
    its (generation, version) differs from the one it holds."""

    generation: str
    version: int
    payload: Any = None  # None: not published yet (the transport fills it in)


@dataclasses.dataclass(frozen=True)
class WorkOrder:
    """The theta handle and the curriculum a worker's next truncation uses, and the seed
    of a new task stream to draw from first (after the worker died or failed)."""

    theta: ThetaHandle
    curriculum: Curriculum
    reseed: int | None = None


@dataclasses.dataclass
class Submission:
    """One truncation's result, as a worker sends it."""

    grad: np.ndarray  # [P] float32, theta's ravel_pytree order (mean over ``count`` tasks)
    version: int  # theta version the gradient was computed with
    generation: str  # learner incarnation that published that version
    loss: float  # mean meta-objective over the truncation's steps (and tasks)
    finite: bool = True  # the worker's own check of loss and gradient
    count: int = 1  # task gradients averaged in ``grad`` (a vmapped worker's T)
    # The meta-objective after the task's first inner step (phi ~ its random init), for
    # the same task(s): loss - loss_start is how much the rule has improved the task's
    # features so far, free of how hard the task is. NaN: not known.
    loss_start: float = float("nan")
    nonfinite_tasks: int = 0  # further tasks of this truncation left out as not finite
    dataset: str = "unknown"
    num_steps: int = 0  # U
    worker: int = -1
    metadata: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)
    # The estimator's own scalars for this truncation (mean over the kept tasks):
    # grad_norm, and per estimator pair_var, xi_norm, bp_var, es_var, w_bp ... The
    # learner averages them over a meta-batch into the row as est/<name>.
    estimator_metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LearnerRow:
    """The metrics row of one learner update; its fields are the columns every row has
    (``LEARNER_COLUMNS``), besides the per-run ``loss/<dataset>``, ``theta/<name>`` and
    ``est/<name>`` (docs/training.md, Metrics)."""

    step: int  # the update's number (1: the first)
    meta_loss: float  # mean meta-objective of the meta-batch
    meta_loss_rolling: float  # ... over the last ``learner.loss_window`` tasks
    loss_vs_start_rolling: float  # mean loss - loss_start over that window
    grads_per_s: float  # task gradients received per second since the last update
    staleness_mean: float
    staleness_max: int
    dropped_stale: int  # task-gradient counters since the run began
    dropped_nonfinite: int
    dropped_generation: int
    received: int
    lr: float
    unroll_min: int  # the curriculum at this update
    unroll_max: int
    truncations_std: float
    grad_norm: float  # of the mean gradient (trainable entries)
    update_norm: float
    theta_norm: float
    wall_s: float  # wall seconds of the run, earlier sessions included
    grad_var: float  # spread of the submissions' gradients (NaN: one submission)
    grad_snr: float

    def to_dict(self, extra: dict) -> dict:
        return {**dataclasses.asdict(self), **extra}


LEARNER_COLUMNS = tuple(field.name for field in dataclasses.fields(LearnerRow))


@dataclasses.dataclass(frozen=True)
class LearnerReply:
    """The learner's answer to a ``Submission``: its newest step and version, the metrics
    row if the submission completed a meta-batch (with the curriculum at the new step),
    and the step of a checkpoint it wrote. ``learner_lost`` marks a reply that no learner
    gave (the push failed): the driver then replaces the learner."""

    generation: str
    step: int  # the learner's step after this submission
    version: int  # its theta version
    row: dict | None = None  # metrics row of the update this submission completed
    curriculum: Curriculum | None = None  # set with ``row``: the curriculum at ``step``
    checkpoint: int | None = None  # step of a checkpoint written while replying
    learner_lost: bool = False  # the push failed: no learner answered
    # The learner cannot go on (e.g. its checkpoint could not be written: disk full,
    # permission denied): one line saying why. The driver stops the run cleanly.
    fatal: str = ""
    received: int = 0  # task gradients this learner incarnation's lineage has received


@dataclasses.dataclass(frozen=True)
class LearnerStatus:
    """The learner's state as the driver sees it (at start, restore and close)."""

    generation: str
    step: int
    version: int
    curriculum: Curriculum
    num_params: int
    counters: dict = dataclasses.field(default_factory=dict)
    meta_loss_rolling: float = float("nan")
    loss_vs_start_rolling: float = float("nan")
    restored_step: int | None = None
    warnings: tuple[str, ...] = ()
    busy_s: float = 0.0  # seconds spent inside ``submit``
    fatal: str = ""  # as ``LearnerReply.fatal``: the learner cannot go on (one line)

    @property
    def theta(self) -> ThetaHandle:
        return ThetaHandle(self.generation, self.version)


@dataclasses.dataclass(frozen=True)
class WorkerResult:
    """One finished order: a reply, or why there is none."""

    index: int
    reply: LearnerReply | None = None
    died: bool = False  # the worker process died (it is restarted)
    error: str = ""  # the truncation raised (the worker lives on); with ``died``, why
    cannot_start: bool = False  # with ``died``: its constructor failed (no restart helps)


__all__ = ["LEARNER_COLUMNS", "error_line", "LearnerReply", "LearnerRow", "LearnerStatus",
           "Submission", "ThetaHandle", "WorkOrder", "WorkerResult"]
