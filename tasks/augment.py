"""Augmentation (docs/tasks.md; paper appendix H.1.1), vectorised over the batch.

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

Semantics per example: warp (rotation quantised to ``rotation_bins`` angles and integer
shifts, one affine map, nearest or bilinear, zero outside the image), flatten, dropout
masks, class permutation, task permutation. ``assemble`` folds all of it into index
arithmetic on the dataset array: one gather per interpolation tap, no per-example
Python.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Literal

import numpy as np

from metalearn.core.config_io import AtLeastOne, Bound, check_fields

Probability = Annotated[float, Bound(0, 1)]
OpenUnit = Annotated[float, Bound(0, 1, open_low=True, open_high=True)]  # (0, 1)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Per-task probabilities and ranges of each augmentation."""

    geometric_prob: Probability = 0.0
    max_rotation: Annotated[float, Bound(0, 360)] = 360.0  # degrees; uniform in [-max/2, max/2)
    max_shift: AtLeastOne = 5  # px, each of x and y
    rotation_bins: AtLeastOne = 360  # angles are multiples of 360 / bins degrees (tabulated)
    # nearest by default: 4-8x cheaper than bilinear here, and crisp at 14x14
    interpolation: Literal["bilinear", "nearest"] = "nearest"
    x_shift_prob: Probability = 0.0
    max_x_shift: AtLeastOne = 3
    example_dropout_prob: Probability = 0.0
    example_dropout_max: OpenUnit = 0.5
    task_dropout_prob: Probability = 0.0
    task_dropout_max: OpenUnit = 0.5  # the task's rate is uniform in [0, max]
    class_permutation_prob: Probability = 0.0

    def __post_init__(self):
        check_fields(self, "augment")


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
    rotation_bins: int
    interpolation: str
    max_shift: int
    max_x_shift: int
    example_dropout_max: float
    task_mask: np.ndarray | None
    task_dropout_rate: float
    class_perm_ids: np.ndarray | None  # [n_classes] ids into the pre-made set
    feature_index: np.ndarray | None
    # Index plans per example shape, built on the first batch (see ``_plan``).
    plans: dict = dataclasses.field(default_factory=dict, repr=False)

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
                       config.rotation_bins, config.interpolation,
                       config.max_shift, config.max_x_shift, config.example_dropout_max,
                       task_mask, rate, class_perm_ids, index)


@functools.lru_cache(maxsize=32)
def warp_table(h: int, w: int, bins: int, interpolation: str, pad: int):
    """Sampling table of the affine maps "rotate by k * 360 / bins degrees about the
    centre, then translate by an integer shift of at most ``pad`` px".

    Output pixel p of an image shifted by t reads the rotated picture at q = p - t; q is
    tabulated on a grid padded by ``pad`` on every side ((H + 2 pad) x (W + 2 pad)), so
    any shift is one offset into the table. Inverse map about the centre
    c: src = R(-angle) (q - c) + c; with rows pointing down, a positive angle turns the
    picture clockwise on screen (90 degrees == np.rot90(image, -1)).

    Returns (index [T, bins * G] int32, weight [T, bins * G] float32), G the padded
    grid size, T = 1 (nearest) or 4 (bilinear) taps; index H*W means "outside" (zero).
    """
    hp, wp = h + 2 * pad, w + 2 * pad
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ii, jj = np.meshgrid(np.arange(hp, dtype=np.float64) - pad,
                         np.arange(wp, dtype=np.float64) - pad, indexing="ij")
    u, v = jj.reshape(1, -1) - cx, ii.reshape(1, -1) - cy
    angle = (2.0 * np.pi / bins) * np.arange(bins)[:, None]
    src_x = np.cos(angle) * u + np.sin(angle) * v + cx
    src_y = -np.sin(angle) * u + np.cos(angle) * v + cy
    # Snap float noise (cos(pi/2) ~ 6e-17) so exact quarter turns stay exact.
    src_x, src_y = np.round(src_x, 6), np.round(src_y, 6)
    if interpolation == "nearest":
        taps = [(np.round(src_x), np.round(src_y), np.ones_like(src_x))]
    else:
        x0, y0 = np.floor(src_x), np.floor(src_y)
        fx, fy = src_x - x0, src_y - y0
        taps = [(x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)]
    index, weight = [], []
    for xs, ys, wt in taps:
        valid = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        index.append(np.where(valid, ys * w + xs, h * w).astype(np.int32).reshape(-1))
        weight.append(np.where(valid, wt, 0.0).astype(np.float32).reshape(-1))
    index, weight = np.stack(index), np.stack(weight)
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


