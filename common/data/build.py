"""``build_image_dataset``: the data set a ``DataConfig`` names, for one split."""
from __future__ import annotations

from typing import Mapping

from torch.utils.data import Dataset

from common.data.builtin import BuiltinPhotoCrops
from common.data.config import DataConfig, as_data_config
from common.data.glyphs import GlyphImages
from common.data.hf import HFImageDataset, HFImageStream
from common.data.imagefolder import SafeImageFolder
from common.data.synthetic import SyntheticShapes
from common.data.webdataset import WebDatasetImages


def build_image_dataset(cfg: DataConfig | Mapping, split: str = "train") -> Dataset:
    """Build the data set described by ``cfg`` for ``split`` (one of ``cfg.splits()``)."""
    cfg = as_data_config(cfg)
    cfg.check_split(split)
    flip = bool(cfg.random_flip) and split == "train"
    if cfg.name == "builtin":
        return BuiltinPhotoCrops(
            split=split, image_size=cfg.image_size,
            crops_per_photo=cfg.crops_per_photo if split == "train" else cfg.val_crops_per_photo,
            min_scale=float(cfg.min_scale), max_scale=float(cfg.max_scale), val_region=float(cfg.val_region),
            val_photos=tuple(cfg.val_photos), seed=cfg.seed, random_flip=flip, tune_region=float(cfg.tune_region),
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
    if cfg.name == "hf":
        options = dict(split=cfg.split if split == "train" else cfg.val_split, image_size=cfg.image_size,
                       random_flip=flip, image_column=cfg.image_column, label_column=cfg.label_column,
                       num_classes=cfg.num_classes)
        if cfg.streaming:
            return HFImageStream(cfg.root, shuffle_buffer=cfg.shuffle_buffer if split == "train" else 0,
                                 seed=cfg.seed, **options)
        return HFImageDataset(cfg.root, **options)
    if cfg.name == "webdataset":
        train = split == "train"
        return WebDatasetImages(cfg.shards if train else cfg.val_shards, image_size=cfg.image_size, random_flip=flip,
                                image_key=cfg.image_key, label_key=cfg.label_key, num_classes=cfg.num_classes,
                                shuffle_buffer=cfg.shuffle_buffer if train else 0, seed=cfg.seed,
                                key="data.shards" if train else "data.val_shards")
    return SafeImageFolder(cfg.root, split=split, image_size=cfg.image_size, random_flip=flip)


