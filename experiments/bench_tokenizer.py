"""Tokenizer training step, ours (the ImageNet recipe) side by side with LlamaGen's VQ-16 at the same widths.

    python -m experiments.bench_tokenizer --llamagen PATH [--image-size 256] [--batch-size 2] [--repeats 3]
        [--precisions fp32 bf16] [--K 16384]

One step = forward of encoder, quantizer and decoder, loss = L1(x_hat, x) + the quantizer's own loss terms,
backward (no optimizer step), on random images in [-1, 1]:
  ours      ``tokenizer.model.build_tokenizer`` from configs/tokenizer/imagenet_base.yaml + imagenet_lgq.yaml
            (base 128 channels, multipliers 1 1 2 2 4, 2 res blocks, attention at the lowest resolution, LGQ with
            C = 64, K = 16384 by default), loss L1 + LGQ's L_q + 0.005 L_peak + 0.005 L_usage;
  llamagen  LlamaGen's ``VQ_16`` (tokenizer/tokenizer_image/vq_model.py, loaded from the checkout at
            ``--llamagen PATH`` by file, nothing vendored here; the same encoder/decoder widths, z 256 channels,
            an l2-normalised 8-dim VQ codebook of K codes), loss L1 + its VQ loss + 0.25 x commitment loss.
Neither side adds LPIPS or the GAN (their VGG / discriminator would add the same cost to both, and the
LPIPS weights cannot be downloaded here). bf16: the step under torch.autocast(bfloat16) on the device (our
quantizer stays fp32 inside it, as in training). Each configuration runs in a fresh process: time =
median of --repeats steps after one warm-up step; peak = the most tensor memory the step held beyond what
was allocated before it (CPU: replay of the profiler's allocation events, one extra untimed step;
CUDA: max_memory_allocated). ``vs ours``: llamagen's process CPU time / ours at the same precision (CPU time is
robust to other jobs on a shared machine; the wall time is printed beside it; on CUDA: wall time).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.bench_quantizers import cpu_allocated_peak_bytes
from experiments.peers import check_peer_path, peer_commit

ROOT = Path(__file__).resolve().parents[1]
RECIPE = [ROOT / "configs" / "tokenizer" / "imagenet_base.yaml", ROOT / "configs" / "tokenizer" / "imagenet_lgq.yaml"]
MODELS = ("ours", "llamagen")
LLAMAGEN_VQ_MODEL = "tokenizer/tokenizer_image/vq_model.py"


def build_ours(codebook_size: int):
    """Our tokenizer of the ImageNet recipe (RECIPE) at K = codebook_size; step loss = L1 + quantizer loss."""
    from omegaconf import OmegaConf

    from tokenizer.model import build_tokenizer

    model_cfg = OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.load(p) for p in RECIPE]).model)
    model = build_tokenizer({**model_cfg, "codebook_size": codebook_size}).train()

    def loss(images):
        out = model(images)
        return F.l1_loss(out.reconstruction.float(), images) + out.quantizer_output.loss
    return model, loss


def build_llamagen(path: str, codebook_size: int):
    """LlamaGen's VQ-16 loaded by file from the checkout (its ``tokenizer`` folder would clash with ours as a
    package name); step loss = L1 + VQ loss + commitment loss (its ``VectorQuantizer`` returns both, weighted)."""
    spec = importlib.util.spec_from_file_location("llamagen_vq_model", os.path.join(path, LLAMAGEN_VQ_MODEL))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.VQ_16(codebook_size=codebook_size, codebook_embed_dim=8).train()
    usage_window = getattr(model.quantize, "codebook_used", None)
    if usage_window is not None:  # registered as a buffer holding an nn.Parameter: its in-place window update
        usage_window.requires_grad_(False)  # would raise under autograd without this

    def loss(images):
        reconstruction, (vq_loss, commit_loss, _entropy_loss, _usage) = model(images)
        return F.l1_loss(reconstruction.float(), images) + vq_loss + commit_loss
    return model, loss


def run_worker(model_name: str, precision: str, args) -> dict:
    """One configuration in this (fresh) process -> a JSON-able row."""
    torch.manual_seed(0)
    model, loss_fn = build_ours(args.K) if model_name == "ours" else build_llamagen(args.llamagen, args.K)
    model = model.to(args.device)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    images = (images * 2 - 1).to(args.device)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(images)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def synchronize():
        if device_type == "cuda":
            torch.cuda.synchronize()

    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times, cpu_times = [], []
    for i in range(args.repeats + 1):  # the first step is the warm-up
        synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        synchronize()
        if i:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        print(f"# {model_name} {precision}: {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
    peak = torch.cuda.max_memory_allocated() - baseline if device_type == "cuda" else cpu_allocated_peak_bytes(step)
    cpu_seconds = statistics.median(cpu_times) if device_type == "cpu" else statistics.median(times)
    return {"model": model_name, "precision": precision, "seconds": statistics.median(times), "all_seconds": times,
            "cpu_seconds": cpu_seconds,
            "peak_bytes": peak, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}


def markdown_table(rows: list[dict]) -> str:
    ours = {r["precision"]: r["cpu_seconds"] for r in rows if r["model"] == "ours"}
    out = ["| tokenizer | precision | params (M) | s / step (median) | CPU s / step | vs ours (CPU) | peak allocated MiB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        versus = f"{r['cpu_seconds'] / ours[r['precision']]:.2f}x" if r["precision"] in ours else "-"
        out.append(f"| {r['model']} | {r['precision']} | {r['params'] / 1e6:.1f} | {r['seconds']:.2f} | "
                   f"{r['cpu_seconds']:.2f} | {versus} | {r['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamagen", default=None, metavar="PATH", help="a checkout of LlamaGen (without it: ours only)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--K", type=int, default=16384, help="codebook size of both tokenizers")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "PRECISION"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.image_size, args.batch_size, args.repeats) < 1 or args.image_size % 16 or args.K < 2:
        parser.error("--image-size must be a positive multiple of 16, --batch-size and --repeats >= 1, --K >= 2")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    args.llamagen = check_peer_path(parser, "--llamagen", args.llamagen, LLAMAGEN_VQ_MODEL,
                                    "github.com/FoundationVision/LlamaGen")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(*args.worker, args)), flush=True)
        return 0
    load_before = os.getloadavg()
    rows = []
    for precision in args.precisions:
        for model_name in MODELS if args.llamagen else MODELS[:1]:
            cmd = [sys.executable, "-m", "experiments.bench_tokenizer", "--worker", model_name, precision,
                   "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--K", str(args.K),
                   "--repeats", str(args.repeats), "--device", args.device]
            cmd += ["--llamagen", args.llamagen] if args.llamagen else []
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"tokenizer benchmark {model_name} {precision} failed: {tail}")
            rows.append(json.loads(lines[-1]))
    load_after = os.getloadavg()
    print(f"Tokenizer training step (forward + backward, L1 + quantizer losses, no LPIPS/GAN), "
          f"{args.image_size} px, batch {args.batch_size}, K={args.K}, device={args.device}, {rows[0]['threads']} "
          f"torch threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; each configuration "
          f"in a fresh process, median of {args.repeats} after 1 warm-up; load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}" + (f"; llamagen: LlamaGen at commit {peer_commit(args.llamagen)}" if args.llamagen
                                   else "") + "\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
