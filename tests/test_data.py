"""Image data: builtin photo crops, glyphs, safe ImageFolder, synthetic shapes, config validation."""
import io
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from common.data import (
    BUILTIN_PHOTO_NAMES,
    DATASET_NAMES,
    BuiltinPhotoCrops,
    DataConfig,
    GlyphImages,
    SafeImageFolder,
    build_image_dataset,
    luma,
    matplotlib_font_dir,
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


def boxes_overlap(a, b):
    (top_a, left_a, side_a), (top_b, left_b, side_b) = a, b
    return top_a < top_b + side_b and top_b < top_a + side_a and left_a < left_b + side_b and left_b < left_a + side_a


def test_builtin_splits_are_disjoint_by_construction():
    train = small_builtin("train", crops_per_photo=60, val_crops_per_photo=20)
    val = small_builtin("val", crops_per_photo=60, val_crops_per_photo=20)
    unseen = small_builtin("val_unseen_photos", val_crops_per_photo=20)
    # "val": held-out squares of the training photos; same photos and labels as train
    assert train.photos == val.photos and train.split_labels == val.split_labels
    assert set(train.photos).isdisjoint(unseen.photos)
    assert set(train.photos) | set(unseen.photos) == set(BUILTIN_PHOTO_NAMES)
    assert set(unseen.split_labels).isdisjoint(train.split_labels)
    assert len(val) == 20 * len(val.photos) and len(unseen) == 20 * len(unseen.photos)
    above = left_of = 0
    for i in range(len(train)):
        photo, top, left, side = train.crop_box(i)
        height, width = train._images[photo].shape[:2]
        square = train.held_out_square(photo)
        assert 0 <= top and top + side <= height and 0 <= left and left + side <= width
        assert not boxes_overlap((top, left, side), square)  # never touches a val pixel
        above += top + side <= square[0]
        left_of += left + side <= square[1]
    assert above > 0 and left_of > 0  # both parts of the L-shaped train region are used
    for i in range(len(val)):
        photo, top, left, side = val.crop_box(i)
        square_top, square_left, q = val.held_out_square(photo)
        assert square_top <= top and top + side <= square_top + q
        assert square_left <= left and left + side <= square_left + q
        assert side <= q and val[i][1] == BUILTIN_PHOTO_NAMES.index(photo)
    # the same crop-size rule in every split: side / Q ~ U(min_scale, max_scale)
    for dataset in (train, val, unseen):
        for i in range(len(dataset)):
            photo, _, _, side = dataset.crop_box(i)
            assert 0.35 - 0.02 <= side / dataset.held_out_square(photo)[2] <= 1.0
    assert {unseen[i][1] for i in range(len(unseen))} == set(unseen.split_labels)
    custom = small_builtin("val_unseen_photos", val_photos=["coffee"])
    assert custom.photos == ("coffee",) and custom.split_labels == [BUILTIN_PHOTO_NAMES.index("coffee")]
    assert "coffee" not in small_builtin("train", val_photos=["coffee"]).photos
    assert "coffee" not in small_builtin("val", val_photos=["coffee"]).photos


def test_builtin_from_omegaconf_structured_config():
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(
        ["image_size=16", "crops_per_photo=1", "val_photos=[astronaut]"]))
    dataset = build_image_dataset(cfg, "val_unseen_photos")
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
    (dict(val_region=0.7), "data.val_region"),
    (dict(name="glyphs", random_flip=True), "data.random_flip"),
    (dict(name="glyphs", num_classes=11), "data.num_classes"),
    (dict(name="glyphs", glyph_charset="greek"), "data.glyph_charset"),
    (dict(name="glyphs", glyph_min_contrast=1.5), "data.glyph_min_contrast"),
])
def test_config_validation_names_the_field(overrides, field_name):
    with pytest.raises(ValueError, match=field_name):
        DataConfig(**overrides)


def test_unknown_data_set_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="data.name") as info:
        build_image_dataset({"name": "imagenet"}, "train")
    assert all(name in str(info.value) for name in DATASET_NAMES)


