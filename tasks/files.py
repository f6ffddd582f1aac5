"""``file:PATH`` sources: a user's own data as parquet or ``.npz``.

Features ``x`` ([N, D], [N, H, W] or [N, H, W, C]) and integer labels ``y`` ([N]).
Parquet: a column ``y`` of integers and a column ``x`` of equal-length lists (or
fixed-size lists) of numbers, optionally with ``height``/``width``(/``channels``)
schema-metadata keys for images; otherwise ``x`` is a vector. Labels are remapped to
0..C-1 in sorted order; class names are the original label values. Integer-valued
uint8 arrays with 2 or 3 trailing image dims are treated as images.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq

from metalearn.core.config_io import ConfigError
from tasks.registry import Dataset, SourceOptions


def _from_arrays(path: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{path}: labels y must be a 1-d integer array, got "
                          f"{y.dtype} of shape {y.shape}")
    if x.ndim not in (2, 3, 4) or x.shape[0] != y.shape[0]:
        raise ConfigError(f"{path}: features x must be [N, D], [N, H, W] or [N, H, W, C] "
                          f"with N = {y.shape[0]} labels, got shape {x.shape}")
    values, labels = np.unique(y, return_inverse=True)
    if x.ndim == 2:
        return Dataset(f"file:{path}", x.astype(np.float32), labels.astype(np.int32),
                       tuple(str(v) for v in values), "vector", info={"origin": path})
    if x.dtype != np.uint8:
        # Images in [0, 1] floats (or any range) are stored as uint8 like every source.
        lo, hi = float(x.min()), float(x.max())
        x = np.round((x - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
    return Dataset(f"file:{path}", x, labels.astype(np.int32), tuple(str(v) for v in values),
                   "image", info={"origin": path})


def load_file(path: str, options: SourceOptions, progress: bool = True) -> Dataset:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} not found (file:PATH needs a .parquet or "
                                f".npz file with features x and integer labels y)")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            missing = {"x", "y"} - set(data.files)
            if missing:
                raise ConfigError(f"{path} lacks array(s) {sorted(missing)}; it has {data.files}")
            return _from_arrays(path, data["x"], data["y"])
    if path.endswith(".parquet"):
        table = pq.read_table(path)
        missing = {"x", "y"} - set(table.column_names)
        if missing:
            raise ConfigError(f"{path} lacks column(s) {sorted(missing)}; it has "
                              f"{table.column_names}")
        col = table.column("x").combine_chunks()
        n = table.num_rows
        x = col.flatten().to_numpy(zero_copy_only=False)
        if x.size % max(n, 1):
            raise ConfigError(f"{path}: rows of x have different lengths")
        x = x.reshape(n, -1)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if "height" in meta and "width" in meta:
            shape = (int(meta["height"]), int(meta["width"]))
            if "channels" in meta:
                shape += (int(meta["channels"]),)
            x = x.reshape((n, *shape))
        return _from_arrays(path, x, table.column("y").to_numpy())
    raise ConfigError(f"file:{path}: unsupported format; use .parquet or .npz")
