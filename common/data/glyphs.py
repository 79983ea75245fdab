"""``data.name=glyphs``: class-conditional images of characters rendered with the fonts bundled with matplotlib."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from common.data.transforms import split_code

# Character sets of the glyphs data set (class = position in the string). Lower-case letters are
# left out on purpose: with random sizes, c/C, o/O, s/S, v/V, w/W, x/X, z/Z are not separable.
GLYPH_CHARSETS = {
    "digits": "0123456789",
    "uppercase": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "alphanumeric": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
}

# Real colour photographs shipped with scikit-image (no pooch download). Label = position here.
# Excluded on purpose: brick/camera/coins/grass/gravel/moon/page/text/cell/clock_motion
# (grayscale), chessboard_*/color/phantom/logo (charts, synthetic or drawings),

def matplotlib_font_dir() -> Path:
    """Folder of the TrueType fonts bundled with matplotlib (DejaVu, STIX, Computer Modern)."""
    import matplotlib  # lazy: only the glyphs data set needs matplotlib (for its bundled fonts)

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@dataclass(frozen=True)
class GlyphFont:
    """One usable font: per character a grey-level ink mask, rendered once.

    ``masks[c]`` is a square uint8 array whose ink bounding box is centred and has its longer
    side equal to ``ink_size`` pixels (so every glyph is scaled by the same rule).
    """

    name: str
    path: str
    masks: tuple  # of np.ndarray [M, M] uint8
    ink_size: int


def _glyph_name_matches(glyph_name: str, char: str) -> bool:
    """Whether a font's glyph name denotes ``char`` (Adobe Glyph List name, "uniXXXX", optional
    ".suffix" or "oldstyle" suffix, as in Computer Modern's "zerooldstyle")."""
    from fontTools import agl  # lazy: only the glyphs data set reads font files

    base = glyph_name.split(".", 1)[0]
    if base.endswith("oldstyle"):
        base = base[: -len("oldstyle")]
    return agl.toUnicode(base) == char


