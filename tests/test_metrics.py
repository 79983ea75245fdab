"""Metrics: codebook statistics, PSNR, SSIM, to_uint8, LPIPS hook, FID / IS with local random Inception weights.

The Inception weights are random (tests/inception_utils.py): the FID values test the
plumbing (streaming statistics, torch-fidelity agreement, save/load, weight resolution),
not image quality. Inception costs ~0.2-0.8 s per image here: a few images per side.
"""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from eval import fid as fid_module
from eval.fid import (
    FEATURE_EXTRACTOR,
    INCEPTION_WEIGHTS_FILENAME,
    FIDStatistics,
    InceptionFeatureAccumulator,
    InceptionFeatureExtractor,
    InceptionWeightsUnavailable,
    calculate_fid,
    frechet_distance,
    inception_score,
    inception_weights_available,
    load_fid_statistics,
    resolve_inception_weights,
    save_fid_statistics,
)
from common.metrics import (baseline_plan, code_histogram, precision_recall, codebook_statistics, equal_bits_thumbnail_size, lpips_distance,
                          mean_colour_images, mean_psnr, nominal_bits_per_image, psnr, ssim, thumbnail_images,
                          to_uint8)

pytestmark = pytest.mark.filterwarnings("ignore:FID from:UserWarning")


# ----------------------------------------------------------------------------- trivial baselines
def test_mean_colour_baseline_is_each_images_own_rounded_mean():
    images = torch.randint(0, 256, (3, 3, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    baseline = mean_colour_images(images)
    assert baseline.dtype == torch.uint8 and baseline.shape == images.shape
    expected = images.double().mean(dim=(2, 3)).round().to(torch.uint8)
    assert torch.equal(baseline[:, :, 0, 0], expected)
    assert torch.equal(baseline, expected[:, :, None, None].expand_as(images))
    flat = torch.full((1, 3, 16, 16), -0.2)  # a flat image is its own mean colour: exact
    assert torch.equal(mean_colour_images(flat), to_uint8(flat))


def test_thumbnail_baseline_exact_on_smooth_content_and_better_with_more_pixels():
    flat = to_uint8(torch.full((2, 3, 32, 32), 0.3))
    assert torch.equal(thumbnail_images(flat, (4, 4)), flat)
    assert torch.equal(thumbnail_images(flat, (32, 32)), flat)  # full size = identity (8-bit already)
    ys, xs = torch.meshgrid(torch.linspace(0, 6.28, 32), torch.linspace(0, 6.28, 32), indexing="ij")
    smooth = torch.stack([torch.sin(xs), torch.cos(ys), torch.sin(xs + ys)])[None] * 0.8
    errors = [mean_psnr(smooth, thumbnail_images(smooth, (n, n))) for n in (2, 4, 8, 16)]
    assert errors == sorted(errors) and errors[-1] > 35.0
    with pytest.raises(ValueError, match="thumbnail size"):
        thumbnail_images(smooth, (0, 4))


def test_equal_bits_thumbnail_size_is_closest_in_bits_and_keeps_the_aspect():
    assert nominal_bits_per_image(64, 1024) == 640.0
    assert equal_bits_thumbnail_size(640, 64, 64) == (5, 5)      # 600 bits (6x6 = 864)
    assert equal_bits_thumbnail_size(64 * 6.1, 64, 64) == (4, 4)  # the issue's ~390 bits -> 384
    assert equal_bits_thumbnail_size(24 * 300, 32, 64) == (12, 24)  # 2:1 aspect -> 288 pixels
    assert equal_bits_thumbnail_size(5, 32, 32) == (1, 1)
    assert equal_bits_thumbnail_size(1e9, 16, 16) == (16, 16)
    plan = baseline_plan((32, 32), (8, 8), nominal_bits_per_image(64, 16))
    assert plan["mean_colour"] == {"thumbnail_size": None, "bits_per_image": 24}
    assert plan["token_grid_thumbnail"] == {"thumbnail_size": (8, 8), "bits_per_image": 1536}
    assert plan["equal_bits_thumbnail"] == {"thumbnail_size": (3, 3), "bits_per_image": 216}  # 256 bits


# ----------------------------------------------------------------------------- codebook statistics

def test_codebook_statistics_from_histogram():
    counts = code_histogram(torch.tensor([[0, 0], [1, 3]]), codebook_size=4)
    assert counts.tolist() == [2, 1, 0, 1]
    stats = codebook_statistics(counts, tokens_per_image=2)
    assert stats["active_codes"] == 3 and stats["utilisation"] == 0.75
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert stats["perplexity"] == pytest.approx(math.exp(entropy))
    assert stats["bits_per_image"] == pytest.approx(2 * entropy / math.log(2))


# ----------------------------------------------------------------------------- to_uint8, PSNR, SSIM

def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, -1.0 + 1.0 / 255, -1.0 + 0.9 / 127.5, -1.0 + 1.1 / 127.5])
    # 0.0 -> 127.5 -> 128 and -1 + 1/255 -> 0.5 -> 0 (ties to even); 0.9 -> 1; 1.1 -> 1
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 0, 1, 1]
    exact = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(exact.float() / 127.5 - 1.0), exact)  # round trip of every byte value
    assert to_uint8(exact) is exact
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError):
        to_uint8(torch.zeros(3, dtype=torch.int32))


