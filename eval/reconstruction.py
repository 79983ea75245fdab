"""Reconstruction evaluation of a tokenizer: rFID, PSNR, SSIM, LPIPS and codebook statistics.

    python -m eval.reconstruction --tokenizer OUT/tokenizer --data.name builtin --split val \
        [--num-images N] [--batch-size 32] --output metrics.json [--inception-weights PATH]

Protocol (every figure is written to the JSON together with it):

* evaluation set: the ``--split`` of the data set built by ``common.data.build_image_dataset`` from the
  ``--data.<field>`` options (``DataConfig`` fields, e.g. ``--data.root``, ``--data.image_size``);
  all images, or with ``--num-images N`` a class-balanced subset (classes taken round robin, items
  of each class in a seeded random order; exactly N / C per class when C divides N);
* every image x is encoded to hard indices and decoded: x_hat = tokenizer.decode(tokenizer.encode(x));
  both are converted once to uint8 (``common.metrics.to_uint8``), the form images are stored and seen
  by Inception;
* rFID: FID(real images, reconstructions) with torch-fidelity's inception-v3-compat features
  (``eval.fid``; streaming statistics). Without Inception weights rFID is ``null`` and the JSON
  says why - never another network;
* PSNR: per image on [0, 1] (uint8 / 255), PSNR_i = 10 log10(1 / MSE_i), averaged over images
  (capped at 100 dB per image so identical images stay finite in JSON); SSIM: per image
  (Gaussian 11x11, sigma 1.5), averaged; LPIPS-VGG v0.1 (the published metric) when its weights are
  available, else absent (never a uniform-head variant);
* codebook statistics over the WHOLE evaluation set from one bincount of the hard indices
  (``common.metrics.codebook_statistics``: active codes, utilisation, perplexity, bits per token/image);
* trivial baselines on the same images, PSNR and SSIM as above (``common.metrics.baseline_plan``):
  each image's own mean colour (24 bits), bicubic upsampling of an 8-bit RGB thumbnail of the
  token-grid size (h x w pixels for h x w tokens) and of the thumbnail whose size in bits is closest
  to the tokenizer's NOMINAL rate, tokens per image x log2 K ("equal-bits thumbnail"; the measured
  rate, tokens x log2 perplexity, is at most this and is in ``codebook.bits_per_image``). Each baseline
  records ``psnr_gain_db`` = tokenizer PSNR - baseline PSNR (positive: the tokenizer beats it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from common.cli import config_help
from common.data import load_data_config, split_data_options  # the --data.<field> options every command shares
from common.data import (DataConfig, build_image_dataset, class_balanced_indices, dataset_labels, dataset_size,
                         is_stream, process_share)
from common.files import write_json
from common.metrics import (PSNR_CAP_DB, BASELINE_NAMES, baseline_images, baseline_plan, code_histogram, codebook_statistics,
                            lpips_distance, mean_colour_shift, nominal_bits_per_image, psnr, ssim, to_uint8)
from eval.classifier import classifier_report, load_classifier
from eval.fid import (FID_FEATURE_DIM_WARNING, InceptionFeatureAccumulator, InceptionFeatureExtractor,
                      InceptionWeightsUnavailable, frechet_distance, is_offline)
from tokenizer.losses import LPIPS
from tokenizer.model import LGQTokenizer

# ----------------------------------------------------------------------------- evaluation
def _resolve_inception(inception_weights: str | os.PathLike | None, device: torch.device, allow_download: bool):
    """(extractor, None) or (None, reason) - never a substitute network."""
    try:
        return InceptionFeatureExtractor(inception_weights, device=device, allow_download=allow_download), None
    except InceptionWeightsUnavailable as err:
        return None, str(err)


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer,
    dataset: Dataset,
    num_images: int | None = None,
    batch_size: int = 32,
    inception_weights: str | os.PathLike | None = None,
    compute_fid: bool = True,
    lpips_model: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    num_workers: int = 0,
    allow_download: bool = True,
    protocol: dict[str, Any] | None = None,
    return_code_counts: bool = False,
    return_images: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode + decode the evaluation set and measure it (module docstring). Returns a JSON-ready dict:

    ``{"rfid", "psnr", "ssim", "lpips", "codebook": {...}, "baselines": {...}, "protocol": {...}, "notes": [...]}``;
    figures that could not be computed are ``None`` with the reason in ``notes``.
    ``return_code_counts=True`` adds ``"code_counts"``: the bincount c_k of hard indices (list of K ints).
    ``return_images=True`` adds ``"images_u8"``, ``"reconstructions_u8"`` (uint8 [N, 3, H, W], CPU) and
    ``"labels"`` (int64 [N]) of the evaluated images (tensors: pop them before writing JSON).
    ``progress`` shows a tqdm bar over the batches (stderr).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else tokenizer.device
    tokenizer = tokenizer.to(device).eval()
    notes: list[str] = []
    indices, balance, labels_used = evaluation_subset(dataset, num_images, seed)
    source = process_share(dataset) if indices is None else Subset(dataset, indices)  # a stream: every shard in order
    workers = min(num_workers, 1) if is_stream(dataset) else num_workers  # one reader keeps a stream's shard order
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers)
    extractor = _inception_or_note(compute_fid, inception_weights, device, allow_download, notes)
    lpips_model = _published_lpips_or_note(lpips_model, device, notes)

    start = time.time()
    tally = ReconstructionTally(int(tokenizer.codebook_size), extractor, lpips_model, keep_images=return_images)
    for images, labels in tqdm(loader, desc="reconstruction", unit="batch", disable=not progress):
        images = images.to(device=device, dtype=torch.float32)
        tokens = tokenizer.encode(images.to(tokenizer.dtype))
        tally.add(images, tokens, tokenizer.decode(tokens).float(), labels)

    result = tally.figures()
    fid_protocol: dict[str, Any] = {"inception_weights": None}
    if extractor is not None:
        result["rfid"] = tally.rfid()
        fid_protocol = {"inception_weights": extractor.protocol()}
        if tally.num_images < FID_FEATURE_DIM_WARNING:
            notes.append(f"rFID from {tally.num_images} images (< {FID_FEATURE_DIM_WARNING}) is biased upwards: "
                         f"compare only with rFIDs over the same number of images")
    result["protocol"] = {**_reconstruction_protocol(tally, dataset, tokenizer, lpips_model, balance, labels_used,
                                                      seed, time.time() - start),
                          **fid_protocol, **(protocol or {})}
    result["notes"] = notes
    if return_code_counts:
        result["code_counts"] = tally.counts.tolist()
    if return_images:
        result.update(images_u8=torch.cat(tally.kept_real), reconstructions_u8=torch.cat(tally.kept_recon),
                      labels=torch.cat(tally.kept_labels))
    return result


def evaluation_subset(dataset: Dataset, num_images: int | None, seed: int) -> tuple[list[int], str, list | None]:
    """(indices, how they were chosen, their labels or None): every image, or a class-balanced subset (a stream:
    indices None = every image of every shard in order; a balanced subset of a stream raises ValueError)."""
    if num_images is None:
        indices = None if is_stream(dataset) else list(range(len(dataset)))
        balance, labels_used = "all images of the split", None
    else:
        labels = dataset_labels(dataset)
        indices = class_balanced_indices(labels, int(num_images), seed=seed)
        labels_used = [labels[i] for i in indices]
        balance = f"class-balanced subset (round robin over classes, seed {seed})"
    if indices is not None and not indices:
        raise ValueError("the evaluation set is empty")
    return indices, balance, labels_used


def _inception_or_note(compute_fid: bool, inception_weights, device, allow_download: bool, notes: list[str]):
    """The Inception feature extractor for rFID, or None with the reason appended to ``notes``."""
    if not compute_fid:
        notes.append("rFID not computed: disabled (compute_fid=False)")
        return None
    extractor, reason = _resolve_inception(inception_weights, device, allow_download)
    if extractor is None:
        notes.append(f"rFID not computed: {reason}")
    return extractor


def _published_lpips_or_note(lpips_model: torch.nn.Module | None, device, notes: list[str]):
    """``lpips_model`` on ``device`` if it is the published LPIPS; None (noted) without one; a ValueError for an
    LPIPS-like network with uniform heads (its figures are not the published metric)."""
    if lpips_model is None:
        notes.append("LPIPS not computed: no LPIPS network given (weights unavailable or disabled)")
        return None
    if not getattr(lpips_model, "uses_lpips_heads", False):
        raise ValueError("reported LPIPS must be the published metric: lpips_model has uniform heads "
                         "(tokenizer.losses.LPIPS(uniform_heads=True)); pass the published heads or no model")
    return lpips_model.to(device)


class ReconstructionTally:
    """The per-batch measurements of an evaluation, summed: code histogram, per-image PSNR / SSIM / LPIPS,
    the baselines' PSNR / SSIM, Inception features of both sides, and (optionally) the uint8 images."""

    def __init__(self, codebook_size: int, extractor, lpips_model, keep_images: bool = False):
        self.extractor, self.lpips_model, self.keep_images = extractor, lpips_model, keep_images
        self.counts = torch.zeros(codebook_size, dtype=torch.int64)
        self.psnr_values, self.ssim_values, self.lpips_values = [], [], []
        self.baseline_values: dict[str, dict[str, list]] = {name: {"psnr": [], "ssim": []} for name in BASELINE_NAMES}
        self.real_features, self.recon_features = InceptionFeatureAccumulator(), InceptionFeatureAccumulator()
        self.kept_real, self.kept_recon, self.kept_labels = [], [], []
        self.label_values, self.colour_shift_values = [], []
        self.plan = self.grid_shape = self.resolution = None

    def add(self, images: torch.Tensor, tokens: torch.Tensor, reconstructions: torch.Tensor, labels) -> None:
        """One batch: images and reconstructions float [B, 3, H, W] in [-1, 1], tokens [B, h, w]."""
        self.grid_shape = tuple(tokens.shape[1:])
        self.resolution = tuple(images.shape[-2:])
        self.counts += code_histogram(tokens.cpu(), self.counts.numel())
        real_u8, recon_u8 = to_uint8(images), to_uint8(reconstructions)
        self.psnr_values.append(psnr(real_u8, recon_u8, max_db=PSNR_CAP_DB).double().cpu())
        self.ssim_values.append(ssim(real_u8, recon_u8).double().cpu())
        self.label_values.append(torch.as_tensor(labels).long().reshape(-1).cpu())
        self.colour_shift_values.append(mean_colour_shift(real_u8, recon_u8).double().cpu())
        if self.keep_images:
            self.kept_real.append(real_u8.cpu())
            self.kept_recon.append(recon_u8.cpu())
            self.kept_labels.append(torch.as_tensor(labels).long().cpu())
        if self.plan is None:
            self.plan = baseline_plan(self.resolution, self.grid_shape,
                                      nominal_bits_per_image(self.tokens_per_image, self.counts.numel()))
        for name, images_u8 in baseline_images(real_u8, self.plan).items():
            self.baseline_values[name]["psnr"].append(psnr(real_u8, images_u8, max_db=PSNR_CAP_DB).double().cpu())
            self.baseline_values[name]["ssim"].append(ssim(real_u8, images_u8).double().cpu())
        if self.lpips_model is not None:
            self.lpips_values.append(lpips_distance(images, reconstructions, self.lpips_model).double().cpu())
        if self.extractor is not None:
            self.real_features.update(real_u8, self.extractor)
            self.recon_features.update(recon_u8, self.extractor)

    @property
    def num_images(self) -> int:
        return int(sum(v.numel() for v in self.psnr_values))

    @property
    def tokens_per_image(self) -> int:
        return int(self.grid_shape[0] * self.grid_shape[1])

    def figures(self) -> dict[str, Any]:
        """{"rfid": None, "psnr", "ssim", "lpips", "codebook", "baselines"}: means over images."""
        result: dict[str, Any] = {
            "rfid": None,
            "psnr": float(torch.cat(self.psnr_values).mean()),
            "ssim": float(torch.cat(self.ssim_values).mean()),
            "lpips": float(torch.cat(self.lpips_values).mean()) if self.lpips_values else None,
            "codebook": codebook_statistics(self.counts, tokens_per_image=self.tokens_per_image),
            "mean_colour_shift": float(torch.cat(self.colour_shift_values).mean()),
        }
        result["baselines"] = {}
        for name, entry in self.plan.items():
            base_psnr = float(torch.cat(self.baseline_values[name]["psnr"]).mean())
            base_ssim = float(torch.cat(self.baseline_values[name]["ssim"]).mean())
            size = entry["thumbnail_size"]
            result["baselines"][name] = {
                "psnr": base_psnr, "ssim": base_ssim, "bits_per_image": entry["bits_per_image"],
                "thumbnail_size": list(size) if size is not None else None,
                "psnr_gain_db": result["psnr"] - base_psnr, "ssim_gain": result["ssim"] - base_ssim,
            }
        result["per_class"] = self.per_class()
        return result

    def per_class(self) -> dict[str, dict[str, float | int]]:
        """{label: {"images", "psnr", "mean_colour_shift", "<baseline>_psnr"}}: the means over that class's images
        (which classes a tokenizer fails on; e.g. an unseen photo whose colours no training photo has)."""
        labels = torch.cat(self.label_values)
        if labels.numel() != self.num_images:  # labels of another shape than one per image: no breakdown
            return {}
        values = {"psnr": torch.cat(self.psnr_values), "mean_colour_shift": torch.cat(self.colour_shift_values)}
        values.update({f"{name}_psnr": torch.cat(v["psnr"]) for name, v in self.baseline_values.items()})
        table = {}
        for label in torch.unique(labels).tolist():
            chosen = labels == label
            table[str(label)] = {"images": int(chosen.sum()), **{k: float(v[chosen].mean()) for k, v in values.items()}}
        return table

    def rfid(self) -> float:
        """FID between the Inception features of the images and of their reconstructions."""
        protocol = self.extractor.protocol()
        return frechet_distance(self.real_features.statistics(protocol), self.recon_features.statistics(protocol))


