"""``data.name=synthetic``: tiny deterministic procedural images for tests."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.transforms import SPLITS, maybe_flip, split_code


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
        rng = np.random.default_rng((self.seed, split_code(self.split), index))
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
        return maybe_flip(image.contiguous(), self.random_flip), label


