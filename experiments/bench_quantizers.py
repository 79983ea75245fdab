"""Quantizer benchmark: forward+backward time and peak memory per quantizer and codebook size.

    python -m experiments.bench_quantizers [--K 4096 16384 65536] [--N 16384] [--dim 64]
        [--device cpu|cuda] [--repeats 3] [--quantizers lgq vq fsq simvq lfq] [--include-dense]
        [--authors-lgq PATH]

One training-like step = ``out = q(z)``, ``(out.loss + mean(out.quantized^2)).backward()`` on
z [N/256, C, 16, 16] (N tokens; [N, C, 1, 1] if N is not a multiple of 256). ``lgq-dense`` is
``lgq_dense_reference`` (plain autograd over full N x K tensors) on the same LayerNormed tokens.
``lgq-authors`` (with ``--authors-lgq PATH``, a checkout of the LGQ authors' code, github.com/
KurbanIntelligenceLab/LGQ; nothing of it is vendored here) is their ``quantization.quantizers.
MultiBinDiscretizer`` (flattened mode, squared-L2 logits, tau 1, the same loss weights 0.005 / 0.005) on
the same z and the same N(0, I) centres as our ``lgq`` row: ``loss, q = m(z as [B, C, T])``,
``(loss + mean(q^2)).backward()``. The ``vs lgq`` column is the row's CPU time over ``lgq``'s at the same K.

Time: median over ``--repeats`` steps after one warm-up step, wall and process CPU time (all threads).
Peak memory (``peak_bytes``), measured in a fresh subprocess per configuration so configurations
cannot inflate each other: the high-water mark of tensor memory allocated by the step above what
was allocated before it (inputs, parameters), on both devices:
  * CPU: replay of the allocator's events recorded by ``torch.profiler`` (profile_memory=True)
    during one extra, untimed step (``cpu_allocated_peak_bytes``);
  * CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the first step.
On CPU the table also keeps ``rss_growth_bytes``: ru_maxrss after the steps minus ru_maxrss before
them, which adds allocator caching and BLAS workspaces but cannot resolve steps smaller than memory
the process already touched (it reads 0 for small steps).
The dense reference is skipped when 6 dense N x K fp32 tensors would exceed 12 GB.
Timings depend on machine load: the table header records the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from experiments.peers import check_peer_path, peer_commit, use_peer_checkout
from tokenizer.quantizers import build_quantizer
from tokenizer.quantizers.lgq import lgq_dense_reference

DEFAULT_QUANTIZERS = ("lgq", "vq", "fsq", "simvq", "lfq")
DENSE_NAME = "lgq-dense"
AUTHORS_NAME = "lgq-authors"
DENSE_LIMIT_BYTES = 12e9  # skip a dense implementation when its N x K tensors would exceed this
DENSE_TENSORS = {DENSE_NAME: 6, AUTHORS_NAME: 8}  # N x K fp32 tensors alive at once (the authors' adds a one-hot)


def dense_bytes_estimate(num_tokens: int, codebook_size: int, name: str = DENSE_NAME) -> float:
    """Bytes of the dense N x K fp32 tensors alive in a plain-autograd LGQ (``DENSE_TENSORS``)."""
    return num_tokens * codebook_size * 4 * DENSE_TENSORS[name]


def build_authors_quantizer(path: str, codebook_size: int, dim: int, device: str):
    """The LGQ authors' quantizer, imported from their checkout at ``path``, at the sizes and loss weights of our
    ``lgq`` row; its centres are our LGQ's initial centres (torch.randn(K, C) after seed 0), marked initialised."""
    use_peer_checkout(path)
    from quantization.quantizers import MultiBinDiscretizer

    torch.manual_seed(0)
    centres = torch.randn(codebook_size, dim)
    module = MultiBinDiscretizer(dim, codebook_size, tau=1.0, lambda_peak=0.005, lambda_bins=0.005,
                                 flatten_channels=True).to(device).train()
    with torch.no_grad():
        module.centers.copy_(centres)
        module._inited.fill_(1)
    return module


