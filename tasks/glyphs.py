"""``glyphs``: characters rendered from every usable font on the machine, 14x14 grey.

Each class is one Unicode character (Latin, Greek, Cyrillic, Armenian, Hebrew and
Georgian letters, digits, punctuation, mathematical, currency, arrow, technical and
other symbols); each example is that character drawn in one font. Fonts come from
matplotlib's bundled folder (always present) and the usual system font folders, so the
set grows with the fonts installed; the build is deterministic for a given set of font
files, and its output is cached (``tasks.cache``) keyed by the font files and this
config.

Rendering (per font, per character): supersampled on a ``size * supersample`` square
canvas at a fixed em size with a fixed baseline (so '.', '-' and '_' keep their
size and height), centred horizontally on the ink, shrunk only when the ink would
leave the canvas, then box-filtered down to ``size x size``. White ink on black, uint8.

Missing glyphs ("tofu") are dropped, by four checks:
  1. the font's Unicode cmap (fontTools) must contain the code point;
  2. the glyph name must not contradict the code point (a font whose cmap maps '+'
     to a glyph named ``parenrightbt`` is not drawing '+': Adobe Glyph List check);
  3. the render must have ink and must differ from the font's .notdef render;
  4. placeholder fonts (``exclude_fonts``, e.g. Last Resort, whose cmap covers all
     of Unicode with boxes) are never used, and a render identical to the render of an
     earlier character in the same font is dropped (a box shared by many code points,
     or a homoglyph such as Latin 'A' / Greek 'Alpha' / Cyrillic 'A'); a character
     whose renders collide in at least ``homoglyph_fraction`` of its fonts is dropped
     entirely, so classes are visually distinct.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import unicodedata

import matplotlib
import numpy as np
import PIL
from fontTools import agl
from fontTools.ttLib import TTCollection, TTFont
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from metalearn.core.config_io import ConfigError, from_dict
from tasks.cache import cached
from tasks.registry import Dataset, SourceOptions, register

# Unicode blocks rendered, in the order classes are numbered (earlier blocks win
# homoglyph ties, so Latin letters are kept over identical Greek/Cyrillic ones).
BLOCKS: dict[str, tuple[int, int]] = {
    "basic_latin": (0x0021, 0x007E),
    "latin1": (0x00A1, 0x00FF),
    "latin_ext_a": (0x0100, 0x017F),
    "latin_ext_b": (0x0180, 0x024F),
    "ipa": (0x0250, 0x02AF),
    "greek": (0x0370, 0x03FF),
    "cyrillic": (0x0400, 0x04FF),
    "armenian": (0x0531, 0x058A),
    "hebrew": (0x05D0, 0x05EA),
    "georgian": (0x10A0, 0x10FF),
    "general_punctuation": (0x2010, 0x205E),
    "currency": (0x20A0, 0x20C0),
    "letterlike": (0x2100, 0x214F),
    "number_forms": (0x2150, 0x218B),
    "arrows": (0x2190, 0x21FF),
    "math_operators": (0x2200, 0x22FF),
    "misc_technical": (0x2300, 0x23FF),
    "geometric_shapes": (0x25A0, 0x25FF),
    "misc_symbols": (0x2600, 0x26FF),
    "dingbats": (0x2700, 0x27BF),
    "misc_math_a": (0x27C0, 0x27EF),
    "misc_math_b": (0x2980, 0x29FF),
    "supplemental_math": (0x2A00, 0x2AFF),
}
# Unicode general categories that draw one visible, self-contained symbol.
DRAWN_CATEGORIES = ("Lu", "Ll", "Lt", "Lo", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi",
                    "Pf", "Po", "Sm", "Sc", "So")
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts",
                    "~/.fonts", "/Library/Fonts", "/System/Library/Fonts",
                    "C:/Windows/Fonts")


@dataclasses.dataclass(frozen=True)
class GlyphConfig:
    """How the glyph dataset is rendered; every field is part of the cache key."""

    size: int = 14  # output images are size x size
    supersample: int = 4  # render at size * supersample, then box-filter down
    em_fraction: float = 0.7  # font size as a fraction of the canvas
    baseline: float = 0.75  # baseline height from the top, as a fraction of the canvas
    margin: float = 0.04  # ink is kept this fraction of the canvas from its edges
    blocks: tuple[str, ...] = ()  # subset of BLOCKS; empty = all
    max_chars: int = 0  # keep only the first N candidate characters (0 = all; tests)
    system_fonts: bool = True  # also scan SYSTEM_FONT_DIRS
    font_dirs: tuple[str, ...] = ()  # extra folders scanned before the system ones
    max_fonts: int = 0  # use only the first N usable fonts (0 = all; tests)
    # Placeholder / symbol-encoded fonts whose cmap lies about what they draw, and
    # decorative faces that frame every letter (keyboard keys, drop-cap initials).
    exclude_fonts: tuple[str, ...] = ("LastResort", "STIXSiz", "STIXNonUni", "cmex10",
                                      "cmsy10", "cmmi10", "Keyboard", "Initials")
    # TeX fonts in a legacy encoding: only their letters and digits are what they claim.
    alnum_only_fonts: tuple[str, ...] = ("cmr10", "cmb10", "cmss10", "cmti10", "cmtt10")
    max_cmap: int = 100_000  # a cmap larger than this is a fallback/placeholder font
    blank_threshold: int = 48  # a render whose brightest pixel is below this is blank
    homoglyph_fraction: float = 0.5  # drop a character colliding in this share of fonts
    min_fonts_per_char: int = 3  # drop characters drawn by fewer fonts

    def __post_init__(self):
        unknown = sorted(set(self.blocks) - set(BLOCKS))
        if unknown:
            raise ConfigError(f"glyphs.blocks: unknown block {unknown[0]!r}; known: "
                              f"{', '.join(BLOCKS)}")
        for name in ("size", "supersample", "min_fonts_per_char"):
            if getattr(self, name) < 1:
                raise ConfigError(f"glyphs.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.homoglyph_fraction <= 1.0:
            raise ConfigError("glyphs.homoglyph_fraction must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class FontFile:
    path: str
    index: int  # face index inside a .ttc collection
    name: str  # full name from the name table (used to drop duplicate installs)
    file_size: int


def candidate_chars(config: GlyphConfig) -> list[str]:
    """Characters to try, in class order (block order, then code point)."""
    out = []
    for block in (config.blocks or tuple(BLOCKS)):
        lo, hi = BLOCKS[block]
        out.extend(chr(cp) for cp in range(lo, hi + 1)
                   if unicodedata.category(chr(cp)) in DRAWN_CATEGORIES)
    return out[:config.max_chars] if config.max_chars else out


def font_dirs(config: GlyphConfig) -> list[str]:
    dirs = [os.path.join(matplotlib.get_data_path(), "fonts", "ttf")]
    dirs += [os.path.expanduser(d) for d in config.font_dirs]
    if config.system_fonts:
        dirs += [os.path.expanduser(d) for d in SYSTEM_FONT_DIRS]
    return dirs


def discover_fonts(config: GlyphConfig) -> list[FontFile]:
    """Usable font faces, deterministic order, one per distinct full name."""
    found, seen = [], set()
    for folder in font_dirs(config):
        if not os.path.isdir(folder):
            continue
        paths = []
        for root, subdirs, files in os.walk(folder):
            subdirs.sort()
            paths += [os.path.join(root, f) for f in sorted(files)
                      if f.lower().endswith(FONT_EXTENSIONS)]
        for path in paths:
            if any(pattern in os.path.basename(path) for pattern in config.exclude_fonts):
                continue
            try:
                if path.lower().endswith(".ttc"):
                    faces = list(enumerate(TTCollection(path, lazy=True).fonts))
                else:
                    faces = [(0, TTFont(path, lazy=True))]
            except Exception:  # noqa: BLE001 - an unreadable font file is skipped
                continue
            for index, face in faces:
                try:
                    name = face["name"].getBestFullName() or os.path.basename(path)
                except Exception:  # noqa: BLE001
                    continue
                if name in seen or any(p in name.replace(" ", "") for p in config.exclude_fonts):
                    continue
                seen.add(name)
                found.append(FontFile(path, index, name, os.path.getsize(path)))
    return found[:config.max_fonts] if config.max_fonts else found


def _covered(font: FontFile, chars: list[str], config: GlyphConfig) -> list[str]:
    """Characters whose code point the font's cmap maps to a glyph that claims to be it."""
    try:
        face = (TTCollection(font.path, lazy=True).fonts[font.index]
                if font.path.lower().endswith(".ttc") else TTFont(font.path, lazy=True))
        cmap = face.getBestCmap() or {}
    except Exception:  # noqa: BLE001
        return []
    if len(cmap) > config.max_cmap:
        return []
    alnum_only = any(p in os.path.basename(font.path) for p in config.alnum_only_fonts)
    out = []
    for ch in chars:
        glyph = cmap.get(ord(ch))
        if glyph is None or glyph == ".notdef":
            continue
        if alnum_only and not (ch.isascii() and ch.isalnum()):
            continue
        # A glyph name that decodes (Adobe Glyph List) to another character is a
        # font whose cmap lies (symbol encodings); undecodable names are accepted.
        claimed = agl.toUnicode(glyph.split(".")[0])
        if claimed and claimed != ch:
            continue
        out.append(ch)
    return out


