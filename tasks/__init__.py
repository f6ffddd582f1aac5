"""Where tasks come from: data sources, preprocessing, augmentation and the task sampler.

    from tasks.sampler import TaskSampler, load_mix   # seed -> Task (docs/tasks.md)
    from tasks.sources import load                    # name -> Dataset (numpy), cached

Modules: ``sources`` (registry, ``Dataset``, ``SourceOptions``), ``cache`` (parquet),
``glyphs``, ``sklearn_sources``, ``idx`` (Fashion-MNIST files), ``tfds_sources``,
``files`` (``file:PATH``), ``preprocess``, ``augment``, ``sampler``, ``cli``
(``metalearn data``) and ``bench`` (``metalearn bench tasks``).
"""
