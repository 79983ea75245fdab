"""Which images to train / evaluate on: ``DataConfig`` (the ``data.*`` keys of every command) and its parsing."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence

from common.config import load_config
from common.data.builtin import BUILTIN_PHOTO_NAMES, DEFAULT_VAL_PHOTOS, BuiltinPhotoCrops
from common.data.glyphs import GLYPH_CHARSETS, GlyphImages

DATASET_NAMES = ("builtin", "imagefolder", "glyphs", "synthetic", "hf", "webdataset")
# Splits each data set offers (``build_image_dataset(cfg, split)``).
DATASET_SPLITS = {
    "builtin": BuiltinPhotoCrops.SPLITS,
    "imagefolder": ("train", "val"),
    "glyphs": GlyphImages.SPLITS,
    "synthetic": ("train", "val", "tune"),
    "hf": ("train", "val"),
    "webdataset": ("train", "val"),
}
# Per-data-set defaults of the DataConfig fields left at None.
DATASET_DEFAULTS = {
    "builtin": dict(image_size=256, random_flip=True),
    "imagefolder": dict(image_size=256, random_flip=True),
    "hf": dict(image_size=256, random_flip=True),
    "webdataset": dict(image_size=256, random_flip=True),
    # Mirrored characters are different (or no) characters: glyphs never flip.
    "glyphs": dict(image_size=32, random_flip=False, num_images=20000, num_val_images=1000),
    "synthetic": dict(image_size=256, random_flip=True, num_images=64, num_val_images=16, num_classes=4),
}

@dataclass
class DataConfig:
    """Which images to train / evaluate on.

    name: "builtin" | "imagefolder" | "glyphs" | "synthetic" | "hf" | "webdataset".
    root: data root for "imagefolder" (``<root>/train/<class>/...``, ``<root>/val/<class>/...``); for "hf" a Hub id,
        a ``save_to_disk`` folder, a folder of parquet/arrow files or one such file / glob (``common/data/hf.py``).
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
    tune_region: side of a second square held out of every builtin training photo (top-left corner, a fraction
        of the shorter side) for the "tune" split, the study's tuning split; 0 (default) = no tune split and the
        train crops of every earlier run.
    num_images / num_val_images: size of the train / val split of glyphs (default 20000 / 1000)
        and synthetic (64 / 16).
    num_classes: glyphs: use the first N characters of the charset (default: all);
        synthetic: number of shape classes (default 4); hf with integer labels / webdataset without dataset.json:
        the number of classes (hf default: largest label + 1; needed when streaming).
    glyph_charset: "digits" | "uppercase" | "alphanumeric" (see GLYPH_CHARSETS).
    glyph_font_dir: folder of .ttf/.otf fonts for glyphs (null = matplotlib's bundled fonts).
    glyph_min_contrast: minimum luma difference |Y(fg) - Y(bg)| in [0, 1] of a glyph's colours.
    split / val_split: hf: the dataset splits our "train" / "val" splits read (default "train" / "validation").
    image_column / label_column: hf: the columns of the images and the labels (ClassLabel or integers; null =
        one class).
    streaming: hf: read the split as a stream over its shards (common/data/stream.py) instead of indexing it.
    shards / val_shards: webdataset: the train / val tar shards, a brace pattern, glob or list (local paths or
        any URL webdataset opens).
    image_key / label_key: webdataset: the image member extensions tried in order and the label's extension.
    shuffle_buffer: streams (webdataset, hf with streaming): samples in the shuffle buffer of the train split.
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
    tune_region: float = 0.0
    val_photos: List[str] = field(default_factory=lambda: list(DEFAULT_VAL_PHOTOS))
    # glyphs / synthetic
    num_images: Optional[int] = None
    num_val_images: Optional[int] = None
    num_classes: Optional[int] = None
    # glyphs
    glyph_charset: str = "digits"
    glyph_font_dir: Optional[str] = None
    glyph_min_contrast: float = 0.4
    # hf
    split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"
    label_column: Optional[str] = "label"
    streaming: bool = False
    # webdataset
    shards: Any = None
    val_shards: Any = None
    image_key: str = "jpg;jpeg;png;webp"
    label_key: str = "cls"
    # streams
    shuffle_buffer: int = 1000

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
        if self.name == "hf" and not self.root:
            raise ValueError("data.root must be set for data.name='hf' (a Hub id, a save_to_disk folder or "
                             "parquet/arrow files)")
        if self.name == "webdataset" and not self.shards:
            raise ValueError("data.shards must be set for data.name='webdataset' (a brace pattern, glob or list "
                             "of tar shards)")
        for key in ("shards", "val_shards"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                                                     and all(isinstance(v, str) for v in value))):
                raise ValueError(f"data.{key} must be a pattern or a non-empty list of shard paths/URLs, "
                                 f"got {value!r}")
        if self.streaming and self.name != "hf":
            raise ValueError(f"data.streaming=true is an option of data.name='hf' (webdataset always streams), got "
                             f"data.name={self.name!r}")
        if isinstance(self.shuffle_buffer, bool) or not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be a non-negative integer, got {self.shuffle_buffer!r}")
        if not self.image_column or not self.image_key or not self.label_key:
            raise ValueError("data.image_column, data.image_key and data.label_key must not be empty")
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
        if float(self.tune_region) != 0.0 and not 0.1 <= float(self.tune_region) <= 0.5:
            raise ValueError(f"data.tune_region must be 0 (no tune split) or lie in [0.1, 0.5] (fraction of the "
                             f"shorter photo side), got {self.tune_region}")
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
        if self.name == "webdataset" and not self.val_shards:
            return ("train",)
        if self.name == "builtin" and float(self.tune_region) == 0.0:
            return tuple(s for s in DATASET_SPLITS[self.name] if s != "tune")
        return DATASET_SPLITS[self.name]

    @property
    def is_stream(self) -> bool:
        """Whether this source is read as a stream (no length, no random access; common/data/stream.py)."""
        return self.name == "webdataset" or (self.name == "hf" and bool(self.streaming))

    def check_split(self, split: str) -> None:
        """ValueError naming the valid splits unless ``split`` is one of ``splits()``."""
        if split not in self.splits():
            hint = " (set data.val_shards for a val split)" if self.name == "webdataset" and split == "val" else ""
            if self.name == "builtin" and split == "tune":
                hint = " (set data.tune_region, e.g. 0.35, to hold a tuning square out of the training photos)"
            raise ValueError(f"split must be one of {self.splits()} for data.name={self.name!r}, got {split!r}{hint}")


def as_data_config(cfg: Any) -> DataConfig:
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


