"""Write WebDataset tar shards from an image folder or a Hugging Face dataset split.

    python -m common.data.convert --from imagefolder /data/imagenet --split train --to shards/train --shard-size 1000
    python -m common.data.convert --from hf /data/imagenet_hf --split validation --to shards/val --shard-size 1000

Each sample is ``<index>.<jpg|png|...>`` (the original encoded bytes, not re-encoded) + ``<index>.cls`` (the class
index as text), in shards ``shard-000000.tar``, ... of ``--shard-size`` samples (webdataset's ``ShardWriter``),
plus ``dataset.json`` = ``{"class_names": [...], "shards": {"shard-000000.tar": count, ...}, "source": ...}``,
which ``data.name=webdataset`` reads for the class names and the number of images. Samples are written in an
order shuffled with ``--seed`` (ImageNet folders are sorted by class: unshuffled, a shard would hold one or two
classes), or in source order with ``--keep-order``. Files that are not images are skipped with a warning and
counted.
"""
from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from common.data.webdataset import INFO_FILE

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def image_extension(data: bytes) -> str:
    """The member extension of encoded image bytes (ValueError for bytes PIL cannot identify)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except Exception as err:  # noqa: BLE001 - any failure = not an image
        raise ValueError(f"not an image ({type(err).__name__}: {err})") from None
    return EXTENSIONS.get(fmt, "png")


def as_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def imagefolder_samples(root: str, split: str) -> tuple[list[str], int, Callable]:
    from common.data.imagefolder import SafeImageFolder

    folder = SafeImageFolder(root, split=split)
    return folder.class_names, len(folder), lambda i: (Path(folder.samples[i][0]).read_bytes(), folder.samples[i][1],
                                                       folder.samples[i][0])


def hf_samples(root: str, split: str, image_column: str, label_column: Optional[str]):
    from common.data.hf import HFImageDataset, encoded_image

    dataset = HFImageDataset(root, split, image_column=image_column, label_column=label_column)

    def item(i: int):
        value = encoded_image(dataset.dataset[i][image_column])
        data = Path(value).read_bytes() if isinstance(value, str) else bytes(value)
        return data, dataset.targets[i], dataset.item_name(i)

    return dataset.class_names, len(dataset), item


def convert(source: str, root: str, output: str | Path, *, shard_size: int, split: str = "train",
            image_column: str = "image", label_column: Optional[str] = "label", seed: Optional[int] = 0) -> dict:
    """Write the shards and ``dataset.json``; returns the info dictionary."""
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if source == "imagefolder":
        class_names, count, item = imagefolder_samples(root, split)
    elif source == "hf":
        class_names, count, item = hf_samples(root, split, image_column, label_column)
    else:
        raise ValueError(f"--from must be 'imagefolder' or 'hf', got {source!r}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if any(output.glob("shard-*.tar")):
        raise FileExistsError(f"{output} already holds shard-*.tar files; choose an empty --to folder")
    order = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)
    counts: dict[str, int] = {}
    skipped = 0
    with wds.ShardWriter(str(output / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as writer:
        for i in order.tolist():
            data, label, name = item(i)
            try:
                extension = image_extension(data)
            except ValueError as err:
                warnings.warn(f"skipping {name}: {err}", RuntimeWarning)
                skipped += 1
                continue
            if extension not in ("jpg", "png", "webp"):
                data, extension = as_png(data), "png"
            writer.write({"__key__": f"{i:09d}", extension: data, "cls": str(int(label)).encode()})
            shard = Path(writer.fname).name
            counts[shard] = counts.get(shard, 0) + 1
    info = {"class_names": list(class_names), "shards": counts, "num_images": sum(counts.values()),
            "skipped": skipped, "source": {"from": source, "root": str(root), "split": split}}
    (output / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m common.data.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", nargs=2, metavar=("imagefolder|hf", "ROOT"), required=True)
    parser.add_argument("--to", required=True, help="folder for the shards (one split per folder)")
    parser.add_argument("--shard-size", type=int, required=True, help="samples per shard")
    parser.add_argument("--split", default="train", help="imagefolder: train|val; hf: the dataset split")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label", help="'none' for unlabelled data (class 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order the samples are written in")
    parser.add_argument("--keep-order", action="store_true", help="write the samples in source order")
    args = parser.parse_args(argv)
    label_column = None if args.label_column.lower() in ("none", "null") else args.label_column
    info = convert(args.source[0], args.source[1], args.to, shard_size=args.shard_size, split=args.split,
                   image_column=args.image_column, label_column=label_column,
                   seed=None if args.keep_order else args.seed)
    print(f"wrote {info['num_images']} images in {len(info['shards'])} shards to {args.to} "
          f"({info['skipped']} skipped, {len(info['class_names'])} classes)")
    return info


if __name__ == "__main__":  # pragma: no cover
    main()
