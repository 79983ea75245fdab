"""``data.name=webdataset``: images in WebDataset tar shards (``<key>.jpg`` / ``<key>.png`` + ``<key>.cls``).

``data.shards`` (train split) and ``data.val_shards`` (val split) are a brace pattern
(``/data/imagenet/train-{000000..000127}.tar``), a glob of local files, or a list of either; any other URL
webdataset opens (``pipe:...``, ``http://...``) is passed on unchecked. ``data.image_key`` lists the image
extensions tried in order (``jpg;jpeg;png;webp``), ``data.label_key`` the label's (``cls``: the class index as
text). Class names and the number of images come from ``dataset.json`` next to the shards when it is there
(written by ``python -m common.data.convert``: ``{"class_names": [...], "shards": {"<file>": <count>}}``);
without it ``data.num_classes`` must be set. How the shards are split over processes and workers, shuffled and
resumed: :mod:`common.data.stream`.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from common.data.stream import ShardedImageStream

INFO_FILE = "dataset.json"


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(shards: str | Sequence[str], key: str = "data.shards") -> list[str]:
    """Brace patterns and globs -> the list of shard URLs; a local pattern that matches no file, or a listed local
    file that does not exist, raises FileNotFoundError naming it."""
    import webdataset as wds  # lazy: only this source needs it

    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not patterns:
        raise ValueError(f"{key} is empty")
    urls: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(str(pattern)):
            if not _is_local(url):
                urls.append(url)
                continue
            path = url[len("file:"):] if url.startswith("file:") else url
            matches = sorted(glob.glob(str(Path(path).expanduser()))) if glob.has_magic(path) else [path]
            if not matches:
                raise FileNotFoundError(f"{key}: the pattern {pattern!r} matches no file")
            missing = [m for m in matches if not Path(m).expanduser().is_file()]
            if missing:
                raise FileNotFoundError(f"{key}: shard file {missing[0]!r} (from {pattern!r}) does not exist")
            urls.extend(str(Path(m).expanduser()) for m in matches)
    return urls


def read_shard_info(urls: Sequence[str]) -> dict[str, Any]:
    """``dataset.json`` of the folder holding the (local) shards, or {} (several folders: the first one's)."""
    local = [u for u in urls if _is_local(u)]
    if not local:
        return {}
    path = Path(local[0]).parent / INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"cannot parse {path}: {err}") from err


class WebDatasetImages(ShardedImageStream):
    """WebDataset tar shards as an image stream (see :mod:`common.data.stream` and the module docstring)."""

    def __init__(self, shards: str | Sequence[str], *, image_size: int = 256, random_flip: bool = False,
                 image_key: str = "jpg;jpeg;png;webp", label_key: str = "cls", num_classes: Optional[int] = None,
                 shuffle_buffer: int = 1000, seed: int = 0, key: str = "data.shards"):
        urls = expand_shards(shards, key)
        info = read_shard_info(urls)
        class_names = info.get("class_names")
        counts = info.get("shards", {})
        if num_classes is None:
            if not class_names:
                raise ValueError(f"{key}: no {INFO_FILE} with class_names next to the shards; set data.num_classes")
            num_classes = len(class_names)
        elif class_names and len(class_names) != num_classes:
            raise ValueError(f"data.num_classes={num_classes} but {INFO_FILE} lists {len(class_names)} classes")
        names = [Path(u).name for u in urls]
        empty = [n for n in names if counts.get(n) == 0]
        if empty:
            raise ValueError(f"{key}: {INFO_FILE} says shard {empty[0]!r} holds no samples; leave it out")
        num_images = sum(counts[n] for n in names) if counts and all(n in counts for n in names) else None
        super().__init__(urls, image_size=image_size, random_flip=random_flip, num_classes=num_classes,
                         class_names=class_names, num_images=num_images, shuffle_buffer=shuffle_buffer, seed=seed,
                         description=f"webdataset {key}")
        self.image_keys = [k.strip().lstrip(".") for k in image_key.split(";") if k.strip()]
        self.label_key = label_key.strip().lstrip(".")

    def read_shard(self, index: int) -> Iterator[tuple[str, Any, Any]]:
        import webdataset as wds

        url = self.shard_names[index]
        samples = wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        for sample in samples:
            name = sample.get("__key__", "?")
            image = next((sample[k] for k in self.image_keys if k in sample), None)
            if image is None:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"{self.description}: sample {name!r} in {url} has no image member "
                                 f"{self.image_keys} (it has {members}); set data.image_key")
            if self.label_key not in sample:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"{self.description}: sample {name!r} in {url} has no label member "
                                 f"{self.label_key!r} (it has {members}); set data.label_key")
            label = sample[self.label_key]
            if isinstance(label, bytes):
                label = label.decode("utf-8", "replace").strip()
            yield name, image, label