class _Renderer:
    """Renders characters of one font as ``size x size`` uint8 arrays."""

    def __init__(self, font: FontFile, config: GlyphConfig):
        self.font, self.config = font, config
        self.canvas = config.size * config.supersample
        self.em = max(4, int(round(config.em_fraction * self.canvas)))
        self._fonts: dict[int, object] = {}
        self._load = lambda px: ImageFont.truetype(font.path, px, index=font.index)

    def _face(self, px: int):
        if px not in self._fonts:
            self._fonts[px] = self._load(px)
        return self._fonts[px]

    def render(self, ch: str) -> np.ndarray | None:
        cfg, canvas = self.config, self.canvas
        base = cfg.baseline * canvas
        margin = cfg.margin * canvas
        px = self.em
        face = self._face(px)
        left, top, right, bottom = face.getbbox(ch, anchor="ls")
        if right <= left or bottom <= top:
            return None
        # Shrink (keeping the baseline) only if the ink would leave the canvas.
        room = [(canvas - 2 * margin) / (right - left)]
        if top < 0:
            room.append((base - margin) / -top)
        if bottom > 0:
            room.append((canvas - margin - base) / bottom)
        scale = min(1.0, *room)
        if scale < 1.0:
            px = max(2, int(px * scale))
            face = self._face(px)
            left, top, right, bottom = face.getbbox(ch, anchor="ls")
        image = Image.new("L", (canvas, canvas), 0)
        x = canvas / 2 - (left + right) / 2
        ImageDraw.Draw(image).text((x, base), ch, font=face, fill=255, anchor="ls")
        small = image.resize((cfg.size, cfg.size), Image.Resampling.BOX)
        out = np.asarray(small, dtype=np.uint8)
        return out if out.max() >= cfg.blank_threshold else None

    def notdef(self) -> np.ndarray | None:
        # A private-use code point no font here maps: FreeType draws glyph 0 (.notdef).
        return self.render("\U0010FFFD")