def warp(images: np.ndarray, angle_bin: np.ndarray, shift: np.ndarray, *, bins: int = 360,
         interpolation: str = "nearest") -> np.ndarray:
    """Rotate about the centre by ``angle_bin * 360 / bins`` degrees and translate by the
    integer ``shift``, as one affine map; zero where the source falls outside.

    images: [B, H, W, C] float32; angle_bin: [B] int; shift: [B, 2] int (dx, dy) in px,
    +x right, +y down. Returns [B, H, W, C] float32. Angles are quantised to ``bins`` so
    the sampling tables are computed once; a batch is then a few ``np.take`` gathers.
    """
    b, h, w, c = images.shape
    hw = h * w
    shift = np.asarray(shift, np.int64)
    pad = max(1, int(np.abs(shift).max(initial=0)))
    pad = 1 << (pad - 1).bit_length()  # few distinct tables across batches
    index, weight = warp_table(h, w, bins, interpolation, pad)
    wp = w + 2 * pad
    grid = (h + 2 * pad) * wp
    ii, jj = np.divmod(np.arange(hw), w)
    start = ((ii + pad) * wp + jj + pad).astype(np.int32)
    offset = np.asarray(angle_bin, np.int64) * grid - shift[:, 1] * wp - shift[:, 0]
    row = start[None, :] + offset.astype(np.int32)[:, None]  # [B, HW] into the table
    # Channels ride along the batch axis; a zero pixel at position HW serves "outside".
    planes = np.zeros((b, c, hw + 1), np.float32)
    planes[:, :, :hw] = images.reshape(b, hw, c).transpose(0, 2, 1)
    planes = planes.reshape(-1)
    base = (np.arange(b * c, dtype=np.int32) * (hw + 1)).reshape(b, c, 1)
    out = np.zeros((b, c, hw), np.float32)
    for tap in range(index.shape[0]):
        src = np.take(index[tap], row)[:, None, :] + base  # [B, C, HW]
        out += np.take(planes, src) * np.take(weight[tap], row)[:, None, :]
    return out.transpose(0, 2, 1).reshape(b, h, w, c)


