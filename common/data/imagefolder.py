"""``data.name=imagefolder``: ImageNet-style ``<root>/<split>/<class>/<image>`` folders, unreadable files skipped."""
from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from common.data.transforms import SPLITS, photo_transform
from common.data.unreadable import SkipUnreadable


class SafeImageFolder(SkipUnreadable):
    """``<root>/<split>/<class>/<image>`` (torchvision ImageFolder layout) with bad files skipped.

    Transform: resize the shorter side to ``image_size`` (bilinear, antialiased), centre
    crop ``image_size`` x ``image_size``, random horizontal flip on train, map to [-1, 1].
    Classes: the sorted sub-folders of ``<root>/train`` when it exists (so train and val
    share one numbering even if val lacks a class), else of ``<root>/<split>``.

    Unreadable or truncated files are skipped with a warning and counted (``num_skipped``,
    ``skipped_files``, ``scan()``; see :class:`~common.data.unreadable.SkipUnreadable`).
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
        self._init_unreadable()

    def __len__(self) -> int:
        return len(self.samples)

    def raw_item(self, index: int):
        return self.samples[index]

    def item_name(self, index: int) -> str:
        return self.samples[index][0]

    def __repr__(self) -> str:
        return f"SafeImageFolder({str(self.root / self.split)!r})"
