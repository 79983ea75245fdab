"""FID and Inception Score with torch-fidelity's standard Inception ("inception-v3-compat").

Protocol (recorded in every result dict): images are converted once with
``common.metrics.to_uint8`` (float [-1, 1] -> uint8), fed to torch-fidelity's
inception-v3-compat feature extractor (TF-compatible bilinear resize to 299x299),
FID uses the 2048-d pool features, IS the 1008-way "logits_unbiased" (torch-fidelity's
defaults). Statistics are accumulated in streaming form (float64 sums on the CPU), so
50k images never sit in memory:

    mu = S1 / N,   Sigma = (S2 - N mu mu^T) / (N - 1)     (S1 = sum_i f_i, S2 = sum_i f_i f_i^T)

which equals ``np.cov`` (unbiased) as torch-fidelity computes it, and the distance is

    FID = |mu_a - mu_b|^2 + tr(Sigma_a) + tr(Sigma_b) - 2 tr(sqrt(Sigma_a Sigma_b))

with the trace term computed exactly from two symmetric eigendecompositions (``frechet_distance``,
same value as torch-fidelity's ``fid_statistics_to_metric`` to ~1e-6 relative, several times faster
than its general ``eigvals(Sigma_a Sigma_b)`` at D = 2048).

Inception weights (never silently replaced by other weights), first match wins:
  1. ``weights_path=`` argument (offline clusters: copy the .pth there);
  2. ``$LGQ_INCEPTION_WEIGHTS``;
  3. torch hub cache: ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``
     (where torch-fidelity's own download puts it);
  4. download from torch-fidelity's release URL into that cache - unless offline
     (``HF_HUB_OFFLINE`` / ``LGQ_OFFLINE`` set) or ``allow_download=False``.
Otherwise :class:`InceptionWeightsUnavailable` explains the options.

Multi-process evaluation: extract features per process with
:class:`InceptionFeatureExtractor`, gather them (e.g. ``accelerator.gather_for_metrics``)
and feed :meth:`InceptionFeatureAccumulator.update_features` on one process.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from common.files import atomic_write
from common.metrics import nonnegative_distance, to_uint8

FEATURE_EXTRACTOR = "inception-v3-compat"
FID_FEATURE_LAYER = "2048"
ISC_FEATURE_LAYER = "logits_unbiased"
INCEPTION_INPUT_SIZE = 299
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILENAME = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
WEIGHTS_ENV_VAR = "LGQ_INCEPTION_WEIGHTS"
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "LGQ_OFFLINE")
FID_FEATURE_DIM_WARNING = 2048  # fewer images than feature dimensions: rank-deficient covariance, FID biased up


class InceptionWeightsUnavailable(RuntimeError):
    """The FID Inception weights cannot be found locally and cannot be downloaded."""


@dataclass(frozen=True)
class InceptionWeights:
    path: str
    source: str  # "argument" | "env:LGQ_INCEPTION_WEIGHTS" | "torch_hub_cache" | "downloaded"


def torch_hub_weights_path() -> Path:
    """Where torch hub (and torch-fidelity) caches the weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def is_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENV_VARS)


def _unavailable_message(reason: str) -> str:
    return (
        f"Inception weights for FID/IS are unavailable: {reason}.\n"
        f"Options: (a) on a connected machine run once without HF_HUB_OFFLINE/LGQ_OFFLINE to download\n"
        f"  {INCEPTION_WEIGHTS_URL}\n"
        f"  into {torch_hub_weights_path()}; (b) copy that file there ($TORCH_HOME/hub/checkpoints/);\n"
        f"  (c) pass inception_weights_path=/path/to/{INCEPTION_WEIGHTS_FILENAME} or set ${WEIGHTS_ENV_VAR}.\n"
        f"Other Inception weights are never substituted (FID numbers would not be comparable)."
    )