def test_bad_split_and_unknown_keys():
    with pytest.raises(ValueError, match="split"):
        build_image_dataset(DataConfig(name="synthetic"), "test")
    with pytest.raises(ValueError, match="val_unseen_photos"):  # the error lists the valid splits
        build_image_dataset(DataConfig(name="builtin", image_size=16), "test")
    with pytest.raises(ValueError, match="split"):  # only builtin has unseen photos
        build_image_dataset(DataConfig(name="glyphs", num_images=4), "val_unseen_photos")
    with pytest.raises(ValueError, match="imagesize"):
        build_image_dataset({"name": "synthetic", "imagesize": 8})


# ----------------------------------------------------------------------------- glyphs

def small_glyphs(split="train", **overrides):
    options = dict(name="glyphs", num_images=60, num_val_images=40)
    options.update(overrides)
    return build_image_dataset(DataConfig(**options), split)


def test_glyphs_defaults_shapes_range_and_class_balance():
    cfg = DataConfig(name="glyphs")
    assert (cfg.image_size, cfg.random_flip, cfg.num_images, cfg.num_val_images) == (32, False, 20000, 1000)
    train = small_glyphs()
    assert isinstance(train, GlyphImages) and len(train) == 60
    assert train.class_names == list("0123456789") and train.num_classes == 10
    assert train.split_labels == list(range(10))
    assert len(train.fonts) >= 10 and "DejaVuSans" in train.fonts
    assert "LastResortHE-Regular.ttf" in train.skipped_fonts and "cmsy10.ttf" in train.skipped_fonts
    counts = np.zeros(10, int)
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert isinstance(label, int)
        counts[label] += 1
    assert counts.tolist() == [6] * 10
    big = small_glyphs(image_size=64, num_classes=4)
    assert big[0][0].shape == (3, 64, 64) and big.class_names == list("0123")
    letters = small_glyphs(glyph_charset="uppercase")
    assert letters.num_classes == 26 and letters.class_names[25] == "Z"


def test_parent_configs_apply_the_chosen_data_sets_defaults():
    from common.config import load_config
    from prior.extract import ExtractConfig
    from tokenizer.config import TokenizerRunConfig

    run = load_config(TokenizerRunConfig, None, ["data.name=glyphs"])
    assert (run.data.image_size, run.data.random_flip, run.data.num_images) == (32, False, 20000)
    assert load_config(TokenizerRunConfig, None, []).data.random_flip is True  # builtin keeps its flips
    extract = load_config(ExtractConfig, None, ["tokenizer=T", "output=O", "data.name=glyphs", "data.image_size=64"])
    assert (extract.data.image_size, extract.data.random_flip) == (64, False)


def test_glyphs_are_deterministic_by_seed():
    a, b, other = small_glyphs(), small_glyphs(), small_glyphs(seed=1)
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert sum(torch.equal(a[i][0], other[i][0]) for i in range(len(a))) == 0


def test_glyphs_train_val_and_tune_are_disjoint():
    train, val = small_glyphs(num_images=400), small_glyphs("val", num_val_images=100)
    tune = small_glyphs("tune", num_val_images=100)  # the study's tuning split
    train_images = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    val_images = torch.stack([val[i][0] for i in range(len(val))]).flatten(1)
    for j in range(len(val)):
        image = val[j][0].flatten()
        assert float((train_images - image).abs().amax(dim=1).min()) > 0.05  # not even a near duplicate
        image = tune[j][0].flatten()
        assert float((torch.cat([train_images, val_images]) - image).abs().amax(dim=1).min()) > 0.05
    # one distribution: both splits use every class, many fonts, the whole size range
    for dataset in (train, val):
        params = [dataset.parameters(i) for i in range(len(dataset))]
        assert {p["label"] for p in params} == set(range(10))
        assert len({p["font"] for p in params}) >= 8
        sizes = [p["size"] for p in params]
        assert min(sizes) < GlyphImages.MIN_SIZE + 0.03 and max(sizes) > GlyphImages.MAX_SIZE - 0.03