def _draw_geometry(aug: TaskAugment, b: int, rng: np.random.Generator):
    """Per-example warp parameters and their targets: (angle_bin [B], shift [B, 2], list)."""
    angle_bin = np.zeros(b, np.int64)
    shift = np.zeros((b, 2), np.int64)
    targets = []
    if aug.geometric:
        # Uniform in [-max/2, max/2) degrees, quantised to the tabulated bins; the
        # target is the angle actually applied.
        step = 360.0 / aug.rotation_bins
        half = aug.max_rotation / 2.0
        degrees = np.round(rng.uniform(-half, half, b) / step) * step
        angle_bin = np.mod(np.round(degrees / step), aug.rotation_bins).astype(np.int64)
        angle = np.deg2rad(degrees)
        shift = rng.integers(-aug.max_shift, aug.max_shift + 1, (b, 2))
        targets += [np.sin(angle), np.cos(angle), shift[:, 0] / aug.max_shift,
                    shift[:, 1] / aug.max_shift]
    if aug.x_shift:
        extra = rng.integers(-aug.max_x_shift, aug.max_x_shift + 1, b)
        shift = shift.copy()
        shift[:, 0] += extra
        targets.append(extra / aug.max_x_shift)
    return angle_bin, shift, targets


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Per-task constants of ``assemble`` for one example shape; arrays are [F, D] with
    F = 1 (shared) or n_classes (per-class permutations), indexed by label if F > 1."""

    feature: np.ndarray  # input feature read by each output feature
    mask: np.ndarray | None  # task dropout mask in output order, float32
    start: np.ndarray | None  # warp-table position of each output feature's pixel
    channel: np.ndarray | None  # colour channel of each output feature (C > 1)
    pad: int  # shift bound of the warp table (power of two)


def _plan(aug: TaskAugment, shape: tuple[int, ...], is_image: bool) -> _Plan:
    key = (shape, is_image)
    plan = aug.plans.get(key)
    if plan is not None:
        return plan
    d = int(np.prod(shape))
    feature = (np.arange(d)[None, :] if aug.feature_index is None else aug.feature_index)
    feature = feature.astype(np.int32)
    mask = None if aug.task_mask is None else aug.task_mask[feature]
    start = channel = None
    pad = 0
    if is_image and (aug.geometric or aug.x_shift):
        h, w = shape[:2]
        c = shape[2] if len(shape) == 3 else 1
        bound = aug.max_shift * aug.geometric + aug.max_x_shift * aug.x_shift
        pad = 1 << (max(1, bound) - 1).bit_length()
        pixel, channel = (feature, None) if c == 1 else np.divmod(feature, c)
        pi, pj = np.divmod(pixel, w)
        start = ((pi + pad) * (w + 2 * pad) + pj + pad).astype(np.int32)
    plan = _Plan(feature, mask, start, channel, pad)
    aug.plans[key] = plan
    return plan


def assemble(aug: TaskAugment, data: np.ndarray, ids: np.ndarray, labels: np.ndarray,
             rng: np.random.Generator, is_image: bool,
             scale=None) -> tuple[np.ndarray, np.ndarray]:
    """Gather, warp, mask and permute a batch straight from the dataset array.

    data: [N, H, W, C] images (uint8 or float) or [N, D] vectors, C-contiguous;
    ids: [B] example ids; labels: [B] task-local class ids; scale: maps the gathered
    [B, D] values to float32 (default: cast).
    Returns (features [B, D] float32, targets [B, R] float32, R = ``aug.num_targets``).

    Every step is folded into index arithmetic, so the whole batch costs one gather
    from ``data`` per interpolation tap: output feature k of example b is input
    feature f = perm_b[k] (class and task permutations composed), i.e. pixel p = f // C,
    channel f % C, of the warped image, which the warp table maps to a source pixel.
    """
    b = ids.shape[0]
    n = data.shape[0]
    shape = tuple(data.shape[1:])
    d = int(np.prod(shape))
    flat = data.reshape(-1)  # a view: prepared arrays are contiguous
    plan = _plan(aug, shape, is_image)
    per_class = plan.feature.shape[0] > 1
    pick = (lambda a: a[labels]) if per_class else (lambda a: a)
    # int32 index arithmetic halves memory traffic; int64 only for huge arrays.
    itype = np.int32 if n * d < 2 ** 31 - 1 else np.int64
    base = (ids.astype(itype) * itype(d))[:, None]
    targets = []
    if plan.start is not None:
        h, w = shape[:2]
        c = shape[2] if len(shape) == 3 else 1
        hw = h * w
        angle_bin, shift, targets = _draw_geometry(aug, b, rng)
        index, weight = warp_table(h, w, aug.rotation_bins, aug.interpolation, plan.pad)
        wp = w + 2 * plan.pad
        grid = (h + 2 * plan.pad) * wp
        offset = (angle_bin * grid - shift[:, 1] * wp - shift[:, 0]).astype(np.int32)
        row = pick(plan.start) + offset[:, None]  # [B, D] positions in the table
        x = None
        for tap in range(index.shape[0]):
            src = np.take(index[tap], row).astype(itype, copy=False)
            inside = src < hw  # index hw marks "outside the image"
            np.minimum(src, hw - 1, out=src)
            if plan.channel is not None:
                src *= c
                src += pick(plan.channel)
            src += base
            vals = np.take(flat, src)
            vals = scale(vals) if scale else vals.astype(np.float32)
            wts = np.take(weight[tap], row) * inside if index.shape[0] > 1 else inside
            vals *= wts
            x = vals if x is None else x + vals
    else:
        x = np.take(flat, base + pick(plan.feature))
        x = scale(x) if scale else x.astype(np.float32)
    if aug.example_dropout:
        # Rates in 1/256 steps compared with random bytes: a third of the cost of
        # float uniforms, and the target is still exactly the rate applied.
        level = np.round(rng.uniform(0.0, aug.example_dropout_max, b) * 256.0)
        noise = np.frombuffer(rng.bytes(x.size), np.uint8).reshape(x.shape)
        x *= noise >= level[:, None].astype(np.uint8)
        targets.append(level / 256.0 / aug.example_dropout_max)
    if plan.mask is not None:
        x *= pick(plan.mask)  # the task's mask lives in input-feature space
    y = (np.stack(targets, axis=1).astype(np.float32) if targets
         else np.zeros((b, 0), np.float32))
    return np.ascontiguousarray(x, dtype=np.float32), y


def apply(aug: TaskAugment, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
          is_image: bool) -> tuple[np.ndarray, np.ndarray]:
    """Augment a batch already in memory: x [B, H, W, C] images or [B, D] vectors
    (float32). Same as ``assemble`` with the batch as the dataset."""
    x = np.ascontiguousarray(x)
    return assemble(aug, x, np.arange(x.shape[0]), labels, rng, is_image)