def make_latents(num_tokens: int, dim: int, device: str):
    generator = torch.Generator().manual_seed(0)
    if num_tokens % 256 == 0:
        shape = (num_tokens // 256, dim, 16, 16)
    else:
        shape = (num_tokens, dim, 1, 1)
    return torch.randn(shape, generator=generator).to(device).requires_grad_(True)


def build_step(name: str, codebook_size: int, num_tokens: int, dim: int, device: str, authors_lgq: str | None = None):
    """Return a zero-argument closure running one forward+backward step."""
    torch.manual_seed(0)
    z = make_latents(num_tokens, dim, device)
    if name == AUTHORS_NAME:
        if not authors_lgq:
            raise ValueError(f"{AUTHORS_NAME} needs --authors-lgq PATH (a checkout of the LGQ authors' code)")
        module = build_authors_quantizer(authors_lgq, codebook_size, dim, device)

        def step():
            loss, quantized = module(z.flatten(2))[:2]  # [B, C, T] in, [B, C, T] out
            (loss + quantized.square().mean()).backward()
            z.grad = None
            module.zero_grad(set_to_none=True)

        return step
    if name == DENSE_NAME:
        centres = torch.randn(codebook_size, dim, device=device, requires_grad=True)

        def step():
            x = F.layer_norm(z.permute(0, 2, 3, 1).reshape(-1, dim), (dim,), eps=1e-6)
            ref = lgq_dense_reference(x, centres, 1.0)
            loss = ref["loss_quant"] + 0.005 * ref["loss_peak"] + 0.005 * ref["loss_usage"]
            (loss + ref["quantized"].square().mean()).backward()
            z.grad = centres.grad = None

        return step

    quantizer = build_quantizer(name, dim=dim, codebook_size=codebook_size).to(device).train()

    def step():
        out = quantizer(z)
        (out.loss + out.quantized.square().mean()).backward()
        z.grad = None
        quantizer.zero_grad(set_to_none=True)

    return step


def cpu_allocated_peak_bytes(step) -> int:
    """Peak of the running sum of CPU allocations (+) and frees (-) recorded by torch.profiler
    while ``step()`` runs: max_t sum_{events e <= t} nbytes(e), i.e. the most tensor memory the step
    held at once beyond what was allocated before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")), key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def run_worker(name: str, codebook_size: int, num_tokens: int, dim: int, device: str, repeats: int,
               authors_lgq: str | None = None) -> dict:
    """One configuration in this (fresh) process; returns a JSON-able result row."""
    row = {"quantizer": name, "K": codebook_size, "N": num_tokens, "dim": dim, "device": device}
    try:
        step = build_step(name, codebook_size, num_tokens, dim, device, authors_lgq)
    except (ImportError, AttributeError, ModuleNotFoundError) as err:
        return {**row, "status": f"not available ({type(err).__name__}: {err})"}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        sync()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    times, cpu_times = [], []
    for i in range(repeats + 1):  # first step is the warm-up
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        if i > 0:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if device.startswith("cuda"):
        memory = {"peak_bytes": torch.cuda.max_memory_allocated() - baseline}
    else:
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        memory = {"peak_bytes": cpu_allocated_peak_bytes(step), "rss_growth_bytes": rss_growth}
    return {**row, "status": "ok", "seconds": statistics.median(times), "all_seconds": times,
            "cpu_seconds": statistics.median(cpu_times), **memory, "threads": torch.get_num_threads()}


def run_configuration(name: str, args, codebook_size: int) -> dict:
    if name in DENSE_TENSORS and dense_bytes_estimate(args.N, codebook_size, name) > DENSE_LIMIT_BYTES:
        need = dense_bytes_estimate(args.N, codebook_size, name) / 1e9
        return {"quantizer": name, "K": codebook_size, "N": args.N,
                "status": f"skipped (dense needs ~{need:.0f} GB > {DENSE_LIMIT_BYTES / 1e9:.0f} GB limit)"}
    cmd = [sys.executable, "-m", "experiments.bench_quantizers", "--worker", name, "--K", str(codebook_size),
           "--N", str(args.N), "--dim", str(args.dim), "--device", args.device, "--repeats", str(args.repeats)]
    if args.authors_lgq:
        cmd += ["--authors-lgq", args.authors_lgq]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"quantizer": name, "K": codebook_size, "N": args.N, "status": f"failed: {tail[:120]}"}
    return json.loads(lines[-1])


def seconds_text(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 1 else f"{seconds:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """One row per configuration; ``vs lgq``: its process CPU time / the ``lgq`` row's at the same K and N (CPU
    time: what the step computed, robust to other jobs sharing the machine, unlike the wall time beside it)."""
    lgq_cpu = {(r["K"], r["N"]): r["cpu_seconds"] for r in rows if r["quantizer"] == "lgq" and "cpu_seconds" in r}
    out = ["| quantizer | K | N | fwd+bwd s (median) | CPU s (median) | vs lgq (CPU) | peak allocated MiB | "
           "RSS growth MiB | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = seconds_text(r["seconds"]) if "seconds" in r else "-"
        cpu = seconds_text(r["cpu_seconds"]) if "cpu_seconds" in r else "-"
        base = lgq_cpu.get((r["K"], r["N"]))
        ratio = f"{r['cpu_seconds'] / base:.2f}x" if base and "cpu_seconds" in r else "-"
        mem = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-"
        rss = f"{r['rss_growth_bytes'] / 2**20:.0f}" if "rss_growth_bytes" in r else "-"
        out.append(f"| {r['quantizer']} | {r['K']} | {r['N']} | {secs} | {cpu} | {ratio} | {mem} | {rss} | "
                   f"{r['status']} |")
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--K", type=int, nargs="+", default=[4096, 16384, 65536], help="codebook sizes")
    parser.add_argument("--N", type=int, default=16384, help="tokens per step (e.g. 64 images x 16x16)")
    parser.add_argument("--dim", type=int, default=64, help="latent channels C")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--quantizers", nargs="+", default=list(DEFAULT_QUANTIZERS))
    parser.add_argument("--include-dense", action="store_true", help=f"also run the dense reference ({DENSE_NAME})")
    parser.add_argument("--authors-lgq", default=None, metavar="PATH",
                        help=f"also run the LGQ authors' quantizer ({AUTHORS_NAME}) from their checkout at PATH")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.N < 1 or args.dim < 1 or args.repeats < 1 or any(k < 2 for k in args.K):
        parser.error("--N, --dim and --repeats must be >= 1 and every --K >= 2")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    args.authors_lgq = check_peer_path(parser, "--authors-lgq", args.authors_lgq, "quantization/quantizers.py",
                                       "github.com/KurbanIntelligenceLab/LGQ")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(args.worker, args.K[0], args.N, args.dim, args.device, args.repeats,
                                    args.authors_lgq)), flush=True)
        return 0
    names = (list(args.quantizers) + ([DENSE_NAME] if args.include_dense else [])
             + ([AUTHORS_NAME] if args.authors_lgq else []))
    load_before = os.getloadavg()
    rows = []
    for codebook_size in args.K:
        for name in names:
            row = run_configuration(name, args, codebook_size)
            rows.append(row)
            print(f"# {name} K={codebook_size}: {row['status']}"
                  + (f", {row['seconds']:.2f} s, {row['peak_bytes'] / 2**20:.0f} MiB" if "seconds" in row else ""),
                  file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    threads = next((r["threads"] for r in rows if "threads" in r), "?")
    print(f"Quantizer fwd+bwd benchmark: N={args.N} tokens, C={args.dim}, device={args.device}, "
          f"{threads} torch threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"median of {args.repeats} after 1 warm-up; load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
          + (f"; {AUTHORS_NAME}: the authors' code at commit {peer_commit(args.authors_lgq)}" if args.authors_lgq else "")
          + "\n")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
