"""Look at a data set and time it: ``python -m common.data.preview --preview grid.png --data.name glyphs`` (also
``python -m common.data``), ``--benchmark N`` for the items per second of ``dataset[i]`` on one thread."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.config import load_config
from common.data.build import build_image_dataset
from common.data.config import DataConfig, split_data_options


def preview_grid(dataset: Dataset, rows: int = 8, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 ``[H, W, 3]`` grid of the first ``rows * columns`` items (default ``columns`` = number of
    classes of the split, so with class ``i % num_classes`` each column holds one class)."""
    columns = columns or max(1, len(getattr(dataset, "split_labels", [])) or 8)
    count = min(len(dataset), rows * columns)
    images = [dataset[i][0] for i in range(count)]
    size = images[0].shape[-1]
    step = size + padding
    grid = np.full((padding + rows * step, padding + columns * step, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        grid[padding + r * step:padding + r * step + size, padding + c * step:padding + c * step + size] = pixels
    return grid


def measure_throughput(dataset: Dataset, num_items: int = 4000) -> dict[str, float]:
    """Items per second of ``dataset[i]`` for ``i < num_items`` (cycling), in CPU time of this process and
    in wall time (CPU time does not count other processes sharing the cores)."""
    count = min(num_items, 64)
    for i in range(count):  # warm up (font masks, first parameter blocks)
        dataset[i % len(dataset)]
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(num_items):
        dataset[i % len(dataset)]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"items": num_items, "items_per_cpu_second": num_items / max(cpu, 1e-9),
            "items_per_second": num_items / max(wall, 1e-9), "torch_threads": torch.get_num_threads()}


def main(argv: Optional[List[str]] = None) -> Optional[Path]:
    """``python -m common.data [--preview OUT.png] [--benchmark N] [--split S] [--rows R] [--columns C] [--scale K]
    [--data.<field> V ...]``: save a grid of items and/or measure the item throughput on 1 thread."""
    rest, overrides = split_data_options(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m common.data",
                                     description="Save a PNG grid of data set items and/or measure their throughput.")
    parser.add_argument("--preview", default=None, help="PNG file to write")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N", help="time N items on 1 torch thread")
    parser.add_argument("--split", default="train")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--columns", type=int, default=None, help="default: the number of classes in the split")
    parser.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling of the grid")
    parser.epilog = "Data options: --data.<field> value for every common.data.DataConfig field."
    args = parser.parse_args(rest)
    if args.preview is None and args.benchmark <= 0:
        parser.error("give --preview OUT.png and/or --benchmark N")

    cfg = load_config(DataConfig, None, overrides)
    dataset = build_image_dataset(cfg, args.split)
    out = None
    if args.preview:
        grid = Image.fromarray(preview_grid(dataset, args.rows, args.columns))
        if args.scale > 1:
            grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.Resampling.NEAREST)
        out = Path(args.preview)
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out, optimize=True)
        print(f"{cfg.name} {args.split}: {grid.width}x{grid.height} grid written to {out}")
    if args.benchmark > 0:
        torch.set_num_threads(1)
        result = measure_throughput(dataset, args.benchmark)
        print(f"{cfg.name} {args.split} at {cfg.image_size} px: {result['items_per_cpu_second']:.0f} items per "
              f"CPU-second ({result['items_per_second']:.0f} per wall-clock second) over {result['items']} items, "
              f"1 torch thread")
    return out


if __name__ == "__main__":  # pragma: no cover
    main()


