"""Augmentation (SPEC section 5, paper appendix H.1.1), vectorised over the batch.

Per task, each augmentation is switched on with its probability; per example, its
parameters are drawn and (where they vary per example) appended to the targets of the
meta-objective as extra regression columns:

  geometric      rotation up to ``max_rotation`` degrees and integer shifts up to
                 +-``max_shift`` px; targets sin(angle), cos(angle), dx / max_shift,
                 dy / max_shift
  x_shift        an extra integer shift along x up to +-``max_x_shift`` px; target
                 shift / max_x_shift
  example_dropout  each example zeroes a random fraction r ~ U[0, max] of its
                 features; target r / max
  task_dropout   one fixed mask for the whole task (no target: constant per task)
  class_permutation  each class's features are permuted by one of a fixed set of
                 pre-made permutations (no target: the class already identifies it)
  and always (``permute_inputs``) one per-task permutation of the features.

Images are warped in one bilinear gather (rotation and shifts composed), zero outside
the image. Order per example: warp, flatten, dropout masks, class permutation, task
permutation; the two permutations are composed into one gather index per class.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from metalearn.config import ConfigError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Per-task probabilities and ranges of each augmentation."""

    geometric_prob: float = 0.0
    max_rotation: float = 360.0  # degrees; angles are uniform in [-max/2, max/2)
    max_shift: int = 5  # px, each of x and y
    x_shift_prob: float = 0.0
    max_x_shift: int = 3
    example_dropout_prob: float = 0.0
    example_dropout_max: float = 0.5
    task_dropout_prob: float = 0.0
    task_dropout_max: float = 0.5  # the task's rate is uniform in [0, max]
    class_permutation_prob: float = 0.0

    def __post_init__(self):
        for name in ("geometric_prob", "x_shift_prob", "example_dropout_prob",
                     "task_dropout_prob", "class_permutation_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augment.{name} must be a probability, got "
                                  f"{getattr(self, name)!r}")
        for name in ("example_dropout_max", "task_dropout_max"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"augment.{name} must be in (0, 1)")
        if not 0.0 <= self.max_rotation <= 360.0:
            raise ConfigError("augment.max_rotation must be in [0, 360] degrees")
        if self.max_shift < 1 or self.max_x_shift < 1:
            raise ConfigError("augment.max_shift and max_x_shift must be >= 1 px")


@functools.lru_cache(maxsize=16)
def premade_permutations(dim: int, count: int, seed: int) -> np.ndarray:
    """The fixed set [count, dim] of pre-made permutations for inputs of size ``dim``
    (the same on every machine for a given seed)."""
    rng = np.random.default_rng([seed, dim])
    out = np.stack([rng.permutation(dim) for _ in range(count)])
    out.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class TaskAugment:
    """The augmentations one task uses (drawn once per task by ``draw``).

    feature_index: [n_classes, D] int; row c = the composed class and task permutation
      (out[:, k] = x[:, feature_index[c, k]]), or None when no permutation applies.
    task_mask: [D] float32 0/1, or None.
    """

    geometric: bool
    x_shift: bool
    example_dropout: bool
    max_rotation: float
    max_shift: int
    max_x_shift: int
    example_dropout_max: float
    task_mask: np.ndarray | None
    task_dropout_rate: float
    class_perm_ids: np.ndarray | None  # [n_classes] ids into the pre-made set
    feature_index: np.ndarray | None

    @property
    def target_names(self) -> list[str]:
        names = []
        if self.geometric:
            names += ["sin_rotation", "cos_rotation", "shift_x", "shift_y"]
        if self.x_shift:
            names += ["x_shift"]
        if self.example_dropout:
            names += ["example_dropout"]
        return names

    @property
    def num_targets(self) -> int:
        return len(self.target_names)

    def describe(self) -> dict:
        """JSON-able summary for task metadata."""
        return {
            "geometric": ({"max_rotation": self.max_rotation, "max_shift": self.max_shift}
                          if self.geometric else None),
            "x_shift": {"max": self.max_x_shift} if self.x_shift else None,
            "example_dropout": ({"max_rate": self.example_dropout_max}
                                if self.example_dropout else None),
            "task_dropout": ({"rate": self.task_dropout_rate}
                             if self.task_mask is not None else None),
            "class_permutation": (self.class_perm_ids.tolist()
                                  if self.class_perm_ids is not None else None),
            "permute_inputs": self.feature_index is not None,
            "targets": self.target_names,
        }


