"""Per-item helpers every image source shares: the split's seed-stream code, the random flip, decoding a file or
bytes to RGB, and the resize + centre-crop transform of real photographs (ImageFolder, Hugging Face, WebDataset)."""
from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision import transforms

SPLITS = ("train", "val", "val_unseen_photos", "tune")  # every split name of any data set (seed-stream code =
# position: a new split is appended, so the existing splits keep their images)


def split_code(split: str) -> int:
    return SPLITS.index(split)


def maybe_flip(image: torch.Tensor, random_flip: bool) -> torch.Tensor:
    # torch's global RNG (restored by accelerate's load_state), not numpy's.
    if random_flip and bool(torch.rand(()) < 0.5):
        image = image.flip(-1)
    return image


def load_rgb(source) -> Image.Image:
    """Open and fully decode ``source`` (a path, raw bytes or a PIL image) as an RGB PIL image; raises on
    bad or truncated data (``convert`` forces the full decode)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(source))) as img:
            return img.convert("RGB")
    with open(source, "rb") as handle:
        with Image.open(handle) as img:
            return img.convert("RGB")


def photo_transform(image_size: int, random_flip: bool = False) -> transforms.Compose:
    """PIL RGB image -> float32 ``[3, S, S]`` in [-1, 1]: resize the shorter side to S (bilinear, antialiased), centre
    crop S x S, random horizontal flip (torch RNG) when asked, ``x = 2 * rgb / 255 - 1``."""
    steps = [
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(image_size),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())  # torch RNG
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(steps)
