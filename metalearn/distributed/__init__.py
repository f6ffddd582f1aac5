"""The Ray floor (docs/architecture.md): ``driver`` the training loop's Ray transport and
runner (``RayLearner``, ``RayWorkers``, ``RAY``); ``actors`` the thin actor classes around
``LearnerHost`` and ``Worker`` (no JAX import at module level: a worker sets its CPU
affinity before JAX starts its thread pool); ``evaluator`` the evaluator actor;
``sweep_spec`` / ``sweep`` the Tune sweeps; ``bench`` the learner and scaling measurements;
``chaos`` the runs that break a local cluster on a schedule.
"""
