"""scikit-learn's bundled and generated sets: ``digits`` (8x8 handwritten) and ``two_moons``.

Both exist on every machine with scikit-learn installed; nothing downloads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import sklearn
from sklearn.datasets import load_digits, make_moons

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