def test_psnr_hand_computed_and_identical():
    a = torch.zeros(2, 3, 4, 4)  # mid-grey in [-1, 1] = 0.5 in [0, 1]
    b = a.clone()
    b[0] += 0.2  # difference 0.1 in [0, 1] -> MSE 0.01 -> 20 dB
    values = psnr(a, b)
    assert values[0].item() == pytest.approx(20.0, abs=1e-4)
    assert math.isinf(values[1].item()) and values[1] > 0  # identical: +inf, not capped
    assert psnr(a, b, max_db=60.0)[1].item() == 60.0
    assert math.isinf(mean_psnr(a, b))
    # uint8 [0, 255]: one image differs by 255/10 everywhere -> 20 dB; same value as the float path
    u = to_uint8(a)
    v = u.clone()
    v[0] = 128 + 25  # 25/255 off
    assert psnr(u, v)[0].item() == pytest.approx(10 * math.log10(255 ** 2 / 25 ** 2), abs=1e-4)
    # per image then averaged, not pooled MSE
    c = a.clone()
    c[1] += 0.02  # 0.01 in [0,1] -> 40 dB
    assert mean_psnr(a, torch.stack([b[0], c[1]])) == pytest.approx(30.0, abs=1e-3)
    assert psnr(a[0], b[0]).shape == (1,)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:1])
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, data_range=0)


def test_ssim_matches_skimage_and_is_one_for_identical():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 40, 48, generator=generator) * 2 - 1
    smooth = torch.nn.functional.avg_pool2d(a, 5, stride=1, padding=2)
    b = (smooth + 0.2 * torch.randn(a.shape, generator=generator)).clamp(-1, 1)
    ours = ssim(a, b)
    reference = [
        structural_similarity(((a[i] + 1) / 2).double().numpy(), ((b[i] + 1) / 2).double().numpy(),
                              channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for i in range(3)
    ]
    assert ours.shape == (3,)
    assert np.allclose(ours.numpy(), reference, atol=1e-4)
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-5)
    # uint8 path gives the same as the float path on the same picture
    assert torch.allclose(ssim(to_uint8(a), to_uint8(b)), ssim(to_uint8(a).float() / 127.5 - 1, to_uint8(b).float() / 127.5 - 1), atol=1e-5)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[..., :8, :8], b[..., :8, :8])


def test_lpips_hook_reduces_per_image_and_restores_mode():
    class SquaredDistance(torch.nn.Module):
        def forward(self, x, y):
            return (x - y).pow(2).mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1] like LPIPS

    model = SquaredDistance().train()
    a, b = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    b[1] += 0.5
    assert lpips_distance(a, b, model).tolist() == [0.0, 0.25]
    assert model.training


# ----------------------------------------------------------------------------- FID statistics (no Inception)

