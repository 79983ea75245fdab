"""Evaluation subsets: every item's label and class-balanced subsets of a data set."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import Dataset, Subset


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every item: ``dataset.targets`` when present (ImageFolder), else read item by item. A stream
    raises ValueError: a labelled subset needs a length and random access."""
    if getattr(dataset, "is_stream", False):
        raise ValueError(f"{dataset.description} is a stream (data.name=webdataset or data.streaming=true): this "
                         "command picks a class-balanced subset, which needs a length and random access; use "
                         "data.name=hf with data.streaming=false, or an image folder")
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return [int(t) for t in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def class_balanced_indices(labels: Sequence[int], num_images: int, seed: int = 0) -> list[int]:
    """A class-balanced subset of ``num_images`` item indices.

    Classes (sorted) are visited round robin; each class yields its items in a random order drawn
    from ``numpy.random.default_rng((seed, class))``. Every class contributes floor(N / C) or
    ceil(N / C) items (exactly N / C when C divides N) unless a class runs out, in which case the
    remaining classes fill up. Returned indices are sorted (data set order).
    """
    labels = [int(v) for v in labels]
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if num_images > len(labels):
        raise ValueError(f"num_images={num_images} exceeds the {len(labels)} images of the evaluation set")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    queues = {}
    for label, items in sorted(by_class.items()):
        order = np.random.default_rng((int(seed), label)).permutation(len(items))
        queues[label] = [items[i] for i in order]
    chosen: list[int] = []
    position = 0
    while len(chosen) < num_images:
        for label in sorted(queues):
            if position < len(queues[label]) and len(chosen) < num_images:
                chosen.append(queues[label][position])
        position += 1
    return sorted(chosen)


def first_items(dataset, count: int | None = None) -> list[tuple]:
    """The first ``count`` items ``(image, label)`` (all when None or the set is smaller): ``dataset[0..count)``,
    or for a stream the first images of its shards in stored order (no shuffle, shard 0 first)."""
    if not getattr(dataset, "is_stream", False):
        return [dataset[i] for i in range(len(dataset) if count is None else min(count, len(dataset)))]
    items: list[tuple] = []
    for item in dataset.shard_items(*range(dataset.num_shards)):
        if count is not None and len(items) >= count:
            break
        items.append(item)
    return items


def process_share(dataset, rank: int = 0, world: int = 1):
    """What process ``rank`` of ``world`` reads when the processes share a whole split, each item once: items
    ``rank, rank + world, ...`` of an indexable set, shards ``rank, rank + world, ...`` of a stream (in order)."""
    if getattr(dataset, "is_stream", False):
        return dataset.shard_items(*range(rank, dataset.num_shards, world))
    return Subset(dataset, range(rank, len(dataset), world))


def dataset_size(dataset) -> int | None:
    """``len(dataset)``; for a stream the number of images its source states (None when it does not)."""
    return dataset.num_images if getattr(dataset, "is_stream", False) else len(dataset)


def describe_size(dataset) -> str:
    """"N images" for an indexable set, "a stream of N images in S shards" (N when known) for a stream."""
    if not getattr(dataset, "is_stream", False):
        return f"{len(dataset)} images"
    known = f"{dataset.num_images} images" if dataset.num_images else "images"
    return f"a stream of {known} in {dataset.num_shards} shards"
