"""``file:PATH`` sources: a user's own data as parquet or ``.npz``.

Features ``x`` ([N, D], [N, H, W] or [N, H, W, C]) and integer labels ``y`` ([N]).
Parquet: a column ``y`` of integers and a column ``x`` of equal-length lists (or
fixed-size lists) of numbers, optionally with ``height``/``width``(/``channels``)
schema-metadata keys for images; otherwise ``x`` is a vector. Labels are remapped to
0..C-1 in sorted order; class names are the original label values. Integer-valued
uint8 arrays with 2 or 3 trailing image dims are treated as images.

A file is checked once, when it is loaded (the driver loads every ``file:`` source of a
task mix before any actor starts, ``metalearn.training.task_mix``): a ConfigError names
the file and what is wrong with it: not readable as .npz / parquet, no rows, a single
class, NaN or inf features, labels that are not one integer per row, features that are
not [N, D], [N, H, W] or [N, H, W, C] (C = 1 or 3) numbers.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metalearn.core.config_io import ConfigError
from tasks.registry import Dataset, SourceOptions


def check_arrays(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """Raise ConfigError naming ``path`` unless ``x``, ``y`` make a usable labelled set."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{path}: labels y must be a 1-d integer array, got "
                          f"{y.dtype} of shape {y.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ConfigError(f"{path}: features x must be numbers, got dtype {x.dtype}")
    if x.ndim not in (2, 3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise ConfigError(f"{path}: features x must be [N, D], [N, H, W] or [N, H, W, C] "
                          f"with C = 1 or 3, got shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"{path}: x has {x.shape[0]} rows but y has {y.shape[0]} labels; "
                          f"they must be one label per row")
    if y.shape[0] == 0 or 0 in x.shape:
        raise ConfigError(f"{path}: no data (x has shape {x.shape}); tasks need labelled "
                          f"rows of at least 2 classes")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ConfigError(f"{path}: features x have NaN or inf values in {rows.size} of "
                              f"{x.shape[0]} rows (first: row {rows[0]}); drop or impute "
                              f"them")
    classes = np.unique(y)
    if classes.size < 2:
        raise ConfigError(f"{path}: labels y have a single class ({classes[0]}); tasks "
                          f"need at least 2 classes")


def _from_arrays(path: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    check_arrays(path, x, y)
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
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"x", "y"} - set(data.files)
                if missing:
                    raise ConfigError(f"{path} lacks array(s) {sorted(missing)}; it has "
                                      f"{data.files}")
                x, y = data["x"], data["y"]
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - not an .npz numpy can read
            with open(path, "rb") as f:
                zipped = f.read(2) == b"PK"
            why = _one_line(err) if zipped else "not a zip archive"
            raise ConfigError(f"{path}: cannot read it as .npz ({why}); write it with "
                              f"numpy.savez(path, x=..., y=...)") from None
        return _from_arrays(path, x, y)
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - not a parquet file pyarrow can read
            raise ConfigError(f"{path}: cannot read it as parquet ({_one_line(err)})") from None
        missing = {"x", "y"} - set(table.column_names)
        if missing:
            raise ConfigError(f"{path} lacks column(s) {sorted(missing)}; it has "
                              f"{table.column_names}")
        col = table.column("x").combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                or pa.types.is_fixed_size_list(col.type)):
            raise ConfigError(f"{path}: column x must hold lists of numbers (one list per "
                              f"row), got {col.type}")
        if col.null_count or col.flatten().null_count:
            raise ConfigError(f"{path}: column x has missing (null) values; drop or impute "
                              f"them")
        n = table.num_rows
        x = col.flatten().to_numpy(zero_copy_only=False)
        if x.size % max(n, 1):
            raise ConfigError(f"{path}: rows of x have different lengths")
        x = x.reshape(n, -1)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if "height" in meta and "width" in meta:
            try:
                shape = (int(meta["height"]), int(meta["width"]))
                if "channels" in meta:
                    shape += (int(meta["channels"]),)
                x = x.reshape((n, *shape))
            except ValueError:
                raise ConfigError(
                    f"{path}: schema metadata height {meta['height']}, width "
                    f"{meta['width']}, channels {meta.get('channels', '-')} do not fit rows "
                    f"of {x.shape[1] if x.ndim == 2 else '?'} values") from None
        y = table.column("y")
        if y.null_count:
            raise ConfigError(f"{path}: column y has missing (null) labels")
        return _from_arrays(path, x, y.to_numpy())
    raise ConfigError(f"file:{path}: unsupported format; use .parquet or .npz")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__
