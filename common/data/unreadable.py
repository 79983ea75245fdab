"""Images that fail to decode are skipped with a warning and counted, in every source (never a crash mid-epoch,
never a silent hole): :class:`SkipUnreadable` for indexable data sets, :class:`UnreadableCount` for streams."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import Dataset

from common.data.transforms import load_rgb


def warn_unreadable(name: str, err: BaseException) -> None:
    warnings.warn(f"skipping unreadable image {name}: {type(err).__name__}: {err}", RuntimeWarning)


class SkipUnreadable(Dataset):
    """Base of indexable photo sets whose items may not decode. A subclass sets ``self.transform`` and defines
    ``__len__``, ``raw_item(i) -> (encoded image: path | bytes | PIL image, label)`` and ``item_name(i)``, then calls
    ``_init_unreadable()``.

    When item ``i`` fails to decode, a warning names it, it is flagged in a shared-memory tensor and the next index
    (cyclically) that decodes is returned instead. Flags live in shared memory, so items found bad inside
    DataLoader worker processes are visible in the main process: ``num_skipped`` counts distinct bad items found
    so far (lazily: an item is only known bad once an epoch has touched it); ``skipped_files`` names them. A
    flagged item is not decoded again. :meth:`scan` checks every item up front. A replacement item duplicates
    another image within that epoch."""

    transform: Any

    def raw_item(self, index: int) -> tuple[Any, int]:
        raise NotImplementedError

    def item_name(self, index: int) -> str:
        raise NotImplementedError

    def _init_unreadable(self) -> None:
        # 1 = known unreadable; shared memory so DataLoader workers' findings reach the main process.
        self._bad = torch.zeros(len(self), dtype=torch.uint8).share_memory_()

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable items found so far (in this process or any DataLoader worker)."""
        return int(self._bad.sum())

    @property
    def skipped_files(self) -> list[str]:
        return [self.item_name(i) for i in torch.nonzero(self._bad).flatten().tolist()]

    def _try_load(self, index: int):
        encoded, label = self.raw_item(index)
        try:
            return load_rgb(encoded), label
        except Exception as err:  # any failure to open/decode = unreadable item
            if not self._bad[index]:
                self._bad[index] = 1
                warn_unreadable(self.item_name(index), err)
            return None

    def scan(self) -> list[str]:
        """Decode every item once (slow on ImageNet); flag and return the unreadable ones."""
        for index in range(len(self)):
            if not self._bad[index]:
                self._try_load(index)
        return self.skipped_files

    def __getitem__(self, index: int):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        for offset in range(n):
            candidate = (index + offset) % n
            if self._bad[candidate]:
                continue
            loaded = self._try_load(candidate)
            if loaded is not None:
                return self.transform(loaded[0]), int(loaded[1])
        raise RuntimeError(f"no readable image left in {self!r} ({self.num_skipped} unreadable items)")


class UnreadableCount:
    """Number of images a stream skipped, summed over the DataLoader workers (a shared-memory counter)."""

    def __init__(self) -> None:
        self._count = torch.zeros(1, dtype=torch.int64).share_memory_()

    def add(self, name: str, err: BaseException) -> None:
        self._count += 1
        warn_unreadable(name, err)

    def __int__(self) -> int:
        return int(self._count)