def _reconstruction_protocol(tally: ReconstructionTally, dataset, tokenizer, lpips_model, balance: str,
                             labels_used: list | None, seed: int, seconds: float) -> dict[str, Any]:
    """What the figures were measured on and how (the JSON's "protocol")."""
    images_per_class = None
    if labels_used is not None:
        values, frequency = np.unique(labels_used, return_counts=True)
        images_per_class = {int(v): int(c) for v, c in zip(values, frequency)}
    num_evaluated, resolution, grid_shape = tally.num_images, tally.resolution, tally.grid_shape
    tokens_per_image, counts = tally.tokens_per_image, tally.counts
    return {
        "num_images": num_evaluated,
        "dataset_size": dataset_size(dataset) or num_evaluated,
        "class_balancing": balance,
        "images_per_class": images_per_class,
        "num_classes": getattr(dataset, "num_classes", None),
        "class_names": list(getattr(dataset, "class_names", None) or []) or None,
        "resolution": list(resolution),
        "token_grid": list(grid_shape),
        "tokens_per_image": tokens_per_image,
        "codebook_size": int(counts.numel()),
        "quantizer": getattr(tokenizer.config, "quantizer", None),
        "reconstruction": "decode(encode(x)) from hard indices; uint8 for PSNR/SSIM/FID",
        "psnr": f"per image on [0, 1] (uint8 / 255), capped at {PSNR_CAP_DB} dB, averaged over images",
        "ssim": "per image, Gaussian window 11x11 sigma 1.5 (common.metrics.ssim), averaged over images",
        "lpips": getattr(lpips_model, "variant", "LPIPS-VGG v0.1") if lpips_model is not None else None,
        "codebook_statistics": "one bincount of hard indices over the whole evaluation set",
        "nominal_bits_per_image": nominal_bits_per_image(tokens_per_image, int(counts.numel())),
        "mean_colour_shift": "per image: mean over RGB of |mean(reconstruction) - mean(image)| on [0, 1]",
        "baselines": ("mean colour (24 bits); bicubic upsampling of an 8-bit RGB thumbnail of the token-grid size; "
                      "the thumbnail closest in bits to the nominal rate tokens x log2 K (equal_bits_thumbnail); "
                      "psnr_gain_db = tokenizer PSNR - baseline PSNR"),
        "seed": seed,
        "seconds": round(seconds, 2),
    }


