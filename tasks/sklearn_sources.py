"""scikit-learn's bundled and generated sets: ``digits`` (8x8 handwritten), ``two_moons``
and ``photo_patches`` (natural-image patches from the two photographs scikit-learn
bundles). All exist on every machine with scikit-learn installed; nothing downloads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import sklearn
from sklearn.datasets import load_digits, load_sample_images, make_moons

from tasks.cache import cached
from tasks.registry import Dataset, SourceOptions, register


@dataclasses.dataclass(frozen=True)
class TwoMoonsConfig:
    """``sklearn.datasets.make_moons`` arguments; the seed makes the set the same everywhere."""

    num_examples: int = 2000
    noise: float = 0.1
    seed: int = 0


TWO_MOONS = TwoMoonsConfig()


@register("digits", "scikit-learn's 1797 handwritten digits, 8x8 grey, 10 classes")
def build_digits(options: SourceOptions, progress: bool = True) -> Dataset:
    def build() -> Dataset:
        bunch = load_digits()
        # Pixel values are counts 0..16 of a 4x4 block; stretch to the uint8 range.
        x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        return Dataset("digits", x, bunch.target.astype(np.int32),
                       tuple(str(d) for d in range(10)), "image",
                       info={"origin": "sklearn.datasets.load_digits"})

    return cached("digits", {"sklearn": sklearn.__version__}, build, options)


@register("two_moons", "scikit-learn's two interleaving half-circles, 2-D points, 2 classes")
def build_two_moons(options: SourceOptions, progress: bool = True) -> Dataset:
    cfg = TWO_MOONS

    def build() -> Dataset:
        x, y = make_moons(n_samples=cfg.num_examples, noise=cfg.noise, random_state=cfg.seed)
        return Dataset("two_moons", x.astype(np.float32), y.astype(np.int32),
                       ("upper", "lower"), "vector",
                       info={"origin": "sklearn.datasets.make_moons", **dataclasses.asdict(cfg)})

    return cached("two_moons", {"sklearn": sklearn.__version__, **dataclasses.asdict(cfg)},
                  build, options)


@dataclasses.dataclass(frozen=True)
class PhotoPatchesConfig:
    """``photo_patches``: each of scikit-learn's two bundled photographs (427 x 640) is cut
    into a ``rows`` x ``cols`` grid of regions; a region is a class, and its examples are
    ``per_class`` grey crops of ``crop`` px (at random positions inside the region,
    seeded), averaged down to ``size`` px. Telling regions apart is a natural-image task:
    dense grey patches whose variance is dominated by brightness and texture, unlike the
    glyphs' and digits' sparse strokes."""

    rows: int = 4
    cols: int = 6
    per_class: int = 300
    crop: int = 28
    size: int = 14
    seed: int = 0


PHOTO_PATCHES = PhotoPatchesConfig()


@register("photo_patches", "natural-image patches: 48 regions of scikit-learn's two bundled "
          "photographs, 14x14 grey, 300 crops each")
def build_photo_patches(options: SourceOptions, progress: bool = True) -> Dataset:
    cfg = PHOTO_PATCHES

    def build() -> Dataset:
        rng = np.random.default_rng(cfg.seed)
        images, labels, names = [], [], []
        factor = cfg.crop // cfg.size
        for photo, name in zip(load_sample_images().images, ("china", "flower")):
            grey = photo.astype(np.float32).mean(axis=-1)
            height, width = grey.shape
            for r in range(cfg.rows):
                for c in range(cfg.cols):
                    top, bottom = r * height // cfg.rows, (r + 1) * height // cfg.rows
                    left, right = c * width // cfg.cols, (c + 1) * width // cfg.cols
                    ys = rng.integers(top, max(top + 1, bottom - cfg.crop), cfg.per_class)
                    xs = rng.integers(left, max(left + 1, right - cfg.crop), cfg.per_class)
                    crops = np.stack([grey[y:y + cfg.crop, x:x + cfg.crop]
                                      for y, x in zip(ys, xs)])
                    crops = crops.reshape(-1, cfg.size, factor, cfg.size, factor).mean((2, 4))
                    images.append(np.round(crops).astype(np.uint8))
                    labels.append(np.full(cfg.per_class, len(names), np.int32))
                    names.append(f"{name}/{r},{c}")
        return Dataset("photo_patches", np.concatenate(images), np.concatenate(labels),
                       tuple(names), "image",
                       info={"origin": "sklearn.datasets.load_sample_images",
                             **dataclasses.asdict(cfg)})

    return cached("photo_patches", {"sklearn": sklearn.__version__,
                                    **dataclasses.asdict(cfg)}, build, options)
