"""Parquet cache of built datasets, keyed by a hash of everything that went into them.

One file per (source, inputs): ``<cache_dir>/<source>-<hash16>.parquet`` with columns
``x`` (fixed-size list of the flattened example, in the example's dtype) and ``y``
(int32), and the rest of the ``Dataset`` (shape, class names, groups, info) in the
schema metadata. A file that is missing, unreadable, truncated or written for other
inputs is rebuilt; writes go to a temporary file renamed into place, so a killed
build never leaves a half-written cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.registry import Dataset, SourceOptions, default_cache_dir

FORMAT_VERSION = 1  # bump when the file layout changes
_META_KEY = b"metalearn.dataset"


def inputs_hash(source: str, inputs: dict[str, Any]) -> str:
    """Stable hex digest of a source name and its JSON-able build inputs."""
    blob = json.dumps({"source": source, "format": FORMAT_VERSION, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(source: str, inputs: dict[str, Any], options: SourceOptions) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in source)
    return os.path.join(default_cache_dir(options), f"{safe}-{inputs_hash(source, inputs)[:16]}.parquet")


def write(path: str, dataset: Dataset, digest: str) -> None:
    n = dataset.num_examples
    flat = np.ascontiguousarray(dataset.x).reshape(n, -1)
    width = flat.shape[1]
    x_col = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)
    meta = {"hash": digest, "name": dataset.name, "shape": list(dataset.shape),
            "dtype": str(dataset.x.dtype), "class_names": list(dataset.class_names),
            "modality": dataset.modality,
            "groups": {k: list(v) for k, v in dataset.groups.items()}, "info": dataset.info}
    schema = pa.schema([("x", x_col.type), ("y", pa.int32())],
                       metadata={_META_KEY: json.dumps(meta).encode()})
    table = pa.Table.from_arrays([x_col, pa.array(dataset.y.astype(np.int32))], schema=schema)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=os.path.dirname(path))
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path: str, digest: str) -> Dataset:
    """Read a cache file; raises (any exception) if it is corrupt or for other inputs."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[_META_KEY])
    if meta["hash"] != digest:
        raise ValueError("cache written for other inputs")
    x_col = table.column("x").combine_chunks()
    n = table.num_rows
    x = x_col.values.to_numpy(zero_copy_only=False).astype(meta["dtype"], copy=False)
    x = x.reshape((n, *meta["shape"]))
    y = table.column("y").to_numpy().astype(np.int32)
    return Dataset(meta["name"], x, y, tuple(meta["class_names"]), meta["modality"],
                   {k: tuple(v) for k, v in meta["groups"].items()}, meta["info"])


def cached(source: str, inputs: dict[str, Any], build: Callable[[], Dataset],
           options: SourceOptions) -> Dataset:
    """``build()`` once per machine for these inputs; later calls read the parquet file."""
    if not options.use_cache:
        return build()
    path = cache_path(source, inputs, options)
    digest = inputs_hash(source, inputs)
    if os.path.exists(path):
        try:
            return read(path, digest)
        except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt
            print(f"metalearn: cache {path} unreadable ({type(err).__name__}: {err}); "
                  f"rebuilding", file=sys.stderr)
    dataset = build()
    try:
        write(path, dataset, digest)
    except OSError as err:  # a read-only cache dir must not stop training
        print(f"metalearn: could not write cache {path}: {err}", file=sys.stderr)
    return dataset
