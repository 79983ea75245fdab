"""Training speed with and without ``train.compile: true``: the demo's recipes through the real train scripts.

    python -m experiments.bench_compile [--stages tokenizer prior] [--window 5] [--windows 3] [--threads 1]

Each stage runs its train script twice (``train.compile=false``, then ``true``) for ``window x (1 + windows)``
steps, logging every ``window`` steps (the Trainer's ``images_per_sec`` of each window):

* tokenizer: ``configs/tokenizer/glyphs.yaml`` (32 px glyphs, batch 32; 2000 training images);
* prior: ``configs/prior/glyphs.yaml`` (MaskGIT, 4 x 128, batch 64) on 2000 random 8 x 8 grids with K = 256
  (a step's cost does not depend on the tokens).

s / step is the mean over the last ``windows`` windows; the first window holds the first steps, where torch.compile
traces and builds its kernels (inductor's caches disabled: a cold compile): compile time = first window
(compiled) - first window (eager). Timings depend on
machine load: the output records the load average and thread count.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def window_seconds(trainer) -> list[float]:
    """Seconds of each logged window: steps x images per step / images_per_sec."""
    seconds, previous = [], 0
    for step, logs in trainer.history:
        seconds.append((step - previous) * trainer.images_per_step / logs["images_per_sec"])
        previous = step
    return seconds


def run_stage(stage: str, compile_: bool, window: int, windows: int, folder: Path) -> list[float]:
    common = [f"train.max_steps={window * (1 + windows)}", f"train.log_every={window}", "train.checkpoint_every=0",
              "train.image_log_every=0", "train.tracker=none", "train.progress_bar=false", "train.warmup_steps=0",
              f"train.compile={str(compile_).lower()}", f"train.output_dir={folder / f'{stage}_{compile_}'}"]
    if stage == "tokenizer":
        from tokenizer.train import main

        trainer = main(["--config", str(ROOT / "configs" / "tokenizer" / "glyphs.yaml"), "data.num_images=2000",
                        "eval.num_val_images=0", *common])
    else:
        from prior.tokens import save_token_directory
        from prior.train import main

        tokens_dir = folder / "tokens" / "train"
        if not tokens_dir.exists():
            rng = np.random.default_rng(0)
            save_token_directory(tokens_dir, rng.integers(0, 256, (2000, 8, 8)), rng.integers(0, 10, 2000),
                                 codebook_size=256, num_classes=10)
        trainer = main(["--config", str(ROOT / "configs" / "prior" / "glyphs.yaml"), f"data.tokens={tokens_dir}",
                        "data.tokenizer=null", *common])
    return window_seconds(trainer)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=("tokenizer", "prior"), default=["tokenizer", "prior"])
    parser.add_argument("--window", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows after the first (compile) window")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.window < 1 or args.windows < 1 or args.threads < 1:
        parser.error("--window, --windows and --threads must be >= 1")
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True  # a cold compile, as in a new environment
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lgq-bench-compile-") as folder:
        for stage in args.stages:
            eager = run_stage(stage, False, args.window, args.windows, Path(folder))
            compiled = run_stage(stage, True, args.window, args.windows, Path(folder))
            steady = [float(np.mean(seconds[1:])) / args.window for seconds in (eager, compiled)]
            rows.append((stage, steady[0], steady[1], compiled[0] - eager[0]))
    load_after = os.getloadavg()
    print(f"\nTraining s/step, eager vs train.compile=true (inductor), demo recipes on the CPU, {args.threads} torch "
          f"thread(s), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"mean of {args.windows} windows of {args.window} steps after the first; load average "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f}\n")
    print("| stage | eager s/step | compiled s/step | speed-up | compile time (s) |")
    print("|---|---|---|---|---|")
    for stage, eager, compiled, compile_time in rows:
        print(f"| {stage} | {eager:.3f} | {compiled:.3f} | {eager / compiled:.2f}x | {compile_time:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
