"""Sampling throughput of the priors: MaskGIT (8 and 16 steps) vs GPT (with / without KV cache).

    python -m experiments.bench_sampling [--device cpu|cuda] [--batch-size 8] [--grid 16] [--codebook-size 16384]
        [--size small|base] [--num-classes 1000] [--guidance-scale 2.0] [--repeats 3] [--no-cache-repeats N] [--no-kv-free-gpt]

Randomly initialised priors (sampling cost does not depend on the weights):
  small  MaskGIT and GPT: 4 layers, 256 hidden, 4 heads, MLP 1024   (CPU-sized)
  base   MaskGIT-B: 24 layers, 768 hidden, 16 heads, MLP 3072; GPT-B (LlamaGen): 12 layers, 768 hidden, 12 heads,
         SwiGLU 2048 (mlp_ratio 8/3, as configs/prior/imagenet_gpt_b.yaml: 110.9M parameters at K = 16384)
Every configuration uses classifier-free guidance (guidance scale != 1 -> conditional and null-class
sequences batched together: 2 x batch sequences per forward pass). Throughput = batch / time of one
``generate`` call, tokens only: decoding the tokens to pixels is excluded (it is the same tokenizer
cost for every prior). Time: median of --repeats calls after a one-image warm-up call.
Timings depend on machine load: the header records the load average and thread count.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from prior.gpt import GPTPrior
from prior.maskgit import MaskGITPrior

SIZES = {
    "small": {"maskgit": dict(hidden_size=256, num_layers=4, num_heads=4, mlp_ratio=4.0),
              "gpt": dict(hidden_size=256, num_layers=4, num_heads=4, mlp_ratio=4.0)},
    "base": {"maskgit": dict(hidden_size=768, num_layers=24, num_heads=16, mlp_ratio=4.0),
             "gpt": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_ratio=8 / 3)},
}


def build_priors(size: str, codebook_size: int, grid: int, num_classes: int, device: str):
    """{"maskgit": MaskGITPrior, "gpt": GPTPrior}, randomly initialised (seed 0), eval mode, on ``device``."""
    torch.manual_seed(0)
    common = dict(codebook_size=codebook_size, num_classes=num_classes, grid_size=grid, dropout=0.0)
    return {"maskgit": MaskGITPrior(**common, **SIZES[size]["maskgit"]).to(device).eval(),
            "gpt": GPTPrior(**common, **SIZES[size]["gpt"]).to(device).eval()}


def time_generate(generate, device: str, repeats: int, label: str = "") -> list[float]:
    """Seconds of ``repeats`` calls of generate(batch) after one warm-up call generate(1) (CUDA synchronised).

    The warm-up uses one image (same model, code path and options): it pays the one-off costs (lazy
    initialisation, kernel selection, allocator growth) without a full-batch call; the median of the
    repeats absorbs what is left."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    generate(1)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        generate(None)
        sync()
        times.append(time.perf_counter() - start)
        print(f"# {label}: {times[-1]:.3f} s", file=sys.stderr, flush=True)
    return times


def benchmark(args) -> list[dict]:
    priors = build_priors(args.size, args.codebook_size, args.grid, args.num_classes, args.device)
    all_labels = [i * args.num_classes // args.batch_size for i in range(args.batch_size)]
    tokens_per_image = args.grid * args.grid

    def sampler(name: str, **options):
        """generate(n) samples the first n class labels (all of them for n=None) with a fresh seeded generator."""
        def generate(count: int | None):
            generator = torch.Generator(device=args.device).manual_seed(0)
            return priors[name].generate(all_labels[:count], guidance_scale=args.guidance_scale, generator=generator,
                                         **options)
        return generate

    configurations = [("maskgit", f"{steps} steps", steps, sampler("maskgit", num_inference_steps=steps))
                      for steps in (8, 16)]
    configurations.append(("gpt", "KV cache", tokens_per_image, sampler("gpt", use_cache=True)))
    if not args.no_kv_free_gpt:
        configurations.append(("gpt", "no KV cache", tokens_per_image, sampler("gpt", use_cache=False)))
    rows = []
    for name, method, passes, generate in configurations:
        repeats = args.no_cache_repeats if method == "no KV cache" and args.no_cache_repeats else args.repeats
        times = time_generate(generate, args.device, repeats, f"{name} {method}")
        seconds = statistics.median(times)
        params = sum(p.numel() for p in priors[name].parameters())
        rows.append({"prior": name, "method": method, "forward_passes": passes, "params": params,
                     "seconds": seconds, "repeats": len(times), "images_per_sec": args.batch_size / seconds})
    return rows


def markdown_table(rows: list[dict]) -> str:
    out = ["| prior | decoding | forward passes | params (M) | s / batch (median) | timed calls | images/s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['prior']} | {r['method']} | {r['forward_passes']} | {r['params'] / 1e6:.1f} | "
                   f"{r['seconds']:.3f} | {r['repeats']} | {r['images_per_sec']:.3f} |")
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (CFG doubles the sequences)")
    parser.add_argument("--grid", type=int, default=16, help="token grid side h = w")
    parser.add_argument("--codebook-size", type=int, default=16384, help="K")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale s (must be != 1: CFG is on)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call")
    parser.add_argument("--no-cache-repeats", type=int, default=None,
                        help="timed calls for GPT without KV cache (default --repeats; each call recomputes the prefix, "
                             "O(L^2) token forwards: slow on CPU)")
    parser.add_argument("--no-kv-free-gpt", action="store_true",
                        help="skip GPT without KV cache (O(L^2) forward tokens: slow on CPU)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.grid, args.repeats, args.num_classes, args.no_cache_repeats or 1) < 1 or args.codebook_size < 2:
        parser.error("--batch-size, --grid, --repeats, --num-classes must be >= 1 and --codebook-size >= 2")
    if args.guidance_scale == 1.0:
        parser.error("--guidance-scale 1.0 switches CFG off; the benchmark measures CFG sampling (2x batch)")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    rows = benchmark(args)
    load_after = os.getloadavg()
    sizes = SIZES[args.size]
    describe = lambda s: f"{s['num_layers']} layers x {s['hidden_size']} hidden, {s['num_heads']} heads"  # noqa: E731
    print(f"Prior sampling throughput, size '{args.size}' (MaskGIT {describe(sizes['maskgit'])}; "
          f"GPT {describe(sizes['gpt'])}; random weights), K={args.codebook_size}, {args.grid}x{args.grid} tokens, "
          f"batch {args.batch_size} with CFG s={args.guidance_scale} (2 x {args.batch_size} sequences per pass), "
          f"device={args.device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; tokens only (tokenizer decoding excluded); median of "
          f"the timed calls after a 1-image warm-up; load average {load_before[0]:.1f} -> {load_after[0]:.1f}\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
