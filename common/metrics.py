"""Every metric of the project, defined once (see docs in README "Metrics").

Codebook statistics are computed from a histogram of *hard* indices over a whole
evaluation set (``torch.bincount``), never from a single batch unless stated.
"""
from __future__ import annotations

import math

import torch

PSNR_CAP_DB = 100.0  # PSNR of identical images is infinite: every per-image PSNR is capped here


def code_histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts c_k = #{n : i_n = k}, k = 0..K-1, as an int64 tensor of length K."""
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(
            f"indices must lie in [0, {codebook_size}); got range "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    return torch.bincount(flat, minlength=codebook_size)


def entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_k p_k log p_k (nats), p_k = c_k / sum_j c_j; 0 log 0 := 0."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float64, device=counts.device)
    p = counts / total
    return -(p * torch.log(p.clamp_min(1e-300))).sum()


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Perplexity = exp(H(p)) of the empirical code distribution."""
    return torch.exp(entropy_from_counts(counts))


def codebook_statistics(counts: torch.Tensor, tokens_per_image: int | None = None) -> dict[str, float]:
    """Codebook statistics of docs/method.md §4 from a histogram of hard indices.

    active codes   = #{k : c_k > 0}
    utilisation    = active / K
    perplexity     = exp(H(c / sum c))
    bits per token = log2(perplexity)          ("effective rate", entropy form)
    log2 active    = log2(active)              ("effective rate", support form)
    bits per image = bits per token * tokens per image (when tokens_per_image is given)
    """
    counts = counts.detach().cpu()
    K = counts.numel()
    active = int((counts > 0).sum())
    ppl = float(perplexity_from_counts(counts))
    stats = {
        "codebook_size": K,
        "num_tokens": int(counts.sum()),
        "active_codes": active,
        "utilisation": active / K,
        "perplexity": ppl,
        "bits_per_token": math.log2(ppl) if ppl > 0 else 0.0,
        "log2_active_codes": math.log2(active) if active > 0 else 0.0,
    }
    if tokens_per_image is not None:
        stats["bits_per_image"] = stats["bits_per_token"] * tokens_per_image
    return stats


# ----------------------------------------------------------------------------- images
#
# Range convention for every image metric below: inputs are uint8 in [0, 255] or float
# in [-1, 1] (the project's image convention; floats are clamped to [-1, 1] first, as
# they would be when saved as pictures). Both are mapped to [0, 1] and the metric is
# computed there, i.e. with peak value L = 1. ``data_range=R`` overrides this: the
# inputs are then used as they are (no mapping, no clamping) with peak-to-peak range R.


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 = round(255 * (clamp(x, -1, 1) + 1) / 2) for float images in [-1, 1].

    The single float -> uint8 conversion of the project (FID inputs, saved samples).
    Rounding is to nearest (ties to even, torch.round); uint8 input is returned as is.
    Non-finite values raise ValueError instead of becoming arbitrary bytes.
    """
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [-1, 1] or uint8, got dtype {images.dtype}")
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        raise ValueError(f"images contain {int((~finite).sum())} non-finite values (NaN/inf)")
    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def image_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """[3, 2H + pad, N W + pad] grid in [-1, 1]: originals in the top row, reconstructions below."""
    from torchvision.utils import make_grid  # lazy: a pipeline folder's code imports this module (pipelines/remote_code.py)

    pairs = torch.cat([originals, reconstructions.clamp(-1, 1)]).float().cpu()
    return make_grid(pairs, nrow=originals.shape[0], padding=2, pad_value=1.0)


def _paired_images(images_a: torch.Tensor, images_b: torch.Tensor, data_range: float | None):
    """Validate a pair of image batches and map them to float32 [B, C, H, W] plus the peak L."""
    for name, images in (("images_a", images_a), ("images_b", images_b)):
        if not torch.is_tensor(images):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() not in (3, 4):
            raise ValueError(f"{name} must be [B, C, H, W] (or [C, H, W]), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"{name} must be uint8 or float, got dtype {images.dtype}")
    if images_a.shape != images_b.shape:
        raise ValueError(f"image shapes differ: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    if data_range is not None and not float(data_range) > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")

    def convert(images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if data_range is not None:
            return images.float()
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        return (images.float().clamp(-1.0, 1.0) + 1.0) / 2.0

    peak = 1.0 if data_range is None else float(data_range)
    return convert(images_a), convert(images_b).to(images_a.device), peak


def psnr(images_a: torch.Tensor, images_b: torch.Tensor, data_range: float | None = None,
         max_db: float | None = None) -> torch.Tensor:
    """Per-image PSNR_i = 10 log10(L^2 / MSE_i), MSE_i = mean over (C, H, W) of (a - b)^2.

    Range convention above (default: computed on [0, 1], L = 1). Identical images give
    MSE = 0 and PSNR = +inf (exact, not capped); pass ``max_db`` to cap. Returns float32
    ``[B]``; average per-image values with :func:`mean_psnr` (not PSNR of a pooled MSE).
    """
    a, b, peak = _paired_images(images_a, images_b, data_range)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    values = 10.0 * torch.log10(peak ** 2 / mse)  # mse = 0 -> +inf
    if max_db is not None:
        values = values.clamp(max=float(max_db))
    return values


def mean_psnr(images_a: torch.Tensor, images_b: torch.Tensor, data_range: float | None = None,
              max_db: float | None = None) -> float:
    """Mean over images of :func:`psnr` (+inf if any pair is identical and max_db is None)."""
    return float(psnr(images_a, images_b, data_range=data_range, max_db=max_db).double().mean())


PRC_NEIGHBORHOOD = 3  # k of the k-NN balls: Kynkaenniemi et al. 2019, ADM's evaluator and torch-fidelity's default
PRC_PROTOCOL = ("improved precision and recall (Kynkaenniemi et al. 2019) as torch-fidelity's prc computes them "
                "(torch_fidelity.metric_prc.prc_features_to_metric, Euclidean distances, k = {k} nearest neighbours "
                "within each set, a point on a ball's boundary counts as inside) on {features} of the generated "
                "and the real images; precision: share of generated images inside the real images' manifold, "
                "recall: share of real images inside the generated images' manifold")


def precision_recall(real_features: torch.Tensor, generated_features: torch.Tensor,
                     neighborhood: int = PRC_NEIGHBORHOOD, batch_size: int = 10000) -> dict[str, float]:
    """Improved precision and recall of generated features against real ones (torch-fidelity's ``prc``).

    With NN_k(x, S) the distance from x to its k-th nearest neighbour in S other than x itself
    (k = ``neighborhood``) and R, G the real and generated features:
    precision = (1/|G|) sum_{g in G} 1[exists r in R: ||g - r|| <= NN_k(r, R)],
    recall    = (1/|R|) sum_{r in R} 1[exists g in G: ||r - g|| <= NN_k(g, G)],
    f_score   = 2 P R / (P + R). Distances are computed in blocks of ``batch_size`` rows (torch-fidelity's
    ``save_cpu_ram`` path), so memory stays O(batch_size x N). Returns {"precision", "recall", "f_score"}.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric  # lazy: a pipeline folder's code imports this module

    for name, features in (("real_features", real_features), ("generated_features", generated_features)):
        if not torch.is_tensor(features) or features.dim() != 2:
            raise ValueError(f"{name} must be a [N, D] tensor, got "
                             f"{tuple(features.shape) if torch.is_tensor(features) else type(features).__name__}")
    if real_features.shape[1] != generated_features.shape[1]:
        raise ValueError(f"feature dimensions differ: {real_features.shape[1]} (real) vs "
                         f"{generated_features.shape[1]} (generated)")
    if isinstance(neighborhood, bool) or not isinstance(neighborhood, int) or neighborhood < 1:
        raise ValueError(f"neighborhood must be a positive integer, got {neighborhood!r}")
    smallest = min(real_features.shape[0], generated_features.shape[0])
    if smallest <= neighborhood:
        raise ValueError(f"precision/recall with k = {neighborhood} need more than {neighborhood} images per set, "
                         f"got {real_features.shape[0]} real and {generated_features.shape[0]} generated")
    # torch-fidelity's convention: features_1 are the generated images, features_2 the real ones
    out = prc_features_to_metric(generated_features.float(), real_features.float(), prc_neighborhood=neighborhood,
                                 prc_batch_size=int(batch_size), save_cpu_ram=True, verbose=False)
    return {key: float(out[key]) for key in ("precision", "recall", "f_score")}


SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # window radius = int(3.5 * 1.5 + 0.5) = 5 -> 11 x 11, as scikit-image
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _gaussian_window_1d(sigma: float, truncate: float, device, dtype) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def ssim(images_a: torch.Tensor, images_b: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Per-image SSIM of Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5).

    With local means mu, variances s^2 and covariance s_ab taken under the Gaussian
    window w (population form), C1 = (0.01 L)^2, C2 = (0.03 L)^2:

        SSIM(x) = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))

    averaged over all window positions that fit inside the image (no padding) and over
    channels. Matches ``skimage.metrics.structural_similarity(a, b, channel_axis=0,
    data_range=L, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
    (tested to 1e-4). Range convention above. Runs on the inputs' device; returns float32 [B].
    """
    a, b, peak = _paired_images(images_a, images_b, data_range)
    window = _gaussian_window_1d(SSIM_SIGMA, SSIM_TRUNCATE, a.device, torch.float32)
    size = window.numel()
    if a.shape[-1] < size or a.shape[-2] < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size}, got {tuple(a.shape[-2:])}")
    channels = a.shape[1]
    kernel_h = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    kernel_w = window.view(1, 1, 1, size).expand(channels, 1, 1, size)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian filter, 'valid' region
        x = torch.nn.functional.conv2d(x, kernel_h, groups=channels)
        return torch.nn.functional.conv2d(x, kernel_w, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov_ab = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)


@torch.no_grad()
def lpips_distance(images_a: torch.Tensor, images_b: torch.Tensor, lpips_model: torch.nn.Module) -> torch.Tensor:
    """Per-image LPIPS d(a, b) with the project's perceptual network (``tokenizer.losses.LPIPS``).

    Hook only: the network (and its ImageNet VGG weights) lives in tokenizer/losses.py; this
    evaluates it in eval mode without gradients on float images in [-1, 1] and reduces its
    output to one value per image (mean over any remaining dims). Returns float32 [B].
    """
    if images_a.shape != images_b.shape:
        raise ValueError(f"image shapes differ: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    if images_a.dtype == torch.uint8 or images_b.dtype == torch.uint8:
        raise TypeError("lpips_distance expects float images in [-1, 1], got uint8")
    was_training = lpips_model.training
    lpips_model.eval()
    try:
        distance = lpips_model(images_a, images_b)
    finally:
        lpips_model.train(was_training)
    return distance.reshape(images_a.shape[0], -1).float().mean(dim=1)


# ----------------------------------------------------------------------------- trivial baselines
#
# What a reconstruction should beat: images rebuilt from a handful of bits per image with no
# learning at all. Every baseline starts from the uint8 image (``to_uint8``, the form PSNR/SSIM
# compare), stores 8-bit RGB values and returns uint8 images of the input's size.

BITS_PER_RGB_PIXEL = 24  # 8-bit R, G and B


def _unit_float(images: torch.Tensor) -> torch.Tensor:
    """float32 [B, C, H, W] in [0, 1] from uint8 or float [-1, 1] images (via ``to_uint8``)."""
    images = to_uint8(images)
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    return images.float() / 255.0


def mean_colour_images(images: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its own mean colour (24 bits per image).

    m_c = round(255 * mean over (H, W) of x_c) for x on [0, 1]; output pixel (c, y, x) = m_c (uint8).
    """
    unit = _unit_float(images)
    mean = unit.mean(dim=(2, 3), keepdim=True)
    return to_uint8(mean.expand_as(unit) * 2.0 - 1.0)


def mean_colour_shift(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per image [B]: (1/C) sum_c |mean_(H,W) r_c - mean_(H,W) x_c| on [0, 1] (uint8 or [-1, 1] float inputs):
    how far a reconstruction's average colour is from the image's (0 = the same average colour)."""
    if images.shape != reconstructions.shape:
        raise ValueError(f"images {tuple(images.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape")
    return (_unit_float(reconstructions).mean(dim=(2, 3)) - _unit_float(images).mean(dim=(2, 3))).abs().mean(dim=1)


def thumbnail_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling of an 8-bit RGB thumbnail of ``size = (h, w)`` pixels (h * w * 24 bits).

    thumbnail = round(255 * clamp(down(x), 0, 1)) with down = antialiased bicubic resize to (h, w)
    (``F.interpolate(..., mode="bicubic", antialias=True)``, as an image library makes thumbnails);
    output = round(255 * clamp(up(thumbnail / 255), 0, 1)) with up = bicubic resize back to (H, W)
    (a = -0.75, align_corners=False). Returns uint8 [B, C, H, W].
    """
    unit = _unit_float(images)
    h, w = (int(v) for v in size)
    height, width = unit.shape[-2:]
    if not (1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"thumbnail size must lie in [1, {height}] x [1, {width}], got {(h, w)}")
    functional = torch.nn.functional
    thumb = functional.interpolate(unit, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    thumb = (thumb.clamp(0.0, 1.0) * 255.0).round() / 255.0  # stored as 8-bit RGB
    upsampled = functional.interpolate(thumb, size=(height, width), mode="bicubic", align_corners=False)
    return to_uint8(upsampled.clamp(0.0, 1.0) * 2.0 - 1.0)


def nominal_bits_per_image(tokens_per_image: int, codebook_size: int) -> float:
    """Nominal rate of a token grid: bits per image = tokens per image * log2(K)."""
    if tokens_per_image < 1 or codebook_size < 2:
        raise ValueError(f"need tokens_per_image >= 1 and codebook_size >= 2, got {tokens_per_image}, {codebook_size}")
    return tokens_per_image * math.log2(codebook_size)


def equal_bits_thumbnail_size(bits_per_image: float, height: int, width: int) -> tuple[int, int]:
    """The thumbnail (s, t) of an H x W image whose size s * t * 24 bits is closest to ``bits_per_image``.

    Candidates keep the aspect ratio: s = 1..H, t = clamp(round(s * W / H), 1, W). Among equally close
    candidates the smaller one wins (the thumbnail then never gets more bits than the tokenizer on a tie).
    """
    if not bits_per_image > 0:
        raise ValueError(f"bits_per_image must be positive, got {bits_per_image}")
    candidates = []
    for s in range(1, int(height) + 1):
        t = min(int(width), max(1, round(s * width / height)))
        candidates.append((abs(s * t * BITS_PER_RGB_PIXEL - bits_per_image), s * t, (s, t)))
    return min(candidates)[2]


BASELINE_NAMES = ("mean_colour", "token_grid_thumbnail", "equal_bits_thumbnail")


def baseline_plan(image_size: tuple[int, int], token_grid: tuple[int, int], bits_per_image: float) -> dict[str, dict]:
    """Name -> {"thumbnail_size": (h, w) or None, "bits_per_image": bits} of the three trivial baselines.

    mean_colour: 24 bits; token_grid_thumbnail: a thumbnail of the token-grid size (h x w tokens ->
    h x w pixels); equal_bits_thumbnail: :func:`equal_bits_thumbnail_size` of ``bits_per_image``.
    """
    height, width = (int(v) for v in image_size)
    grid = (int(token_grid[0]), int(token_grid[1]))
    equal = equal_bits_thumbnail_size(bits_per_image, height, width)
    return {
        "mean_colour": {"thumbnail_size": None, "bits_per_image": BITS_PER_RGB_PIXEL},
        "token_grid_thumbnail": {"thumbnail_size": grid, "bits_per_image": grid[0] * grid[1] * BITS_PER_RGB_PIXEL},
        "equal_bits_thumbnail": {"thumbnail_size": equal, "bits_per_image": equal[0] * equal[1] * BITS_PER_RGB_PIXEL},
    }


def baseline_images(images: torch.Tensor, plan: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Name -> uint8 images of each baseline in ``plan`` (:func:`baseline_plan`) for one batch."""
    return {name: mean_colour_images(images) if entry["thumbnail_size"] is None
            else thumbnail_images(images, entry["thumbnail_size"]) for name, entry in plan.items()}



def nonnegative_distance(distance: float) -> float:
    """max(0, d) for a distance d computed in floating point, e.g. the Frechet distance
    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Both FD terms are non-negative in exact arithmetic, but the trace term is a difference of nearly equal sums,
    so for (nearly) identical feature sets rounding can leave the total slightly below zero (seen: -1.8e-08 for a
    set against itself). A distance is never negative: the clamp changes only such rounding residues, far below
    any reported digit.
    """
    return max(0.0, float(distance))
