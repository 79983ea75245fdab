"""The one-command demo end to end at a tiny size (32 px, a handful of steps), then resumed from its exports."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from experiments import demo


@pytest.fixture()
def offline_cpu(monkeypatch):
    # FID must be skipped (no Inception download in tests) and the trainers must stay on the CPU.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LGQ_OFFLINE", "1")
    monkeypatch.delenv("LGQ_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home-for-demo-test")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the demo sets the process-wide thread count


@pytest.mark.slow
def test_tiny_demo_end_to_end_then_reuses_exports(tmp_path, offline_cpu, capsys):
    out = tmp_path / "demo"
    argv = ["--tiny", "--data", "builtin", "--output-dir", str(out), "--device", "cpu", "--threads", "1"]  # 1 thread
    metrics = demo.main(argv)
    first_log = capsys.readouterr().out

    for name in ("metrics.json", "report.md", "samples.png", "reconstructions.png"):
        assert (out / name).is_file(), name
    assert (out / "pipeline" / "model_index.json").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("settings", "timings", "tokens", "reconstruction", "generation", "notes"):
        assert key in saved, key
    for stage in ("tokenizer", "tokens", "prior", "pipeline", "samples", "evaluation", "total"):
        assert stage in saved["timings"], stage
        assert saved["timings"][stage]["reused"] is False
    assert saved["timings"]["total_s"] == saved["timings"]["total"]["seconds"] > 0
    rec = saved["reconstruction"]
    assert 0.0 < rec["psnr"] < 100.0 and -1.0 <= rec["ssim"] <= 1.0
    assert 1 <= rec["codebook"]["active_codes"] <= 64 and rec["codebook"]["codebook_size"] == 64
    assert rec["protocol"]["resolution"] == [32, 32]
    for name in ("mean_colour", "token_grid_thumbnail", "equal_bits_thumbnail"):  # trivial baselines, same images
        baseline = rec["baselines"][name]
        assert 0.0 < baseline["psnr"] <= 100.0
        assert baseline["psnr_gain_db"] == pytest.approx(rec["psnr"] - baseline["psnr"])
    # the classifier metric: trained once into OUT/classifier/<data>-<size>px, figures in [0, 1], FD/KID named
    gen = saved["generation"]
    classifier_dirs = [p for p in (out / "classifier").iterdir() if p.is_dir()]  # beside it: its <name>.lock file
    assert len(classifier_dirs) == 1 and (classifier_dirs[0] / "classifier.json").is_file()
    assert 0.0 <= gen["classifier_accuracy"] <= 1.0 and 0.0 <= gen["classifier_real_val_accuracy"] <= 1.0
    assert 0.0 <= rec["classifier_accuracy"] <= 1.0 and rec["classifier_fd"] >= -1e-6
    assert gen["classifier_fd_name"].startswith("FD-") and gen["classifier_protocol"]["num_images"] == 12
    assert set(gen["classifier_per_class_accuracy"]) >= set(saved["samples"]["rows"])
    assert saved["timings"]["classifier"]["reused"] is False
    # without Inception weights FID is null and said so, never silently replaced
    assert rec["rfid"] is None and saved["generation"]["fid"] is None
    assert any("FID skipped" in note for note in saved["notes"])
    report = (out / "report.md").read_text()
    assert "FID skipped" in report and "samples.png" in report and "reconstructions.png" in report
    assert "| equal-bits thumbnail" in report and "tokenizer PSNR lead (dB)" in report
    assert "classified as their label" in report and gen["classifier_fd_name"] in report
    # builtin's second validation split (unseen photos) is reported next to val (held-out regions)
    unseen = saved["reconstruction_other_splits"]["val_unseen_photos"]
    assert 0.0 < unseen["psnr"] < 100.0 and unseen["protocol"]["split"] == "val_unseen_photos"
    assert "split `val_unseen_photos`" in report
    # the sample grid: one row per training class (6 photos), 2 columns of 32 px + 2 px padding
    from PIL import Image

    width, height = Image.open(out / "samples.png").size
    rows = len(saved["samples"]["rows"])
    assert rows == 6 and (width, height) == (2 + 2 * 34, 2 + rows * 34)
    assert saved["tokens"]["count"] == 2 * 6 * 4  # 6 train photos x 4 crops, each + its flip
    assert metrics["reconstruction"]["psnr"] == pytest.approx(rec["psnr"])
    assert first_log.count("==> [") == 7
    assert saved["settings"]["torch_threads"] == 1 and saved["settings"]["size"] == "tiny"

    # second run: every training export is reused, the figures of the same tokenizer are identical
    demo.main(argv)
    second_log = capsys.readouterr().out
    assert second_log.count("reusing the existing export") == 4
    again = json.loads((out / "metrics.json").read_text())
    for stage in ("tokenizer", "tokens", "prior", "pipeline"):
        assert again["timings"][stage]["reused"] is True
        assert again["timings"][stage]["seconds_when_run"] == saved["timings"][stage]["seconds"]
    assert again["reconstruction"]["psnr"] == pytest.approx(rec["psnr"])
    assert again["timings"]["classifier"]["reused"] is True
    assert again["generation"]["classifier_real_val_accuracy"] == gen["classifier_real_val_accuracy"]
    assert again["tokenizer_training"] == saved["tokenizer_training"] is not None


@pytest.mark.slow
def test_tiny_demo_on_glyphs_the_default_data(tmp_path, offline_cpu, monkeypatch):
    """The default demo data: glyphs (class = digit), no flips, generation scored against glyphs' train split;
    the sampling temperature reaches the sampler that makes the scored samples and is recorded; --mixed-precision
    bf16 and --train-seed reach both trainers (their saved run configs, the resolved precision and seed)."""
    out = tmp_path / "demo"
    seen = {}
    real_generate_samples = demo.generate_samples

    def spy(*args, **kwargs):
        seen["temperature"] = kwargs.get("temperature")
        return real_generate_samples(*args, **kwargs)

    monkeypatch.setattr(demo, "generate_samples", spy)
    demo.main(["--tiny", "--output-dir", str(out), "--device", "cpu", "--threads", "1", "--temperature", "0.6",
               "--mixed-precision", "bf16", "--train-seed", "3"])
    saved = json.loads((out / "metrics.json").read_text())
    assert seen["temperature"] == 0.6
    assert saved["tokenizer_training"]["mixed_precision"] == saved["prior_training"]["mixed_precision"] == "bf16"
    assert saved["tokenizer_training"]["seed"] == saved["prior_training"]["seed"] == 3
    for run in ("tokenizer_run", "prior_run"):
        assert OmegaConf.load(out / run / "config.yaml").train.mixed_precision == "bf16"
        assert OmegaConf.load(out / run / "config.yaml").train.seed == 3
    with pytest.raises(ValueError, match=r"tokenizer_run holds a run trained with train.seed 3 \(asked: 4\)"):
        demo.main(["--tiny", "--output-dir", str(out), "--device", "cpu", "--threads", "1", "--train-seed", "4"])
    assert saved["generation"]["protocol"]["temperature"] == saved["samples"]["temperature"] == 0.6
    assert saved["settings"]["data"] == "glyphs" and saved["settings"]["tokenizer_config"].endswith("glyphs.yaml")
    assert saved["samples"]["rows"] == [str(digit) for digit in range(10)]
    assert saved["tokens"]["count"] == 40 and saved["tokens"]["augmentations"] == ["none"]  # no flips
    assert saved["generation"]["protocol"]["reference"] == "glyphs train split"
    for key in ("psnr",):
        assert 0.0 < saved["reconstruction"]["baselines"]["equal_bits_thumbnail"][key] <= 100.0
    assert 0.0 <= saved["generation"]["classifier_accuracy"] <= 1.0
    assert "coloured digits" in (out / "report.md").read_text() or "glyphs" in (out / "report.md").read_text()


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps-scale", "0"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--quick", "--tiny"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--data", "mnist"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--temperature", "0"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--mixed-precision", "bfloat16"])
    assert demo.parse_args([]).temperature == 0.7  # the README's demo figures are measured at 0.7
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            demo.resolve_device("cuda")


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(demo, "usable_cores", lambda: 4)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert demo.default_threads() == 4
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.6, 0.0, 0.0))  # the demo's own start-up on an idle machine
    assert demo.default_threads() == 4
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (2.6, 0.0, 0.0))  # two busy cores
    assert demo.default_threads() == 2
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert demo.default_threads() == 1
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (11.0, 0.0, 0.0))
    assert demo.default_threads() == 1


def test_a_reused_run_is_checked_by_the_precision_it_resolves_to(tmp_path, monkeypatch):
    """A run trained with the recipe's "auto" is the fp32 run on a machine without a bf16 CUDA device: reused when
    --mixed-precision no is asked, refused for bf16 (and refused for no where auto meant bf16)."""
    from types import SimpleNamespace

    OmegaConf.save(OmegaConf.create({"train": {"seed": 0, "mixed_precision": "auto"}}), tmp_path / "config.yaml")

    def check(mixed_precision, train_seed=None):
        demo.Demo.check_reusable(SimpleNamespace(args=SimpleNamespace(train_seed=train_seed,
                                                                      mixed_precision=mixed_precision)), tmp_path)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check("no"), check("auto"), check(None, train_seed=0)
    with pytest.raises(ValueError, match=r"train.mixed_precision 'auto' \(asked: 'bf16'\)"):
        check("bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    check("bf16")
    with pytest.raises(ValueError, match=r"train.mixed_precision 'auto' \(asked: 'no'\)"):
        check("no")


def test_the_demo_trains_in_bf16_by_default_only_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(demo, "cpu_supports_bf16", lambda: True)
    assert demo.default_precision(torch.device("cpu")) == "bf16"
    assert demo.default_precision(torch.device("cuda")) is None  # the recipes' auto decides on a GPU
    monkeypatch.setattr(demo, "cpu_supports_bf16", lambda: False)
    assert demo.default_precision(torch.device("cpu")) is None
    assert demo.parse_args([]).mixed_precision is None  # an explicit --mixed-precision always wins


def test_cpu_bf16_support_is_read_from_onednn(monkeypatch):
    from common import training

    assert isinstance(training.cpu_supports_bf16(), bool)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert training.cpu_supports_bf16() is False
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert training.cpu_supports_bf16() is False
