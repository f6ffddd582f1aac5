"""Glyph rendering: legible classes, deterministic, missing glyphs (tofu) dropped."""

import atexit
import os
import shutil
import tempfile

# One throwaway parquet cache per test process, never the user's.
os.environ["METALEARN_CACHE"] = os.path.join(tempfile.gettempdir(),
                                             f"metalearn-test-cache-{os.getpid()}")
atexit.register(shutil.rmtree, os.environ["METALEARN_CACHE"], True)

import dataclasses

import numpy as np
import pytest
from fontTools.ttLib import TTFont

from metalearn.core.config import ConfigError
from tasks import glyphs
from tasks.sources import SourceOptions, load

SMALL = glyphs.GlyphConfig(blocks=("basic_latin", "currency"), system_fonts=False,
                           max_fonts=8, min_fonts_per_char=1)


def _font(name):
    fonts = glyphs.discover_fonts(glyphs.GlyphConfig(system_fonts=False))
    return next(f for f in fonts if f.name == name)


def test_small_build_is_deterministic_and_grouped():
    fonts = glyphs.discover_fonts(SMALL)
    chars = glyphs.candidate_chars(SMALL)
    x1, y1, kept1, _ = glyphs.render_all(SMALL, fonts, chars, progress=False)
    x2, y2, kept2, _ = glyphs.render_all(SMALL, fonts, chars, progress=False)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert kept1 == kept2
    assert x1.shape[1:] == (14, 14) and x1.dtype == np.uint8
    assert len(kept1) > 100
    groups = glyphs.groups_of(kept1)
    assert len(groups["alphabet"]) == 52
    assert len(groups["currency"]) >= 10
    assert len(groups["math"]) >= 5  # + < = > | ~ and currency-block maths
    # every render has ink, and the classes of one font never share a bitmap
    assert (x1.reshape(len(x1), -1).max(axis=1) >= SMALL.blank_threshold).all()


def test_missing_glyphs_are_dropped():
    # DejaVu Sans Mono lacks some currency signs that DejaVu Sans has: those code points
    # must not be rendered from Mono (FreeType would draw its .notdef box).
    mono, sans = _font("DejaVu Sans Mono Book"), _font("DejaVu Sans Book")
    chars = glyphs.candidate_chars(glyphs.GlyphConfig(blocks=("currency",)))
    mono_cmap = TTFont(mono.path, lazy=True).getBestCmap()
    lacking = [ch for ch in chars if ord(ch) not in mono_cmap]
    assert lacking, "test needs a character the mono font lacks"
    covered = glyphs._covered(mono, chars, SMALL)
    assert not set(lacking) & set(covered)
    cfg = dataclasses.replace(SMALL, blocks=("currency",))
    x, y, kept, info = glyphs.render_all(cfg, [mono, sans], chars, progress=False)
    counts = np.bincount(y, minlength=len(kept))
    for i, ch in enumerate(kept):
        assert counts[i] == (2 if ord(ch) in mono_cmap else 1)
    # The .notdef (tofu) box is what a missing glyph would have produced.
    renderer = glyphs._Renderer(mono, cfg)
    assert np.array_equal(renderer.render(lacking[0]), renderer.notdef())


def test_font_renders_are_one_fonts_distinct_drawable_characters():
    mono = _font("DejaVu Sans Mono Book")
    chars = glyphs.candidate_chars(glyphs.GlyphConfig(blocks=("currency",)))
    mono_cmap = TTFont(mono.path, lazy=True).getBestCmap()
    images = glyphs.font_renders(mono, chars, SMALL)
    drawable = [ch for ch in chars if ord(ch) in mono_cmap]
    assert 0 < len(images) <= len(drawable) < len(chars)
    assert all(im.shape == (14, 14) and im.dtype == np.uint8 for im in images)
    assert len({im.tobytes() for im in images}) == len(images)
    assert glyphs.font_renders(mono, [], SMALL) == []
    broken = dataclasses.replace(mono, path=mono.path + ".missing")
    assert glyphs.font_renders(broken, chars, SMALL) == []


def test_placeholder_font_boxes_are_dropped():
    # Last Resort maps every code point to a box per Unicode block: with the name
    # filter off and the cmap-size guard off, the collision check still drops the boxes.
    cfg = dataclasses.replace(SMALL, exclude_fonts=(), max_cmap=10**7, max_fonts=0,
                              blocks=("basic_latin",))
    last = next(f for f in glyphs.discover_fonts(cfg) if "Last Resort" in f.name)
    assert glyphs._covered(last, ["A"], SMALL) == []  # default guard: cmap too large
    x, y, kept, info = glyphs.render_all(cfg, [last], glyphs.candidate_chars(cfg),
                                         progress=False)
    assert len(kept) <= 1  # the first box of the block at most, never 94 "classes"
    assert "Last Resort High-Efficiency" not in [
        f.name for f in glyphs.discover_fonts(glyphs.GlyphConfig(system_fonts=False))]


def test_symbol_encoded_fonts_do_not_lie():
    # cmr10 (TeX encoding) draws other glyphs at some ASCII punctuation code points;
    # only its letters and digits are used.
    cmr = _font("cmr10")
    covered = glyphs._covered(cmr, glyphs.candidate_chars(
        glyphs.GlyphConfig(blocks=("basic_latin",))), SMALL)
    assert covered and all(ch.isalnum() for ch in covered)


def test_full_build_from_bundled_fonts(tmp_path):
    """The real build from matplotlib's fonts alone: >= 1000 characters, several fonts each."""
    options = SourceOptions(cache_dir=str(tmp_path), glyphs={"system_fonts": False})
    ds = load("glyphs", options=options, progress=False)
    assert ds.num_classes >= 1000
    assert ds.class_index.counts.min() >= 3
    assert {k: len(v) >= 10 for k, v in ds.groups.items()} == {
        "alphabet": True, "math": True, "currency": True}
    assert ds.info["num_fonts"] >= 10


def test_bad_glyph_config():
    with pytest.raises(ConfigError, match="unknown block 'klingon'"):
        glyphs.GlyphConfig(blocks=("klingon",))
    with pytest.raises(ConfigError, match="sources.glyphs.bogus"):
        glyphs.glyph_config(SourceOptions(glyphs={"bogus": 1}))
