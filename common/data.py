"""Image data shared by both stages (tokenizer training, token extraction, evaluation).

Every data set built here yields ``(image, label)`` with ``image`` a float32 tensor
``[3, S, S]`` in ``[-1, 1]`` (``x = 2 * rgb / 255 - 1``) and ``label`` a Python int in
``[0, num_classes)``; every data set has ``.num_classes`` and ``.class_names``.

Four sources, chosen by ``DataConfig.name``:

``"builtin"`` (default, no download)
    Real colour photographs bundled inside scikit-image, cut into crops at several
    scales. See :class:`BuiltinPhotoCrops` for the photo list and the split design.
``"imagefolder"``
    ImageNet-style folders ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*``
    (the validation set must be sorted into class folders, as most ImageNet copies
    are). Unreadable files are skipped and counted, see :class:`SafeImageFolder`.
``"glyphs"`` (no download)
    Class-conditional images of characters (class = character, the 10 digits by default)
    rendered with the TrueType fonts that ship inside matplotlib, in random colours, sizes,
    positions and small rotations; 32 px by default. See :class:`GlyphImages`.
``"synthetic"``
    Tiny deterministic procedural images (a coloured shape on a gradient per class) for
    tests, see :class:`SyntheticShapes`.

Preview any of them: ``python -m common.data --preview grid.png --data.name glyphs``.

Randomness: everything sampled per item (builtin crop boxes, glyph parameters, synthetic shapes) is a
pure function of ``(seed, split, index)``, so epochs and resumed runs see the same
items. Random horizontal flips (train split only) draw from torch's global RNG, which
accelerate's ``save_state``/``load_state`` restores (per DataLoader worker, torch seeds
each worker from the base seed, so flips are reproducible there too).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from common.config import load_config

DATASET_NAMES = ("builtin", "imagefolder", "glyphs", "synthetic")
# Splits each data set offers (``build_image_dataset(cfg, split)``).
DATASET_SPLITS = {
    "builtin": ("train", "val", "val_unseen_photos"),
    "imagefolder": ("train", "val"),
    "glyphs": ("train", "val"),
    "synthetic": ("train", "val"),
}
SPLITS = ("train", "val", "val_unseen_photos")  # every split name of any data set (seed-stream code = position)
# Per-data-set defaults of the DataConfig fields left at None.
DATASET_DEFAULTS = {
    "builtin": dict(image_size=256, random_flip=True),
    "imagefolder": dict(image_size=256, random_flip=True),
    # Mirrored characters are different (or no) characters: glyphs never flip.
    "glyphs": dict(image_size=32, random_flip=False, num_images=20000, num_val_images=1000),
    "synthetic": dict(image_size=256, random_flip=True, num_images=64, num_val_images=16, num_classes=4),
}

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
# horse (binary silhouette), motorcycle_right (stereo twin of motorcycle_left: it would
# leak one photo into the other split), microaneurysms (tiny grayscale), lfw_subset (grayscale faces).
BUILTIN_PHOTOS = (
    "astronaut.png",          # portrait photograph (NASA)
    "chelsea.png",            # cat photograph
    "coffee.png",             # cup of coffee photograph
    "hubble_deep_field.jpg",  # telescope photograph of galaxies
    "ihc.png",                # immunohistochemistry micrograph (colour light microscopy)
    "motorcycle_left.png",    # indoor photograph of a motorcycle (Middlebury stereo, left view)
    "retina.jpg",             # fundus photograph of a human retina
    "rocket.jpg",             # outdoor photograph of a rocket launch
)
BUILTIN_PHOTO_NAMES = tuple(name.rsplit(".", 1)[0] for name in BUILTIN_PHOTOS)
DEFAULT_VAL_PHOTOS = ("chelsea", "rocket")


@dataclass
class DataConfig:
    """Which images to train / evaluate on.

    name: "builtin" | "imagefolder" | "glyphs" | "synthetic".
    root: data root for "imagefolder" (``<root>/train/<class>/...``, ``<root>/val/<class>/...``).
    image_size: side S of the square output images (null = the data set's default: 32 for
        glyphs, 256 otherwise).
    random_flip: horizontal flip with p = 0.5 on the train split (never on val); null = the data
        set's default (on, except glyphs, where it is an error: a mirrored character is not its class).
    num_workers: DataLoader worker processes (used by the training scripts).
    seed: seed of the per-item sampling (builtin crop boxes, glyph parameters, synthetic images).
    crops_per_photo / val_crops_per_photo: builtin crops per photo in train / each val split.
    min_scale / max_scale: builtin crop side = scale * R, scale ~ U(min, max), R = the side of the
        held-out square (``val_region * shorter photo side``), the same in every split.
    val_region: side of the square held out of every builtin training photo for the "val" split,
        as a fraction of the photo's shorter side (bottom-right corner).
    val_photos: builtin photos held out completely, for the "val_unseen_photos" split.
    num_images / num_val_images: size of the train / val split of glyphs (default 20000 / 1000)
        and synthetic (64 / 16).
    num_classes: glyphs: use the first N characters of the charset (default: all);
        synthetic: number of shape classes (default 4).
    glyph_charset: "digits" | "uppercase" | "alphanumeric" (see GLYPH_CHARSETS).
    glyph_font_dir: folder of .ttf/.otf fonts for glyphs (null = matplotlib's bundled fonts).
    glyph_min_contrast: minimum luma difference |Y(fg) - Y(bg)| in [0, 1] of a glyph's colours.
    """

    name: str = "builtin"
    root: Optional[str] = None
    image_size: Optional[int] = None
    random_flip: Optional[bool] = None
    num_workers: int = 0
    seed: int = 0
    # builtin
    crops_per_photo: int = 128
    val_crops_per_photo: int = 32
    min_scale: float = 0.35
    max_scale: float = 1.0
    val_region: float = 0.5
    val_photos: List[str] = field(default_factory=lambda: list(DEFAULT_VAL_PHOTOS))
    # glyphs / synthetic
    num_images: Optional[int] = None
    num_val_images: Optional[int] = None
    num_classes: Optional[int] = None
    # glyphs
    glyph_charset: str = "digits"
    glyph_font_dir: Optional[str] = None
    glyph_min_contrast: float = 0.4

    @classmethod
    def unresolved(cls) -> "DataConfig":
        """The defaults with the per-data-set fields still None (``DATASET_DEFAULTS`` not applied, not
        validated). Use it as the schema default of a parent config (``field(default_factory=
        DataConfig.unresolved)``): ``DataConfig()`` fills builtin's defaults (e.g. random_flip=true), which
        would then stay in the schema when a YAML file or override sets ``data.name=glyphs``."""
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(config, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        return config

    def __post_init__(self) -> None:
        if self.name in DATASET_DEFAULTS:  # unknown names are reported by validate()
            for key, value in DATASET_DEFAULTS[self.name].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.name not in DATASET_NAMES:
            raise ValueError(f"data.name must be one of {DATASET_NAMES}, got {self.name!r}")
        if self.name == "imagefolder" and not self.root:
            raise ValueError("data.root must be set for data.name='imagefolder' (folder with train/ and val/)")
        for key in ("image_size", "crops_per_photo", "val_crops_per_photo", "num_images", "num_val_images", "num_classes"):
            value = getattr(self, key)
            if value is None and key != "image_size":  # None = not used by this data set
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key} must be a positive integer, got {value!r}")
        if self.image_size < 8:
            raise ValueError(f"data.image_size must be >= 8, got {self.image_size}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers must be a non-negative integer, got {self.num_workers!r}")
        if not (0.0 < float(self.min_scale) <= float(self.max_scale) <= 1.0):
            raise ValueError(
                f"data.min_scale / data.max_scale must satisfy 0 < min_scale <= max_scale <= 1, "
                f"got {self.min_scale} / {self.max_scale}"
            )
        if not 0.1 <= float(self.val_region) <= 0.5:
            raise ValueError(f"data.val_region must lie in [0.1, 0.5] (fraction of the shorter photo side), "
                             f"got {self.val_region}")
        val_photos = list(self.val_photos)
        unknown = [p for p in val_photos if p not in BUILTIN_PHOTO_NAMES]
        if unknown:
            raise ValueError(f"data.val_photos has unknown photos {unknown}; choose from {BUILTIN_PHOTO_NAMES}")
        if len(set(val_photos)) != len(val_photos):
            raise ValueError(f"data.val_photos has duplicates: {val_photos}")
        if not val_photos or len(val_photos) >= len(BUILTIN_PHOTO_NAMES):
            raise ValueError(
                f"data.val_photos must hold out at least one and at most {len(BUILTIN_PHOTO_NAMES) - 1} "
                f"of the {len(BUILTIN_PHOTO_NAMES)} builtin photos, got {val_photos}"
            )
        if self.glyph_charset not in GLYPH_CHARSETS:
            raise ValueError(f"data.glyph_charset must be one of {tuple(GLYPH_CHARSETS)}, got {self.glyph_charset!r}")
        if not 0.0 <= float(self.glyph_min_contrast) <= 0.9:
            raise ValueError(f"data.glyph_min_contrast must lie in [0, 0.9], got {self.glyph_min_contrast}")
        if self.name == "glyphs":
            if self.random_flip:
                raise ValueError("data.random_flip must be false for data.name='glyphs': a mirrored character "
                                 "is not an image of its class")
            charset = GLYPH_CHARSETS[self.glyph_charset]
            if self.num_classes is not None and self.num_classes > len(charset):
                raise ValueError(f"data.num_classes={self.num_classes} exceeds the {len(charset)} characters of "
                                 f"data.glyph_charset={self.glyph_charset!r}")

    def splits(self) -> tuple[str, ...]:
        """The split names ``build_image_dataset`` accepts for this data set."""
        return DATASET_SPLITS[self.name]

    def check_split(self, split: str) -> None:
        """ValueError naming the valid splits unless ``split`` is one of ``splits()``."""
        if split not in self.splits():
            raise ValueError(f"split must be one of {self.splits()} for data.name={self.name!r}, got {split!r}")


def _as_data_config(cfg: Any) -> DataConfig:
    if isinstance(cfg, DataConfig):
        cfg.validate()
        return cfg
    if not isinstance(cfg, Mapping):  # OmegaConf DictConfig is a Mapping
        raise TypeError(f"cfg must be a DataConfig or a mapping, got {type(cfg).__name__}")
    try:
        from omegaconf import DictConfig, OmegaConf  # lazy: plain mappings and dataclasses are handled without omegaconf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; known keys: {sorted(known)}")
    return DataConfig(**dict(cfg))


def build_image_dataset(cfg: DataConfig | Mapping, split: str = "train") -> Dataset:
    """Build the data set described by ``cfg`` for ``split`` (one of ``cfg.splits()``)."""
    cfg = _as_data_config(cfg)
    if split not in cfg.splits():
        raise ValueError(f"split must be one of {cfg.splits()} for data.name={cfg.name!r}, got {split!r}")
    flip = bool(cfg.random_flip) and split == "train"
    if cfg.name == "builtin":
        return BuiltinPhotoCrops(
            split=split, image_size=cfg.image_size,
            crops_per_photo=cfg.crops_per_photo if split == "train" else cfg.val_crops_per_photo,
            min_scale=float(cfg.min_scale), max_scale=float(cfg.max_scale), val_region=float(cfg.val_region),
            val_photos=tuple(cfg.val_photos), seed=cfg.seed, random_flip=flip,
        )
    if cfg.name == "glyphs":
        return GlyphImages(
            split=split, num_images=cfg.num_images if split == "train" else cfg.num_val_images,
            image_size=cfg.image_size, charset=cfg.glyph_charset, num_classes=cfg.num_classes,
            font_dir=cfg.glyph_font_dir, min_contrast=float(cfg.glyph_min_contrast), seed=cfg.seed,
        )
    if cfg.name == "synthetic":
        return SyntheticShapes(
            num_images=cfg.num_images if split == "train" else cfg.num_val_images,
            num_classes=cfg.num_classes, image_size=cfg.image_size,
            split=split, seed=cfg.seed, random_flip=flip,
        )
    return SafeImageFolder(cfg.root, split=split, image_size=cfg.image_size, random_flip=flip)


def _split_code(split: str) -> int:
    return SPLITS.index(split)


def _maybe_flip(image: torch.Tensor, random_flip: bool) -> torch.Tensor:
    # torch's global RNG (restored by accelerate's load_state), not numpy's.
    if random_flip and bool(torch.rand(()) < 0.5):
        image = image.flip(-1)
    return image


# ----------------------------------------------------------------------------- builtin

def builtin_photo_dir() -> Path:
    """Folder of scikit-image's bundled sample images (read directly: no pooch fetch)."""
    import skimage.data  # lazy: scikit-image is slow to import; only the builtin data set needs its photos

    return Path(skimage.data.__file__).resolve().parent


_PHOTO_CACHE: dict[str, np.ndarray] = {}


def load_builtin_photo(name: str) -> np.ndarray:
    """The bundled photo ``name`` as uint8 ``[H, W, 3]`` (read once per process)."""
    if name not in BUILTIN_PHOTO_NAMES:
        raise ValueError(f"unknown builtin photo {name!r}; choose from {BUILTIN_PHOTO_NAMES}")
    if name not in _PHOTO_CACHE:
        path = builtin_photo_dir() / BUILTIN_PHOTOS[BUILTIN_PHOTO_NAMES.index(name)]
        if not path.is_file():
            raise FileNotFoundError(f"builtin photo {name!r} not found at {path} (scikit-image install incomplete?)")
        with Image.open(path) as img:
            _PHOTO_CACHE[name] = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return _PHOTO_CACHE[name]


class BuiltinPhotoCrops(Dataset):
    """Crops of real colour photographs bundled with scikit-image (see ``BUILTIN_PHOTOS``).

    Which photos: only genuine colour photographs (portrait, cat, coffee cup, motorcycle,
    rocket launch, a telescope deep field, a fundus photograph, a stained-tissue
    micrograph); grayscale test images, charts, drawings, silhouettes and the right view
    of the motorcycle stereo pair are excluded (list next to ``BUILTIN_PHOTOS``).

    Splits (``val_photos`` default chelsea + rocket; the other six are the training photos):

    ``"train"``  crops of the training photos that avoid the bottom-right square of side
                 ``Q = round(val_region * min(H, W))`` of each photo;
    ``"val"``    crops inside that held-out square of the training photos: unseen pixels of
                 seen photos, i.e. in-distribution validation (no crop shares a pixel with any
                 train crop);
    ``"val_unseen_photos"``  crops anywhere in the ``val_photos``, which no other split uses:
                 generalisation to unseen photographs.

    Every split uses the same crop-size rule: side = round(s * Q), s ~ U(min_scale, max_scale)
    (``Q`` of the photo the crop comes from), so crops cover the same scales of content.
    Labels are photo identities with ONE fixed numbering for every split:
    ``label = BUILTIN_PHOTO_NAMES.index(photo)``, ``num_classes = len(BUILTIN_PHOTOS)`` (8) and
    ``class_names = BUILTIN_PHOTO_NAMES``; ``split_labels`` lists the labels a split actually
    uses ("train" and "val" share theirs; "val_unseen_photos" has classes train never sees).

    Item ``i``: photo ``split_photos[i % P]`` (classes balanced), crop box drawn from
    ``numpy.random.default_rng((seed, split, i))``: side as above, top-left uniform over the
    positions allowed in the split; the crop is resized to ``image_size`` with antialiased
    bilinear interpolation. So item ``i`` is the same crop in every epoch and after a resume;
    only the flip (train) is random.
    """

    def __init__(self, split: str = "train", image_size: int = 256, crops_per_photo: int = 128,
                 min_scale: float = 0.35, max_scale: float = 1.0, val_region: float = 0.5,
                 val_photos: tuple[str, ...] = DEFAULT_VAL_PHOTOS, seed: int = 0, random_flip: bool = False):
        if split not in DATASET_SPLITS["builtin"]:
            raise ValueError(f"split must be one of {DATASET_SPLITS['builtin']}, got {split!r}")
        if not 0.0 < float(val_region) <= 0.5:
            raise ValueError(f"val_region must lie in (0, 0.5], got {val_region}")
        held_out = set(val_photos)
        if split == "val_unseen_photos":
            self.photos = tuple(p for p in BUILTIN_PHOTO_NAMES if p in held_out)
        else:
            self.photos = tuple(p for p in BUILTIN_PHOTO_NAMES if p not in held_out)
        if not self.photos:
            raise ValueError(f"no builtin photos left for split {split!r} with val_photos={list(val_photos)}")
        self.split = split
        self.image_size = int(image_size)
        self.crops_per_photo = int(crops_per_photo)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.val_region = float(val_region)
        self.seed = int(seed)
        self.random_flip = bool(random_flip)
        self.class_names = list(BUILTIN_PHOTO_NAMES)
        self.num_classes = len(self.class_names)
        self.split_labels = [BUILTIN_PHOTO_NAMES.index(p) for p in self.photos]
        self.num_skipped = 0  # same attribute as SafeImageFolder; bundled files are always readable
        self._images = {p: load_builtin_photo(p) for p in self.photos}

    def __len__(self) -> int:
        return self.crops_per_photo * len(self.photos)

    def held_out_square(self, photo: str) -> tuple[int, int, int]:
        """(top, left, side) of the square of ``photo`` reserved for the "val" split."""
        height, width = self._images[photo].shape[:2]
        side = max(1, int(round(self.val_region * min(height, width))))
        return height - side, width - side, side

    def crop_box(self, index: int) -> tuple[str, int, int, int]:
        """(photo, top, left, side) of item ``index`` - a pure function of (seed, split, index)."""
        photo = self.photos[index % len(self.photos)]
        height, width = self._images[photo].shape[:2]
        square_top, square_left, q = self.held_out_square(photo)
        rng = np.random.default_rng((self.seed, _split_code(self.split), index))
        scale = rng.uniform(self.min_scale, self.max_scale)
        side = max(1, min(int(round(scale * q)), q))
        if self.split == "val":  # inside the held-out square
            top = square_top + int(rng.integers(0, q - side + 1))
            left = square_left + int(rng.integers(0, q - side + 1))
        elif self.split == "val_unseen_photos":  # anywhere in a held-out photo
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
        else:
            # uniform over the boxes that avoid the square: above it (A: top + side <= square_top)
            # or left of it (B: left + side <= square_left); B minus A = B's rows below square_top - side.
            rows_a, cols_a = square_top - side + 1, width - side + 1
            cols_b = square_left - side + 1
            count_a, count_b_only = rows_a * cols_a, (height - side + 1 - rows_a) * cols_b
            pick = int(rng.integers(0, count_a + count_b_only))
            if pick < count_a:
                top, left = divmod(pick, cols_a)
            else:
                row, left = divmod(pick - count_a, cols_b)
                top = rows_a + row
        return photo, int(top), int(left), int(side)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = index % len(self)
        photo, top, left, side = self.crop_box(index)
        crop = self._images[photo][top:top + side, left:left + side]
        image = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().unsqueeze(0)
        image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        image = (image / 127.5 - 1.0).clamp_(-1.0, 1.0)
        return _maybe_flip(image, self.random_flip), BUILTIN_PHOTO_NAMES.index(photo)


# ----------------------------------------------------------------------------- glyphs

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

    Split: train and val use different seed streams (the split is part of the seed), so they are
    two independent draws from one distribution: every parameter is continuous, so no val item
    equals a train item. There is no flip (a mirrored character is not its class).
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

    def __init__(self, split: str = "train", num_images: int = 20000, image_size: int = 32,
                 charset: str = "digits", num_classes: Optional[int] = None,
                 font_dir: str | os.PathLike | None = None, min_contrast: float = 0.4, seed: int = 0):
        if split not in DATASET_SPLITS["glyphs"]:
            raise ValueError(f"split must be one of {DATASET_SPLITS['glyphs']}, got {split!r}")
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
            rng = np.random.default_rng((self.seed, _split_code(self.split), block))
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


# ----------------------------------------------------------------------------- synthetic

class SyntheticShapes(Dataset):
    """Tiny procedural images for tests: class ``c = i % num_classes`` fixes the colours
    (hue c / num_classes) and the shape (disc, square, triangle: ``c % 3``); position,
    size and gradient direction come from ``numpy.random.default_rng((seed, split, i))``.
    Pixel = gradient background blended with the shape mask; deterministic per index."""

    def __init__(self, num_images: int = 64, num_classes: int = 4, image_size: int = 32,
                 split: str = "train", seed: int = 0, random_flip: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_images < 1 or num_classes < 1 or image_size < 1:
            raise ValueError("num_images, num_classes and image_size must be positive")
        self.num_images, self.num_classes, self.image_size = int(num_images), int(num_classes), int(image_size)
        self.split, self.seed, self.random_flip = split, int(seed), bool(random_flip)
        self.class_names = [f"shape_{c}" for c in range(self.num_classes)]
        self.split_labels = list(range(min(self.num_classes, self.num_images)))
        self.num_skipped = 0

    def __len__(self) -> int:
        return self.num_images

    @staticmethod
    def _hue_to_rgb(hue: float) -> np.ndarray:
        # piecewise-linear HSV (s = v = 1) -> RGB in [0, 1]
        k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
        return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = index % len(self)
        label = index % self.num_classes
        rng = np.random.default_rng((self.seed, _split_code(self.split), index))
        size = self.image_size
        ys, xs = np.meshgrid(np.linspace(0.0, 1.0, size), np.linspace(0.0, 1.0, size), indexing="ij")
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ramp = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) / np.sqrt(2.0) + 0.5
        hue = label / self.num_classes
        background = (0.25 + 0.5 * ramp)[..., None] * self._hue_to_rgb(hue)
        foreground = self._hue_to_rgb((hue + 0.5) % 1.0)
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        radius = rng.uniform(0.15, 0.3)
        kind = label % 3
        if kind == 0:
            mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius ** 2
        elif kind == 1:
            mask = (np.abs(ys - cy) <= radius) & (np.abs(xs - cx) <= radius)
        else:
            mask = (ys >= cy - radius) & (ys <= cy + radius) & (np.abs(xs - cx) <= (ys - (cy - radius)) / 2.0)
        rgb = np.where(mask[..., None], foreground, background)
        image = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) * 2.0 - 1.0
        return _maybe_flip(image.contiguous(), self.random_flip), label


