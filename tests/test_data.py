"""Image data: builtin photo crops, safe ImageFolder, synthetic shapes, config validation."""
import io
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from lgq.data import (
    BUILTIN_PHOTO_NAMES,
    BuiltinPhotoCrops,
    DataConfig,
    SafeImageFolder,
    build_image_dataset,
)


def small_builtin(split="train", **overrides):
    options = dict(name="builtin", image_size=32, crops_per_photo=3, val_crops_per_photo=2, random_flip=False)
    options.update(overrides)
    return build_image_dataset(DataConfig(**options), split)


# ----------------------------------------------------------------------------- builtin

def test_builtin_items_shapes_ranges_labels():
    train = small_builtin("train")
    assert train.num_classes == len(BUILTIN_PHOTO_NAMES) == len(train.class_names)
    assert len(train) == 3 * len(train.photos)
    seen_labels = set()
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
        assert image.std() > 0.01  # a real picture, not a constant
        assert isinstance(label, int) and train.class_names[label] == train.photos[i % len(train.photos)]
        seen_labels.add(label)
    assert seen_labels == set(train.split_labels)  # every training photo appears, classes balanced


def test_builtin_crops_are_fixed_per_index_and_depend_on_seed():
    a, b = small_builtin("train"), small_builtin("train")
    for i in range(len(a)):
        assert a.crop_box(i) == b.crop_box(i)
        assert torch.equal(a[i][0], b[i][0])
    assert [a.crop_box(i) for i in range(len(a))] != [small_builtin("train", seed=1).crop_box(i) for i in range(len(a))]
    # different indices of the same photo are different crops
    n = len(a.photos)
    assert a.crop_box(0) != a.crop_box(n)


def test_builtin_random_flip_uses_torch_rng():
    plain = small_builtin("train")
    flipping = small_builtin("train", random_flip=True)
    torch.manual_seed(123)
    first = [flipping[i][0] for i in range(len(flipping))]
    torch.manual_seed(123)
    second = [flipping[i][0] for i in range(len(flipping))]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    flipped = 0
    for i, image in enumerate(first):
        reference = plain[i][0]
        assert torch.equal(image, reference) or torch.equal(image, reference.flip(-1))
        flipped += int(not torch.equal(image, reference))
    assert 0 < flipped < len(first)
    # val never flips
    val = small_builtin("val", random_flip=True)
    assert torch.equal(val[0][0], small_builtin("val")[0][0])


def test_builtin_val_photos_are_disjoint_from_train():
    train, val = small_builtin("train"), small_builtin("val")
    assert set(train.photos).isdisjoint(val.photos)
    assert set(train.photos) | set(val.photos) == set(BUILTIN_PHOTO_NAMES)
    assert set(train.split_labels).isdisjoint(val.split_labels)
    assert {val[i][1] for i in range(len(val))} == set(val.split_labels)
    assert len(val) == 2 * len(val.photos)
    custom = small_builtin("val", val_photos=["coffee"])
    assert custom.photos == ("coffee",) and custom.split_labels == [BUILTIN_PHOTO_NAMES.index("coffee")]
    assert "coffee" not in small_builtin("train", val_photos=["coffee"]).photos


