"""``data.name=hf``: images from Hugging Face ``datasets``.

``data.root`` is a folder written by ``save_to_disk`` (read with ``load_from_disk``), a local parquet/arrow file or
glob (``load_dataset("parquet", data_files=...)``: one split, called "train"), a folder of data files, or a Hub
id (both through ``load_dataset``; offline with ``HF_HUB_OFFLINE=1`` once cached). ``data.split`` names the
dataset split our "train" split reads, ``data.val_split`` the one "val" reads. ``data.image_column`` holds the
images (an ``Image`` feature, bytes or paths), ``data.label_column`` the labels: a ``ClassLabel`` (its names
become ``class_names``) or integers (``data.num_classes`` or the largest label + 1 classes); null = one class.
Images are decoded here, not by ``datasets``, so one that does not decode is skipped with a warning and counted
(:mod:`common.data.unreadable`). ``data.streaming=true`` gives a stream over the dataset's shards (its data
files; :mod:`common.data.stream`) instead of an indexable set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from common.data.stream import ShardedImageStream
from common.data.transforms import photo_transform
from common.data.unreadable import SkipUnreadable

DATA_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


def load_hf_split(root: str, split: str, streaming: bool):
    """The ``split`` of the dataset at ``root`` (see the module docstring), as a ``datasets.Dataset`` or, with
    ``streaming``, a ``datasets.IterableDataset``. Unknown splits raise ValueError naming the available ones."""
    import datasets  # lazy: only this source needs it

    path = Path(root).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
                          and (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"data.root={root!r} has splits {sorted(loaded)}, not {split!r} (set data.split / "
                                 "data.val_split)")
            loaded = loaded[split]
        elif split != "train":
            raise ValueError(f"data.root={root!r} is a single saved Dataset (no splits): only data.split='train' "
                             f"reads it, got {split!r}")
        return loaded.to_iterable_dataset(num_shards=max(1, len(loaded.cache_files))) if streaming else loaded
    suffix = path.suffix.lower()
    if suffix in DATA_FILE_SUFFIXES:
        import glob as globbing

        if not globbing.glob(str(path)):
            raise FileNotFoundError(f"data.root={root!r} matches no file")
        if split != "train":
            raise ValueError(f"data.root={root!r} is one set of data files (split 'train'); for a val split put "
                             "train-*.parquet and validation-*.parquet files in one folder and set data.root to it")
        return datasets.load_dataset(DATA_FILE_SUFFIXES[suffix], data_files=str(path), split="train",
                                     streaming=streaming)
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else root, split=split, streaming=streaming)
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"data.root={root!r}: {err} (set data.split / data.val_split)") from err
        raise


def label_info(features, label_column: Optional[str], num_classes: Optional[int], where: str
               ) -> tuple[Optional[int], Optional[list[str]]]:
    """(num_classes or None = count from the data, class names or None) from the label feature; ValueError for a
    label column that is neither a ClassLabel nor integers."""
    import datasets

    if label_column is None:
        return 1, ["all"]
    feature = features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        if num_classes is not None and num_classes != feature.num_classes:
            raise ValueError(f"data.num_classes={num_classes} but the ClassLabel {label_column!r} of {where} has "
                             f"{feature.num_classes} classes")
        return feature.num_classes, list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return num_classes, None
    raise ValueError(f"data.label_column={label_column!r} of {where} is {feature}, not an integer or ClassLabel "
                     "column; choose another data.label_column (or null for one class)")


def check_columns(features, image_column: str, label_column: Optional[str], where: str) -> None:
    if features is None:
        raise ValueError(f"{where} does not declare its features; cannot check data.image_column")
    for key, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in features:
            raise ValueError(f"data.{key}={column!r} is not a column of {where}; columns: {sorted(features)}")


def undecoded(dataset, image_column: str):
    """The dataset with its ``Image`` column left encoded ({"bytes", "path"}): we decode (and skip bad images)."""
    import datasets

    if isinstance(dataset.features[image_column], datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def encoded_image(value: Any) -> Any:
    """An ``Image(decode=False)`` value {"bytes", "path"} -> bytes or path; bytes/paths/PIL images pass through."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