# ----------------------------------------------------------------------------- report
def format_table(result: dict[str, Any]) -> str:
    """A two-column text table of the headline figures."""
    codebook = result["codebook"]

    def fmt(value, digits=4):
        if value is None:
            return "n/a"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    rows = [
        ("images", result["protocol"]["num_images"]),
        ("resolution", "x".join(map(str, result["protocol"]["resolution"]))),
        ("rFID", fmt(result["rfid"])),
        ("PSNR (dB)", fmt(result["psnr"], 3)),
        ("SSIM", fmt(result["ssim"])),
        ("LPIPS", fmt(result["lpips"])),
        ("active codes", f"{codebook['active_codes']} / {codebook['codebook_size']}"),
        ("utilisation", fmt(codebook["utilisation"])),
        ("perplexity", fmt(codebook["perplexity"], 2)),
        ("bits / token", fmt(codebook["bits_per_token"], 3)),
        ("log2 active", fmt(codebook["log2_active_codes"], 3)),
        ("bits / image", f"{fmt(codebook.get('bits_per_image'), 1)} measured (log2 perplexity per token)"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += ["", baseline_table(result)]
    if len(result.get("per_class", {})) > 1:
        lines += ["", per_class_table(result["per_class"], result["protocol"].get("class_names"))]
    if "classifier_accuracy" in result:
        lines += ["", f"classifier accuracy on reconstructions  {result['classifier_accuracy']:.4f} "
                      f"(real val: {result['classifier_real_val_accuracy']:.4f})",
                  f"{result['classifier_fd_name']} / {result['classifier_kid_name']} vs the real images  "
                  f"{result['classifier_fd']:.3f} / {result['classifier_kid_mean']:.4f}"]
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def aligned_columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Plain-text table: every column left-aligned to its widest cell, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


BASELINE_LABELS = {"mean_colour": "mean colour", "token_grid_thumbnail": "token-grid thumbnail",
                   "equal_bits_thumbnail": "equal-bits thumbnail"}


def baseline_table(result: dict[str, Any]) -> str:
    """Tokenizer vs the trivial baselines: PSNR, SSIM, bits per image and the tokenizer's PSNR lead (dB)."""
    bits = result["protocol"].get("nominal_bits_per_image")
    rows = [("tokenizer", f"{result['psnr']:.2f}", f"{result['ssim']:.4f}",
             f"{bits:.0f} (nominal)" if bits is not None else "n/a", "")]
    for name, entry in result.get("baselines", {}).items():
        size = entry["thumbnail_size"]
        label = BASELINE_LABELS.get(name, name) + (f" {size[0]}x{size[1]}" if size else "")
        gain = entry["psnr_gain_db"]
        rows.append((label, f"{entry['psnr']:.2f}", f"{entry['ssim']:.4f}", str(entry["bits_per_image"]),
                     f"{'beats' if gain > 0 else 'trails'} by {abs(gain):.2f} dB"))
    header = ("reconstruction vs", "PSNR dB", "SSIM", "bits/image", "tokenizer")
    return aligned_columns(header, rows)


def per_class_table(per_class: dict[str, dict], class_names: list[str] | None = None) -> str:
    """One row per class: images, tokenizer PSNR, each baseline's PSNR and the mean colour shift."""
    header = ("class", "images", "PSNR dB", *[f"{BASELINE_LABELS[name]} dB" for name in BASELINE_NAMES],
              "mean colour shift")
    rows = []
    for label, row in per_class.items():
        name = class_names[int(label)] if class_names and int(label) < len(class_names) else label
        rows.append((str(name), str(row["images"]), f"{row['psnr']:.2f}",
                     *[f"{row[f'{b}_psnr']:.2f}" for b in BASELINE_NAMES], f"{row['mean_colour_shift']:.3f}"))
    return aligned_columns(header, rows)


# ----------------------------------------------------------------------------- CLI
def build_lpips(mode: str, lpips_weights: str | None, vgg_weights: str | None):
    """(LPIPS network or None, note or None) for --lpips auto|on|off."""
    if mode == "off":
        return None, "disabled (--lpips off)"

    cached_vgg = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    if mode == "auto" and vgg_weights is None and not cached_vgg.is_file() and is_offline():
        return None, (f"weights unavailable (offline mode and no VGG16 weights at {cached_vgg}; "
                      f"pass --lpips-vgg-weights PATH)")
    try:
        return LPIPS(pretrained=True, lpips_weights_path=lpips_weights, vgg_weights_path=vgg_weights), None
    except (RuntimeError, FileNotFoundError) as err:
        if mode == "on":
            raise
        return None, f"weights unavailable ({err})"


def parse_args(argv: Sequence[str] | None = None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    rest, data_overrides = split_data_options(argv)

    parser = argparse.ArgumentParser(prog="python -m eval.reconstruction", description=__doc__,
                                     epilog=config_help(DataConfig, "data."),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="LGQTokenizer folder (save_pretrained export)")
    parser.add_argument("--split", default="val",
                        help="split of the data set (train | val; builtin also val_unseen_photos)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="class-balanced subset of this size (default: every image of the split)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", required=True, help="metrics JSON to write")
    parser.add_argument("--inception-weights", default=None, help="inception-v3-compat .pth (see eval/fid.py)")
    parser.add_argument("--no-fid", action="store_true", help="skip rFID")
    parser.add_argument("--lpips", default="auto", choices=("auto", "on", "off"),
                        help="auto: LPIPS when its VGG weights load; on: fail if they do not; off")
    parser.add_argument("--lpips-weights", default=None,
                        help="LPIPS v0.1 linear heads (vgg.pth; default: the copy in the lpips package)")
    parser.add_argument("--lpips-vgg-weights", default=None, help="torchvision vgg16-397923af.pth")
    parser.add_argument("--classifier", default=None,
                        help="classifier cache folder (python -m eval.classifier): adds its accuracy and FD/KID "
                             "on the reconstructions (classifier_* keys); must match the data set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class-balanced subset")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(rest)
    args.data_overrides = data_overrides
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    data_cfg = load_data_config(args.data_overrides)
    if not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer!r} is not a folder (expected a save_pretrained export)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = LGQTokenizer.from_pretrained(args.tokenizer)
    dataset = build_image_dataset(data_cfg, split=args.split)
    lpips_model, lpips_note = build_lpips(args.lpips, args.lpips_weights, args.lpips_vgg_weights)

    classifier = None
    if args.classifier is not None:
        classifier = load_classifier(args.classifier, data_cfg, device=device)  # mismatching data -> error

    result = evaluate_reconstruction(
        tokenizer, dataset, num_images=args.num_images, batch_size=args.batch_size,
        inception_weights=args.inception_weights, compute_fid=not args.no_fid, lpips_model=lpips_model,
        device=device, seed=args.seed, num_workers=args.num_workers,
        protocol={"tokenizer": str(Path(args.tokenizer).resolve()), "split": args.split,
                  "data": dataclasses.asdict(data_cfg)},
        return_images=classifier is not None,
    )
    if classifier is not None:
        real_u8, recon_u8, labels = result.pop("images_u8"), result.pop("reconstructions_u8"), result.pop("labels")
        result.update(classifier_report(args.classifier, *classifier, recon_u8, labels, real_u8, device=device))
    if lpips_note:
        result["notes"] = [n for n in result["notes"] if not n.startswith("LPIPS")] + [f"LPIPS not computed: {lpips_note}"]
    write_json(args.output, result)
    print(format_table(result))
    print(f"metrics written to {args.output}")
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
