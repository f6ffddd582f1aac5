"""Is the data a sweep needs on every node, before any trial starts? One zero-CPU task
per alive node loads the trials' sources and writes a probe to the checkpoint storage
(a bucket needs credentials on every node); see docs/sweeps.md (Data on every node).
"""

from __future__ import annotations

import socket

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from metalearn.core.config import ConfigError
from metalearn.distributed.storage import check_writable
from tasks.registry import SourceOptions
from tasks.sources import load


def ranked_dataset(metric: str) -> str | None:
    """The dataset a metric such as ``eval/fashion_mnist_val/accuracy@100`` is measured
    on; None for a training column (``meta_loss_rolling``)."""
    # The name may hold slashes itself (file:/data/set.npz): it ends at the last one.
    if not metric.startswith("eval/") or metric.count("/") < 2:
        return None
    return metric[len("eval/"):metric.rindex("/")]


def missing_sources(needs: list[tuple[str, SourceOptions]]) -> dict[str, str]:
    """{source: why} for each (source, options) that cannot be loaded in this process
    (built and cached where it can be: the trial then finds it ready)."""
    missing = {}
    for name, options in needs:
        try:
            load(name, options=options, progress=False)
        except (FileNotFoundError, ConfigError, ImportError, ValueError) as err:
            missing[name] = str(err).splitlines()[0][:300]
    return missing


@ray.remote(num_cpus=0)
def _probe_node(needs: list[tuple[str, SourceOptions]],
                storage: str) -> tuple[str, dict[str, str], str]:
    unwritable = ""
    if storage:
        try:
            check_writable(storage)
        except ConfigError as err:
            unwritable = str(err)
    return socket.gethostname(), missing_sources(needs), unwritable


def check_nodes(needs: list[tuple[str, SourceOptions]], what: str,
                storage: str = "") -> int:
    """Load ``needs`` on every alive node of the connected Ray cluster, and write a
    probe to ``storage`` (a folder or URI; "" skips it); ConfigError naming the first
    missing source or unwritable storage, its node and why. Returns the nodes checked."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probes = [_probe_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(needs, storage) for n in nodes]
    for node, (host, missing, unwritable) in zip(nodes, ray.get(probes)):
        where = f"node {node.get('NodeManagerAddress', host)} ({host})"
        for name, why in missing.items():
            raise ConfigError(f"{what} needs the source {name!r}, which is missing on "
                              f"{where}: {why}. Stage it on every node (docs/sweeps.md) "
                              f"and start again")
        if unwritable:
            raise ConfigError(f"{what}: on {where}, {unwritable}")
    return len(nodes)


__all__ = ["check_nodes", "missing_sources", "ranked_dataset"]
