"""Preprocessing, done once per process per (source, resolution, colour): resize to
14x14 / 16x16 / 28x28 (or keep the native size), grey or colour, then batches are
flattened and scaled on the fly (``scale``).

Resizing is separable and vectorised: ``out = R_h @ image @ R_w^T`` with antialiasing
triangle-filter matrices (the filter widens with the downscale factor, like Pillow's
bilinear resize), so a whole dataset resizes in a few matrix products.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Literal

import numpy as np

from metalearn.core.config_io import ConfigError
from tasks.registry import Dataset

IMAGE_SIZES = (14, 16, 28)
# ITU-R BT.601 luma weights for colour -> grey.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """image_size: 14, 16, 28 or 0 (native). colour: keep RGB (else grey).
    scale: ``unit`` maps uint8 to [0, 1]; ``signed`` to [-1, 1]; vectors are unchanged."""

    image_size: int = 0
    colour: bool = False
    scale: Literal["unit", "signed"] = "unit"

    def __post_init__(self):
        if self.image_size not in (0, *IMAGE_SIZES):
            raise ConfigError(f"preprocess.image_size must be one of {list(IMAGE_SIZES)} or 0 (native), "
                              f"got {self.image_size}")


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] antialiased linear interpolation weights (rows sum to 1)."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # widen the triangle when shrinking
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    taps = np.arange(n_in)
    w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(images: np.ndarray, size: int, chunk: int = 8192) -> np.ndarray:
    """images: [N, H, W, C] uint8 -> [N, size, size, C] uint8."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    rh, rw = resize_matrix(h, size), resize_matrix(w, size)
    out = np.empty((n, size, size, c), np.uint8)
    for start in range(0, n, chunk):  # bounded float32 memory for large sets
        block = images[start:start + chunk].astype(np.float32)
        block = np.einsum("oh,nhwc,pw->nopc", rh, block, rw, optimize=True)
        out[start:start + chunk] = np.clip(np.round(block), 0, 255).astype(np.uint8)
    return out


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


def prepare_images(x: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """[N, H, W(, C)] uint8 -> [N, S, S, C'] uint8 with C' = 3 if colour (and the source
    has colour) else 1."""
    x = to_nhwc(x)
    if not config.colour and x.shape[-1] == 3:
        x = np.round(x.astype(np.float32) @ LUMA)[..., None].astype(np.uint8)
    elif config.colour and x.shape[-1] == 1:
        pass  # a grey source stays grey: no fake colour channels
    if config.image_size:
        x = resize(x, config.image_size)
    return x


# (id(dataset), config) -> (dataset, array): the dataset is kept so its id is not reused.
_PREPARED: dict[tuple, tuple[Dataset, np.ndarray]] = {}
_LOCK = threading.Lock()


def prepared(dataset: Dataset, config: PreprocessConfig) -> np.ndarray:
    """The dataset's examples preprocessed once per process.

    images: [N, S, S, C] uint8; vectors/text: [N, D] float32 (unchanged), C-contiguous.
    """
    key = (id(dataset), config)
    with _LOCK:
        if key not in _PREPARED:
            # Contiguous, so batches can gather from a flat view without copies.
            x = (prepare_images(dataset.x, config) if dataset.modality == "image"
                 else dataset.x)
            _PREPARED[key] = (dataset, np.ascontiguousarray(x))
        return _PREPARED[key][1]


def scale(x: np.ndarray, config: PreprocessConfig, modality: str) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] or [-1, 1]; vectors pass through as float32."""
    if modality != "image":
        return x.astype(np.float32, copy=False)
    out = x.astype(np.float32) * np.float32(1.0 / 255.0)
    if config.scale == "signed":
        out = out * 2.0 - 1.0
    return out