def draw(config: AugmentConfig, rng: np.random.Generator, *, num_classes: int, dim: int,
         is_image: bool, permute_inputs: bool, num_premade: int, premade_seed: int) -> TaskAugment:
    """Choose one task's augmentations. Geometric and x-shift apply to images only."""
    geometric = is_image and rng.random() < config.geometric_prob
    x_shift = is_image and rng.random() < config.x_shift_prob
    example_dropout = rng.random() < config.example_dropout_prob
    task_mask, rate = None, 0.0
    if rng.random() < config.task_dropout_prob:
        rate = float(rng.uniform(0.0, config.task_dropout_max))
        task_mask = (rng.random(dim) >= rate).astype(np.float32)
    class_perm_ids = None
    index = None
    if rng.random() < config.class_permutation_prob:
        class_perm_ids = rng.integers(num_premade, size=num_classes)
        index = premade_permutations(dim, num_premade, premade_seed)[class_perm_ids]
    if permute_inputs:
        task_perm = rng.permutation(dim)
        # x1[:, k] = x[:, P_c[k]]; x2[:, k] = x1[:, T[k]] = x[:, P_c[T[k]]]
        index = task_perm[None, :] if index is None else index[:, task_perm]
    return TaskAugment(geometric, x_shift, example_dropout, config.max_rotation,
                       config.max_shift, config.max_x_shift, config.example_dropout_max,
                       task_mask, rate, class_perm_ids, index)


def warp(images: np.ndarray, angle: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Rotate about the centre by ``angle`` (radians) then translate by ``shift``.

    images: [B, H, W, C] float32; angle: [B]; shift: [B, 2] as (dx, dy) in px, +x right,
    +y down. Returns [B, H, W, C], bilinear, zero where the source falls outside.
    With image rows pointing down, a positive angle turns the picture clockwise on
    screen. Implemented as the inverse map: each output pixel reads
    src = R(-angle) (p - centre - shift) + centre.
    """
    b, h, w, c = images.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ii, jj = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    u = jj.reshape(1, -1) - cx - shift[:, :1].astype(np.float32)  # [B, HW]
    v = ii.reshape(1, -1) - cy - shift[:, 1:].astype(np.float32)
    cos = np.cos(angle).astype(np.float32)[:, None]
    sin = np.sin(angle).astype(np.float32)[:, None]
    src_x = cos * u + sin * v + cx
    src_y = -sin * u + cos * v + cy
    x0 = np.floor(src_x)
    y0 = np.floor(src_y)
    fx = src_x - x0
    fy = src_y - y0
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    flat = images.reshape(b, h * w, c)
    out = np.zeros((b, h * w, c), np.float32)
    for dy, dx, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                           (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = x0 + dx, y0 + dy
        valid = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        idx = np.where(valid, ys * w + xs, 0)
        vals = np.take_along_axis(flat, idx[..., None], axis=1)
        out += vals * (weight * valid)[..., None]
    return out.reshape(b, h, w, c)


def apply(aug: TaskAugment, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
          is_image: bool) -> tuple[np.ndarray, np.ndarray]:
    """Augment one batch.

    x: [B, H, W, C] float32 images or [B, D] float32 vectors; labels: [B] task-local
    class ids. Returns (features [B, D] float32, targets [B, R] float32 with R =
    ``aug.num_targets``).
    """
    b = x.shape[0]
    targets = []
    if is_image and (aug.geometric or aug.x_shift):
        angle = np.zeros(b, np.float32)
        shift = np.zeros((b, 2), np.float32)
        if aug.geometric:
            half = np.deg2rad(aug.max_rotation) / 2.0
            angle = rng.uniform(-half, half, b).astype(np.float32)
            shift = rng.integers(-aug.max_shift, aug.max_shift + 1, (b, 2)).astype(np.float32)
            targets += [np.sin(angle), np.cos(angle), shift[:, 0] / aug.max_shift,
                        shift[:, 1] / aug.max_shift]
        if aug.x_shift:
            extra = rng.integers(-aug.max_x_shift, aug.max_x_shift + 1, b).astype(np.float32)
            shift = shift.copy()
            shift[:, 0] += extra
            targets.append(extra / aug.max_x_shift)
        x = warp(x, angle, shift)
    x = x.reshape(b, -1)
    if aug.example_dropout:
        rate = rng.uniform(0.0, aug.example_dropout_max, b).astype(np.float32)
        x = x * (rng.random(x.shape, dtype=np.float32) >= rate[:, None])
        targets.append(rate / aug.example_dropout_max)
    if aug.task_mask is not None:
        x = x * aug.task_mask[None, :]
    if aug.feature_index is not None:
        if aug.feature_index.shape[0] == 1:
            x = x[:, aug.feature_index[0]]
        else:
            x = np.take_along_axis(x, aug.feature_index[labels], axis=1)
    y = (np.stack(targets, axis=1).astype(np.float32) if targets
         else np.zeros((b, 0), np.float32))
    return np.ascontiguousarray(x, dtype=np.float32), y