class HFImageDataset(SkipUnreadable):
    """An indexable split of a Hugging Face dataset (see the module docstring); transform as ImageFolder's."""

    def __init__(self, root: str, split: str = "train", *, image_size: int = 256, random_flip: bool = False,
                 image_column: str = "image", label_column: Optional[str] = "label",
                 num_classes: Optional[int] = None):
        dataset = load_hf_split(root, split, streaming=False)
        where = f"{root!r} split {split!r}"
        check_columns(dataset.features, image_column, label_column, where)
        num_classes, class_names = label_info(dataset.features, label_column, num_classes, where)
        if len(dataset) == 0:
            raise ValueError(f"{where} holds no rows")
        self.dataset = undecoded(dataset, image_column)
        self.image_column, self.label_column = image_column, label_column
        self.targets = [0] * len(dataset) if label_column is None else [int(v) for v in dataset[label_column]]
        if num_classes is None:
            num_classes = max(self.targets) + 1
        bad = [t for t in self.targets if not 0 <= t < num_classes]
        if bad:
            raise ValueError(f"{where}: label {bad[0]} outside [0, {num_classes}) in column {label_column!r}")
        self.root, self.split, self.image_size = root, split, int(image_size)
        self.num_classes = int(num_classes)
        self.class_names = class_names or [str(c) for c in range(self.num_classes)]
        self.split_labels = sorted(set(self.targets))
        self.transform = photo_transform(self.image_size, random_flip)
        self._init_unreadable()

    def __len__(self) -> int:
        return len(self.targets)

    def raw_item(self, index: int):
        return encoded_image(self.dataset[index][self.image_column]), self.targets[index]

    def item_name(self, index: int) -> str:
        return f"row {index} of {self.root!r} split {self.split!r}"

    def __repr__(self) -> str:
        return f"HFImageDataset({self.root!r}, split={self.split!r})"


class HFImageStream(ShardedImageStream):
    """A streamed split of a Hugging Face dataset: its shards (data files) split over processes and workers."""

    def __init__(self, root: str, split: str = "train", *, image_size: int = 256, random_flip: bool = False,
                 image_column: str = "image", label_column: Optional[str] = "label",
                 num_classes: Optional[int] = None, shuffle_buffer: int = 1000, seed: int = 0):
        dataset = load_hf_split(root, split, streaming=True)
        where = f"{root!r} split {split!r}"
        check_columns(dataset.features, image_column, label_column, where)
        num_classes, class_names = label_info(dataset.features, label_column, num_classes, where)
        if num_classes is None:
            raise ValueError(f"data.streaming=true with the integer label column {label_column!r} of {where}: the "
                             "number of classes needs a pass over the data; set data.num_classes")
        self.dataset = undecoded(dataset, image_column)
        self.image_column, self.label_column = image_column, label_column
        info = getattr(dataset, "info", None)
        splits = getattr(info, "splits", None) or {}
        num_images = getattr(splits.get(split), "num_examples", None) if hasattr(splits, "get") else None
        super().__init__([f"{root} shard {i}" for i in range(dataset.num_shards)], image_size=image_size,
                         random_flip=random_flip, num_classes=num_classes, class_names=class_names,
                         num_images=num_images or None, shuffle_buffer=shuffle_buffer, seed=seed,
                         description=f"hf stream {where}")

    def read_shard(self, index: int) -> Iterator[tuple[str, Any, Any]]:
        # .iter(batch_size), not iter(): inside a DataLoader worker datasets would split the one shard over workers again
        shard = self.dataset.shard(num_shards=self.num_shards, index=index)
        row = 0
        for batch in shard.iter(batch_size=64):
            labels = batch[self.label_column] if self.label_column else [0] * len(batch[self.image_column])
            for image, label in zip(batch[self.image_column], labels):
                yield f"row {row}", encoded_image(image), label
                row += 1
