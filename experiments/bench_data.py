"""Does the data path keep a tokenizer fed? Images/s of decode + resize + centre crop per source and worker count,
against the images/s one tokenizer training step consumes.

    python -m experiments.bench_data [--images 512] [--size 256] [--workers 1,2,4] [--step-batch 2]
        [--device cpu|cuda] [--tokenizer-config configs/tokenizer/imagenet_base.yaml configs/tokenizer/imagenet_lgq.yaml]

Data: ``--images`` JPEG photographs (quality 90) of ImageNet's typical size, 500 x 375, cut from the colour photos
bundled with scikit-image, written once into a temporary folder as an image folder, as a Hugging Face
``save_to_disk`` folder and as WebDataset shards (``python -m common.data.convert``, 64 images per shard). Each
source is read through a DataLoader (batch 32) with 1, 2, ... workers at ``--size`` px, the way training reads it
(``build_image_dataset``, train split, flips on); images/s = images after the first batch / wall time after it
(worker start-up excluded). The tokenizer step: the ImageNet recipe's model and losses (LPIPS-VGG with random
weights, offline: the cost does not depend on them; GAN term and discriminator update on), one optimisation step
of ``--step-batch`` images, median of 3 after a warm-up; images/s = step-batch / step time. Workers per device =
step images/s / one worker's images/s. Timings depend on the machine's load: the header prints the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common.config import load_config
from common.data import BUILTIN_PHOTO_NAMES, DataConfig, build_image_dataset, is_stream, load_builtin_photo
from common.data.convert import convert

PHOTO_SIZE = (500, 375)  # ImageNet's most common size (width, height)


def write_photo_folder(root: Path, count: int) -> Path:
    """``count`` JPEGs of 500 x 375 in root/train/<photo>/ (random crops of the bundled photos, seed 0)."""
    rng = np.random.default_rng(0)
    photos = [load_builtin_photo(name) for name in BUILTIN_PHOTO_NAMES]
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize(PHOTO_SIZE, Image.Resampling.BILINEAR)
        folder = root / "train" / BUILTIN_PHOTO_NAMES[i % len(photos)]
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def write_sources(work: Path, count: int, size: int) -> dict[str, DataConfig]:
    """The same photos as imagefolder, hf (save_to_disk) and webdataset shards; their DataConfigs."""
    import datasets

    folder = write_photo_folder(work / "folder", count)
    convert("imagefolder", str(folder), work / "shards", shard_size=64)
    paths = sorted((folder / "train").glob("*/*.jpg"))
    classes = sorted(p.name for p in (folder / "train").iterdir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    table = {"image": [{"bytes": p.read_bytes(), "path": None} for p in paths],
             "label": [classes.index(p.parent.name) for p in paths]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        str(work / "hf"))
    return {"imagefolder": DataConfig(name="imagefolder", root=str(folder), image_size=size),
            "hf": DataConfig(name="hf", root=str(work / "hf"), image_size=size),
            # no shuffle buffer: a buffer is filled (its images decoded) before the first batch, which is not timed
            "webdataset": DataConfig(name="webdataset", shards=str(work / "shards" / "*.tar"), image_size=size,
                                     shuffle_buffer=0)}


def loader_images_per_second(cfg: DataConfig, workers: int, batch_size: int = 32) -> tuple[float, int]:
    """(images/s after the first batch, images timed) of one pass over the train split."""
    dataset = build_image_dataset(cfg, "train")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=not is_stream(dataset), num_workers=workers,
                        drop_last=False)
    count, start = 0, None
    for images, _ in loader:
        if start is None:  # the first batch includes worker start-up
            start = time.perf_counter()
            continue
        count += images.shape[0]
    elapsed = time.perf_counter() - (start or time.perf_counter())
    return count / max(elapsed, 1e-9), count


def tokenizer_step_images_per_second(config_files: list[str], size: int, batch: int, device: str,
                                     overrides: list[str]) -> tuple[float, str]:
    """(images/s of one tokenizer optimisation step, description of the model)."""
    from tokenizer.config import TokenizerRunConfig
    from tokenizer.losses import TokenizerLoss
    from tokenizer.model import build_tokenizer

    cfg = load_config(TokenizerRunConfig, config_files, ["data.name=synthetic", f"data.image_size={size}",
                                                         "loss.lpips_pretrained=false", *overrides])
    torch.manual_seed(0)
    model = build_tokenizer(cfg.model).to(device).train()
    loss_fn = TokenizerLoss.from_config(cfg.loss).to(device)
    disc = loss_fn.discriminator
    params = list(model.parameters()) + (list(disc.parameters()) if disc is not None else [])
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    step = cfg.loss.gan_start_step  # GAN term and discriminator update on

    def one_step() -> float:
        start = time.perf_counter()
        output = model(images)
        loss, _ = loss_fn.generator_loss(images, output.reconstruction, output.quantizer_output.loss, step,
                                         last_layer=model.last_layer_weight())
        loss.backward()
        if loss_fn.gan_active(step):
            disc_loss, _ = loss_fn.discriminator_loss(images, output.reconstruction, step)
            disc_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one_step()
    seconds = statistics.median(one_step() for _ in range(3))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    return batch / seconds, f"{cfg.model.quantizer} tokenizer, {millions:.1f}M parameters, batch {batch} at {size} px"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated DataLoader worker counts")
    parser.add_argument("--step-batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer-config", nargs="+",
                        default=["configs/tokenizer/imagenet_base.yaml", "configs/tokenizer/imagenet_lgq.yaml"])
    parser.add_argument("--tokenizer-override", nargs="*", default=[], help="key=value overrides of that config")
    parser.add_argument("--work-dir", default=None, help="where to write the photos (default: a temporary folder)")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, torch threads "
          f"{torch.get_num_threads()}; {args.images} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} -> {args.size} px")
    results: dict = {"loader": {}, "step": None}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        sources = write_sources(Path(tmp), args.images, args.size)
        print(f"{'source':<12} {'workers':>7} {'images/s':>9}")
        for name, cfg in sources.items():
            for count in workers:
                rate, timed = loader_images_per_second(cfg, count)
                results["loader"][(name, count)] = rate
                print(f"{name:<12} {count:>7} {rate:>9.0f}   ({timed} images timed)")
    rate, description = tokenizer_step_images_per_second(args.tokenizer_config, args.size, args.step_batch,
                                                         args.device, args.tokenizer_override)
    results["step"] = rate
    print(f"tokenizer step ({description}, {args.device}): {rate:.2f} images/s")
    base = min(workers, key=lambda w: (w == 0, w))  # the fewest workers > 0 (0 = the main process: one reader)
    one_worker = min(results["loader"][(name, base)] for name in sources) / max(base, 1)
    results["workers_needed"] = rate / one_worker
    print(f"workers per {args.device} device to keep up (slowest source, from {base} worker(s)): "
          f"{results['workers_needed']:.2f}")
    return results


if __name__ == "__main__":
    main()
