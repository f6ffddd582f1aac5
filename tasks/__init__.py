"""Where tasks come from: data sources, preprocessing, augmentation and the task sampler.

    from tasks.sampler import TaskSampler, load_mix   # seed -> Task (docs/tasks.md)
    from tasks.sources import load                    # name -> Dataset (numpy), cached

Modules: ``registry`` (``Dataset``, ``SourceOptions``, ``register``), ``sources`` (the
registry of every source by name, ``load``), ``cache`` (parquet), ``glyphs``,
``sklearn_sources``, ``idx`` (Fashion-MNIST files), ``tfds_sources``, ``files``
(``file:PATH``), ``preprocess``, ``augment``, ``sampler`` and ``bench`` (what
``metalearn bench tasks`` measures). The package imports only ``metalearn.core``; its
command lines live in ``metalearn.cli`` (``data``, ``bench``).
"""