def test_glyphs_have_the_minimum_contrast():
    dataset = small_glyphs(glyph_min_contrast=0.5)
    for i in range(len(dataset)):
        p = dataset.parameters(i)
        assert abs(float(luma(p["foreground"]) - luma(p["background"]))) >= 0.5
        image = (dataset[i][0] + 1) / 2  # [3, S, S] in [0, 1]
        pixel_luma = luma(image.permute(1, 2, 0).numpy())
        assert pixel_luma.max() - pixel_luma.min() >= 0.5 * 0.9  # strokes reach (almost) the foreground colour
        assert np.allclose(image[:, 0, 0].numpy(), p["background"], atol=1e-6)  # corners are background


def test_glyph_fonts_lacking_characters_are_skipped_and_unreadable_fonts_named(tmp_path):
    import shutil

    for name in ("DejaVuSans.ttf", "cmsy10.ttf"):
        shutil.copy(matplotlib_font_dir() / name, tmp_path / name)
    dataset = small_glyphs(glyph_font_dir=str(tmp_path))
    assert dataset.fonts == ["DejaVuSans"] and list(dataset.skipped_fonts) == ["cmsy10.ttf"]
    assert "prime" in dataset.skipped_fonts["cmsy10.ttf"]  # cmsy10 maps '0' to a math symbol
    (tmp_path / "broken.ttf").write_bytes(b"definitely not a font" * 20)
    with pytest.raises(ValueError, match="broken.ttf"):
        small_glyphs(glyph_font_dir=str(tmp_path))
    only_symbols = tmp_path / "symbols"
    only_symbols.mkdir()
    shutil.copy(matplotlib_font_dir() / "cmsy10.ttf", only_symbols / "cmsy10.ttf")
    with pytest.raises(ValueError, match="no font .* has glyphs"):
        small_glyphs(glyph_font_dir=str(only_symbols))
    with pytest.raises(FileNotFoundError, match="no .ttf"):
        small_glyphs(glyph_font_dir=str(tmp_path / "empty_missing"))


def test_glyph_fonts_whose_characters_render_identically_are_skipped(tmp_path, monkeypatch):
    import shutil

    import common.data.glyphs

    # without usable glyph names (or fontTools) the rendering check alone must reject LastResort's boxes
    monkeypatch.setattr(common.data.glyphs, "_glyph_name_matches", lambda glyph_name, char: True)
    for name in ("DejaVuSerif.ttf", "LastResortHE-Regular.ttf"):
        shutil.copy(matplotlib_font_dir() / name, tmp_path / name)
    dataset = small_glyphs(glyph_font_dir=str(tmp_path))
    assert dataset.fonts == ["DejaVuSerif"]
    assert "render identically" in dataset.skipped_fonts["LastResortHE-Regular.ttf"]


def test_preview_and_benchmark_command(tmp_path, capsys):
    from common.data.preview import main

    out = main(["--preview", str(tmp_path / "grid.png"), "--rows", "2", "--data.name", "glyphs",
                "--data.num_images=20", "--data.num_classes", "5"])
    with Image.open(out) as grid:
        assert grid.size == (2 + 5 * 34, 2 + 2 * 34)
    assert main(["--benchmark", "8", "--data.name", "glyphs", "--data.num_images", "8"]) is None
    assert "items per CPU-second" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # neither --preview nor --benchmark
        main(["--data.name", "glyphs"])


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


def test_builtin_train_crops_of_full_side_fit_beside_the_square_of_an_odd_sized_photo():
    """retina is 1411 px square: Q = 706 and the square starts at 705, so a train crop of side Q (scale 1) fits
    neither above nor left of it; such crops are capped at 705 px (before the cap, crop_box raised 'high <= 0')."""
    train = small_builtin("train", max_scale=1.0, min_scale=0.999, crops_per_photo=64)
    sides = {}
    for i in range(len(train)):
        photo, top, left, side = train.crop_box(i)
        height, width = train._images[photo].shape[:2]
        assert 0 <= top and top + side <= height and 0 <= left and left + side <= width
        assert not boxes_overlap((top, left, side), train.held_out_square(photo))
        sides.setdefault(photo, set()).add(side)
    assert sides["retina"] == {705} and train.held_out_square("retina") == (705, 705, 706)
    assert max(sides["astronaut"]) == 256  # an even photo keeps crops of the full side Q