def test_streaming_statistics_equal_numpy_mean_and_cov():
    features = torch.rand(37, 2048, dtype=torch.float64) * 3 + 1
    accumulator = InceptionFeatureAccumulator()
    for chunk in features.split(10):
        accumulator.update_features(chunk.float())
    stats = accumulator.statistics()
    reference = features.float().double().numpy()
    assert np.allclose(stats.mu, reference.mean(axis=0), atol=1e-10)
    assert np.allclose(stats.sigma, np.cov(reference, rowvar=False), atol=1e-9)
    assert stats.num_images == 37


# ----------------------------------------------------------------------------- weights resolution

def random_covariance(generator, dim, num_samples):
    """Unbiased sample covariance of num_samples correlated Gaussian vectors (singular when num_samples <= dim)."""
    mixing = generator.standard_normal((dim, dim)) / math.sqrt(dim)
    samples = generator.standard_normal((num_samples, dim)) @ mixing + generator.standard_normal(dim)
    return samples.mean(0), np.cov(samples, rowvar=False)


@pytest.mark.parametrize("num_samples", [200, 20], ids=["full_rank", "rank_deficient"])
def test_frechet_distance_equals_torch_fidelity_on_small_statistics(num_samples):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    from eval.fid import trace_sqrt_product

    generator = np.random.default_rng(num_samples)
    dim = 48
    for _ in range(3):
        stats_a = FIDStatistics(*random_covariance(generator, dim, num_samples), num_samples)
        stats_b = FIDStatistics(*random_covariance(generator, dim, num_samples), num_samples)
        expected = fid_statistics_to_metric({"mu": stats_a.mu, "sigma": stats_a.sigma},
                                            {"mu": stats_b.mu, "sigma": stats_b.sigma}, verbose=False)[KEY_METRIC_FID]
        assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance(stats_b, stats_a) == pytest.approx(expected, rel=1e-6)  # symmetric
        # tr(sqrt(Sigma Sigma)) = tr(Sigma): the distance of a set to itself vanishes
        assert trace_sqrt_product(stats_a.sigma, stats_a.sigma) == pytest.approx(np.trace(stats_a.sigma), rel=1e-6)
        assert 0.0 <= frechet_distance(stats_a, stats_a) < 1e-6 * np.trace(stats_a.sigma)  # never below zero
    # exact on a case with a closed form: diagonal covariances, tr sqrt(A B) = sum sqrt(a_i b_i)
    diag_a, diag_b = generator.uniform(0.1, 2.0, dim), generator.uniform(0.0, 2.0, dim)
    assert trace_sqrt_product(np.diag(diag_a), np.diag(diag_b)) == pytest.approx(np.sqrt(diag_a * diag_b).sum(), rel=1e-12)
    with pytest.raises(ValueError, match="equal shape"):
        trace_sqrt_product(np.eye(3), np.eye(4))