def resolve_inception_weights(weights_path: str | os.PathLike | None = None,
                              allow_download: bool = True) -> InceptionWeights:
    """Locate (or download) the inception-v3-compat weights; see the module docstring for the order."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise InceptionWeightsUnavailable(_unavailable_message(f"inception_weights_path {str(path)!r} does not exist"))
        return InceptionWeights(str(path), "argument")
    env_path = os.environ.get(WEIGHTS_ENV_VAR)
    if env_path:
        path = Path(env_path).expanduser()
        if not path.is_file():
            raise InceptionWeightsUnavailable(_unavailable_message(f"${WEIGHTS_ENV_VAR}={env_path!r} does not exist"))
        return InceptionWeights(str(path), f"env:{WEIGHTS_ENV_VAR}")
    cached = torch_hub_weights_path()
    if cached.is_file():
        return InceptionWeights(str(cached), "torch_hub_cache")
    if not allow_download:
        raise InceptionWeightsUnavailable(_unavailable_message(f"not in {cached} and downloading is disabled"))
    if is_offline():
        raise InceptionWeightsUnavailable(_unavailable_message(
            f"not in {cached} and offline mode is set ({', '.join(OFFLINE_ENV_VARS)})"))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached), progress=True)
    except Exception as err:  # network, proxy, disk: all mean "not available"
        raise InceptionWeightsUnavailable(_unavailable_message(
            f"download failed ({type(err).__name__}: {err})")) from err
    return InceptionWeights(str(cached), "downloaded")


def inception_weights_available(weights_path: str | os.PathLike | None = None, allow_download: bool = True) -> bool:
    """True if FID can run: the weights are found locally or (when allowed and online) downloaded now."""
    try:
        resolve_inception_weights(weights_path, allow_download=allow_download)
    except InceptionWeightsUnavailable:
        return False
    return True


_MODEL_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def _load_torch_fidelity_inception(path: str, device: torch.device) -> torch.nn.Module:
    key = (os.path.realpath(path), str(device))
    if key not in _MODEL_CACHE:
        model = create_feature_extractor(
            FEATURE_EXTRACTOR, [FID_FEATURE_LAYER, ISC_FEATURE_LAYER], cuda=False,
            feature_extractor_weights_path=path, verbose=False,
        )
        _MODEL_CACHE.clear()  # keep at most one ~100 MB network alive
        _MODEL_CACHE[key] = model.to(device)
    return _MODEL_CACHE[key]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class InceptionFeatureExtractor:
    """torch-fidelity's inception-v3-compat network; ``extractor(images) -> (pool [B, 2048], logits [B, 1008])``.

    ``images``: uint8 [B, 3, H, W] or float in [-1, 1] (converted with ``to_uint8``).
    Features are returned float32 on the CPU.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 allow_download: bool = True):
        self.weights = resolve_inception_weights(weights_path, allow_download=allow_download)
        self.device = torch.device(device) if device is not None else _default_device()
        self.model = _load_torch_fidelity_inception(self.weights.path, self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got {shape}")
        pool, logits = self.model(to_uint8(images).to(self.device))
        return pool.float().cpu(), logits.float().cpu()

    def protocol(self) -> dict[str, Any]:
        return {
            "feature_extractor": FEATURE_EXTRACTOR,
            "fid_feature_layer": FID_FEATURE_LAYER,
            "isc_feature_layer": ISC_FEATURE_LAYER,
            "inception_input_size": INCEPTION_INPUT_SIZE,
            "weights_source": self.weights.source,
            "weights_path": self.weights.path,
        }


@dataclass
class FIDStatistics:
    """Gaussian statistics of Inception pool features: mean ``mu`` [D], covariance ``sigma`` [D, D] (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    metadata: dict = field(default_factory=dict)
    features: torch.Tensor | None = None  # the per-image features [N, D], when kept (precision/recall); never saved

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0], self.mu.shape[0]):
            raise ValueError(f"FID statistics need mu [D] and sigma [D, D], got {self.mu.shape} and {self.sigma.shape}")


def save_fid_statistics(path: str | os.PathLike, stats: FIDStatistics) -> Path:
    """Write ``mu``, ``sigma``, ``num_images`` and JSON ``metadata`` (protocol) to an .npz file."""
    with atomic_write(path) as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, num_images=np.int64(stats.num_images),
                 metadata=np.array(json.dumps(stats.metadata)))
    return Path(path)


def load_fid_statistics(path: str | os.PathLike) -> FIDStatistics:
    """Read an .npz with ``mu`` and ``sigma`` (ours, or pytorch-fid / ADM-style reference files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{str(path)!r} is not an FID statistics file: missing {missing} (has {data.files})")
        metadata = json.loads(str(data["metadata"])) if "metadata" in data.files else {}
        num_images = int(data["num_images"]) if "num_images" in data.files else -1
        return FIDStatistics(data["mu"], data["sigma"], num_images, metadata)


class InceptionFeatureAccumulator:
    """Streaming sums for FID (S1, S2, N in float64) and, optionally, the IS logits of every image."""

    def __init__(self, dim: int = 2048, keep_logits: bool = False, keep_features: bool = False):
        self.dim = dim
        self.keep_logits = keep_logits
        self.keep_features = keep_features  # every image's pool features, for precision/recall
        self.features: list[torch.Tensor] = []
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.logits: list[torch.Tensor] = []
        self.resolutions: set[str] = set()

    def update_features(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {tuple(features.shape)}")
        f = features.detach().to("cpu", torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f
        if self.keep_features:
            self.features.append(features.detach().to("cpu", torch.float32))
        if self.keep_logits:
            if logits is None:
                raise ValueError("keep_logits=True needs the logits of every batch")
            self.logits.append(logits.detach().to("cpu", torch.float32))

    def update(self, images: torch.Tensor, extractor: InceptionFeatureExtractor) -> None:
        self.resolutions.add(f"{images.shape[-2]}x{images.shape[-1]}")
        pool, logits = extractor(images)
        self.update_features(pool, logits)

    def statistics(self, metadata: dict | None = None) -> FIDStatistics:
        """mu = S1/N, Sigma = (S2 - N mu mu^T)/(N - 1) (unbiased, = np.cov(features, rowvar=False))."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        meta = {"num_images": self.count, "resolution": sorted(self.resolutions)}
        meta.update(metadata or {})
        features = torch.cat(self.features) if self.keep_features else None
        return FIDStatistics(mu.numpy(), sigma.numpy(), self.count, meta, features)

    def all_logits(self) -> torch.Tensor:
        if not self.logits:
            raise ValueError("no logits kept (construct with keep_logits=True)")
        return torch.cat(self.logits)


ImageSource = Union[torch.Tensor, Iterable]


def _iterate_batches(images: ImageSource, batch_size: int):
    """Yield [B, 3, H, W] tensors from a tensor, or an iterable of tensors / (tensor, label) tuples."""
    if torch.is_tensor(images):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not torch.is_tensor(batch):
            raise TypeError(f"image batches must be tensors (or (tensor, label) tuples), got {type(batch).__name__}")
        if batch.dim() == 3:
            batch = batch.unsqueeze(0)
        yield batch


def compute_inception_features(images: ImageSource, extractor: InceptionFeatureExtractor, batch_size: int = 64,
                               keep_logits: bool = False, keep_features: bool = False) -> InceptionFeatureAccumulator:
    """Run ``images`` (tensor [N, 3, H, W], or an iterable of batches such as a DataLoader) through Inception."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    accumulator = InceptionFeatureAccumulator(keep_logits=keep_logits, keep_features=keep_features)
    for batch in _iterate_batches(images, batch_size):
        accumulator.update(batch, extractor)
    if accumulator.count == 0:
        raise ValueError("no images given")
    return accumulator


def compute_fid_statistics(images: ImageSource, weights_path: str | os.PathLike | None = None,
                           batch_size: int = 64, device: str | torch.device | None = None,
                           extractor: InceptionFeatureExtractor | None = None, **metadata) -> FIDStatistics:
    """FID statistics of ``images`` with the protocol in ``metadata`` (e.g. to save as reference statistics)."""
    extractor = extractor or InceptionFeatureExtractor(weights_path, device)
    accumulator = compute_inception_features(images, extractor, batch_size)
    return accumulator.statistics({**extractor.protocol(), **metadata})


def covariance_factor(sigma: np.ndarray) -> np.ndarray:
    """A factor F [D, r] with Sigma = F F^T (to rounding) for a symmetric positive semi-definite Sigma (float64).

    Cholesky (Sigma = L L^T, r = D; cheap and backward stable whenever it completes) for positive
    definite Sigma. Otherwise (singular, e.g. fewer images than feature dimensions) a diagonally
    pivoted Cholesky: step k picks p = argmax_i d_i of the residual diagonal d = diag(Sigma - F F^T),
    appends the column f = (Sigma[:, p] - F F[p]^T) / sqrt(d_p), and stops once max_i d_i <= D * eps * max_i Sigma_ii
    (the residual is PSD, so it is then at rounding level). Its cost is O(D r^2) for rank r.
    """
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        pass
    dim = sigma.shape[0]
    residual_diagonal = np.diag(sigma).copy()
    tolerance = dim * np.finfo(np.float64).eps * max(float(residual_diagonal.max()), 0.0)
    factor = np.zeros((dim, dim), dtype=np.float64)
    rank = 0
    while rank < dim:
        pivot = int(np.argmax(residual_diagonal))
        if residual_diagonal[pivot] <= tolerance:
            break
        column = sigma[:, pivot] - factor[:, :rank] @ factor[pivot, :rank]
        column /= np.sqrt(residual_diagonal[pivot])
        factor[:, rank] = column
        residual_diagonal -= column * column
        residual_diagonal[pivot] = 0.0
        rank += 1
    return factor[:, :rank]


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr(sqrt(Sigma_a Sigma_b)) for symmetric positive semi-definite Sigma_a, Sigma_b [D, D], in float64.

    With any factor Sigma_a = F F^T (``covariance_factor``; F = sqrt(Sigma_a) or its Cholesky factor),
    Sigma_a Sigma_b = F (F^T Sigma_b F) F^-1 is similar to the symmetric PSD matrix M = F^T Sigma_b F
    (for singular Sigma_a the eigenvalues still agree: F F^T Sigma_b and F^T Sigma_b F share their
    non-zero eigenvalues), hence

        tr(sqrt(Sigma_a Sigma_b)) = sum_j sqrt(lambda_j(F^T Sigma_b F))

    computed with the symmetric ``eigvalsh`` instead of the general non-symmetric
    ``eigvals(Sigma_a Sigma_b)`` torch-fidelity uses (same value, several times faster at D = 2048).
    Tiny negative eigenvalues from rounding are clipped to 0 (torch-fidelity takes the real part of
    their complex square root: also 0).
    """
    sigma_a = np.asarray(sigma_a, dtype=np.float64)
    sigma_b = np.asarray(sigma_b, dtype=np.float64)
    if sigma_a.ndim != 2 or sigma_a.shape != sigma_b.shape or sigma_a.shape[0] != sigma_a.shape[1]:
        raise ValueError(f"covariances must be square and of equal shape, got {sigma_a.shape} and {sigma_b.shape}")
    factor = covariance_factor((sigma_a + sigma_a.T) / 2)
    middle = factor.T @ sigma_b @ factor
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(stats_a: FIDStatistics, stats_b: FIDStatistics) -> float:
    """FID = |mu_a - mu_b|^2 + tr(Sigma_a) + tr(Sigma_b) - 2 tr(sqrt(Sigma_a Sigma_b)) (see ``trace_sqrt_product``).

    Equal to torch-fidelity's ``fid_statistics_to_metric`` up to float64 rounding; a rounding residue below 0 is
    clamped to 0 (``common.metrics.nonnegative_distance``).
    """
    if stats_a.mu.shape != stats_b.mu.shape:
        raise ValueError(f"feature dimensions differ: {stats_a.mu.shape[0]} vs {stats_b.mu.shape[0]}")
    for stats in (stats_a, stats_b):
        extractor = stats.metadata.get("feature_extractor")
        if extractor not in (None, FEATURE_EXTRACTOR):
            raise ValueError(f"statistics computed with feature extractor {extractor!r}, expected {FEATURE_EXTRACTOR!r}")
    mean_difference = stats_a.mu - stats_b.mu
    return nonnegative_distance(mean_difference @ mean_difference + np.trace(stats_a.sigma) + np.trace(stats_b.sigma)
                                - 2.0 * trace_sqrt_product(stats_a.sigma, stats_b.sigma))


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, mean and std over splits (torch-fidelity's implementation)."""
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"inception_score needs [N >= splits={splits}, C] logits, got {tuple(logits.shape)}")
    result = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
    return float(result[KEY_METRIC_ISC_MEAN]), float(result[KEY_METRIC_ISC_STD])


def calculate_fid(images: ImageSource, reference: Union[ImageSource, FIDStatistics, str, os.PathLike],
                  inception_weights_path: str | os.PathLike | None = None, isc: bool = False, isc_splits: int = 10,
                  batch_size: int = 64, device: str | torch.device | None = None,
                  allow_download: bool = True) -> dict[str, Any]:
    """FID of ``images`` against ``reference`` (images, FIDStatistics, or an .npz path); IS of ``images`` if ``isc``.

    Returns ``{"fid", ["inception_score_mean", "inception_score_std", "isc_splits"], "num_images",
    "num_reference_images", "resolution", "reference_resolution", "reference_file", "feature_extractor",
    "fid_feature_layer", "isc_feature_layer", "inception_input_size", "weights_source", "weights_path",
    "torch_fidelity_version"}``. Raises :class:`InceptionWeightsUnavailable` when the weights are missing.
    """
    extractor = InceptionFeatureExtractor(inception_weights_path, device, allow_download=allow_download)
    accumulator = compute_inception_features(images, extractor, batch_size, keep_logits=isc)
    stats = accumulator.statistics(extractor.protocol())
    reference_file = None
    if isinstance(reference, FIDStatistics):
        reference_stats = reference
    elif isinstance(reference, (str, os.PathLike)):
        reference_file = str(reference)
        reference_stats = load_fid_statistics(reference)
    else:
        reference_stats = compute_inception_features(reference, extractor, batch_size).statistics(extractor.protocol())
    if 0 < min(stats.num_images, reference_stats.num_images) < FID_FEATURE_DIM_WARNING:
        warnings.warn(f"FID from {stats.num_images} vs {reference_stats.num_images} images (< {FID_FEATURE_DIM_WARNING}) "
                      f"is strongly biased upwards; compare only numbers computed with the same counts", stacklevel=2)
    result: dict[str, Any] = {"fid": frechet_distance(stats, reference_stats)}
    if isc:
        mean, std = inception_score(accumulator.all_logits(), splits=isc_splits)
        result.update(inception_score_mean=mean, inception_score_std=std, isc_splits=isc_splits)
    result.update(
        num_images=stats.num_images,
        num_reference_images=reference_stats.num_images,
        resolution=stats.metadata.get("resolution"),
        reference_resolution=reference_stats.metadata.get("resolution"),
        reference_file=reference_file,
        **extractor.protocol(),
        torch_fidelity_version=getattr(torch_fidelity, "__version__", "unknown"),
    )
    return result