def test_builtin_from_omegaconf_structured_config():
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(
        ["image_size=16", "crops_per_photo=1", "val_photos=[astronaut]"]))
    dataset = build_image_dataset(cfg, "val")
    assert isinstance(dataset, BuiltinPhotoCrops) and dataset.photos == ("astronaut",)
    assert dataset[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("overrides, field_name", [
    (dict(name="imagenet"), "data.name"),
    (dict(image_size=0), "data.image_size"),
    (dict(min_scale=0.9, max_scale=0.5), "data.min_scale"),
    (dict(val_photos=["lena"]), "data.val_photos"),
    (dict(val_photos=list(BUILTIN_PHOTO_NAMES)), "data.val_photos"),
    (dict(name="imagefolder"), "data.root"),
    (dict(num_workers=-1), "data.num_workers"),
])
def test_config_validation_names_the_field(overrides, field_name):
    with pytest.raises(ValueError, match=field_name):
        DataConfig(**overrides)


def test_bad_split_and_unknown_keys():
    with pytest.raises(ValueError, match="split"):
        build_image_dataset(DataConfig(name="synthetic"), "test")
    with pytest.raises(ValueError, match="imagesize"):
        build_image_dataset({"name": "synthetic", "imagesize": 8})


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_and_well_formed():
    cfg = DataConfig(name="synthetic", image_size=16, num_images=10, num_val_images=4, num_classes=3, random_flip=False)
    a, b = build_image_dataset(cfg, "train"), build_image_dataset(cfg, "train")
    val = build_image_dataset(cfg, "val")
    assert len(a) == 10 and len(val) == 4 and a.num_classes == 3
    for i in range(len(a)):
        image, label = a[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert label == i % 3
        assert torch.equal(image, b[i][0])
    assert not torch.equal(a[0][0], a[3][0])  # same class, different shape placement
    assert not torch.equal(a[0][0], val[0][0])  # val items differ from train items


# ----------------------------------------------------------------------------- image folder

def write_png(path, height=40, width=60, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "imagenet"
    for c, cls in enumerate(["n01", "n02"]):
        for k in range(3):
            write_png(root / "train" / cls / f"img{k}.png", seed=10 * c + k)
    write_png(root / "val" / "n02" / "v0.png", seed=99)
    write_png(root / "val" / "n02" / "v1.PNG", height=30, width=30, seed=98)
    # one truncated PNG and one garbage "JPEG"
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 128).save(buffer, format="PNG")
    (root / "train" / "n01" / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "train" / "n02" / "garbage.JPEG").write_bytes(b"this is not an image" * 10)
    return root


def test_imagefolder_skips_and_counts_bad_files(image_root):
    dataset = build_image_dataset(DataConfig(name="imagefolder", root=str(image_root), image_size=24,
                                             random_flip=False), "train")
    assert isinstance(dataset, SafeImageFolder)
    assert dataset.num_classes == 2 and dataset.class_names == ["n01", "n02"]
    assert len(dataset) == 8 and dataset.num_skipped == 0
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        items = [dataset[i] for i in range(len(dataset))]
    assert dataset.num_skipped == 2
    assert sorted(p.rsplit("/", 1)[-1] for p in dataset.skipped_files) == ["garbage.JPEG", "truncated.png"]
    for image, label in items:
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert label in (0, 1)
    # good files load as themselves; a bad index returns the next readable item instead
    for i, (path, label) in enumerate(dataset.samples):
        if "img" in path:
            expected = dataset.transform(Image.open(path).convert("RGB"))
            assert torch.equal(items[i][0], expected) and items[i][1] == label
        else:
            assert torch.equal(items[i][0], items[(i + 1) % len(items)][0])
    # a second epoch does not warn again and keeps the count
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ = [dataset[i] for i in range(len(dataset))]
    assert dataset.num_skipped == 2


def test_imagefolder_skip_count_visible_from_dataloader_workers(image_root):
    dataset = SafeImageFolder(image_root, "train", image_size=16)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(b[0].shape[0] for b in batches) == len(dataset)
    assert dataset.num_skipped == 2


def test_imagefolder_val_uses_train_class_numbering(image_root):
    val = SafeImageFolder(image_root, "val", image_size=16)
    assert val.class_names == ["n01", "n02"] and val.num_classes == 2
    assert len(val) == 2 and {val[i][1] for i in range(2)} == {1}
    assert val.split_labels == [1]
    assert val.scan() == [] and val.num_skipped == 0


def test_imagefolder_missing_paths_raise_file_not_found(tmp_path, image_root):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_image_dataset(DataConfig(name="imagefolder", root=str(missing)), "train")
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    write_png(tmp_path / "only_train" / "train" / "a" / "x.png")
    with pytest.raises(FileNotFoundError, match="val"):
        SafeImageFolder(tmp_path / "only_train", "val")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        SafeImageFolder(tmp_path / "empty", "train")
    write_png(image_root / "val" / "n99" / "x.png")
    with pytest.raises(ValueError, match="n99"):
        SafeImageFolder(image_root, "val")
