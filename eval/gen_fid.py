"""Generation FID / IS / precision and recall of an `LGQPipeline`: sharded, seeded, class-balanced sampling.

    [accelerate launch [--multi_gpu --num_processes P]] eval/gen_fid.py  (or python -m eval.gen_fid)
        --pipeline OUT/pipeline --num-samples 50000 --batch-size 64 --num-inference-steps 12
        --guidance-scale 3.0 --temperature 1.0 --seed 0
        --reference (IMAGE_FOLDER | builtin:train | imagefolder:val | synthetic:val | stats.npz)
        --output metrics.json [--save-npz samples.npz] [--save-grid grid.png] [--inception-weights PATH]

Protocol:

* labels: sample i gets class ``classes[i % C]`` (round robin over the C evaluated classes), so every
  class appears exactly N / C times when C divides N (else floor or ceil). ``classes`` = ``--classes``,
  else the classes present in a data-split reference (``split_labels``), else all ``num_classes``;
* batches are global: batch b holds samples [b B, (b + 1) B) and is sampled with its own generator
  seeded from SeedSequence([seed, b]); process r of P generates the batches b = r, r + P, ...
  So the samples do not depend on the number of processes (each sample is generated exactly once);
* each process extracts Inception features (``eval.fid``) of its samples and writes a shard; the main
  process orders everything by sample index, accumulates the FID statistics (float64 sums), the
  Inception Score (torch-fidelity's split/shuffle, seed 2020), precision and recall (torch-fidelity's prc,
  k = 3, on the same pool features as FID: ``common.metrics.precision_recall``) and compares with the reference:
  an image folder (every image file, sorted), a data split (``common.data`` with ``--data.<field>``
  options; image size defaults to the pipeline's) or an .npz with ``mu``/``sigma`` (our
  ``eval.fid.save_fid_statistics`` or pytorch-fid / ADM-style) or with images ``arr_0`` (NHWC uint8);
  statistics without our protocol metadata (ADM's reference batches) are used as they are and the JSON
  notes that they came from another Inception implementation (``FOREIGN_STATISTICS_NOTE``);
* ``--save-npz``: ``arr_0`` uint8 [N, H, W, 3] (ADM-evaluator compatible) and ``labels`` [N].
Without Inception weights the JSON has ``fid: null`` and a note - never another network.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script (accelerate launch eval/gen_fid.py): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import config_help  # noqa: E402
from common.data import (DATASET_NAMES as DATA_REFERENCE_NAMES, DATASET_SPLITS, DataConfig,  # noqa: E402
                         build_image_dataset, load_data_config, split_data_options)
from common.files import atomic_write, write_json  # noqa: E402
from common.metrics import PRC_NEIGHBORHOOD, PRC_PROTOCOL, precision_recall, to_uint8  # noqa: E402
from common.training import end_process_group  # noqa: E402
from eval.fid import (FID_FEATURE_DIM_WARNING, InceptionFeatureAccumulator, InceptionFeatureExtractor,  # noqa: E402
                      InceptionWeightsUnavailable, compute_inception_features, frechet_distance, inception_score,
                      load_fid_statistics)
from pipelines.pipeline_lgq import LGQPipeline  # noqa: E402
from torch.utils.data import DataLoader

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- sampling plan
def balanced_class_labels(num_samples: int, classes: Sequence[int] | int) -> torch.Tensor:
    """labels[i] = classes[i % C] (int64 [N]); ``classes`` may be an int C meaning range(C)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    classes = list(range(classes)) if isinstance(classes, (int, np.integer)) else [int(c) for c in classes]
    if not classes:
        raise ValueError("classes must not be empty")
    table = torch.tensor(classes, dtype=torch.int64)
    return table[torch.arange(int(num_samples)) % len(classes)]


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of global batch b: the first 63-bit word of numpy SeedSequence([seed, b]) (independent streams)."""
    word = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1, dtype=np.uint64)[0]
    return int(word) & ((1 << 63) - 1)


def shard_batches(num_batches: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Global batch indices of process ``rank``: b = rank, rank + world_size, ... (< num_batches)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, num_batches, world_size))


@torch.no_grad()
def generate_samples(
    pipeline,
    num_samples: int,
    batch_size: int = 32,
    classes: Sequence[int] | None = None,
    num_inference_steps: int = 12,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
    top_k: int | None = None,
    top_p: float | None = None,
    rank: int = 0,
    world_size: int = 1,
    generator_device: str | torch.device | None = None,
    feature_extractor=None,
    keep_images: bool = True,
    progress: bool = False,
    keep_tokens: bool = False,
) -> dict[str, Any]:
    """Generate this process's share of the N samples (module docstring for labels, seeds, sharding).

    Returns ``{"indices": int64 [n], "labels": int64 [n], "images": uint8 [n, 3, H, W] or None,
    "pool": float32 [n, 2048] or None, "logits": float32 [n, 1008] or None}`` for the global sample
    indices this process owns. With ``feature_extractor`` (``eval.fid.InceptionFeatureExtractor``)
    Inception features are computed batch by batch; ``keep_images=False`` then drops the pixels.
    ``keep_tokens=True`` adds ``"tokens"``: the sampled token grids int64 [n, h, w] the images were decoded from.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    classes = list(range(pipeline.num_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < pipeline.num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside [0, {pipeline.num_classes}) of this pipeline")
    labels_all = balanced_class_labels(num_samples, classes)
    num_batches = -(-int(num_samples) // batch_size)
    generator_device = torch.device(generator_device) if generator_device is not None else pipeline.device
    indices, labels, images, pools, logits, tokens = [], [], [], [], [], []
    step_tokens: dict[str, torch.Tensor] = {}

    def record_tokens(pipe, step_index, timestep, callback_kwargs):  # the last step's are the sampled grids
        step_tokens["tokens"] = callback_kwargs["tokens"].detach().clone()
        return {}

    callback = {"callback_on_step_end": record_tokens, "callback_on_step_end_tensor_inputs": ["tokens"]} \
        if keep_tokens else {}
    my_batches = shard_batches(num_batches, rank, world_size)
    iterator = my_batches
    if progress:
        iterator = tqdm(my_batches, desc=f"sampling (rank {rank})")
    for b in iterator:
        start, stop = b * batch_size, min((b + 1) * batch_size, int(num_samples))
        batch_labels = labels_all[start:stop]
        generator = torch.Generator(device=generator_device).manual_seed(batch_seed(seed, b))
        out = pipeline(batch_labels, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       temperature=temperature, generator=generator, output_type="pt", top_k=top_k, top_p=top_p,
                       **callback)
        batch_u8 = to_uint8(out.images * 2.0 - 1.0).cpu()  # [0, 1] -> [-1, 1] -> uint8 (one conversion rule)
        if keep_tokens:
            tokens.append(step_tokens.pop("tokens").view(len(batch_labels), *pipeline.grid_size).long().cpu())
        indices.append(torch.arange(start, stop))
        labels.append(batch_labels)
        if feature_extractor is not None:
            pool, logit = feature_extractor(batch_u8)
            pools.append(pool)
            logits.append(logit)
        if keep_images or feature_extractor is None:
            images.append(batch_u8)
    h, w = pipeline.image_size
    return {
        "indices": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
        "images": torch.cat(images) if images else (torch.zeros(0, 3, h, w, dtype=torch.uint8) if keep_images else None),
        "pool": torch.cat(pools) if pools else None,
        "logits": torch.cat(logits) if logits else None,
        **({"tokens": torch.cat(tokens) if tokens else torch.zeros(0, *pipeline.grid_size, dtype=torch.int64)}
           if keep_tokens else {}),
    }


# ----------------------------------------------------------------------------- references
def image_folder_batches(folder: str | os.PathLike, batch_size: int = 64):
    """uint8 [B, 3, H, W] batches of every image file under ``folder`` (sorted, recursive; same-size runs)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}")
    batch: list[torch.Tensor] = []
    for path in files:
        with Image.open(path) as img:
            tensor = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        if batch and (len(batch) == batch_size or batch[0].shape != tensor.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(tensor)
    if batch:
        yield torch.stack(batch)


FOREIGN_STATISTICS_NOTE = (
    "the reference mu/sigma were not computed by this project (no protocol metadata in the file). ADM's reference "
    "batches (e.g. VIRTUAL_imagenet256_labeled.npz) come from the ADM evaluator's TensorFlow Inception graph; the "
    "samples here went through torch-fidelity's inception-v3-compat, a PyTorch port of the same weights, so this "
    "FID mixes two Inception implementations and carries a small offset. Paper-comparable gFID: run the ADM "
    "evaluator on the --save-npz samples against the same reference batch, or compare only with FIDs computed "
    "by this command against the same reference"
)


def npz_reference(path: str | os.PathLike, extractor, batch_size: int, keep_features: bool = False):
    """FIDStatistics from an .npz: ``mu``/``sigma`` used as they are, else images ``arr_0`` [N, H, W, 3] uint8."""
    with np.load(path, allow_pickle=False) as data:
        has_stats = "mu" in data.files and "sigma" in data.files
        has_images = "arr_0" in data.files
    if has_stats:
        return load_fid_statistics(path), "statistics"
    if not has_images:
        raise ValueError(f"reference {str(path)!r} has neither mu/sigma nor arr_0 images")
    images = np.load(path, mmap_mode=None)["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"reference arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")

    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    accumulator = compute_inception_features(tensor, extractor, batch_size, keep_features=keep_features)
    return accumulator.statistics(extractor.protocol()), "images"


def parse_data_reference(reference: str) -> tuple[str, str] | None:
    """"builtin:train" -> ("builtin", "train"); None when ``reference`` is not a data-split reference."""
    if ":" not in reference or os.path.exists(reference):
        return None
    name, split = reference.split(":", 1)
    if name not in DATA_REFERENCE_NAMES:
        return None
    if split not in DATASET_SPLITS[name]:
        raise ValueError(f"data reference {reference!r}: split must be one of {DATASET_SPLITS[name]}")
    return name, split


def build_reference_dataset(reference: str, data_overrides: Sequence[str], image_size: int):
    name, split = parse_data_reference(reference)
    cfg = load_data_config([f"name={name}", *data_overrides], image_size=image_size, random_flip=False)
    return build_image_dataset(cfg, split=split), cfg, split


def reference_statistics(reference: str, extractor, batch_size: int = 64, data_overrides: Sequence[str] = (),
                         image_size: int = 256, keep_features: bool = False):
    """(FIDStatistics, description dict) of ``reference`` (module docstring for the accepted forms);
    ``keep_features``: the statistics carry every reference image's pool features (not for mu/sigma files)."""
    if parse_data_reference(reference) is not None:
        dataset, cfg, split = build_reference_dataset(reference, data_overrides, image_size)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        stats = compute_inception_features(loader, extractor, batch_size, keep_features=keep_features)
        return stats.statistics(extractor.protocol()), {"type": "data_split", "split": split,
                                                        "data": dataclasses.asdict(cfg)}
    path = Path(reference)
    if path.is_dir():
        stats = compute_inception_features(image_folder_batches(path, batch_size), extractor, batch_size,
                                           keep_features=keep_features)
        return stats.statistics(extractor.protocol()), {"type": "image_folder", "path": str(path.resolve())}
    if path.is_file() and path.suffix == ".npz":
        stats, kind = npz_reference(path, extractor, batch_size, keep_features=keep_features)
        return stats, {"type": f"npz_{kind}", "path": str(path.resolve())}
    raise FileNotFoundError(f"reference {reference!r} is neither an image folder, an .npz file nor a data split "
                            f"({' | '.join(n + ':' + '|'.join(DATASET_SPLITS[n]) for n in DATA_REFERENCE_NAMES)})")


# ----------------------------------------------------------------------------- metrics
def evaluate_generation(samples: dict[str, Any], reference: str | None, extractor=None, batch_size: int = 64,
                        data_overrides: Sequence[str] = (), image_size: int | None = None, isc: bool = True,
                        isc_splits: int = 10, weights_note: str | None = None, prc: bool = True) -> dict[str, Any]:
    """FID, IS and precision/recall of merged ``samples`` (``generate_samples`` output ordered by index) vs
    ``reference``.

    Uses ``samples["pool"]``/``["logits"]`` when present, else extracts features from ``samples["images"]``.
    Returns ``{"fid", "inception_score_mean", "inception_score_std", "precision", "recall", "reference": {...},
    "notes": [...], "inception_weights": {...}}`` (plus ``prc_protocol``); without an extractor every figure is None
    and ``notes`` say why. Precision/recall (``common.metrics.precision_recall`` on the 2048-d pool features,
    k = 3) need the reference's per-image features: a mu/sigma statistics file gives none (noted).
    """
    result: dict[str, Any] = {"fid": None, "inception_score_mean": None, "inception_score_std": None,
                              "precision": None, "recall": None,
                              "reference": {"spec": reference}, "inception_weights": None, "notes": []}
    if extractor is None:
        result["notes"].append(f"FID/IS/precision/recall not computed: {weights_note or 'no Inception feature extractor'}")
        return result
    accumulator = InceptionFeatureAccumulator(keep_logits=True, keep_features=prc)
    if samples.get("pool") is not None:
        accumulator.resolutions.add("x".join(map(str, samples.get("resolution", ()))))
        for start in range(0, samples["pool"].shape[0], batch_size):
            accumulator.update_features(samples["pool"][start:start + batch_size],
                                        samples["logits"][start:start + batch_size])
    else:
        for start in range(0, samples["images"].shape[0], batch_size):
            accumulator.update(samples["images"][start:start + batch_size], extractor)
    result["inception_weights"] = extractor.protocol()
    n = accumulator.count
    if isc and n >= isc_splits:
        result["inception_score_mean"], result["inception_score_std"] = inception_score(accumulator.all_logits(),
                                                                                        splits=isc_splits)
        result["isc_splits"] = isc_splits
    elif isc:
        result["notes"].append(f"IS not computed: {n} samples < {isc_splits} splits")
    if reference is None:
        result["notes"].append("FID not computed: no --reference given")
        return result
    stats = accumulator.statistics(extractor.protocol())
    ref_stats, description = reference_statistics(reference, extractor, batch_size, data_overrides,
                                                  image_size or 256, keep_features=prc)
    result["fid"] = frechet_distance(stats, ref_stats)
    if prc and ref_stats.features is None:
        result["notes"].append("precision/recall not computed: the reference is a mu/sigma statistics file, which "
                               "holds no per-image features (give a folder, a data split or an .npz with arr_0)")
    elif prc:
        try:
            result.update(precision_recall(ref_stats.features, stats.features))
        except ValueError as err:  # too few images for k-NN balls
            result["notes"].append(f"precision/recall not computed: {err}")
        else:
            result["prc_protocol"] = PRC_PROTOCOL.format(k=PRC_NEIGHBORHOOD,
                                                         features="the 2048-d Inception pool features")
    result["reference"].update(description, num_images=ref_stats.num_images,
                               resolution=ref_stats.metadata.get("resolution"))
    if description["type"] == "npz_statistics" and not ref_stats.metadata:
        result["reference"]["inception_implementation"] = "not recorded (statistics not computed by this project)"
        result["notes"].append(FOREIGN_STATISTICS_NOTE)
    if min(n, ref_stats.num_images) < FID_FEATURE_DIM_WARNING:
        result["notes"].append(f"FID from {n} samples vs {ref_stats.num_images} reference images (< "
                               f"{FID_FEATURE_DIM_WARNING}) is biased upwards: compare only at equal counts")
    return result


def merge_shards(shards: Sequence[dict[str, Any]], num_samples: int) -> dict[str, Any]:
    """Concatenate per-process results, order by sample index and check each index occurs exactly once."""
    indices = torch.cat([s["indices"] for s in shards])
    order = torch.argsort(indices)
    if not torch.equal(indices[order], torch.arange(num_samples)):
        raise RuntimeError(f"shards do not cover samples 0..{num_samples - 1} exactly once "
                           f"(got {indices.numel()} indices, {indices.unique().numel()} distinct)")
    merged: dict[str, Any] = {"indices": indices[order]}
    for key in ("labels", "images", "pool", "logits"):
        parts = [s[key] for s in shards if s.get(key) is not None]
        merged[key] = torch.cat(parts)[order] if len(parts) == len(shards) else None
    return merged


def save_samples_npz(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """ADM-evaluator layout: arr_0 uint8 [N, H, W, 3]; plus labels [N]."""
    with atomic_write(path) as f:
        np.savez(f, arr_0=images.permute(0, 2, 3, 1).contiguous().numpy(), labels=labels.numpy())
    return Path(path)


def save_grid(path: str | os.PathLike, images: torch.Tensor, max_images: int = 64) -> Path:
    """The first ``max_images`` samples (uint8 [N, 3, H, W]) as one PNG grid."""
    grid = make_grid(images[:max_images], nrow=int(np.ceil(np.sqrt(min(len(images), max_images)))), padding=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    rest, data_overrides = split_data_options(argv)

    parser = argparse.ArgumentParser(prog="python -m eval.gen_fid", description=__doc__,
                                     epilog="data keys (with --reference data):\n" + config_help(DataConfig, "data."),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="LGQPipeline folder")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-inference-steps", type=int, default=12)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", default=None, help="comma-separated class ids to sample (default: see docs)")
    parser.add_argument("--reference", default=None,
                        help="image folder | builtin:train | imagefolder:val | synthetic:val | stats .npz")
    parser.add_argument("--output", required=True, help="metrics JSON")
    parser.add_argument("--save-npz", default=None, help="write samples as .npz (arr_0 uint8 NHWC, labels)")
    parser.add_argument("--save-grid", default=None, help="write a PNG grid of the first 64 samples")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--no-isc", action="store_true", help="skip the Inception Score")
    parser.add_argument("--no-prc", action="store_true",
                        help="skip precision/recall (they keep every sample's and reference image's pool features)")
    parser.add_argument("--isc-splits", type=int, default=10, help="Inception Score splits (torch-fidelity default 10)")
    parser.add_argument("--torch-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--expected-num-processes", type=int, default=None,
                        help="fail unless launched with this many processes (catches silent 1-process launches)")
    args = parser.parse_args(rest)
    args.data_overrides = data_overrides
    return args


def default_classes(args, pipeline) -> tuple[list[int], str]:
    if args.classes:
        try:
            return [int(c) for c in args.classes.split(",") if c.strip()], "--classes"
        except ValueError as err:
            raise ValueError(f"--classes must be comma-separated integers, got {args.classes!r}") from err
    if args.reference and parse_data_reference(args.reference) is not None:
        dataset, _, _ = build_reference_dataset(args.reference, args.data_overrides, pipeline.image_size[0])
        labels = getattr(dataset, "split_labels", None)
        if labels:
            return [int(c) for c in labels], "classes of the reference split"
    return list(range(pipeline.num_classes)), "all classes"


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Sample on every process, gather the shards on the main process, measure, write the JSON (main only;
    the other processes return None)."""
    args = parse_args(argv)
    accelerator = Accelerator()
    if args.expected_num_processes is not None and accelerator.num_processes != args.expected_num_processes:
        raise RuntimeError(f"launched with {accelerator.num_processes} process(es), expected "
                           f"{args.expected_num_processes}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be positive")
    pipeline = load_pipeline(args.pipeline, args.torch_dtype, accelerator.device)
    classes, classes_source = default_classes(args, pipeline)
    extractor, weights_note = None, None
    try:
        extractor = InceptionFeatureExtractor(args.inception_weights, device=accelerator.device)
    except InceptionWeightsUnavailable as err:
        weights_note = str(err)

    start = time.time()
    samples = sample_on_every_process(args, pipeline, classes, extractor, accelerator)
    if samples is None:
        return None
    seconds = time.time() - start
    result = evaluate_generation(samples, args.reference, extractor, args.batch_size, args.data_overrides,
                                 pipeline.image_size[0], isc=not args.no_isc, isc_splits=args.isc_splits,
                                 prc=not args.no_prc,
                                 weights_note=weights_note)
    result["protocol"] = generation_protocol(args, pipeline, samples, classes, classes_source,
                                             accelerator.num_processes, seconds)
    write_outputs(args, samples, result)
    report(args, result, accelerator.num_processes)
    return result


def load_pipeline(path: str, torch_dtype: str, device: torch.device) -> LGQPipeline:
    """The pipeline in ``torch_dtype`` on ``device``, its progress bar off."""
    dtype = getattr(torch, torch_dtype)
    pipeline = LGQPipeline.from_pretrained(path, torch_dtype=None if dtype == torch.float32 else dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def sample_on_every_process(args: argparse.Namespace, pipeline: LGQPipeline, classes: list[int], extractor,
                            accelerator: Accelerator) -> dict[str, Any] | None:
    """Each process generates its share and writes it to ``<output>.shards/``; the main process merges the
    shards (in sample order) and returns them, the others return None."""
    world, rank = accelerator.num_processes, accelerator.process_index
    shard = generate_samples(
        pipeline, args.num_samples, batch_size=args.batch_size, classes=classes,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        temperature=args.temperature, seed=args.seed, top_k=args.top_k, top_p=args.top_p,
        rank=rank, world_size=world, feature_extractor=extractor,
        keep_images=bool(args.save_npz or args.save_grid) or extractor is None,
        progress=accelerator.is_local_main_process,
    )
    shard_dir = shard_folder(args.output)
    if accelerator.is_main_process:
        shard_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with atomic_write(shard_dir / f"rank{rank:05d}.pt") as f:  # the main process never reads a half shard
        torch.save(shard, f)
    end_process_group()  # the last collective (every process reaches it), before the main's evaluation: no barrier
    if not accelerator.is_main_process:  # after it, since the reference features can take longer than the NCCL
        return None                      # barrier timeout
    shards = [torch.load(shard_dir / f"rank{r:05d}.pt", weights_only=True) for r in range(world)]
    samples = merge_shards(shards, args.num_samples)
    samples["resolution"] = list(pipeline.image_size)
    return samples


def shard_folder(output: str | os.PathLike) -> Path:
    """``<output>.shards``: where each process leaves its samples for the main process."""
    return Path(str(output) + ".shards")


def generation_protocol(args: argparse.Namespace, pipeline: LGQPipeline, samples: dict[str, Any],
                        classes: list[int], classes_source: str, world: int, seconds: float) -> dict[str, Any]:
    """What the figures were measured on: pipeline, sampling options, seeding, labels, processes, time."""
    counts = torch.bincount(samples["labels"], minlength=pipeline.num_classes)
    return {
        "pipeline": str(Path(args.pipeline).resolve()),
        "prior": type(pipeline.prior).__name__,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "num_inference_steps": args.num_inference_steps if pipeline.uses_scheduler else None,
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "seeding": "batch b of size batch_size uses torch.Generator seeded with SeedSequence([seed, b])",
        "classes": classes,
        "classes_source": classes_source,
        "samples_per_class": {int(c): int(counts[c]) for c in classes},
        "label_rule": "label_i = classes[i % len(classes)]",
        "resolution": list(pipeline.image_size),
        "torch_dtype": args.torch_dtype,
        "num_processes": world,
        "sampling_seconds": round(seconds, 2),
        "data_overrides": list(args.data_overrides),
    }


def write_outputs(args: argparse.Namespace, samples: dict[str, Any], result: dict[str, Any]) -> None:
    """The optional sample archive and grid, then the JSON; the shards are removed."""
    if args.save_npz:
        save_samples_npz(args.save_npz, samples["images"], samples["labels"])
        result["samples_npz"] = str(args.save_npz)
    if args.save_grid:
        save_grid(args.save_grid, samples["images"])
        result["grid"] = str(args.save_grid)
    write_json(args.output, result)
    shutil.rmtree(shard_folder(args.output), ignore_errors=True)


def report(args: argparse.Namespace, result: dict[str, Any], world: int) -> None:
    """One summary line, the notes and where the JSON went (stdout)."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"gFID {fmt(result['fid'])}  IS {fmt(result['inception_score_mean'])} +- "
          f"{fmt(result['inception_score_std'])}  precision {fmt(result.get('precision'))}  recall "
          f"{fmt(result.get('recall'))}  ({args.num_samples} samples, {world} process(es), "
          f"steps {args.num_inference_steps}, CFG {args.guidance_scale}, T {args.temperature}, seed {args.seed})")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"metrics written to {args.output}")


if __name__ == "__main__":  # pragma: no cover
    main()