def _render_ink_mask(font_path: Path, char: str, ink_size: int) -> np.ndarray:
    """``char`` rendered in white on black, cropped to its ink, scaled so its longer ink side is
    ``ink_size`` px, centred in a square of side ``ink_size + 4`` (uint8)."""
    reference = 4 * ink_size  # measure at a large size, then render at the size that fits
    font = ImageFont.truetype(str(font_path), reference)
    box = font.getbbox(char)
    longest = max(box[2] - box[0], box[3] - box[1])
    if longest <= 0:
        return np.zeros((ink_size + 4, ink_size + 4), np.uint8)
    font = ImageFont.truetype(str(font_path), max(1, int(round(reference * ink_size / longest))))
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), char, fill=255, font=font)
    ink = np.asarray(canvas)
    rows, cols = np.nonzero(ink > 0)
    if rows.size == 0:
        return np.zeros((ink_size + 4, ink_size + 4), np.uint8)
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    side = ink_size + 4
    scale = ink_size / max(ink.shape)
    if abs(scale - 1.0) > 1e-6:  # hinting makes the rendered ink box differ slightly from getbbox
        new_shape = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
        ink = np.asarray(Image.fromarray(ink).resize(new_shape, Image.Resampling.BILINEAR))
    ink = ink[:side - 2, :side - 2]
    mask = np.zeros((side, side), np.uint8)
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    mask[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    return mask


_FONT_CMAP_CACHE: dict[tuple, dict[int, str]] = {}  # (path, size, mtime) -> code point -> glyph name


def _check_glyph_font(path: Path, chars: str, ink_size: int) -> tuple[Optional[GlyphFont], Optional[str]]:
    """(font, None) when ``path`` has a real glyph for every character, else (None, reason).

    A file that cannot be parsed raises ``ValueError`` naming it (never silently skipped).
    Checks: the character map points every character to a glyph named for it (rejects fonts
    that lack it, symbol fonts that reuse the code points, and LastResort's placeholder
    boxes); every rendered glyph has ink; no two characters render identically.
    """
    try:
        from fontTools.ttLib import TTFont  # lazy: only the glyphs data set reads font files
    except ImportError:  # pragma: no cover - fontTools is a matplotlib dependency
        TTFont = None
    if TTFont is not None:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _FONT_CMAP_CACHE:
            try:
                with TTFont(str(path), lazy=True) as font:
                    _FONT_CMAP_CACHE[key] = dict(font.getBestCmap() or {})
            except Exception as err:
                raise ValueError(f"cannot read font file {path}: {type(err).__name__}: {err}") from err
        cmap = _FONT_CMAP_CACHE[key]
        for char in chars:
            glyph = cmap.get(ord(char))
            if glyph is None:
                return None, f"no glyph for {char!r}"
            if not glyph.startswith("glyph") and not _glyph_name_matches(glyph, char):
                return None, f"{char!r} maps to the glyph {glyph!r}, not that character"
    try:
        masks = [_render_ink_mask(path, char, ink_size) for char in chars]
    except Exception as err:
        raise ValueError(f"cannot read font file {path}: {type(err).__name__}: {err}") from err
    for char, mask in zip(chars, masks):
        if int((mask > 127).sum()) < 4:
            return None, f"{char!r} renders empty"
    thumbs = np.stack([np.asarray(_to_pil(m).resize((16, 16)), np.float32).ravel() / 255.0 for m in masks])
    distance = np.abs(thumbs[:, None] - thumbs[None]).mean(-1) + np.eye(len(chars))  # [C, C], diagonal masked
    if distance.min() < 0.01:
        i, j = np.unravel_index(int(np.argmin(distance)), distance.shape)
        return None, f"{chars[min(i, j)]!r} and {chars[max(i, j)]!r} render identically"
    return GlyphFont(name=path.stem, path=str(path), masks=tuple(masks), ink_size=ink_size), None


def _to_pil(mask: np.ndarray):
    return Image.fromarray(mask)


_GLYPH_FONT_CACHE: dict[tuple, tuple[list[GlyphFont], dict[str, str]]] = {}


def load_glyph_fonts(chars: str, ink_size: int, font_dir: str | os.PathLike | None = None
                     ) -> tuple[list[GlyphFont], dict[str, str]]:
    """(usable fonts sorted by file name, {skipped font file: reason}) for ``chars``; cached per process.

    ``font_dir`` defaults to :func:`matplotlib_font_dir`. Raises ``FileNotFoundError`` when the
    folder has no .ttf/.otf file, ``ValueError`` naming a file that cannot be read, and
    ``ValueError`` listing the reasons when no font has all the characters.
    """
    folder = Path(font_dir).expanduser() if font_dir else matplotlib_font_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"no .ttf/.otf font files in {str(folder)!r}: the folder does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".ttf", ".otf") and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no .ttf/.otf font files in {str(folder)!r}")
    # the key includes each file's size and mtime: an edited folder is checked again
    files = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    key = (str(folder.resolve()), files, chars, int(ink_size))
    if key not in _GLYPH_FONT_CACHE:
        fonts, skipped = [], {}
        for path in paths:
            font, reason = _check_glyph_font(path, chars, int(ink_size))
            if font is None:
                skipped[path.name] = reason
            else:
                fonts.append(font)
        if not fonts:
            details = "; ".join(f"{name}: {why}" for name, why in skipped.items())
            raise ValueError(f"no font in {str(folder)!r} has glyphs for all of {chars!r} ({details})")
        _GLYPH_FONT_CACHE[key] = (fonts, skipped)
    return _GLYPH_FONT_CACHE[key]


def luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of sRGB values in [0, 1]: Y = 0.2126 R + 0.7152 G + 0.0722 B (last axis = RGB)."""
    return np.asarray(rgb) @ np.array([0.2126, 0.7152, 0.0722])


class GlyphImages(Dataset):
    """Characters in random fonts, colours, sizes, positions and rotations; class = character.

    Fonts: every .ttf/.otf in ``font_dir`` (default: the fonts bundled with matplotlib) that has a
    real glyph for every character of the charset (see :func:`load_glyph_fonts`; with matplotlib
    3.11, 22 of its 40 files for the digits: DejaVu, STIX General, Computer Modern). ``fonts`` lists them,
    ``skipped_fonts`` says why the others were left out. Each glyph's ink mask is rendered once,
    at twice the output resolution, with its longer ink side = ``2 * image_size * MAX_SIZE``.

    Item ``i``: class ``c = i % num_classes`` (classes balanced), character ``chars[c]``; every
    other parameter comes from ``numpy.random.default_rng((seed, split, i // 256))``, drawn for
    256 consecutive items at once (so an item does not depend on the data set length):
    font ~ uniform over ``fonts``; longer ink side = ``s * image_size`` with
    ``s ~ U(MIN_SIZE, MAX_SIZE)``; rotation ``~ U(-MAX_ROTATION, MAX_ROTATION)`` degrees;
    centre offset uniform within ``MAX_OFFSET`` times the range that keeps the rotated glyph box inside
    the image;
    background and foreground RGB uniform in [0, 1]^3 subject to a luma difference
    ``|Y(fg) - Y(bg)| >= min_contrast`` (first of 64 candidate pairs that satisfies it, else
    black or white on that background, whichever is farther).
    Rendering: affine warp (bilinear) of the mask into a ``2S x 2S`` canvas, 2x2 box
    downsampling, ``rgb = bg + mask * (fg - bg)``, ``x = 2 * rgb - 1``.

    Split: train, val and tune (the study's tuning split) use different seed streams (the split is part
    of the seed), so they are independent draws from one distribution: every parameter is continuous, so
    no item of one split equals an item of another. There is no flip (a mirrored character is not its class).
    """

    # Geometry ranges: wide enough that no two glyphs align, narrow enough that a CPU-sized prior learns the
    # digits' shapes in minutes. Measured (MaskGIT 128x4, 900 steps on the tokens of an 8x8 LGQ tokenizer): with
    # sizes 0.5-0.9, rotations up to 15 degrees and the full offset range 12-18% of class-conditional samples were
    # classified as their digit; with these ranges 90% (README, "The one-command demo").
    MIN_SIZE = 0.75
    MAX_SIZE = 0.9
    MAX_ROTATION = 8.0
    MAX_OFFSET = 0.4
    COLOUR_CANDIDATES = 64
    PARAMETER_BLOCK = 256
    SPLITS = ("train", "val", "tune")  # "tune": the study's tuning split (experiments.study.tuning)

    def __init__(self, split: str = "train", num_images: int = 20000, image_size: int = 32,
                 charset: str = "digits", num_classes: Optional[int] = None,
                 font_dir: str | os.PathLike | None = None, min_contrast: float = 0.4, seed: int = 0):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        if charset not in GLYPH_CHARSETS:
            raise ValueError(f"charset must be one of {tuple(GLYPH_CHARSETS)}, got {charset!r}")
        chars = GLYPH_CHARSETS[charset]
        num_classes = len(chars) if num_classes is None else int(num_classes)
        if not 1 <= num_classes <= len(chars):
            raise ValueError(f"num_classes must lie in [1, {len(chars)}] for charset {charset!r}, got {num_classes}")
        if num_images < 1 or image_size < 8:
            raise ValueError(f"num_images must be >= 1 and image_size >= 8, got {num_images}, {image_size}")
        self.split, self.num_images, self.image_size = split, int(num_images), int(image_size)
        self.chars = chars[:num_classes]
        self.num_classes = num_classes
        self.class_names = list(self.chars)
        self.split_labels = list(range(min(num_classes, self.num_images)))
        self.min_contrast, self.seed = float(min_contrast), int(seed)
        self.num_skipped = 0
        self._canvas = 2 * self.image_size  # supersampled rendering canvas
        ink_size = max(8, int(round(self._canvas * self.MAX_SIZE)))
        fonts, skipped = load_glyph_fonts(self.chars, ink_size, font_dir)
        self._fonts = fonts
        self.fonts = [f.name for f in fonts]
        self.skipped_fonts = dict(skipped)

        self._mask_images = [[Image.fromarray(m) for m in f.masks] for f in fonts]
        self._blocks: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_images

    @classmethod
    def geometry(cls) -> dict[str, float]:
        """The rendering ranges (size, rotation, offset): part of what defines the data set."""
        return {"min_size": cls.MIN_SIZE, "max_size": cls.MAX_SIZE, "max_rotation": cls.MAX_ROTATION,
                "max_offset": cls.MAX_OFFSET}

    def _parameter_block(self, block: int) -> dict[str, np.ndarray]:
        """Parameters of items ``[block * B, (block + 1) * B)``, drawn at once from
        ``numpy.random.default_rng((seed, split, block))`` (B = ``PARAMETER_BLOCK``)."""
        if block not in self._blocks:
            n = self.PARAMETER_BLOCK
            rng = np.random.default_rng((self.seed, split_code(self.split), block))
            font = rng.integers(len(self._fonts), size=n)
            size = rng.uniform(self.MIN_SIZE, self.MAX_SIZE, size=n)
            angle = rng.uniform(-self.MAX_ROTATION, self.MAX_ROTATION, size=n)
            # half extent of the rotated square ink box, as a fraction of the image side
            radians = np.radians(angle)
            room = np.maximum(0.0, 0.5 - 0.5 * size * (np.abs(np.cos(radians)) + np.abs(np.sin(radians))))
            offset = rng.uniform(-1.0, 1.0, size=(n, 2)) * (self.MAX_OFFSET * room)[:, None]
            pairs = rng.random((n, self.COLOUR_CANDIDATES, 2, 3))
            ok = np.abs(luma(pairs[:, :, 0]) - luma(pairs[:, :, 1])) >= self.min_contrast  # [n, candidates]
            chosen = pairs[np.arange(n), np.argmax(ok, axis=1)]  # first pair with enough contrast
            background, foreground = chosen[:, 0], chosen[:, 1]
            none_ok = ~ok.any(axis=1)  # then black or white on the first background, whichever is farther
            background[none_ok] = pairs[none_ok, 0, 0]
            foreground[none_ok] = np.where(luma(background[none_ok])[:, None] >= 0.5, 0.0, 1.0)
            self._blocks[block] = {"font": font, "size": size, "angle": angle, "offset": offset,
                                   "background": background.astype(np.float32),
                                   "foreground": foreground.astype(np.float32)}
        return self._blocks[block]

    def parameters(self, index: int) -> dict[str, Any]:
        """The rendering parameters of item ``index`` - a pure function of (seed, split, index)."""
        block, row = divmod(int(index), self.PARAMETER_BLOCK)
        p = self._parameter_block(block)
        return {"label": int(index) % self.num_classes, "font": int(p["font"][row]), "size": float(p["size"][row]),
                "angle": float(p["angle"][row]), "offset": (float(p["offset"][row, 0]), float(p["offset"][row, 1])),
                "background": p["background"][row], "foreground": p["foreground"][row]}

    def render_mask(self, label: int, font: int, size: float, angle: float, offset: tuple[float, float]) -> np.ndarray:
        """Ink coverage in [0, 1] (float32 ``[S, S]``) of character ``label`` in font ``font``."""
        mask_image = self._mask_images[font][label]
        side, canvas = mask_image.size[0], self._canvas
        # canvas point p -> mask point q = c_mask + k * R(-angle) (p - c_canvas)
        k = self._fonts[font].ink_size / (size * canvas)
        cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        a, b, d, e = k * cos, k * sin, -k * sin, k * cos
        cx, cy = canvas * (0.5 + offset[0]), canvas * (0.5 + offset[1])
        centre = side / 2.0
        data = (a, b, centre - a * cx - b * cy, d, e, centre - d * cx - e * cy)
        warped = mask_image.transform((canvas, canvas), Image.Transform.AFFINE, data,
                                      resample=Image.Resampling.BILINEAR, fillcolor=0)
        mask = np.asarray(warped.reduce(2), dtype=np.float32)
        return mask * (1.0 / 255.0)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = index % len(self)
        p = self.parameters(index)
        mask = self.render_mask(p["label"], p["font"], p["size"], p["angle"], p["offset"])
        background, foreground = p["background"], p["foreground"]
        rgb = background[:, None, None] + mask[None] * (foreground - background)[:, None, None]
        return torch.from_numpy(rgb * 2.0 - 1.0), p["label"]  # a convex mix of colours in [0, 1]: in [-1, 1]


