"""The Ray floor: the training loop's Ray transport, actors, continuous evaluation and
Tune sweeps (docs/architecture.md).

``actors`` holds the thin actor classes around ``LearnerHost`` and ``Worker`` (no JAX
import at module level: a worker sets its CPU affinity before JAX starts its thread
pool); ``driver`` is ``RayLearner``, ``RayWorkers`` and ``train``; ``evaluator`` the evaluator actor;
``sweep_spec`` / ``sweep`` the Tune sweeps; ``bench`` the learner and scaling
measurements.
"""