@pytest.fixture
def no_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(fid_module.WEIGHTS_ENV_VAR, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def test_missing_weights_offline_raise_clear_error(no_local_weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download offline"))
    with pytest.raises(InceptionWeightsUnavailable, match="inception_weights_path") as info:
        resolve_inception_weights()
    assert str(no_local_weights) in str(info.value)
    assert not inception_weights_available()
    with pytest.raises(InceptionWeightsUnavailable, match="does not exist"):
        resolve_inception_weights("/nonexistent/inception.pth")
    with pytest.raises(InceptionWeightsUnavailable):
        calculate_fid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


def test_failed_download_raises_and_hub_cache_is_found(no_local_weights, monkeypatch):
    for name in fid_module.OFFLINE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def failing_download(url, destination, *args, **kwargs):
        calls.append((url, destination))
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", failing_download)
    with pytest.raises(InceptionWeightsUnavailable, match="download failed"):
        resolve_inception_weights()
    assert calls == [(fid_module.INCEPTION_WEIGHTS_URL, str(no_local_weights))]
    assert not inception_weights_available(allow_download=False)
    # a file in $TORCH_HOME/hub/checkpoints/ is used without any download
    no_local_weights.parent.mkdir(parents=True, exist_ok=True)
    no_local_weights.write_bytes(b"placeholder")
    weights = resolve_inception_weights()
    assert weights.path == str(no_local_weights) and weights.source == "torch_hub_cache"
    monkeypatch.setenv(fid_module.WEIGHTS_ENV_VAR, str(no_local_weights))
    assert resolve_inception_weights().source == f"env:{fid_module.WEIGHTS_ENV_VAR}"
    assert len(calls) == 1


# ----------------------------------------------------------------------------- FID / IS with random Inception

NUM_PER_SIDE = 8


def smooth_images(n, size=48, seed=0):
    """Smooth colour gradients in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, size)
    base = ramp.view(1, 1, 1, size) * torch.rand(n, 3, 1, 1, generator=generator) \
        + ramp.view(1, 1, size, 1) * torch.rand(n, 3, 1, 1, generator=generator)
    return (base * 0.5).clamp(-1, 1)


def noise_images(n, size=48, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def inception_features(inception_weights_path):
    extractor = InceptionFeatureExtractor(inception_weights_path, device="cpu")
    images = {"smooth": smooth_images(NUM_PER_SIDE), "noise": noise_images(NUM_PER_SIDE)}
    features = {name: extractor(batch) for name, batch in images.items()}
    return extractor, images, features


def statistics_of(pool_features, extractor):
    accumulator = InceptionFeatureAccumulator()
    accumulator.update_features(pool_features)
    return accumulator.statistics(extractor.protocol())


def test_fid_identical_sets_near_zero_different_sets_large(inception_features, inception_weights_path, tmp_path):
    extractor, images, features = inception_features
    smooth, noise = (statistics_of(features[k][0], extractor) for k in ("smooth", "noise"))
    different = frechet_distance(smooth, noise)
    assert different > 0 and math.isfinite(different)
    reference_file = save_fid_statistics(tmp_path / "smooth_reference.npz", smooth)
    result = calculate_fid(images["smooth"], reference_file, inception_weights_path=inception_weights_path,
                           isc=True, isc_splits=2, batch_size=5, device="cpu")
    assert abs(result["fid"]) < 1e-3 * different
    assert result["num_images"] == result["num_reference_images"] == NUM_PER_SIDE
    assert result["resolution"] == ["48x48"] and result["reference_file"] == str(reference_file)
    assert result["feature_extractor"] == FEATURE_EXTRACTOR and result["fid_feature_layer"] == "2048"
    assert result["weights_source"] == "argument" and result["weights_path"] == str(inception_weights_path)
    assert result["inception_input_size"] == 299 and result["isc_splits"] == 2
    assert result["inception_score_mean"] >= 1.0 - 1e-6 and math.isfinite(result["inception_score_std"])
    mean, std = inception_score(features["smooth"][1], splits=2)
    assert mean == pytest.approx(result["inception_score_mean"], rel=1e-5)


def test_reference_statistics_save_load_gives_same_fid(inception_features, tmp_path):
    extractor, _, features = inception_features
    smooth, noise = (statistics_of(features[k][0], extractor) for k in ("smooth", "noise"))
    path = save_fid_statistics(tmp_path / "ref" / "noise.npz", noise)
    loaded = load_fid_statistics(path)
    assert loaded.num_images == NUM_PER_SIDE
    assert loaded.metadata["feature_extractor"] == FEATURE_EXTRACTOR
    assert np.array_equal(loaded.mu, noise.mu) and np.array_equal(loaded.sigma, noise.sigma)
    assert frechet_distance(smooth, loaded) == frechet_distance(smooth, noise)
    # a plain pytorch-fid / ADM style file with only mu and sigma loads too
    np.savez(tmp_path / "plain.npz", mu=noise.mu.astype(np.float32), sigma=noise.sigma)
    plain = load_fid_statistics(tmp_path / "plain.npz")
    assert plain.mu.dtype == np.float64 and np.allclose(plain.mu, noise.mu, rtol=1e-6)
    assert np.array_equal(plain.sigma, noise.sigma) and plain.metadata == {}
    with pytest.raises(FileNotFoundError):
        load_fid_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=noise.mu)
    with pytest.raises(ValueError, match="missing"):
        load_fid_statistics(tmp_path / "bad.npz")
    other = FIDStatistics(noise.mu, noise.sigma, 8, {"feature_extractor": "dinov2-vit-l-14"})
    with pytest.raises(ValueError, match="feature extractor"):
        frechet_distance(smooth, other)


def test_streaming_fid_equals_torch_fidelity_calculate_metrics(inception_features, inception_weights_path):
    import torch_fidelity

    extractor, images, features = inception_features
    n = 5

    class Uint8Images(torch.utils.data.Dataset):
        def __init__(self, batch):
            self.batch = to_uint8(batch)

        def __len__(self):
            return self.batch.shape[0]

        def __getitem__(self, index):
            return self.batch[index]

    expected = torch_fidelity.calculate_metrics(
        input1=Uint8Images(images["smooth"][:n]), input2=Uint8Images(images["noise"][:n]), fid=True,
        feature_extractor=FEATURE_EXTRACTOR, feature_extractor_weights_path=str(inception_weights_path),
        cuda=False, batch_size=n, cache=False, save_cpu_ram=True, verbose=False,
    )["frechet_inception_distance"]
    ours = frechet_distance(statistics_of(features["smooth"][0][:n], extractor),
                            statistics_of(features["noise"][0][:n], extractor))
    assert ours == pytest.approx(expected, rel=1e-4)


def test_nonnegative_distance_clamps_only_rounding_residues_below_zero():
    from common.metrics import nonnegative_distance

    assert nonnegative_distance(-1.8e-08) == 0.0  # a set against itself, seen from torch-fidelity
    assert nonnegative_distance(0.0) == 0.0
    assert nonnegative_distance(3.25) == 3.25 and nonnegative_distance(np.float64(1e-12)) == 1e-12


def brute_force_precision_recall(real: np.ndarray, generated: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, one pair at a time: x is inside y's ball when ||x - y|| <= the distance from y to its
    k-th nearest other point of y's own set."""
    def radii(points):
        return np.array([np.sort(np.linalg.norm(points - p, axis=1))[k] for p in points])  # [0] is p itself

    def covered(queries, centres):
        r = radii(centres)
        return np.mean([any(np.linalg.norm(q - c) <= rc for c, rc in zip(centres, r)) for q in queries])

    return covered(generated, real), covered(real, generated)


def test_precision_recall_is_the_definition_and_reads_known_cases():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 5)).astype(np.float32)
    generated = (rng.normal(size=(40, 5)) * 1.4 + 0.3).astype(np.float32)
    result = precision_recall(torch.from_numpy(real), torch.from_numpy(generated))
    expected = brute_force_precision_recall(real.astype(np.float64), generated.astype(np.float64), k=3)
    assert (result["precision"], result["recall"]) == pytest.approx(expected, abs=1e-6)
    p, r = result["precision"], result["recall"]
    assert result["f_score"] == pytest.approx(2 * p * r / (p + r), rel=1e-6)
    same = precision_recall(torch.from_numpy(real), torch.from_numpy(real))
    assert same["precision"] == same["recall"] == 1.0
    collapsed = precision_recall(torch.from_numpy(real), torch.from_numpy(real[:5].repeat(8, axis=0)))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.3   # mode collapse: real but not diverse
    far = precision_recall(torch.from_numpy(real), torch.from_numpy(real + 100.0))
    assert far["precision"] == far["recall"] == 0.0
    # k changes the balls: a larger k can only cover more
    wider = precision_recall(torch.from_numpy(real), torch.from_numpy(generated), neighborhood=8)
    assert wider["precision"] >= p and wider["recall"] >= r


@pytest.mark.parametrize("real, generated, message", [
    (torch.zeros(10, 3), torch.zeros(10, 4), "dimensions differ"), (torch.zeros(10), torch.zeros(10, 3), "real_features"),
    (torch.zeros(3, 2), torch.zeros(10, 2), "more than 3 images")])
def test_precision_recall_rejects_bad_features(real, generated, message):
    with pytest.raises(ValueError, match=message):
        precision_recall(real, generated)