def font_renders(font: FontFile, chars: list[str], config: GlyphConfig) -> list[np.ndarray]:
    """One font's distinct, non-blank, non-.notdef renders of ``chars`` ([size, size] uint8
    each), in ``chars`` order; [] when Pillow cannot open the face. The per-font part of
    ``render_all`` without its cross-font bookkeeping (for font-identity tasks)."""
    try:
        renderer = _Renderer(font, config)
        notdef = renderer.notdef()
    except Exception:  # noqa: BLE001 - Pillow cannot open this face
        return []
    out, seen = [], set()
    for ch in _covered(font, chars, config):
        try:
            image = renderer.render(ch)
        except Exception:  # noqa: BLE001 - a glyph FreeType cannot draw is missing
            continue
        if image is None or (notdef is not None and np.array_equal(image, notdef)):
            continue
        if image.tobytes() not in seen:
            seen.add(image.tobytes())
            out.append(image)
    return out


def render_all(config: GlyphConfig, fonts: list[FontFile], chars: list[str],
               progress: bool = True):
    """(images [N, size, size] uint8, labels [N] int32, kept chars, info dict)."""
    char_id = {ch: i for i, ch in enumerate(chars)}
    renders: dict[str, list[np.ndarray]] = {ch: [] for ch in chars}
    fonts_of: dict[str, int] = {ch: 0 for ch in chars}  # fonts that claim the char
    collisions: dict[str, int] = {ch: 0 for ch in chars}
    used_fonts = []
    dropped = {"not_in_cmap": 0, "blank": 0, "notdef": 0, "collision": 0}
    bar = tqdm(fonts, desc="rendering glyphs", unit="font", disable=not progress)
    for font in bar:
        covered = _covered(font, chars, config)
        dropped["not_in_cmap"] += len(chars) - len(covered)
        if not covered:
            continue
        try:
            renderer = _Renderer(font, config)
            notdef = renderer.notdef()
        except Exception:  # noqa: BLE001 - Pillow cannot open this face: skip the font
            continue
        seen: dict[bytes, str] = {}
        kept_here = 0
        for ch in sorted(covered, key=char_id.__getitem__):
            try:
                image = renderer.render(ch)
            except Exception:  # noqa: BLE001 - a glyph FreeType cannot draw is missing
                image = None
            if image is None:
                dropped["blank"] += 1
                continue
            if notdef is not None and np.array_equal(image, notdef):
                dropped["notdef"] += 1
                continue
            fonts_of[ch] += 1
            digest = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
            if digest in seen:
                collisions[ch] += 1
                dropped["collision"] += 1
                continue
            seen[digest] = ch
            renders[ch].append(image)
            kept_here += 1
        if kept_here:
            used_fonts.append(font.name)
        bar.set_postfix(renders=sum(len(v) for v in renders.values()))

    kept = [ch for ch in chars
            if renders[ch]
            and collisions[ch] < config.homoglyph_fraction * fonts_of[ch]
            and len(renders[ch]) >= config.min_fonts_per_char]
    images = [img for ch in kept for img in renders[ch]]
    labels = [i for i, ch in enumerate(kept) for _ in renders[ch]]
    x = (np.stack(images) if images else
         np.zeros((0, config.size, config.size), np.uint8))
    info = {"fonts": used_fonts, "num_fonts": len(used_fonts), "dropped": dropped,
            "candidates": len(chars)}
    return x, np.asarray(labels, np.int32), kept, info


