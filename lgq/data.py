"""Image data shared by both stages (tokenizer training, token extraction, evaluation).

Every data set built here yields ``(image, label)`` with ``image`` a float32 tensor
``[3, S, S]`` in ``[-1, 1]`` (``x = 2 * rgb / 255 - 1``) and ``label`` a Python int in
``[0, num_classes)``; every data set has ``.num_classes`` and ``.class_names``.

Three sources, chosen by ``DataConfig.name``:

``"builtin"`` (default, no download)
    Real colour photographs bundled inside scikit-image, cut into crops at several
    scales. See :class:`BuiltinPhotoCrops` for the photo list and the split design.
``"imagefolder"``
    ImageNet-style folders ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*``
    (the validation set must be sorted into class folders, as most ImageNet copies
    are). Unreadable files are skipped and counted, see :class:`SafeImageFolder`.
``"synthetic"``
    Tiny deterministic procedural images (a coloured shape on a gradient per class) for
    tests, see :class:`SyntheticShapes`.

Randomness: everything sampled per item (builtin crop boxes, synthetic shapes) is a
pure function of ``(seed, split, index)``, so epochs and resumed runs see the same
items. Random horizontal flips (train split only) draw from torch's global RNG, which
accelerate's ``save_state``/``load_state`` restores (per DataLoader worker, torch seeds
each worker from the base seed, so flips are reproducible there too).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATASET_NAMES = ("builtin", "imagefolder", "synthetic")
SPLITS = ("train", "val")

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

    name: "builtin" | "imagefolder" | "synthetic".
    root: data root for "imagefolder" (``<root>/train/<class>/...``, ``<root>/val/<class>/...``).
    image_size: side S of the square output images.
    random_flip: horizontal flip with p = 0.5 on the train split (never on val).
    num_workers: DataLoader worker processes (used by the training scripts).
    seed: seed of the per-item sampling (builtin crop boxes, synthetic images).
    crops_per_photo / val_crops_per_photo: builtin crops per photo in train / val.
    min_scale / max_scale: builtin crop side = scale * shorter photo side, scale ~ U(min, max).
    val_photos: builtin photos held out from training (names from BUILTIN_PHOTO_NAMES).
    num_images / num_val_images / num_classes: size of the synthetic set.
    """

    name: str = "builtin"
    root: Optional[str] = None
    image_size: int = 256
    random_flip: bool = True
    num_workers: int = 0
    seed: int = 0
    # builtin
    crops_per_photo: int = 128
    val_crops_per_photo: int = 32
    min_scale: float = 0.35
    max_scale: float = 1.0
    val_photos: List[str] = field(default_factory=lambda: list(DEFAULT_VAL_PHOTOS))
    # synthetic
    num_images: int = 64
    num_val_images: int = 16
    num_classes: int = 4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.name not in DATASET_NAMES:
            raise ValueError(f"data.name must be one of {DATASET_NAMES}, got {self.name!r}")
        if self.name == "imagefolder" and not self.root:
            raise ValueError("data.root must be set for data.name='imagefolder' (folder with train/ and val/)")
        for key in ("image_size", "crops_per_photo", "val_crops_per_photo", "num_images", "num_val_images", "num_classes"):
            value = getattr(self, key)
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


def _as_data_config(cfg: Any) -> DataConfig:
    if isinstance(cfg, DataConfig):
        cfg.validate()
        return cfg
    if not isinstance(cfg, Mapping):  # OmegaConf DictConfig is a Mapping
        raise TypeError(f"cfg must be a DataConfig or a mapping, got {type(cfg).__name__}")
    try:
        from omegaconf import DictConfig, OmegaConf

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
    """Build the data set described by ``cfg`` for ``split`` ("train" or "val")."""
    cfg = _as_data_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    flip = bool(cfg.random_flip) and split == "train"
    if cfg.name == "builtin":
        return BuiltinPhotoCrops(
            split=split, image_size=cfg.image_size,
            crops_per_photo=cfg.crops_per_photo if split == "train" else cfg.val_crops_per_photo,
            min_scale=float(cfg.min_scale), max_scale=float(cfg.max_scale),
            val_photos=tuple(cfg.val_photos), seed=cfg.seed, random_flip=flip,
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
    import skimage.data

    return Path(skimage.data.__file__).resolve().parent


_PHOTO_CACHE: dict[str, np.ndarray] = {}


def load_builtin_photo(name: str) -> np.ndarray:
    """The bundled photo ``name`` as uint8 ``[H, W, 3]`` (read once per process)."""
    if name not in BUILTIN_PHOTO_NAMES:
        raise ValueError(f"unknown builtin photo {name!r}; choose from {BUILTIN_PHOTO_NAMES}")
    if name not in _PHOTO_CACHE:
        from PIL import Image

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

    Split: whole photos are held out. ``val_photos`` (default chelsea + rocket) are used
    only by the val split and never by train, so validation measures reconstruction of
    unseen images. Labels are photo identities with ONE fixed numbering for both splits:
    ``label = BUILTIN_PHOTO_NAMES.index(photo)``, ``num_classes = len(BUILTIN_PHOTOS)``
    (8) and ``class_names = BUILTIN_PHOTO_NAMES``; consequently val labels are classes
    that never occur in train. ``split_labels`` lists the labels a split actually uses
    (e.g. for class-conditional sampling on the train classes).

    Item ``i``: photo ``split_photos[i % P]`` (classes balanced), crop box drawn from
    ``numpy.random.default_rng((seed, split, i))``: side = round(s * min(H, W)),
    s ~ U(min_scale, max_scale), top-left uniform; the crop is resized to
    ``image_size`` with antialiased bilinear interpolation. So item ``i`` is the same
    crop in every epoch and after a resume; only the flip (train) is random.
    """

    def __init__(self, split: str = "train", image_size: int = 256, crops_per_photo: int = 128,
                 min_scale: float = 0.35, max_scale: float = 1.0,
                 val_photos: tuple[str, ...] = DEFAULT_VAL_PHOTOS, seed: int = 0, random_flip: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        held_out = set(val_photos)
        if split == "train":
            self.photos = tuple(p for p in BUILTIN_PHOTO_NAMES if p not in held_out)
        else:
            self.photos = tuple(p for p in BUILTIN_PHOTO_NAMES if p in held_out)
        if not self.photos:
            raise ValueError(f"no builtin photos left for split {split!r} with val_photos={list(val_photos)}")
        self.split = split
        self.image_size = int(image_size)
        self.crops_per_photo = int(crops_per_photo)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.seed = int(seed)
        self.random_flip = bool(random_flip)
        self.class_names = list(BUILTIN_PHOTO_NAMES)
        self.num_classes = len(self.class_names)
        self.split_labels = [BUILTIN_PHOTO_NAMES.index(p) for p in self.photos]
        self.num_skipped = 0  # same attribute as SafeImageFolder; bundled files are always readable
        self._images = {p: load_builtin_photo(p) for p in self.photos}

    def __len__(self) -> int:
        return self.crops_per_photo * len(self.photos)

    def crop_box(self, index: int) -> tuple[str, int, int, int]:
        """(photo, top, left, side) of item ``index`` - a pure function of (seed, split, index)."""
        photo = self.photos[index % len(self.photos)]
        height, width = self._images[photo].shape[:2]
        rng = np.random.default_rng((self.seed, _split_code(self.split), index))
        scale = rng.uniform(self.min_scale, self.max_scale)
        side = max(1, min(int(round(scale * min(height, width))), height, width))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        return photo, top, left, side

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
        from torchvision import transforms
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

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
        from PIL import Image

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
