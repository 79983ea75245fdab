"""``data.name=builtin``: crops of real colour photographs bundled inside scikit-image (no download)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from common.data.transforms import maybe_flip, split_code

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


def uniform_box_avoiding(rng: np.random.Generator, height: int, width: int, side: int,
                         squares: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(top, left, side) of a ``side`` x ``side`` box drawn uniformly from the positions in a ``height`` x ``width``
    image that share no pixel with any of ``squares`` ((top, left, side) each), with one ``rng.integers`` draw.

    Per top row t the allowed lefts are [0, width - side] minus, for every square whose rows meet [t, t + side),
    the lefts in [left_s - side + 1, left_s + side_s - 1]; count(t) is their number and the draw picks one of the
    sum_t count(t) positions. When no position is left the side shrinks by one pixel until one is."""
    squares = [sq for sq in squares if sq[2] > 0]
    while side >= 1:
        tops = np.arange(height - side + 1)
        last_left = width - side
        # which squares each top row meets, as a bit pattern; rows of one pattern share their allowed lefts
        patterns = np.zeros(tops.size, dtype=np.int64)
        for bit, (sq_top, _, sq_side) in enumerate(squares):
            patterns |= (((tops < sq_top + sq_side) & (tops + side > sq_top)).astype(np.int64) << bit)
        unique_patterns, pattern_of_row = np.unique(patterns, return_inverse=True)
        runs: list[list[tuple[int, int]]] = []  # per unique pattern: the allowed [lo, hi] intervals of lefts
        for pattern in unique_patterns.tolist():
            blocked = sorted((max(0, sq_left - side + 1), min(last_left, sq_left + sq_side - 1))
                             for bit, (_, sq_left, sq_side) in enumerate(squares) if pattern >> bit & 1)
            free, start = [], 0
            for lo, hi in blocked:
                if lo > hi:
                    continue
                if lo > start:
                    free.append((start, lo - 1))
                start = max(start, hi + 1)
            if start <= last_left:
                free.append((start, last_left))
            runs.append(free)
        counts = np.array([sum(hi - lo + 1 for lo, hi in free) for free in runs], dtype=np.int64)[pattern_of_row]
        total = int(counts.sum())
        if total > 0:
            pick = int(rng.integers(0, total))
            cumulative = np.cumsum(counts)
            top = int(np.searchsorted(cumulative, pick, side="right"))
            offset = pick - (int(cumulative[top - 1]) if top else 0)
            for lo, hi in runs[int(pattern_of_row[top])]:
                if offset <= hi - lo:
                    return top, lo + offset, side
                offset -= hi - lo + 1
        side -= 1
    raise ValueError(f"no box fits beside the held-out squares {squares} of a {height}x{width} photo")


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
    ``"tune"``   only with ``tune_region > 0`` (the study's tuning split, experiments.study.tuning): crops
                 inside a second held-out square of each training photo, its top-left corner, of side
                 ``T = min(round(tune_region * min(H, W)), min(H, W) - Q)`` (so it never meets the val square);
                 train crops then avoid both squares. With ``tune_region = 0`` (the default) train is exactly
                 the train split above, crop for crop.

    Every split uses the same crop-size rule: side = round(s * Q), s ~ U(min_scale, max_scale)
    (``Q`` of the photo the crop comes from), so crops cover the same scales of content (a tune crop's side is
    ``round(s * T)``: the same fractions of its smaller square, so its content is T / Q times finer); a train crop is
    at most max(H, W) - Q px (one pixel less than Q on a photo with an odd shorter side), so it fits beside
    the square.
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

    SPLITS = ("train", "val", "val_unseen_photos", "tune")

    def __init__(self, split: str = "train", image_size: int = 256, crops_per_photo: int = 128,
                 min_scale: float = 0.35, max_scale: float = 1.0, val_region: float = 0.5,
                 val_photos: tuple[str, ...] = DEFAULT_VAL_PHOTOS, seed: int = 0, random_flip: bool = False,
                 tune_region: float = 0.0):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        if not 0.0 < float(val_region) <= 0.5:
            raise ValueError(f"val_region must lie in (0, 0.5], got {val_region}")
        if not 0.0 <= float(tune_region) <= 0.5:
            raise ValueError(f"tune_region must lie in [0, 0.5] (0 = no tune split), got {tune_region}")
        if split == "tune" and float(tune_region) == 0.0:
            raise ValueError("the builtin photos' 'tune' split needs tune_region > 0 (data.tune_region: the side of "
                             "the top-left square held out of the training photos for it)")
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
        self.tune_region = float(tune_region)
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

    def tune_square(self, photo: str) -> tuple[int, int, int]:
        """(top, left, side) of the square of ``photo`` reserved for the "tune" split (side 0 without one)."""
        height, width = self._images[photo].shape[:2]
        if self.tune_region == 0.0:
            return 0, 0, 0
        val_side = self.held_out_square(photo)[2]
        return 0, 0, max(1, min(int(round(self.tune_region * min(height, width))), min(height, width) - val_side))

    def crop_box(self, index: int) -> tuple[str, int, int, int]:
        """(photo, top, left, side) of item ``index`` - a pure function of (seed, split, index)."""
        photo = self.photos[index % len(self.photos)]
        height, width = self._images[photo].shape[:2]
        square_top, square_left, q = self.held_out_square(photo)
        rng = np.random.default_rng((self.seed, split_code(self.split), index))
        scale = rng.uniform(self.min_scale, self.max_scale)
        side = max(1, min(int(round(scale * q)), q))
        if self.split == "train":
            # a train crop lies above the square (side <= square_top) or left of it (side <= square_left): with
            # an odd side (retina, 1411 px: q = 706, square at 705) a crop of side q fits in neither
            side = min(side, max(square_top, square_left))
        if self.split == "val":  # inside the held-out square
            top = square_top + int(rng.integers(0, q - side + 1))
            left = square_left + int(rng.integers(0, q - side + 1))
        elif self.split == "tune":  # inside the top-left tuning square, side relative to it
            _, _, t = self.tune_square(photo)
            side = max(1, min(int(round(scale * t)), t))
            top, left = int(rng.integers(0, t - side + 1)), int(rng.integers(0, t - side + 1))
        elif self.split == "val_unseen_photos":  # anywhere in a held-out photo
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
        elif self.tune_region > 0.0:  # train, avoiding both held-out squares
            top, left, side = uniform_box_avoiding(
                rng, height, width, side, [(square_top, square_left, q), self.tune_square(photo)])
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
        return maybe_flip(image, self.random_flip), BUILTIN_PHOTO_NAMES.index(photo)