def class_name(ch: str) -> str:
    return f"{ch} U+{ord(ch):04X}"


def groups_of(chars: list[str]) -> dict[str, tuple[int, ...]]:
    """Class groups for the paper's fixed 10-way glyph tasks."""
    alphabet = [i for i, ch in enumerate(chars) if ch.isascii() and ch.isalpha()]
    math = [i for i, ch in enumerate(chars) if unicodedata.category(ch) == "Sm"]
    currency = [i for i, ch in enumerate(chars) if unicodedata.category(ch) == "Sc"]
    return {"alphabet": tuple(alphabet), "math": tuple(math), "currency": tuple(currency)}


def glyph_config(options: SourceOptions) -> GlyphConfig:
    return from_dict(GlyphConfig, dict(options.glyphs), "sources.glyphs")


@register("glyphs", "Unicode characters rendered from the machine's fonts, 14x14 grey; "
          "groups alphabet, math, currency")
def build_glyphs(options: SourceOptions, progress: bool = True) -> Dataset:
    config = glyph_config(options)
    fonts = discover_fonts(config)
    chars = candidate_chars(config)
    inputs = {"config": dataclasses.asdict(config),
              "fonts": [dataclasses.asdict(f) for f in fonts],
              "chars": hashlib.sha256("".join(chars).encode()).hexdigest(),
              "unicode": unicodedata.unidata_version}

    def build() -> Dataset:
        x, y, kept, info = render_all(config, fonts, chars, progress)
        if not kept:
            raise FileNotFoundError("no usable fonts found for the glyph dataset (matplotlib's "
                                    "bundled fonts should always be present; is matplotlib "
                                    "installed?)")
        info.update(pillow=PIL.__version__)
        return Dataset("glyphs", x, y, tuple(class_name(ch) for ch in kept), "image",
                       groups_of(kept), info)

    return cached("glyphs", inputs, build, options)
