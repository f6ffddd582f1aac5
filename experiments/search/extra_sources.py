"""Candidate training sources for the alignment screen (docs/results.md): would any data
this machine can have make the meta-objective prefer wide rules, as validation does?

Writes ``file:`` sources (``x``: [N, 14, 14], ``y``: [N] class ids) to score with
``experiments/search/alignment.py --mix MIX`` or to put in a training mix:

    python experiments/search/extra_sources.py fonts --out data/fonts.npz
    python experiments/search/extra_sources.py textures --out data/textures.npz [--standardize]

``fonts``: font identity. A class is one of the machine's fonts (matplotlib's bundled
ones plus the system's), its examples are that font's letters and digits, drawn by the
glyph renderer; fonts with fewer than ``--min-chars`` drawable characters are left out.
Unlike the glyph tasks (class = character), what tells classes apart here is style
(stroke width, serifs, slant), which the largest directions of the data (the characters'
shapes) do not carry.

``textures``: the 1,231 JPEG textures of Debian's ``openarena-081-textures`` package (a
class is one texture of at least 96 px with some contrast; its examples are 60 random
28 px crops, averaged down to 14 px). ``--standardize`` removes each crop's brightness
and contrast, which otherwise tell most textures apart.
"""

from __future__ import annotations

import argparse
import io
import zipfile

import numpy as np

TEXTURE_PACK = "/usr/share/games/openarena/baseoa/pak4-textures.pk3"


def font_identity(min_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """x: [N, 14, 14] uint8 renders, y: [N] font ids."""
    from tasks.glyphs import GlyphConfig, candidate_chars, discover_fonts, font_renders

    config = GlyphConfig()
    chars = [c for c in candidate_chars(config) if c.isalnum() and ord(c) < 0x0250]
    xs, ys = [], []
    for font in discover_fonts(config):
        images = font_renders(font, chars, config)
        if len(images) >= min_chars:
            xs.append(np.stack(images))
            ys.append(np.full(len(images), len(ys), np.int32))
    if not xs:
        raise SystemExit(f"no font draws {min_chars} characters; lower --min-chars")
    return np.concatenate(xs), np.concatenate(ys)


def textures(pack: str, crops: int, standardize: bool, seed: int):
    """x: [N, 14, 14] (uint8, or float32 in [0, 1] when standardised), y: [N] texture ids."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    with zipfile.ZipFile(pack) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".jpg"):
                continue
            grey = np.asarray(Image.open(io.BytesIO(archive.read(info))).convert("L"),
                              np.float32)
            if min(grey.shape) < 96 or grey.std() < 12:
                continue
            corners = [(rng.integers(0, grey.shape[0] - 27), rng.integers(0, grey.shape[1] - 27))
                       for _ in range(crops)]
            patches = np.stack([grey[t:t + 28, s:s + 28] for t, s in corners])
            xs.append(patches.reshape(crops, 14, 2, 14, 2).mean((2, 4)))
            ys.append(np.full(crops, len(ys), np.int32))
    x = np.round(np.concatenate(xs))  # the uint8 values, standardised or stored
    if standardize:
        mean = x.mean((1, 2), keepdims=True)
        scale = x.std((1, 2), keepdims=True) + 4.0  # flat crops are not blown up
        return np.clip((x - mean) / scale * 0.2 + 0.5, 0, 1).astype(np.float32), \
            np.concatenate(ys)
    return x.astype(np.uint8), np.concatenate(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=["fonts", "textures"])
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--min-chars", type=int, default=80)
    parser.add_argument("--pack", default=TEXTURE_PACK)
    parser.add_argument("--crops", type=int, default=60)
    parser.add_argument("--standardize", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.source == "fonts":
        x, y = font_identity(args.min_chars)
    else:
        x, y = textures(args.pack, args.crops, args.standardize, args.seed)
    np.savez_compressed(args.out, x=x, y=y)
    print(f"{args.out}: {x.shape[0]} examples, {int(y.max()) + 1} classes")


if __name__ == "__main__":
    main()
