"""``data.name=imagefolder``: ImageNet-style ``<root>/<split>/<class>/<image>`` folders, unreadable files skipped."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from common.data.transforms import SPLITS, load_rgb, photo_transform


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
        self.transform = photo_transform(self.image_size, random_flip)
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

    load_rgb = staticmethod(load_rgb)  # path -> fully decoded RGB PIL image (raises on bad/truncated files)

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