def test_builtin_tune_split_is_held_out_of_train_and_val():
    """data.tune_region > 0: a top-left square of every training photo for the study's "tune" split; train crops
    avoid it and the val square, tune crops lie inside it, it never meets the val square (even on the odd-sided
    retina), and val is the same split crop for crop."""
    options = dict(crops_per_photo=60, val_crops_per_photo=20, tune_region=0.35)
    train, tune = small_builtin("train", **options), small_builtin("tune", **options)
    assert train.photos == tune.photos and len(tune) == 20 * len(tune.photos)
    assert [small_builtin("val", **options).crop_box(i) for i in range(40)] == \
        [small_builtin("val", crops_per_photo=60, val_crops_per_photo=20).crop_box(i) for i in range(40)]
    for photo in train.photos:
        height, width = train._images[photo].shape[:2]
        square, tune_square = train.held_out_square(photo), train.tune_square(photo)
        assert tune_square[:2] == (0, 0) and tune_square[2] == min(round(0.35 * min(height, width)),
                                                                  min(height, width) - square[2])
        assert not boxes_overlap(square, tune_square)
    for i in range(len(train)):
        photo, top, left, side = train.crop_box(i)
        height, width = train._images[photo].shape[:2]
        assert 0 <= top and top + side <= height and 0 <= left and left + side <= width
        assert not boxes_overlap((top, left, side), train.held_out_square(photo))
        assert not boxes_overlap((top, left, side), train.tune_square(photo))
    sides = []
    for i in range(len(tune)):
        photo, top, left, side = tune.crop_box(i)
        t = tune.tune_square(photo)[2]
        assert 0 <= top and top + side <= t and 0 <= left and left + side <= t
        sides.append(side / t)
    assert 0.35 - 0.02 <= min(sides) and max(sides) <= 1.0 and len(set(tune.crop_box(i) for i in range(len(tune)))) \
        == len(tune)  # the crop-size rule relative to the tuning square, no two crops alike
    assert small_builtin("train", tune_region=0.5, crops_per_photo=8).crop_box(0)  # the largest square still fits
    assert "tune" not in DataConfig(name="builtin").splits() and "tune" in DataConfig(name="builtin", tune_region=0.35).splits()
    with pytest.raises(ValueError, match="data.tune_region"):
        small_builtin("tune")
    with pytest.raises(ValueError, match="data.tune_region"):
        DataConfig(name="builtin", tune_region=0.05)


def test_uniform_box_avoiding_draws_every_allowed_position_equally_often():
    from common.data.builtin import uniform_box_avoiding

    height, width, side = 7, 9, 3
    squares = [(4, 5, 3), (0, 0, 2)]
    allowed = {(t, l) for t in range(height - side + 1) for l in range(width - side + 1)
               if not any(boxes_overlap((t, l, side), sq) for sq in squares)}
    rng = np.random.default_rng(0)
    draws = 200 * len(allowed)
    counts = {}
    for _ in range(draws):
        top, left, got_side = uniform_box_avoiding(rng, height, width, side, squares)
        assert got_side == side and (top, left) in allowed
        counts[(top, left)] = counts.get((top, left), 0) + 1
    assert set(counts) == allowed
    expected = draws / len(allowed)
    chi_square = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi_square < len(allowed) + 6 * (2 * len(allowed)) ** 0.5  # far above the chi2 mean would be non-uniform
    # no room for the side: it shrinks until a box fits
    top, left, got_side = uniform_box_avoiding(np.random.default_rng(0), 4, 4, 3, [(2, 2, 2), (0, 0, 2)])
    assert got_side == 2 and not any(boxes_overlap((top, left, 2), sq) for sq in [(2, 2, 2), (0, 0, 2)])