# ----------------------------------------------------------------------------- image folder

class SafeImageFolder(Dataset):
    """``<root>/<split>/<class>/<image>`` (torchvision ImageFolder layout) with bad files skipped.

    Transform: resize the shorter side to ``image_size`` (bilinear, antialiased), centre
    crop ``image_size`` x ``image_size``, random horizontal flip on train, map to [-1, 1].
    Classes: the sorted sub-folders of ``<root>/train`` when it exists (so train and val
    share one numbering even if val lacks a class), else of ``<root>/<split>``.

    Unreadable or truncated files: loading happens in ``__getitem__``; when a file fails
    to open/decode, a warning names it, it is flagged in a shared-memory tensor and the
    next index (cyclically) that loads is returned instead - never a crash mid-epoch.
    Flags live in shared memory, so files found bad inside DataLoader worker processes
    are visible in the main process: ``num_skipped`` counts distinct bad files found so
    far (lazily: a file is only known bad once an epoch has touched it); ``skipped_files``
    lists them. A flagged file is not opened again. Call :meth:`scan` to check every file
    up front. A replacement item duplicates another image within that epoch.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 256,
                 random_flip: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root {str(root)!r} does not exist")
        split_dir = root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"image folder split directory {str(split_dir)!r} does not exist "
                                    f"(expected layout <root>/{split}/<class>/<image>)")
        class_dir = root / "train" if (root / "train").is_dir() else split_dir
        classes = sorted(e.name for e in os.scandir(class_dir) if e.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class sub-folders in {str(class_dir)!r} "
                                    f"(expected layout <root>/{split}/<class>/<image>)")
        extra = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name not in set(classes))
        if extra:
            raise ValueError(f"{str(split_dir)!r} has class folders not present in {str(class_dir)!r}: {extra[:5]}")
        class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {str(split_dir)!r}")
        self.root, self.split, self.image_size = root, split, int(image_size)
        self.class_names = classes
        self.classes = classes
        self.class_to_idx = class_to_idx
        self.num_classes = len(classes)
        self.targets = [label for _, label in self.samples]
        self.split_labels = sorted(set(self.targets))
        steps = [
            transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(self.image_size),
        ]
        if random_flip:
            steps.append(transforms.RandomHorizontalFlip())  # torch RNG
        steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
        self.transform = transforms.Compose(steps)
        # 1 = known unreadable; shared memory so DataLoader workers' findings reach the main process.
        self._bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files found so far (in this process or any DataLoader worker)."""
        return int(self._bad.sum())

    @property
    def skipped_files(self) -> list[str]:
        return [self.samples[i][0] for i in torch.nonzero(self._bad).flatten().tolist()]

    @staticmethod
    def load_rgb(path: str):
        """Open and fully decode ``path`` as an RGB PIL image (raises on bad/truncated files)."""
        with open(path, "rb") as handle:
            with Image.open(handle) as img:
                return img.convert("RGB")  # convert() forces the full decode

    def _try_load(self, index: int):
        path = self.samples[index][0]
        try:
            return self.load_rgb(path)
        except Exception as err:  # any failure to open/decode the file = unreadable file
            if not self._bad[index]:
                self._bad[index] = 1
                warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", RuntimeWarning)
            return None

    def scan(self) -> list[str]:
        """Decode every file once (slow on ImageNet); flag and return the unreadable ones."""
        for index in range(len(self.samples)):
            if not self._bad[index]:
                self._try_load(index)
        return self.skipped_files

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        n = len(self.samples)
        for offset in range(n):
            candidate = (index + offset) % n
            if self._bad[candidate]:
                continue
            img = self._try_load(candidate)
            if img is not None:
                return self.transform(img), self.samples[candidate][1]
        raise RuntimeError(f"no readable image left under {str(self.root / self.split)!r} "
                           f"({self.num_skipped} unreadable files)")


