"""Ray wrappers of the learner and workers, and the driver loop of ``metalearn train``.

``actors`` holds the thin actor classes (no JAX import at module level: a worker sets
its CPU affinity before JAX starts its thread pool); ``driver`` starts or joins Ray,
runs the asynchronous loop with ``ray.wait`` and handles failures; ``bench`` registers
``metalearn bench learner`` and ``metalearn bench scaling``.
"""
