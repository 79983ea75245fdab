"""Hugging Face datasets and WebDataset shards as image sources: loading, labels, splitting over workers, the
converter and every bad input of issue 22 (tiny data built here with `datasets` and webdataset's ShardWriter)."""
from __future__ import annotations

import io
import json
import warnings

import datasets
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from common.data import DataConfig, build_image_dataset, dataset_labels, first_items
from common.data.convert import main as convert_main

CLASSES = ["cat", "dog", "fox"]


def png_bytes(colour, size=12, fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size + 4), colour).save(out, format=fmt)
    return out.getvalue()


def colour(i: int) -> tuple[int, int, int]:
    """A distinct colour per image index: image i is recognisable after decoding (red channel = 5 * i, i <= 51)."""
    return (5 * i, 255 - 5 * i, 40 * (i % 3))


def index_of(image: torch.Tensor) -> int:
    """The image index encoded by ``colour`` (from the mean red value of a decoded [-1, 1] image)."""
    return int(round(((float(image[0].mean()) + 1) * 127.5) / 5))


def make_imagefolder(root, per_class=4, corrupt=False):
    i = 0
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for _ in range(per_class):
                (folder / f"{i:03d}.png").write_bytes(png_bytes(colour(i)))
                i += 1
    if corrupt:
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def hf_split(count, start=0, labels=None):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    labels = labels if labels is not None else [i % 3 for i in range(count)]
    images = [{"bytes": png_bytes(colour(start + i)), "path": None} for i in range(count)]
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture
def hf_folder(tmp_path):
    path = tmp_path / "hf_saved"
    datasets.DatasetDict({"train": hf_split(9), "validation": hf_split(3, start=9)}).save_to_disk(str(path))
    return path


def write_shards(folder, counts, start=0, label=lambda i: i % 3, extra=None):
    """Shards of the given sizes with images start, start+1, ... (``extra(i)`` may replace a sample's members)."""
    folder.mkdir(parents=True, exist_ok=True)
    i = start
    paths = []
    for s, count in enumerate(counts):
        path = folder / f"part-{s:03d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for _ in range(count):
                sample = {"__key__": f"{i:06d}", "png": png_bytes(colour(i)), "cls": str(label(i)).encode()}
                writer.write(extra(i, sample) if extra else sample)
                i += 1
        paths.append(path)
    return paths


def wds_config(shards, **options):
    options = {"image_size": 8, "random_flip": False, "num_classes": 3, "shuffle_buffer": 0, **options}
    return DataConfig(name="webdataset", shards=shards, **options)


# ----------------------------------------------------------------------------- hf
def test_hf_save_to_disk_folder_gives_classlabel_names_both_splits_and_each_row(hf_folder):
    cfg = DataConfig(name="hf", root=str(hf_folder), image_size=8, random_flip=False)
    train, val = build_image_dataset(cfg, "train"), build_image_dataset(cfg, "val")
    assert len(train) == 9 and len(val) == 3
    assert train.class_names == CLASSES and train.num_classes == 3
    assert [index_of(train[i][0]) for i in range(9)] == list(range(9))
    assert [train[i][1] for i in range(9)] == [i % 3 for i in range(9)] == dataset_labels(train)
    assert [index_of(val[i][0]) for i in range(3)] == [9, 10, 11]
    image = train[0][0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and -1 <= float(image.min())
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\], not 'test'"):
        build_image_dataset(DataConfig(name="hf", root=str(hf_folder), val_split="test"), "val")


