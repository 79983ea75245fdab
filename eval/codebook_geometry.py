"""Codebook geometry of one tokenizer: ``python -m eval.codebook_geometry``.

    python -m eval.codebook_geometry --tokenizer runs/tok/tokenizer --output-dir runs/tok/geometry \
        --data.name glyphs --split val [--num-images N] [--neighbours 8]
    python -m eval.codebook_geometry --tokenizer ... --output-dir ... --counts runs/x/code_counts.json

Centres d_k (k = 0..K-1) are the latents the decoder receives for index k (``tokenizer.prune.decoder_codes``:
LGQ/VQ/IBQ centres, SimVQ's W b_k, FSQ's grid points, LFQ's sign patterns). Usage c_k is the hard count of
index k over a data split (``tokenizer.prune.count_code_usage``; sharded over processes like pruning) or read
from a ``code_counts.json`` ({"counts": [...]}, what the study writes per run). Written:

* ``geometry.json``: per code (counts, nearest-neighbour distance r_1(k) = min_{j != k} ||d_k - d_j||, k-NN
  distance r_n(k) = distance to the n-th nearest other centre (n = ``neighbours``; a small r_n = a dense region),
  2-D PCA coordinates) and summaries: active / dead codes, perplexity, quantiles of r_1 and r_n, the Spearman rank
  correlation between usage and r_n (negative: busy codes sit in dense regions), the median r_n of used and of
  unused codes, the PCA's explained variance ratios, the number of duplicate centres (r_1 = 0);
* ``geometry.json["assignments"]`` (when usage is counted over a split): how the latents x_n that the quantizer receives
  (``encode_latents`` of the first ``--assignment-images`` images) sit among the centres (``assignment_geometry``):
  the latents' spread around their mean against the centres' distance from it, the nearest squared distance, the
  margin between the nearest and the second-nearest centre and, for LGQ, that margin over tau and the mean max
  soft-assignment probability at the tokenizer's tau. A small margin/tau with latents in a small ball far from every
  centre is the soft regime: the straight-through backward sees a nearly uniform p, not the hard code;
* ``codebook_geometry.png``: four panels: sorted usage (log scale), usage against r_n, the histogram of r_1, and
  the centres on their first two principal components coloured by log(1 + usage).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from common.cli import config_help
from common.data import (DataConfig, build_image_dataset, class_balanced_indices, dataset_labels, load_data_config,
                         split_data_options)
from common.files import write_json
from common.metrics import codebook_statistics
from common.training import end_process_group, make_accelerator
from tokenizer.model import LGQTokenizer
from tokenizer.prune import count_code_usage, decoder_codes

GEOMETRY_FILE = "geometry.json"
PLOT_FILE = "codebook_geometry.png"
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def neighbour_distances(centres: torch.Tensor, neighbours: int, chunk_size: int = 1024) -> torch.Tensor:
    """[K, n] euclidean distances from each centre to its n nearest OTHER centres, ascending (float64, chunked)."""
    points = centres.double()
    K = points.shape[0]
    if not 1 <= neighbours <= K - 1:
        raise ValueError(f"neighbours must lie in [1, K - 1 = {K - 1}], got {neighbours}")
    result = points.new_empty(K, neighbours)
    for start in range(0, K, chunk_size):
        distances = torch.cdist(points[start:start + chunk_size], points)
        rows = torch.arange(distances.shape[0])
        distances[rows, rows + start] = math.inf  # not its own neighbour
        result[start:start + chunk_size] = distances.topk(neighbours, dim=1, largest=False).values
    return result


def principal_components(centres: torch.Tensor, num_components: int = 2) -> tuple[torch.Tensor, list[float]]:
    """(coordinates [K, 2] of the centred centres on their top principal axes, explained variance ratios).

    X = centres - mean, X = U S V^T; coordinates = X V[:, :2], ratio_i = S_i^2 / sum_j S_j^2."""
    x = centres.double() - centres.double().mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    coordinates = x @ vh[:num_components].t()
    if coordinates.shape[1] < num_components:  # 1-D latents
        coordinates = torch.cat([coordinates, coordinates.new_zeros(x.shape[0], num_components - coordinates.shape[1])], 1)
    total = float((singular ** 2).sum())
    ratios = [float(s ** 2) / total if total > 0 else 0.0 for s in singular[:num_components]]
    return coordinates, ratios + [0.0] * (num_components - len(ratios))


def quantile_summary(values: torch.Tensor) -> dict[str, float]:
    """{"qNN": the NN-th percentile (linear interpolation between order statistics), "mean"} of ``values``;
    numpy's quantile, which (unlike torch.quantile, limited to 2^24 values) takes a split's every token pair."""
    values = values.detach().double().reshape(-1).cpu().numpy()
    summary = {f"q{int(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}
    summary["mean"] = float(values.mean())
    return summary


def codebook_geometry(centres: torch.Tensor, counts: torch.Tensor, neighbours: int = 8) -> dict[str, Any]:
    """The JSON-ready geometry of centres [K, C] with hard usage counts [K] (module doc)."""
    from scipy.stats import spearmanr  # lazy: scipy is needed by this one statistic only


    counts = torch.as_tensor(counts).long().reshape(-1)
    if centres.dim() != 2 or centres.shape[0] != counts.numel():
        raise ValueError(f"centres [K, C] and counts [K] must agree, got {tuple(centres.shape)} and {tuple(counts.shape)}")
    K = counts.numel()
    neighbours = min(int(neighbours), K - 1)
    distances = neighbour_distances(centres, neighbours)
    nearest, knn = distances[:, 0], distances[:, -1]
    coordinates, ratios = principal_components(centres)
    used = counts > 0
    rho = None
    if counts.unique().numel() > 1 and knn.unique().numel() > 1:
        rho = float(spearmanr(counts.numpy(), knn.numpy()).statistic)
    stats = codebook_statistics(counts)
    return {
        "codebook_size": K,
        "latent_dim": int(centres.shape[1]),
        "neighbours": neighbours,
        "num_tokens": int(counts.sum()),
        "active_codes": int(used.sum()),
        "dead_codes": int((~used).sum()),
        "perplexity": stats["perplexity"],
        "nearest_neighbour_distance": quantile_summary(nearest),
        "knn_distance": quantile_summary(knn),
        "knn_distance_median_used": float(knn[used].median()) if used.any() else None,
        "knn_distance_median_unused": float(knn[~used].median()) if (~used).any() else None,
        "usage_knn_distance_spearman": rho,
        "duplicate_centres": int((nearest == 0).sum()),
        "pca_explained_variance_ratio": ratios,
        "per_code": {
            "counts": counts.tolist(),
            "nearest_neighbour_distance": nearest.tolist(),
            "knn_distance": knn.tolist(),
            "pca": coordinates.tolist(),
        },
    }


def plot_geometry(geometry: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """The four panels of the module doc as one PNG (matplotlib, Agg)."""
    import matplotlib  # lazy: plotting only; the Agg backend is chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: plotting only; the Agg backend is chosen before pyplot is imported

    per_code = geometry["per_code"]
    counts = np.asarray(per_code["counts"], dtype=np.float64)
    knn = np.asarray(per_code["knn_distance"])
    nearest = np.asarray(per_code["nearest_neighbour_distance"])
    pca = np.asarray(per_code["pca"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    ax = axes[0][0]
    ax.plot(np.arange(1, counts.size + 1), np.sort(counts)[::-1] + 1)
    ax.set_yscale("log")
    ax.set_xlabel("code rank (sorted by usage)")
    ax.set_ylabel("usage + 1 (tokens)")
    ax.set_title(f"sorted usage: {geometry['active_codes']} / {geometry['codebook_size']} codes used")
    ax = axes[0][1]
    ax.scatter(knn, counts + 1, s=6, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel(f"distance to the {geometry['neighbours']}-th nearest centre (small = dense)")
    ax.set_ylabel("usage + 1")
    rho = geometry["usage_knn_distance_spearman"]
    ax.set_title("usage vs local density" + (f" (Spearman {rho:+.2f})" if rho is not None else ""))
    ax = axes[1][0]
    ax.hist(nearest, bins=min(50, max(5, counts.size // 4)))
    ax.set_xlabel("distance to the nearest other centre")
    ax.set_ylabel("centres")
    ax.set_title("nearest-neighbour distances between centres")
    ax = axes[1][1]
    points = ax.scatter(pca[:, 0], pca[:, 1], c=np.log1p(counts), s=8, cmap="viridis")
    fig.colorbar(points, ax=ax, label="log(1 + usage)")
    ratios = geometry["pca_explained_variance_ratio"]
    ax.set_xlabel(f"PC 1 ({100 * ratios[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratios[1]:.0f}%)")
    ax.set_title("centres, 2-D PCA, coloured by usage")
    for row in axes:
        for panel in row:
            panel.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def assignment_geometry(latents: torch.Tensor, centres: torch.Tensor, tau: float | None = None,
                        chunk_size: int = 4096) -> dict[str, Any]:
    """How token latents x_n [N, C] sit among centres c_k [K, C] (float64). With d_nk = ||x_n - c_k||^2, x_bar the
    latents' mean and d_n(1) <= d_n(2) the two smallest d_nk:

        latent_spread        = mean_n ||x_n - x_bar||^2
        centre_offset        = mean_k ||c_k - x_bar||^2   (all centres; ``_used``: those nearest to some x_n)
        nearest_sq_distance  = quantiles of d_n(1)
        margin               = quantiles of m_n = d_n(2) - d_n(1)
        with tau:  margin_over_tau = quantiles of m_n / tau;  mean_max_probability = mean_n max_k softmax_k(-d_nk / tau)

    (LGQ's Euclidean logits are l_nk = -d_nk / tau, docs/method.md §1, so m_n / tau is the gap between the top two
    logits: << 1 means the soft assignment cannot tell the nearest centre from the next.)"""
    x, c = latents.double().reshape(-1, latents.shape[-1]), centres.double()
    if c.dim() != 2 or x.shape[1] != c.shape[1] or c.shape[0] < 2 or x.shape[0] == 0:
        raise ValueError(f"latents [N, C] and centres [K >= 2, C] must agree, got {tuple(latents.shape)} and "
                         f"{tuple(centres.shape)}")
    nearest, margins, max_probability, used = [], [], [], torch.zeros(c.shape[0], dtype=torch.bool)
    for start in range(0, x.shape[0], chunk_size):
        d = torch.cdist(x[start:start + chunk_size], c).pow(2)
        two = d.topk(2, dim=1, largest=False)
        nearest.append(two.values[:, 0])
        margins.append(two.values[:, 1] - two.values[:, 0])
        used[two.indices[:, 0]] = True
        if tau is not None:
            max_probability.append(torch.softmax(-d / float(tau), dim=1).max(dim=1).values)
    mean = x.mean(0)
    offsets = (c - mean).pow(2).sum(1)
    margin = torch.cat(margins)
    result = {
        "num_latents": int(x.shape[0]),
        "latent_spread": float((x - mean).pow(2).sum(1).mean()),
        "centre_offset": float(offsets.mean()),
        "centre_offset_used": float(offsets[used].mean()),
        "nearest_sq_distance": quantile_summary(torch.cat(nearest)),
        "margin": quantile_summary(margin),
    }
    if tau is not None:
        result.update(tau=float(tau), margin_over_tau=quantile_summary(margin / float(tau)),
                      mean_max_probability=float(torch.cat(max_probability).mean()))
    return result


def latents_of_images(tokenizer, dataset, num_images: int, batch_size: int = 64) -> torch.Tensor:
    """[N, C] token latents (``encode_latents``) of the first ``num_images`` items of ``dataset``, on the CPU."""
    device = tokenizer.device
    latents, seen = [], 0
    for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = images[:num_images - seen]
        with torch.no_grad():
            z = tokenizer.encode_latents(images.to(device, tokenizer.dtype)).float()
        latents.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu())
        seen += images.shape[0]
        if seen >= num_images:
            break
    return torch.cat(latents)


def write_codebook_geometry(tokenizer, counts, output_dir: str | Path, neighbours: int = 8, title: str = "",
                            protocol: dict[str, Any] | None = None, latents: torch.Tensor | None = None
                            ) -> dict[str, Any]:
    """geometry.json + codebook_geometry.png for ``tokenizer`` (an LGQTokenizer) with usage ``counts`` [K]; with
    token ``latents`` [N, C] also their ``assignment_geometry`` (at the quantizer's tau when it has one)."""

    centres = decoder_codes(tokenizer.quantizer).cpu()
    geometry = codebook_geometry(centres, torch.as_tensor(counts), neighbours)
    if latents is not None:
        tau = getattr(tokenizer.quantizer, "tau", None)
        geometry["assignments"] = assignment_geometry(latents, centres, None if tau is None else float(tau))
        gain = getattr(tokenizer.quantizer, "straight_through_gain", None)
        if gain is not None:  # LGQ: the mean eigenvalue of dq~/dx over every latent (1 = VQ / FSQ's identity)
            codebook = tokenizer.quantizer.codebook.detach().float().cpu()
            chunks = latents.float().split(tokenizer.quantizer.STE_GAIN_TOKENS)
            geometry["assignments"]["ste_gain"] = sum(float(gain(chunk, codebook)) * chunk.shape[0]
                                                      for chunk in chunks) / latents.shape[0]
    geometry["quantizer"] = str(tokenizer.config.quantizer)
    output_dir = Path(output_dir)
    geometry["plot"] = str(plot_geometry(geometry, output_dir / PLOT_FILE, title))
    geometry["protocol"] = {"centres": "tokenizer.prune.decoder_codes (the latents the decoder receives per index)",
                            "usage": "hard counts of tokenizer.encode indices", **(protocol or {})}
    write_json(output_dir / GEOMETRY_FILE, geometry)
    return geometry


def parse_args(argv: Sequence[str] | None = None):

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    rest, data_overrides = split_data_options(argv)
    parser = argparse.ArgumentParser(prog="python -m eval.codebook_geometry", description=__doc__,
                                     epilog=config_help(DataConfig, "data."),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="LGQTokenizer folder (save_pretrained export)")
    parser.add_argument("--output-dir", required=True, help="folder for geometry.json and codebook_geometry.png")
    parser.add_argument("--counts", default=None,
                        help="code_counts.json ({'counts': [...]}) instead of counting over a data split")
    parser.add_argument("--split", default="val", help="split whose hard usage is counted (without --counts)")
    parser.add_argument("--num-images", type=int, default=None, help="class-balanced subset of the split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--neighbours", type=int, default=8, help="n of the k-NN distance (local density)")
    parser.add_argument("--assignment-images", type=int, default=256,
                        help="latents of the split's first N images for geometry.json['assignments'] (0: none)")
    args = parser.parse_args(rest)
    args.data_overrides = data_overrides
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:

    args = parse_args(argv)
    if not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer!r} is not a folder (expected a save_pretrained export)")
    tokenizer = LGQTokenizer.from_pretrained(args.tokenizer).eval()
    if args.counts is not None:
        counts = json.loads(Path(args.counts).read_text())["counts"]
        if len(counts) != tokenizer.codebook_size:
            raise ValueError(f"--counts holds {len(counts)} counts, the tokenizer has K={tokenizer.codebook_size}")
        protocol = {"counts_file": str(Path(args.counts).resolve())}
        accelerator = None
    else:



        data_cfg = dataclasses.replace(load_data_config(args.data_overrides), random_flip=False)
        data_cfg.check_split(args.split)
        dataset = build_image_dataset(data_cfg, split=args.split)
        if args.num_images is not None:
            dataset = Subset(dataset, class_balanced_indices(dataset_labels(dataset), args.num_images))
        accelerator = make_accelerator()
        counts = count_code_usage(tokenizer, dataset, accelerator, args.batch_size, data_cfg.num_workers)
        end_process_group()  # the main process alone writes what follows
        protocol = {"split": args.split, "num_images": len(dataset), "data": dataclasses.asdict(data_cfg)}
    protocol["tokenizer"] = str(Path(args.tokenizer).resolve())
    if accelerator is not None and not accelerator.is_main_process:
        return {}
    latents = None
    if args.counts is None and args.assignment_images > 0:
        latents = latents_of_images(tokenizer, dataset, args.assignment_images, args.batch_size)
        protocol["assignment_images"] = min(args.assignment_images, len(dataset))
    geometry = write_codebook_geometry(tokenizer, counts, args.output_dir, args.neighbours,
                                       title=f"{tokenizer.config.quantizer}, K = {tokenizer.codebook_size}",
                                       protocol=protocol, latents=latents)
    rho = geometry["usage_knn_distance_spearman"]
    print(f"{geometry['active_codes']} / {geometry['codebook_size']} codes used; nearest-centre distance median "
          f"{geometry['nearest_neighbour_distance']['q50']:.4g}; {geometry['neighbours']}-NN distance median used "
          f"{geometry['knn_distance_median_used']} / unused {geometry['knn_distance_median_unused']}; Spearman(usage, "
          f"k-NN distance) {'n/a' if rho is None else f'{rho:+.3f}'}; PCA variance {geometry['pca_explained_variance_ratio']}")
    if "assignments" in geometry:
        a = geometry["assignments"]
        print(f"latents: spread {a['latent_spread']:.4g} around their mean; centres {a['centre_offset']:.4g} from it "
              f"(used {a['centre_offset_used']:.4g}); nearest squared distance median {a['nearest_sq_distance']['q50']:.4g}, "
              f"margin to the second median {a['margin']['q50']:.4g}"
              + (f" = {a['margin_over_tau']['q50']:.4g} tau; mean max p {a['mean_max_probability']:.4g} at tau "
                 f"{a['tau']:.4g}" if "tau" in a else ""))
    print(f"written: {Path(args.output_dir) / GEOMETRY_FILE}, {geometry['plot']}")
    return geometry


if __name__ == "__main__":
    main()
