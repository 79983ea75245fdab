"""eval.reconstruction and eval.gen_fid: protocol JSON, codebook statistics, FID plumbing, balance, sharding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import gen_fid, reconstruction
from common.metrics import (code_histogram, codebook_statistics, mean_colour_images, psnr, ssim,
                          thumbnail_images, to_uint8)
from common.data import DataConfig, build_image_dataset
from pipelines import LGQPipeline
from prior.maskgit import MaskGITPrior
from prior.scheduler import MaskGITScheduler
from tokenizer.model import LGQTokenizer

K, NUM_CLASSES = 32, 4
DATA_ARGS = ["--data.name", "synthetic", "--data.num_val_images", "24", "--data.num_classes", str(NUM_CLASSES),
             "--data.image_size", "16"]


def tiny_tokenizer() -> LGQTokenizer:
    torch.manual_seed(0)
    return LGQTokenizer(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_dim=8,
                        attention_resolutions="none", codebook_size=K)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    prior = MaskGITPrior(codebook_size=K, num_classes=NUM_CLASSES, grid_size=4, hidden_size=32, num_layers=1,
                         num_heads=2)
    pipe = LGQPipeline(tokenizer=tiny_tokenizer(), prior=prior, scheduler=MaskGITScheduler(codebook_size=K))
    path = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- reconstruction
def test_class_balanced_subset():
    labels = [0] * 10 + [1] * 3 + [2] * 7
    chosen = reconstruction.class_balanced_indices(labels, 9, seed=0)
    assert len(set(chosen)) == 9
    assert np.bincount([labels[i] for i in chosen]).tolist() == [3, 3, 3]
    uneven = reconstruction.class_balanced_indices(labels, 15, seed=0)  # class 1 runs out -> others fill up
    assert np.bincount([labels[i] for i in uneven]).tolist() == [6, 3, 6]
    with pytest.raises(ValueError, match="exceeds"):
        reconstruction.class_balanced_indices(labels, 21)


def test_reconstruction_command_json_matches_hand_computation(tmp_path, tokenizer_dir, inception_weights_path, capsys):
    out = tmp_path / "metrics.json"
    reconstruction.main(["--tokenizer", tokenizer_dir, *DATA_ARGS, "--split", "val", "--num-images", "8",
                         "--batch-size", "5", "--output", out, "--inception-weights", inception_weights_path,
                         "--lpips", "off"])
    captured = capsys.readouterr()
    table = captured.out
    assert "rFID" in table and "active codes" in table
    assert "reconstruction" in captured.err and "2/2" in captured.err  # the progress bar over 2 batches
    result = json.loads(out.read_text())
    protocol = result["protocol"]
    assert protocol["num_images"] == 8 and protocol["split"] == "val" and protocol["resolution"] == [16, 16]
    assert protocol["images_per_class"] == {str(c): 2 for c in range(NUM_CLASSES)}
    assert protocol["inception_weights"]["weights_source"] == "argument"
    assert protocol["tokenizer"] == str(Path(tokenizer_dir).resolve())
    assert protocol["data"]["name"] == "synthetic"
    assert result["lpips"] is None and any("LPIPS" in n for n in result["notes"])

    # by hand: same class-balanced subset, one bincount over all of it
    dataset = build_image_dataset(DataConfig(name="synthetic", num_val_images=24, num_classes=NUM_CLASSES,
                                             image_size=16), split="val")
    chosen = reconstruction.class_balanced_indices([dataset[i][1] for i in range(len(dataset))], 8, seed=0)
    images = torch.stack([dataset[i][0] for i in chosen])
    tokenizer = LGQTokenizer.from_pretrained(tokenizer_dir).eval()
    tokens = tokenizer.encode(images)
    expected = codebook_statistics(torch.bincount(tokens.flatten(), minlength=K), tokens_per_image=64)
    assert result["codebook"]["num_tokens"] == 8 * 64
    for key, value in expected.items():
        assert result["codebook"][key] == pytest.approx(value, rel=1e-9), key
    assert torch.equal(code_histogram(tokens, K), torch.bincount(tokens.flatten(), minlength=K))
    recon = tokenizer.decode(tokens)
    assert result["psnr"] == pytest.approx(float(psnr(to_uint8(images), to_uint8(recon)).double().mean()), rel=1e-6)
    assert result["ssim"] == pytest.approx(float(ssim(to_uint8(images), to_uint8(recon)).double().mean()), rel=1e-6)
    assert result["rfid"] > 1.0  # an untrained tokenizer reconstructs badly (identical sets -> ~0: gen_fid test)

    # trivial baselines on the same images: 16x16 px, 8x8 tokens, K = 32 -> nominal 64 * 5 = 320 bits -> 4x4 (384)
    assert protocol["nominal_bits_per_image"] == 320.0
    baselines = result["baselines"]
    assert baselines["equal_bits_thumbnail"]["thumbnail_size"] == [4, 4]
    assert baselines["token_grid_thumbnail"]["thumbnail_size"] == [8, 8]
    real = to_uint8(images)
    expected_images = {"mean_colour": mean_colour_images(real), "token_grid_thumbnail": thumbnail_images(real, (8, 8)),
                       "equal_bits_thumbnail": thumbnail_images(real, (4, 4))}
    for name, baseline in expected_images.items():
        expected_psnr = float(psnr(real, baseline, max_db=100.0).double().mean())
        assert baselines[name]["psnr"] == pytest.approx(expected_psnr, rel=1e-6), name
        assert baselines[name]["ssim"] == pytest.approx(float(ssim(real, baseline).double().mean()), rel=1e-6)
        assert baselines[name]["psnr_gain_db"] == pytest.approx(result["psnr"] - expected_psnr, rel=1e-6)
    assert baselines["token_grid_thumbnail"]["psnr"] > baselines["mean_colour"]["psnr"]
    assert "equal-bits thumbnail 4x4" in table and ("trails by" in table or "beats by" in table)

    # per class, by hand: the class's images only; the colour shift |mean(recon) - mean(image)| per channel on [0, 1]
    labels = torch.tensor([dataset[i][1] for i in chosen])
    per_image_psnr = psnr(real, to_uint8(recon)).double()
    shift = (to_uint8(recon).double().mean((2, 3)) - real.double().mean((2, 3))).abs().mean(1) / 255
    assert result["mean_colour_shift"] == pytest.approx(float(shift.mean()), rel=1e-5)
    assert sorted(result["per_class"]) == [str(c) for c in range(NUM_CLASSES)]
    for label, row in result["per_class"].items():
        chosen_class = labels == int(label)
        assert row["images"] == 2
        assert row["psnr"] == pytest.approx(float(per_image_psnr[chosen_class].mean()), rel=1e-6)
        assert row["mean_colour_shift"] == pytest.approx(float(shift[chosen_class].mean()), rel=1e-5)
        expected_mean_colour = psnr(real, expected_images["mean_colour"], max_db=100.0).double()[chosen_class].mean()
        assert row["mean_colour_psnr"] == pytest.approx(float(expected_mean_colour), rel=1e-6)
    class_names = dataset.class_names
    assert "mean colour shift" in table and all(str(name) in table for name in class_names)


def test_reconstruction_without_inception_weights_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LGQ_INCEPTION_WEIGHTS", raising=False)
    dataset = build_image_dataset(DataConfig(name="synthetic", num_val_images=6, image_size=16), split="val")
    result = reconstruction.evaluate_reconstruction(tiny_tokenizer(), dataset, batch_size=4)
    assert result["rfid"] is None and result["protocol"]["inception_weights"] is None
    assert any(n.startswith("rFID not computed") and "unavailable" in n for n in result["notes"])
    assert result["codebook"]["num_tokens"] == 6 * 64


def test_reconstruction_cli_errors_name_the_problem(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="nmae"):  # typo in a data option
        reconstruction.main(["--tokenizer", tokenizer_dir, "--data.nmae", "synthetic", "--output", tmp_path / "m.json"])
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        reconstruction.main(["--tokenizer", tmp_path / "none", "--data.name", "synthetic",
                             "--output", tmp_path / "m.json"])
    with pytest.raises(ValueError, match="exceeds"):
        reconstruction.main(["--tokenizer", tokenizer_dir, *DATA_ARGS, "--num-images", "1000", "--no-fid",
                             "--lpips", "off", "--output", tmp_path / "m.json"])


def test_reconstruction_command_selects_the_split(tmp_path, tokenizer_dir):
    builtin = ["--data.name", "builtin", "--data.image_size", "16", "--data.val_crops_per_photo", "2",
               "--no-fid", "--lpips", "off"]
    for split, photos in (("val", 6), ("val_unseen_photos", 2)):  # held-out regions / held-out photos
        out = tmp_path / f"{split}.json"
        reconstruction.main(["--tokenizer", tokenizer_dir, *builtin, "--split", split, "--output", out])
        saved = json.loads(out.read_text())
        assert saved["protocol"]["split"] == split and saved["protocol"]["num_images"] == 2 * photos
    with pytest.raises(ValueError, match="val_unseen_photos.*synthetic|synthetic.*val_unseen_photos"):
        reconstruction.main(["--tokenizer", tokenizer_dir, *DATA_ARGS, "--split", "val_unseen_photos", "--no-fid",
                             "--lpips", "off", "--output", tmp_path / "m.json"])


# ----------------------------------------------------------------------------- generation
def test_balanced_class_labels():
    assert torch.bincount(gen_fid.balanced_class_labels(12, 4)).tolist() == [3, 3, 3, 3]
    assert torch.bincount(gen_fid.balanced_class_labels(10, [1, 3]), minlength=4).tolist() == [0, 5, 0, 5]
    counts = torch.bincount(gen_fid.balanced_class_labels(7, 3))
    assert counts.sum() == 7 and counts.max() - counts.min() <= 1
    with pytest.raises(ValueError):
        gen_fid.balanced_class_labels(0, 3)


def test_sharded_generation_equals_single_process(pipeline_dir):
    pipe = LGQPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_samples=10, batch_size=3, num_inference_steps=3, seed=4)
    single = gen_fid.generate_samples(pipe, **kwargs)
    shards = [gen_fid.generate_samples(pipe, rank=r, world_size=2, **kwargs) for r in range(2)]
    assert sorted(shards[0]["indices"].tolist() + shards[1]["indices"].tolist()) == list(range(10))
    merged = gen_fid.merge_shards(shards, 10)
    assert torch.equal(merged["images"], single["images"]) and torch.equal(merged["labels"], single["labels"])
    assert single["images"].dtype == torch.uint8 and single["images"].shape == (10, 3, 8, 8)
    with pytest.raises(RuntimeError, match="exactly once"):
        gen_fid.merge_shards([shards[0], shards[0]], 10)
    other_seed = gen_fid.generate_samples(pipe, **{**kwargs, "seed": 5})
    assert not torch.equal(other_seed["images"], single["images"])

    # keep_tokens: the grids the images were decoded from, with the same images and no undecided position
    with_tokens = gen_fid.generate_samples(pipe, keep_tokens=True, **kwargs)
    assert "tokens" not in single and torch.equal(with_tokens["images"], single["images"])
    tokens = with_tokens["tokens"]
    assert tokens.shape == (10, *pipe.grid_size) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < pipe.tokenizer.codebook_size
    with torch.no_grad():
        decoded = gen_fid.to_uint8(pipe.tokenizer.decode(tokens[:3]).clamp(-1, 1))
    assert (decoded.int() - single["images"][:3].int()).abs().max() <= 1  # one rounding apart at most


def test_gen_fid_command_references_and_outputs(tmp_path, pipeline_dir, inception_weights_path):
    common = ["--pipeline", pipeline_dir, "--num-samples", "8", "--batch-size", "4", "--num-inference-steps", "3",
              "--guidance-scale", "1.5", "--temperature", "0.9", "--seed", "1", "--isc-splits", "4",
              "--inception-weights", inception_weights_path]
    data = ["--data.num_val_images", "8", "--data.num_classes", str(NUM_CLASSES)]
    result = gen_fid.main([*common, "--reference", "synthetic:val", *data, "--output", tmp_path / "m.json",
                           "--save-npz", tmp_path / "s.npz", "--save-grid", tmp_path / "grid.png"])
    saved = json.loads((tmp_path / "m.json").read_text())
    protocol = saved["protocol"]
    assert protocol["num_samples"] == 8 and protocol["num_inference_steps"] == 3
    assert protocol["guidance_scale"] == 1.5 and protocol["temperature"] == 0.9 and protocol["seed"] == 1
    assert protocol["samples_per_class"] == {str(c): 2 for c in range(NUM_CLASSES)}
    assert saved["reference"]["type"] == "data_split" and saved["reference"]["num_images"] == 8
    assert saved["inception_weights"]["weights_source"] == "argument"
    assert saved["inception_score_mean"] > 0 and saved["isc_splits"] == 4
    with np.load(tmp_path / "s.npz") as npz:
        samples, labels = npz["arr_0"], npz["labels"]
    assert samples.dtype == np.uint8 and samples.shape == (8, 8, 8, 3)
    assert np.bincount(labels).tolist() == [2, 2, 2, 2]
    assert Image.open(tmp_path / "grid.png").size[0] > 8
    assert not (tmp_path / "m.json.shards").exists()

    # the same samples as reference (.npz images, image folder of PNGs) -> FID ~ 0; the data split: clearly larger
    from eval.fid import InceptionFeatureExtractor, compute_inception_features, frechet_distance

    extractor = InceptionFeatureExtractor(inception_weights_path, device="cpu")
    sample_stats = compute_inception_features(torch.from_numpy(samples).permute(0, 3, 1, 2), extractor).statistics()
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(samples):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    npz_stats, description = gen_fid.reference_statistics(str(tmp_path / "s.npz"), extractor)
    assert description["type"] == "npz_images" and npz_stats.num_images == 8
    assert abs(frechet_distance(sample_stats, npz_stats)) < 1e-3 * result["fid"]
    folder_stats, description = gen_fid.reference_statistics(str(folder), extractor)  # same statistics -> same FID
    assert description["type"] == "image_folder" and folder_stats.num_images == 8
    np.testing.assert_allclose(folder_stats.mu, sample_stats.mu, rtol=0, atol=1e-9)
    np.testing.assert_allclose(folder_stats.sigma, sample_stats.sigma, rtol=0, atol=1e-9)
    assert result["fid"] > 1.0

    # precision / recall (k = 3) on the same pool features: the samples against themselves cover each other
    # completely; against the data split, the figures are those of common.metrics.precision_recall
    from common.metrics import precision_recall

    assert saved["precision"] == result["precision"] and "k = 3" in saved["prc_protocol"]
    reference_stats, _ = gen_fid.reference_statistics("synthetic:val", extractor, data_overrides=[
        "num_val_images=8", f"num_classes={NUM_CLASSES}"], image_size=8, keep_features=True)
    sample_features = compute_inception_features(torch.from_numpy(samples).permute(0, 3, 1, 2), extractor,
                                                 keep_features=True).statistics().features
    expected = precision_recall(reference_stats.features, sample_features)
    assert (result["precision"], result["recall"]) == pytest.approx((expected["precision"], expected["recall"]))
    against_themselves = gen_fid.evaluate_generation({"images": torch.from_numpy(samples).permute(0, 3, 1, 2)},
                                                     str(folder), extractor, isc=False)
    assert against_themselves["precision"] == against_themselves["recall"] == 1.0
    from eval.fid import save_fid_statistics

    save_fid_statistics(tmp_path / "stats.npz", sample_stats)
    statistics_file = gen_fid.evaluate_generation({"images": torch.from_numpy(samples).permute(0, 3, 1, 2)},
                                                  str(tmp_path / "stats.npz"), extractor, isc=False)
    assert statistics_file["precision"] is None and any("mu/sigma" in n for n in statistics_file["notes"])


def test_gen_fid_rejects_bad_reference(tmp_path, pipeline_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("LGQ_INCEPTION_WEIGHTS", raising=False)
    result = gen_fid.main(["--pipeline", pipeline_dir, "--num-samples", "4", "--batch-size", "4",
                           "--num-inference-steps", "2", "--reference", tmp_path / "missing",
                           "--output", tmp_path / "m.json"])
    assert result["fid"] is None and any("not computed" in n for n in result["notes"])


@pytest.mark.slow
def test_two_process_gen_fid_generates_each_sample_once(tmp_path, pipeline_dir, inception_weights_path):
    from ddp import run_ddp

    args = ["--pipeline", pipeline_dir, "--num-samples", "8", "--batch-size", "3", "--num-inference-steps", "2",
            "--seed", "3", "--inception-weights", inception_weights_path, "--isc-splits", "4"]
    run_ddp(Path(gen_fid.__file__), *args, "--output", tmp_path / "ddp.json", "--save-npz", tmp_path / "ddp.npz",
            "--expected-num-processes", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the DDP workers (OMP_NUM_THREADS=1): bit-identical float reductions
    try:
        single = gen_fid.main([*args, "--output", tmp_path / "one.json", "--save-npz", tmp_path / "one.npz"])
    finally:
        torch.set_num_threads(threads)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["protocol"]["num_processes"] == 2 and single["protocol"]["num_processes"] == 1
    with np.load(tmp_path / "ddp.npz") as a, np.load(tmp_path / "one.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert ddp["fid"] is None and any("no --reference" in n for n in ddp["notes"])  # FID itself: test above
    # Inception features were extracted on each rank and gathered: the same IS as one process
    assert ddp["inception_score_mean"] == pytest.approx(single["inception_score_mean"], rel=1e-9)


def test_gen_fid_notes_reference_statistics_from_another_inception_implementation(tmp_path, inception_weights_path):
    """ADM-style reference batches hold bare mu/sigma (TensorFlow Inception); ours carry protocol metadata."""
    from eval.fid import InceptionFeatureExtractor, compute_inception_features, save_fid_statistics

    extractor = InceptionFeatureExtractor(inception_weights_path, device="cpu")
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    reference = compute_inception_features(images.flip(0)[:5], extractor).statistics(extractor.protocol())
    np.savez(tmp_path / "adm_style.npz", mu=reference.mu, sigma=reference.sigma)
    save_fid_statistics(tmp_path / "ours.npz", reference)
    results = {name: gen_fid.evaluate_generation({"images": images}, str(tmp_path / f"{name}.npz"), extractor,
                                                 isc=False)
               for name in ("adm_style", "ours")}
    assert results["adm_style"]["fid"] == pytest.approx(results["ours"]["fid"])
    assert results["adm_style"]["reference"]["type"] == "npz_statistics"
    assert results["adm_style"]["reference"]["inception_implementation"].startswith("not recorded")
    assert gen_fid.FOREIGN_STATISTICS_NOTE in results["adm_style"]["notes"]
    assert "ADM evaluator" in gen_fid.FOREIGN_STATISTICS_NOTE
    assert gen_fid.FOREIGN_STATISTICS_NOTE not in results["ours"]["notes"]
    assert "inception_implementation" not in results["ours"]["reference"]