def test_hf_parquet_files_through_load_dataset(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    hf_split(6).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    hf_split(3, start=6).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    cfg = DataConfig(name="hf", root=str(folder), image_size=8)
    train, val = build_image_dataset(cfg, "train"), build_image_dataset(cfg, "val")
    assert (len(train), len(val)) == (6, 3) and train.class_names == CLASSES
    assert [index_of(val[i][0]) for i in range(3)] == [6, 7, 8]
    single = build_image_dataset(DataConfig(name="hf", root=str(folder / "train-00000-of-00001.parquet"),
                                            image_size=8), "train")
    assert len(single) == 6
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_image_dataset(DataConfig(name="hf", root=str(folder / "nothing-*.parquet")), "train")


def test_hf_bad_columns_and_labels_are_named(tmp_path, hf_folder):
    with pytest.raises(ValueError, match=r"data.image_column='img' is not a column .* columns: \['image', 'label'\]"):
        build_image_dataset(DataConfig(name="hf", root=str(hf_folder), image_column="img"), "train")
    with pytest.raises(ValueError, match="data.label_column='lbl' is not a column"):
        build_image_dataset(DataConfig(name="hf", root=str(hf_folder), label_column="lbl"), "train")
    text = hf_split(3).cast_column("label", datasets.Value("int64")).map(lambda r: {"caption": "x"})
    text.save_to_disk(str(tmp_path / "captions"))
    with pytest.raises(ValueError, match="label_column='caption' .* not an integer or ClassLabel"):
        build_image_dataset(DataConfig(name="hf", root=str(tmp_path / "captions"), label_column="caption"), "train")
    # integer labels without names: largest + 1 classes, or data.num_classes; one class without a label column
    ints = build_image_dataset(DataConfig(name="hf", root=str(tmp_path / "captions"), image_size=8), "train")
    assert ints.num_classes == 3 and ints.class_names == ["0", "1", "2"]
    assert build_image_dataset(DataConfig(name="hf", root=str(tmp_path / "captions"), num_classes=5,
                                          image_size=8), "train").num_classes == 5
    unlabelled = build_image_dataset(DataConfig(name="hf", root=str(tmp_path / "captions"), label_column=None,
                                                image_size=8), "train")
    assert unlabelled.num_classes == 1 and {unlabelled[i][1] for i in range(3)} == {0}
    with pytest.raises(ValueError, match="data.root must be set for data.name='hf'"):
        DataConfig(name="hf")


def test_hf_corrupt_image_in_parquet_is_skipped_with_a_warning_and_counted(tmp_path):
    rows = hf_split(4).to_dict()
    rows["image"][1] = {"bytes": b"\x89PNG broken", "path": None}
    broken = datasets.Dataset.from_dict(rows, features=hf_split(1).features)
    broken.to_parquet(str(tmp_path / "broken.parquet"))
    dataset = build_image_dataset(DataConfig(name="hf", root=str(tmp_path / "broken.parquet"), image_size=8), "train")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image row 1"):
        image, label = dataset[1]
    assert index_of(image) == 2 and label == 2  # the next readable row replaces it
    assert dataset.num_skipped == 1 and dataset.scan() == ["row 1 of " + repr(str(tmp_path / "broken.parquet"))
                                                           + " split 'train'"]


def test_hf_streaming_reads_every_row_once_over_shards_and_workers(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    for s, (start, count) in enumerate([(0, 5), (5, 3), (8, 4)]):  # 3 data files = 3 shards, uneven
        hf_split(count, start=start).to_parquet(str(folder / f"train-{s:05d}-of-00003.parquet"))
    cfg = DataConfig(name="hf", root=str(folder), streaming=True, image_size=8, shuffle_buffer=4)
    stream = build_image_dataset(cfg, "train")
    assert stream.is_stream and stream.num_shards == 3 and stream.class_names == CLASSES
    with pytest.raises(TypeError, match="is a stream"):
        len(stream)
    for workers in (0, 2):
        seen = [index_of(img) for images, _ in DataLoader(stream, batch_size=1, num_workers=workers) for img in images]
        assert sorted(seen) == list(range(12))
    in_order = [index_of(image) for shard in range(3) for image, _ in stream.iter_shard(shard)]
    assert in_order == list(range(12))
    with pytest.raises(ValueError, match="needs a length and random access"):
        dataset_labels(stream)
    ints = folder.parent / "ints"
    ints.mkdir()
    hf_split(3).cast_column("label", datasets.Value("int64")).to_parquet(str(ints / "train-0.parquet"))
    with pytest.raises(ValueError, match="streaming=true with the integer label column .* set data.num_classes"):
        build_image_dataset(DataConfig(name="hf", root=str(ints), streaming=True), "train")
    with pytest.raises(ValueError, match="data.streaming=true is an option of data.name='hf'"):
        DataConfig(name="imagefolder", root=str(tmp_path), streaming=True)


# ----------------------------------------------------------------------------- webdataset
def test_webdataset_stream_splits_shards_over_workers_and_shuffles_deterministically(tmp_path):
    write_shards(tmp_path / "shards", [4, 2, 5, 3])  # 14 images, uneven shards
    pattern = str(tmp_path / "shards" / "part-{000..003}.tar")
    stream = build_image_dataset(wds_config(pattern), "train")
    assert stream.num_shards == 4 and stream.num_images is None
    for workers in (0, 1, 2):
        seen = [index_of(img) for images, _ in DataLoader(stream, batch_size=2, num_workers=workers) for img in images]
        assert sorted(seen) == list(range(14)), workers  # each image exactly once: no two workers share a shard
    shuffled = build_image_dataset(wds_config(pattern, shuffle_buffer=8, seed=3), "train")
    shuffled.random_flip = False

    def order(position):
        shuffled.start_at(position)
        return [index_of(image) for image, _ in shuffled]

    assert order(5) == order(5) and sorted(order(5)) == list(range(14))
    assert order(5) != order(6) and order(5) != list(range(14))
    labels = [label for _, label in stream]
    assert sorted(labels) == sorted(i % 3 for i in range(14))


def test_webdataset_shard_patterns_globs_and_lists(tmp_path):
    paths = write_shards(tmp_path / "s", [2, 2, 2])
    assert build_image_dataset(wds_config(str(tmp_path / "s" / "*.tar")), "train").num_shards == 3
    assert build_image_dataset(wds_config([str(p) for p in paths[:2]]), "train").num_shards == 2
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_image_dataset(wds_config(str(tmp_path / "s" / "train-*.tar")), "train")
    with pytest.raises(FileNotFoundError, match="part-{007..008}.tar|part-007.tar"):
        build_image_dataset(wds_config(str(tmp_path / "s" / "part-{007..008}.tar")), "train")
    with pytest.raises(ValueError, match="set data.val_shards"):
        build_image_dataset(wds_config(str(tmp_path / "s" / "*.tar")), "val")
    with pytest.raises(ValueError, match="data.shards must be set"):
        DataConfig(name="webdataset")
    with pytest.raises(ValueError, match="no dataset.json .* set data.num_classes"):
        build_image_dataset(DataConfig(name="webdataset", shards=str(paths[0])), "train")


def test_webdataset_bad_samples_empty_and_corrupt_shards(tmp_path):
    corrupt = write_shards(tmp_path / "c", [3], extra=lambda i, s: {**s, "png": b"\x89PNG bad"} if i == 1 else s)
    stream = build_image_dataset(wds_config(str(corrupt[0])), "train")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image 000001 in .*part-000.tar"):
        seen = [index_of(image) for image, _ in stream]
    assert seen == [0, 2] and stream.num_skipped == 1

    empty = write_shards(tmp_path / "e", [2, 0])
    stream = build_image_dataset(wds_config([str(p) for p in empty]), "train")
    with pytest.warns(RuntimeWarning, match="part-001.tar yielded no readable image"):
        assert len(list(stream)) == 2

    no_label = write_shards(tmp_path / "n", [2], extra=lambda i, s: {"__key__": s["__key__"], "png": s["png"]})
    with pytest.raises(ValueError, match=r"sample '000000' .* has no label member 'cls' \(it has \['png'\]\)"):
        list(build_image_dataset(wds_config(str(no_label[0])), "train"))
    jpeg_only = write_shards(tmp_path / "j", [1], extra=lambda i, s: {"__key__": s["__key__"], "gif": s["png"],
                                                                         "cls": s["cls"]})
    with pytest.raises(ValueError, match="has no image member .* set data.image_key"):
        list(build_image_dataset(wds_config(str(jpeg_only[0])), "train"))
    assert len(list(build_image_dataset(wds_config(str(jpeg_only[0]), image_key="gif"), "train"))) == 1
    text_label = write_shards(tmp_path / "t", [1], label=lambda i: "cat")
    with pytest.raises(ValueError, match="has label 'cat', not an integer class index"):
        list(build_image_dataset(wds_config(str(text_label[0])), "train"))
    stream = build_image_dataset(wds_config(str(tmp_path / "e" / "*.tar")), "train")
    with pytest.raises(ValueError, match="2 shard\\(s\\) for 3 processes"):
        stream.check_readers(3, 0)
    with pytest.warns(RuntimeWarning, match="2 worker\\(s\\) read nothing"):
        stream.check_readers(2, 2)


def test_convert_imagefolder_and_hf_to_shards(tmp_path, hf_folder):
    root = make_imagefolder(tmp_path / "folder", per_class=3, corrupt=True)
    with pytest.warns(RuntimeWarning, match="skipping .*broken.jpg: not an image"):
        info = convert_main(["--from", "imagefolder", str(root), "--to", str(tmp_path / "wds"), "--shard-size", "4"])
    assert info["num_images"] == 9 and info["skipped"] == 1 and info["class_names"] == CLASSES
    assert sorted(info["shards"].values()) == [1, 4, 4]
    assert json.loads((tmp_path / "wds" / "dataset.json").read_text())["shards"] == info["shards"]
    stream = build_image_dataset(DataConfig(name="webdataset", shards=str(tmp_path / "wds" / "*.tar"), image_size=8),
                                 "train")
    assert stream.class_names == CLASSES and stream.num_images == 9  # from dataset.json
    items = sorted((index_of(image), label) for image, label in first_items(stream, 100))
    assert items == [(i, i // 3) for i in range(9)]  # imagefolder images 0..8 = 3 per class, all there once
    with pytest.raises(FileExistsError, match="already holds shard"):
        convert_main(["--from", "imagefolder", str(root), "--to", str(tmp_path / "wds"), "--shard-size", "4"])

    info = convert_main(["--from", "hf", str(hf_folder), "--split", "validation", "--to", str(tmp_path / "hfwds"),
                         "--shard-size", "2", "--keep-order"])
    assert info["shards"] == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    stream = build_image_dataset(DataConfig(name="webdataset", shards=str(tmp_path / "hfwds" / "*.tar"), image_size=8),
                                 "train")
    assert [(index_of(i), label) for i, label in first_items(stream, 10)] == [(9, 0), (10, 1), (11, 2)]


# ----------------------------------------------------------------------------- consumers
def test_evaluation_and_pruning_read_a_stream_like_the_same_images_indexed(tmp_path):
    """The same 10 images as an indexable hf split and as webdataset shards (converted in order): reconstruction
    evaluation, code counting for pruning and the classifier's image loading give identical results."""
    from eval.classifier import load_split
    from eval.reconstruction import evaluate_reconstruction
    from tokenizer.model import LGQTokenizer
    from tokenizer.prune import count_code_usage

    path = tmp_path / "hf"
    datasets.DatasetDict({"train": hf_split(10)}).save_to_disk(str(path))
    convert_main(["--from", "hf", str(path), "--to", str(tmp_path / "wds"), "--shard-size", "3", "--keep-order"])
    indexed = DataConfig(name="hf", root=str(path), image_size=16, random_flip=False)
    streamed = DataConfig(name="webdataset", shards=str(tmp_path / "wds" / "*.tar"), image_size=16, random_flip=False)
    torch.manual_seed(0)
    tokenizer = LGQTokenizer(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_dim=4,
                             attention_resolutions="none", codebook_size=16).eval()
    results = []
    for cfg in (indexed, streamed):
        dataset = build_image_dataset(cfg, "train")
        result = evaluate_reconstruction(tokenizer, dataset, batch_size=4, compute_fid=False, device="cpu",
                                         return_code_counts=True, progress=False, num_workers=1)
        counts = count_code_usage(tokenizer, dataset, batch_size=4, progress=False)
        images, labels, _ = load_split(cfg, "train", max_images=7)
        results.append((result, counts, images, labels))
    (a, counts_a, images_a, labels_a), (b, counts_b, images_b, labels_b) = results
    assert a["protocol"]["num_images"] == b["protocol"]["num_images"] == 10
    assert b["protocol"]["dataset_size"] == 10  # from the converter's dataset.json
    assert a["psnr"] == b["psnr"] and a["code_counts"] == b["code_counts"]
    assert torch.equal(counts_a, counts_b) and int(counts_a.sum()) == 10 * 8 * 8
    assert torch.equal(images_a, images_b) and labels_a.tolist() == labels_b.tolist() == [i % 3 for i in range(7)]
    with pytest.raises(ValueError, match="class-balanced subset, which needs a length and random access"):
        evaluate_reconstruction(tokenizer, build_image_dataset(streamed, "train"), num_images=6, compute_fid=False,
                                device="cpu", progress=False)