# ----------------------------------------------------------------------------- preview

def load_data_config(overrides: Sequence[str], **defaults: Any):
    """``DataConfig`` from ``field=value`` overrides (typos and wrong types raise naming the key)."""
    given = {item.split("=", 1)[0] for item in overrides}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in given and v is not None]
    return load_config(DataConfig, None, [*extra, *overrides])


def split_data_options(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--data.<field> value`` / ``--data.<field>=value`` / ``data.<field>=value`` (-> ``field=value``)
    from the rest (the common.cli style for the data config's keys)."""
    rest, overrides = [], []
    argv = [str(a) for a in argv]
    i = 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("data.") and "=" in item:
            overrides.append(item[len("data."):])
        elif item.startswith("--data."):
            key = item[len("--data."):]
            if "=" in key:
                overrides.append(key)
            else:
                if i + 1 >= len(argv):
                    raise ValueError(f"option {item} needs a value")
                overrides.append(f"{key}={argv[i + 1]}")
                i += 1
        else:
            rest.append(item)
        i += 1
    return rest, overrides


def preview_grid(dataset: Dataset, rows: int = 8, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 ``[H, W, 3]`` grid of the first ``rows * columns`` items (default ``columns`` = number of
    classes of the split, so with class ``i % num_classes`` each column holds one class)."""
    columns = columns or max(1, len(getattr(dataset, "split_labels", [])) or 8)
    count = min(len(dataset), rows * columns)
    images = [dataset[i][0] for i in range(count)]
    size = images[0].shape[-1]
    step = size + padding
    grid = np.full((padding + rows * step, padding + columns * step, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        grid[padding + r * step:padding + r * step + size, padding + c * step:padding + c * step + size] = pixels
    return grid


def measure_throughput(dataset: Dataset, num_items: int = 4000) -> dict[str, float]:
    """Items per second of ``dataset[i]`` for ``i < num_items`` (cycling), in CPU time of this process and
    in wall time (CPU time does not count other processes sharing the cores)."""
    count = min(num_items, 64)
    for i in range(count):  # warm up (font masks, first parameter blocks)
        dataset[i % len(dataset)]
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(num_items):
        dataset[i % len(dataset)]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"items": num_items, "items_per_cpu_second": num_items / max(cpu, 1e-9),
            "items_per_second": num_items / max(wall, 1e-9), "torch_threads": torch.get_num_threads()}


def main(argv: Optional[List[str]] = None) -> Optional[Path]:
    """``python -m common.data [--preview OUT.png] [--benchmark N] [--split S] [--rows R] [--columns C] [--scale K]
    [--data.<field> V ...]``: save a grid of items and/or measure the item throughput on 1 thread."""
    rest, overrides = split_data_options(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m common.data",
                                     description="Save a PNG grid of data set items and/or measure their throughput.")
    parser.add_argument("--preview", default=None, help="PNG file to write")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N", help="time N items on 1 torch thread")
    parser.add_argument("--split", default="train")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--columns", type=int, default=None, help="default: the number of classes in the split")
    parser.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling of the grid")
    parser.epilog = "Data options: --data.<field> value for every common.data.DataConfig field."
    args = parser.parse_args(rest)
    if args.preview is None and args.benchmark <= 0:
        parser.error("give --preview OUT.png and/or --benchmark N")

    cfg = load_config(DataConfig, None, overrides)
    dataset = build_image_dataset(cfg, args.split)
    out = None
    if args.preview:
        grid = Image.fromarray(preview_grid(dataset, args.rows, args.columns))
        if args.scale > 1:
            grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.Resampling.NEAREST)
        out = Path(args.preview)
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out, optimize=True)
        print(f"{cfg.name} {args.split}: {grid.width}x{grid.height} grid written to {out}")
    if args.benchmark > 0:
        torch.set_num_threads(1)
        result = measure_throughput(dataset, args.benchmark)
        print(f"{cfg.name} {args.split} at {cfg.image_size} px: {result['items_per_cpu_second']:.0f} items per "
              f"CPU-second ({result['items_per_second']:.0f} per wall-clock second) over {result['items']} items, "
              f"1 torch thread")
    return out


if __name__ == "__main__":  # pragma: no cover
    main()


# ----------------------------------------------------------------------------- evaluation subsets
def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every item: ``dataset.targets`` when present (ImageFolder), else read item by item."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return [int(t) for t in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def class_balanced_indices(labels: Sequence[int], num_images: int, seed: int = 0) -> list[int]:
    """A class-balanced subset of ``num_images`` item indices.

    Classes (sorted) are visited round robin; each class yields its items in a random order drawn
    from ``numpy.random.default_rng((seed, class))``. Every class contributes floor(N / C) or
    ceil(N / C) items (exactly N / C when C divides N) unless a class runs out, in which case the
    remaining classes fill up. Returned indices are sorted (data set order).
    """
    labels = [int(v) for v in labels]
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if num_images > len(labels):
        raise ValueError(f"num_images={num_images} exceeds the {len(labels)} images of the evaluation set")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    queues = {}
    for label, items in sorted(by_class.items()):
        order = np.random.default_rng((int(seed), label)).permutation(len(items))
        queues[label] = [items[i] for i in order]
    chosen: list[int] = []
    position = 0
    while len(chosen) < num_images:
        for label in sorted(queues):
            if position < len(queues[label]) and len(chosen) < num_images:
                chosen.append(queues[label][position])
        position += 1
    return sorted(chosen)
