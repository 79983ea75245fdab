"""Sharded image streams (``data.name=webdataset``, ``data.name=hf data.streaming=true``): no length, no random access.

What a stream yields, and what resume means
-------------------------------------------
The shards are dealt out once and for all: process ``r`` of ``P`` reads ``shards[r::P]`` and DataLoader worker ``w``
of ``W`` reads ``shards[r::P][w::W]`` (webdataset's ``split_by_node`` / ``split_by_worker``), so no two readers
ever open the same shard. A *pass* (one ``iter()`` of the stream, one ``iter()`` of its DataLoader) reads every
shard of the reader once, in an order shuffled by ``random.Random((seed, position, rank, worker))``, through a
shuffle buffer of ``shuffle_buffer`` samples drawn from the same generator; the flip of the train split uses
torch's RNG (seeded per worker by the DataLoader). ``position`` is set with :meth:`start_at` before a pass.

The training loop (``common.training.Trainer``) runs the stream in passes without end and calls
``start_at(consumed)`` (``consumed`` = micro-batches this process has taken since step 0) before every pass: at
step 0, after each pass, after every checkpoint and on resume. So a run resumed from the checkpoint at step ``s``
sees exactly the batches the uninterrupted run saw after step ``s`` (both restart the stream there with the
same seed): training resumes bit-identically, as with the indexable sets. The price: a restart begins a new
pass, so between two restarts every image is seen at most once, but over the run images are not seen equally
often (the samples a pass had not reached when a checkpoint was written wait for a later pass, like
webdataset's resampled shards). Images per pass differ between processes when shards differ in size; the loop
never waits for a pass to end on every process, so that needs no collective.

Extraction (``prior.extract``) does not shuffle: it reads whole shards in stored order with :meth:`iter_shard`,
one shard per resumable chunk, so every image is encoded exactly once.
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset

from common.data.transforms import load_rgb, photo_transform
from common.data.unreadable import UnreadableCount


class ShardedImageStream(IterableDataset):
    """Base of the streams: a subclass defines ``shard_names`` and ``read_shard(i)`` yielding
    ``(sample name, encoded image, label)`` in stored order (raising ValueError naming a malformed sample)."""

    is_stream = True

    def __init__(self, shard_names: Sequence[str], *, image_size: int, random_flip: bool, num_classes: int,
                 class_names: Optional[Sequence[str]] = None, num_images: Optional[int] = None,
                 shuffle_buffer: int = 1000, seed: int = 0, description: str = "stream"):
        if not shard_names:
            raise ValueError(f"{description}: no shards")
        self.shard_names = list(shard_names)
        self.image_size = int(image_size)
        self.transform = photo_transform(self.image_size, random_flip)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [str(c) for c in range(self.num_classes)]
        self.split_labels = list(range(self.num_classes))
        self.num_images = num_images  # None when the source does not say
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.position = 0
        self.description = description
        self._skipped = UnreadableCount()

    # -------------------------------------------------------------------------------- subclass API
    def read_shard(self, index: int) -> Iterator[tuple[str, Any, Any]]:
        raise NotImplementedError

    # -------------------------------------------------------------------------------- reading
    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    @property
    def num_skipped(self) -> int:
        """Images skipped because they did not decode (all DataLoader workers of this process)."""
        return int(self._skipped)

    def start_at(self, position: int) -> None:
        """Seed the next pass with ``position`` (see the module docstring)."""
        self.position = int(position)

    def check_label(self, label: Any, name: str) -> int:
        try:
            value = int(label)
        except (TypeError, ValueError):
            raise ValueError(f"{self.description}: sample {name} has label {label!r}, not an integer class "
                             "index") from None
        if not 0 <= value < self.num_classes:
            raise ValueError(f"{self.description}: sample {name} has label {value}, outside [0, {self.num_classes})"
                             " (set data.num_classes)")
        return value

    def iter_shard(self, index: int) -> Iterator[tuple[torch.Tensor, int]]:
        """``(image, label)`` of shard ``index`` in stored order; undecodable images skipped with a warning, an
        empty shard warned about."""
        count = 0
        for name, encoded, label in self.read_shard(index):
            label = self.check_label(label, name)
            try:
                image = load_rgb(encoded)
            except Exception as err:  # any failure to decode = unreadable image
                self._skipped.add(f"{name} in {self.shard_names[index]}", err)
                continue
            count += 1
            yield self.transform(image), label
        if count == 0:
            warnings.warn(f"{self.description}: shard {self.shard_names[index]} yielded no readable image (empty "
                          "shard, or no sample with the configured image/label keys)", RuntimeWarning)

    def shard_items(self, *indices: int) -> "ShardItems":
        """Shards ``indices`` (in that order) as a data set of their own, read in stored order: for a DataLoader
        that must see each of their images once (extraction, evaluation)."""
        return ShardItems(self, indices)

    def reader_shards(self) -> list[int]:
        """The shard indices of this process and DataLoader worker: ``shards[rank::P][worker::W]``."""
        import webdataset as wds  # lazy: only streams need it

        return list(wds.split_by_worker(wds.split_by_node(range(self.num_shards))))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        import webdataset as wds
        from webdataset.utils import pytorch_worker_info

        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(f"{self.seed}/{self.position}/{rank}/{worker}")
        shards = self.reader_shards()
        rng.shuffle(shards)
        samples = (sample for shard in shards for sample in self.iter_shard(shard))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        yield from samples

    def check_readers(self, num_processes: int, num_workers: int) -> None:
        """ValueError when a process would get no shard; a warning when some DataLoader workers would idle."""
        if self.num_shards < num_processes:
            raise ValueError(f"{self.description}: {self.num_shards} shard(s) for {num_processes} processes; every "
                             "process needs at least one shard (no two processes read the same shard)")
        readers = num_processes * max(1, num_workers)
        if self.num_shards < readers:
            warnings.warn(f"{self.description}: {self.num_shards} shard(s) for {num_processes} process(es) x "
                          f"{max(1, num_workers)} DataLoader worker(s): {readers - self.num_shards} worker(s) read "
                          "nothing; write more, smaller shards (python -m common.data.convert --shard-size)",
                          RuntimeWarning)

    def __len__(self) -> int:  # a stream has no length: say so instead of DataLoader's TypeError
        raise TypeError(f"{self.description} is a stream: it has no length or random access "
                        f"({'about ' + str(self.num_images) + ' images' if self.num_images else 'size unknown'}); "
                        "use an indexable source (data.name=imagefolder, or data.name=hf with "
                        "data.streaming=false) for what needs one")


class ShardItems(IterableDataset):
    """The ``(image, label)`` items of some shards of a stream, in stored order (one reader: no worker split)."""

    def __init__(self, stream: ShardedImageStream, shards: Sequence[int]):
        self.stream, self.shards = stream, list(shards)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for shard in self.shards:
            yield from self.stream.iter_shard(shard)


def is_stream(dataset: Any) -> bool:
    return bool(getattr(dataset, "is_stream", False))
