"""eval.classifier: the offline classifier metric (accuracy, FD-<dataset>, KID-<dataset>) and its cache."""
from __future__ import annotations

import json

import pytest
import torch

from eval import classifier as clf_module
from eval.classifier import (ClassifierCacheMismatch, ClassifierTrainConfig, classification_accuracy,
                             classifier_report, feature_distances, load_classifier, load_or_train_classifier,
                             load_split, predict)
from eval.gen_fid import balanced_class_labels, save_samples_npz
from common.data import DataConfig, GlyphImages

NUM_CLASSES = 4
DATA = dict(name="synthetic", image_size=16, num_images=192, num_val_images=128, num_classes=NUM_CLASSES)
RECIPE = ClassifierTrainConfig(epochs=8, batch_size=32, widths=(16, 32), feature_dim=32)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("cache") / "classifier"
    classifier, metadata, trained = load_or_train_classifier(folder, DataConfig(**DATA), RECIPE, progress=False)
    assert trained
    return folder, classifier, metadata


@pytest.fixture(scope="module")
def val_set():
    images, labels, _ = load_split(DataConfig(**DATA), "val")
    return images, labels


def test_trained_once_cached_with_metadata_and_reloaded_without_retraining(cached, val_set):
    folder, classifier, metadata = cached
    saved = json.loads((folder / "classifier.json").read_text())
    assert saved["dataset"]["name"] == "synthetic" and saved["dataset"]["image_size"] == 16
    assert saved["dataset"]["class_names"] == [f"shape_{c}" for c in range(NUM_CLASSES)]
    assert saved["training"]["seed"] == 0 and saved["training"]["epochs"] == 8
    assert saved["num_val_images"] == 128 and saved["real_val_accuracy"] >= 0.95  # simple shapes: near perfect
    images, labels = val_set
    expected = classification_accuracy(predict(classifier, images), labels, saved["dataset"]["class_names"])
    assert saved["real_val_accuracy"] == pytest.approx(expected["accuracy"])

    stamp = (folder / "model" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again, metadata_again, trained = load_or_train_classifier(folder, DataConfig(**DATA), RECIPE, progress=False)
    assert not trained and metadata_again == saved
    assert (folder / "model" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(predict(again, images), predict(classifier, images))


def test_cache_made_before_a_data_key_existed_loads_while_the_key_keeps_its_default(cached):
    """A cache from an older lgq lacks DataConfig keys added since (here `shuffle_buffer`): it is the same data while the
    key is at its default, and another data set when it is not."""
    from eval.classifier import check_metadata

    folder, _, saved = cached
    older = json.loads(json.dumps(saved))
    del older["dataset"]["config"]["shuffle_buffer"]
    check_metadata(older, folder, DataConfig(**DATA))
    with pytest.raises(ClassifierCacheMismatch, match=r"data\.shuffle_buffer: cached 1000, requested 7"):
        check_metadata(older, folder, DataConfig(**{**DATA, "shuffle_buffer": 7}))


def test_training_is_deterministic(cached, tmp_path):
    _, classifier, _ = cached
    retrained, _, _ = load_or_train_classifier(tmp_path / "again", DataConfig(**DATA), RECIPE, progress=False)
    for (name, a), b in zip(classifier.state_dict().items(), retrained.state_dict().values()):
        assert torch.equal(a, b), name


def test_cache_made_for_other_data_or_recipe_is_refused(cached, tmp_path):
    folder, classifier, _ = cached
    with pytest.raises(ClassifierCacheMismatch, match=r"data\.image_size: cached 16, requested 32"):
        load_or_train_classifier(folder, DataConfig(**{**DATA, "image_size": 32}), RECIPE)
    with pytest.raises(ClassifierCacheMismatch, match=r"data set 'synthetic' at 16 px.*data\.num_classes: cached 4, requested 5"):
        load_classifier(folder, DataConfig(**{**DATA, "num_classes": 5}))
    with pytest.raises(ClassifierCacheMismatch, match=r"training\.seed: cached 0, requested 1"):
        load_or_train_classifier(folder, DataConfig(**DATA), ClassifierTrainConfig(**{**RECIPE.__dict__, "seed": 1}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="classifier.json is missing"):
        load_or_train_classifier(tmp_path / "empty", DataConfig(**DATA), RECIPE)
    with pytest.raises(ValueError, match="trained on .* 16, 16"):
        predict(classifier, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        classification_accuracy(torch.zeros(3), torch.tensor([0, 1, 4]), ["a", "b", "c", "d"])


def test_fd_kid_use_torch_fidelity_and_are_near_zero_for_real_vs_real(cached, val_set):
    folder, classifier, metadata = cached
    images, _ = val_set
    first, second = images[:64], images[64:]
    same = feature_distances(folder, first, first)
    halves = feature_distances(folder, first, second)
    perturbed = feature_distances(folder, first, 255 - second)  # colour-inverted: other colours, same shapes
    assert same["fd_name"] == "FD-synthetic" and same["kid_name"] == "KID-synthetic"
    assert abs(same["fd"]) < 1e-3
    assert perturbed["fd"] > 10 * max(halves["fd"], 1e-3) and perturbed["kid_mean"] > halves["kid_mean"] + 0.1

    # the distance is torch-fidelity's formula on the classifier's penultimate features
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    with torch.no_grad():
        feats = [classifier.features_and_logits(x.float() / 127.5 - 1)[0].double() for x in (first, second)]
    expected = fid_statistics_to_metric(*[fid_features_to_statistics(f) for f in feats], verbose=False)
    assert halves["fd"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-3)


def test_generator_ignoring_labels_gets_chance_accuracy(cached, val_set):
    folder, classifier, metadata = cached
    images, labels = val_set
    requested = balanced_class_labels(128, NUM_CLASSES)
    ignoring = images[torch.randperm(128, generator=torch.Generator().manual_seed(0))]  # label-free "samples"
    report = classifier_report(folder, classifier, metadata, ignoring, requested, images, kid_subsets=5)
    assert abs(report["classifier_accuracy"] - 1 / NUM_CLASSES) < 0.12
    by_class = {c: torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)}
    faithful = torch.stack([images[by_class[int(c)][i // NUM_CLASSES]] for i, c in enumerate(requested)])
    good = classifier_report(folder, classifier, metadata, faithful, requested, images, kid_subsets=5)
    assert good["classifier_accuracy"] >= 0.95
    assert set(good["classifier_per_class_accuracy"]) == {f"shape_{c}" for c in range(NUM_CLASSES)}
    assert good["classifier_real_val_accuracy"] == metadata["real_val_accuracy"]
    assert good["classifier_fd_name"] == "FD-synthetic" and good["classifier_fd"] >= 0


def test_cli_trains_then_loads_the_cache_and_scores_samples(val_set, tmp_path, capsys):
    images, labels = val_set
    npz = save_samples_npz(tmp_path / "samples.npz", images[:32], labels[:32])
    data_args = sum(([f"--data.{k}", str(v)] for k, v in DATA.items()), [])
    args = ["--output-dir", tmp_path / "clf", "--epochs", "1", "--max-train-images", "64", *data_args]
    first = clf_module.main(args)
    assert "trained and cached" in capsys.readouterr().out
    second = clf_module.main(args + ["--samples", npz, "--sanity"])
    out = capsys.readouterr().out
    assert "loaded" in out and "FD-synthetic" in out and "KID-synthetic" in out
    assert second["metadata"] == first["metadata"] and second["metadata"]["num_train_images"] == 64
    assert second["samples"]["classifier_protocol"]["num_images"] == 32
    sanity = second["sanity"]
    assert sanity["fd_real_vs_blurred"] > sanity["fd_real_half_vs_half"] and sanity["chance"] == 0.25
    with pytest.raises(ClassifierCacheMismatch, match="data.image_size"):
        clf_module.main(args[:-2] + ["--data.image_size", "32"])


def test_reconstruction_command_adds_classifier_figures_and_refuses_other_data(cached, tmp_path, capsys):
    from eval import reconstruction
    from tokenizer.model import LGQTokenizer

    folder, _, _ = cached
    torch.manual_seed(0)
    LGQTokenizer(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_dim=8,
                 attention_resolutions="none", codebook_size=16).save_pretrained(tmp_path / "tok")
    data_args = sum(([f"--data.{k}", str(v)] for k, v in DATA.items()), [])
    argv = ["--tokenizer", tmp_path / "tok", *data_args, "--num-images", "16", "--no-fid", "--lpips", "off",
            "--output", tmp_path / "m.json", "--classifier", folder]
    reconstruction.main(argv)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= saved["classifier_accuracy"] <= 1.0 and saved["classifier_fd_name"] == "FD-synthetic"
    assert saved["classifier_protocol"]["num_images"] == 16 and "images_u8" not in saved
    assert "classifier accuracy on reconstructions" in capsys.readouterr().out
    with pytest.raises(ClassifierCacheMismatch, match="data.num_val_images"):
        reconstruction.main([*argv, "--data.num_val_images", "64"])


def test_glyph_cache_made_with_other_rendering_ranges_is_refused(tmp_path, monkeypatch):
    """The glyph geometry (size / rotation / offset ranges) lives in the code, not the data config: a cached
    classifier made before a change of those ranges must be refused, not silently reused."""
    from eval.classifier import check_metadata, data_identity

    data_cfg = DataConfig(name="glyphs", image_size=32)
    metadata = {"dataset": {"name": "glyphs", "image_size": 32, "num_classes": 10,
                            "config": json.loads(json.dumps(data_identity(data_cfg)))}}
    check_metadata(metadata, tmp_path, data_cfg)  # same ranges: accepted
    monkeypatch.setattr(GlyphImages, "MAX_ROTATION", GlyphImages.MAX_ROTATION + 7.0)
    with pytest.raises(ClassifierCacheMismatch, match=r"data\.glyph_geometry"):
        check_metadata(metadata, tmp_path, data_cfg)


def test_precision_recall_on_classifier_features(cached, val_set):
    """Real vs real: high precision and recall; a generator that repeats four images: precision high (they are
    real), recall low (most of the real manifold is missed); inverted colours: both low."""
    folder, classifier, metadata = cached
    images, _ = val_set
    first, second = images[:64], images[64:]
    halves = feature_distances(folder, first, second)
    collapsed = feature_distances(folder, first, second[:4].repeat(16, 1, 1, 1))
    inverted = feature_distances(folder, first, 255 - second)
    assert halves["precision"] > 0.7 and halves["recall"] > 0.7
    assert collapsed["precision"] > 0.7 and collapsed["recall"] < 0.3
    assert inverted["precision"] < halves["precision"] - 0.3 and inverted["recall"] < halves["recall"] - 0.3
    from common.metrics import precision_recall

    with torch.no_grad():
        feats = [classifier.features_and_logits(x.float() / 127.5 - 1)[0] for x in (first, second)]
    expected = precision_recall(*feats)
    assert (halves["precision"], halves["recall"]) == pytest.approx((expected["precision"], expected["recall"]))
    report = classifier_report(folder, classifier, metadata, second, val_set[1][64:], first)
    assert report["classifier_precision"] == pytest.approx(halves["precision"])
    assert "k = 3" in report["classifier_protocol"]["precision_recall"]
