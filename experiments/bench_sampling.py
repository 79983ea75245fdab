"""Sampling throughput of the priors: MaskGIT (8 and 16 steps) vs GPT (with / without KV cache), each against
its floor on this machine, and LlamaGen's GPT ``generate()`` side by side at the identical size.

    python -m experiments.bench_sampling [--device cpu|cuda] [--batch-size 8] [--grid 16] [--codebook-size 16384]
        [--size small|base] [--num-classes 1000] [--guidance-scale 2.0] [--repeats 3] [--no-cache-repeats N]
        [--no-kv-free-gpt] [--llamagen PATH] [--configurations maskgit-8 maskgit-16 gpt-cache gpt-dynamic-cache gpt-no-cache llamagen-gpt]

Randomly initialised priors (sampling cost does not depend on the weights):
  small  MaskGIT: 4 layers, 256 hidden, 4 heads, MLP 1024; GPT: 4 layers, 256 hidden, 4 heads, SwiGLU 768
  base   MaskGIT-B: 24 layers, 768 hidden, 16 heads, MLP 3072; GPT-B (LlamaGen): 12 layers, 768 hidden, 12 heads,
         SwiGLU 2048 (as configs/prior/imagenet_gpt_b.yaml: 110.9M parameters at K = 16384)
GPT SwiGLU widths follow LlamaGen: find_multiple(int(2 * 4 * hidden / 3), 256).
``--llamagen PATH`` (a checkout of github.com/FoundationVision/LlamaGen; nothing of it is vendored here) adds
``llamagen-gpt``: its ``autoregressive.models.gpt.Transformer`` at the same width, depth, heads, SwiGLU width, K,
classes and grid (dropouts 0; its zero-initialised output layer re-drawn N(0, 0.02) like ours, so the logits
are not all equal), sampled with its ``autoregressive.models.generate.generate`` (static KV cache, CFG).
Every configuration uses classifier-free guidance (guidance scale != 1 -> conditional and null-class
sequences batched together: 2 x batch sequences per forward pass). Throughput = batch / time of one
``generate`` call, tokens only: decoding the tokens to pixels is excluded (it is the same tokenizer
cost for every prior). Each configuration runs in a fresh process; time: median of --repeats calls after
a one-image warm-up call.

Floors, measured in the same process right after the timed calls:
  MaskGIT (compute-bound): FLOPs of one generate call (torch.utils.flop_counter) / the FLOP rate of an fp32
      matrix product of the model's shape ([2 B L, d] x [d, 4d], median of 5);
  GPT (weight-bandwidth-bound decode): L decode steps x the bytes of the weights each step reads / the read
      bandwidth of summing a 256 MiB tensor (median of 5). KV cache reads and the prefill are not counted.
``vs floor`` = CPU time / floor; ``vs ours``: llamagen-gpt's CPU time / our GPT's (KV cache: the default, a preallocated StaticCache). On CPU the floors'
micro-benchmarks and the ratios use process CPU time, which other jobs on a shared machine disturb far less
than the wall time (also printed); on CUDA, wall time. The header records the load average and thread count.

``--profile`` adds a second table: where one more generate call's time goes (torch.profiler, self CPU time of
every op; on CUDA the kernels' device time; after one untimed profiled call: the first
profiled call runs several times slower, in aten::cat and copy_ here):
matrix products (aten::mm / addmm / bmm / baddbmm), attention (scaled-dot-product kernels), the other ops (the
three largest named) and outside ops = the profiled call's wall time - the ops' self time (Python, module
wrappers, dispatch). These sum to the profiled call, which the profiler's bookkeeping (and, on a shared machine,
the other jobs: it is wall time) makes slower than the timed calls. Its ``GEMM floor`` is the time the same
matrix products take on their own: each (op, shapes) the call ran, timed alone (median of 5) x its count, on cold
operands (fresh copies, then 256 MiB written, so each call reads them from memory, as a decode step reads every
weight once). A GPT decode's products have only 2 B rows; with one CPU thread they are bound by their FLOPs at
that shape more than by the weight bandwidth. ``vs GEMM floor`` = CPU time of the timed calls / max(GEMM floor,
floor): the rest is everything but the matrix products.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from experiments.peers import check_peer_path, peer_commit, use_peer_checkout
from prior.gpt import GPTPrior
from prior.maskgit import MaskGITPrior


def llamagen_ffn_width(hidden_size: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width: find_multiple(int(2 * 4 * hidden / 3), multiple_of)."""
    width = int(2 * 4 * hidden_size / 3)
    return width if width % multiple_of == 0 else width + multiple_of - width % multiple_of


SIZES = {
    "small": {"maskgit": dict(hidden_size=256, num_layers=4, num_heads=4, mlp_ratio=4.0),
              "gpt": dict(hidden_size=256, num_layers=4, num_heads=4, mlp_ratio=llamagen_ffn_width(256) / 256)},
    "base": {"maskgit": dict(hidden_size=768, num_layers=24, num_heads=16, mlp_ratio=4.0),
             "gpt": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_ratio=llamagen_ffn_width(768) / 768)},
}
# configuration id -> (prior, decoding method, MaskGIT steps or None)
CONFIGURATIONS = {
    "maskgit-8": ("maskgit", "8 steps", 8),
    "maskgit-16": ("maskgit", "16 steps", 16),
    "gpt-cache": ("gpt", "static KV cache", None),
    "gpt-dynamic-cache": ("gpt", "DynamicCache", None),
    "gpt-no-cache": ("gpt", "no KV cache", None),
    "llamagen-gpt": ("llamagen-gpt", "generate(), KV cache", None),
}
LLAMAGEN = "llamagen-gpt"
GPT_CACHES = {"gpt-cache": True, "gpt-dynamic-cache": "dynamic", "gpt-no-cache": False}  # -> GPTPrior use_cache


def build_prior(name: str, size: str, codebook_size: int, grid: int, num_classes: int, device: str):
    """MaskGITPrior or GPTPrior of ``size``, randomly initialised (seed 0), eval mode, on ``device``."""
    torch.manual_seed(0)
    common = dict(codebook_size=codebook_size, num_classes=num_classes, grid_size=grid, dropout=0.0)
    cls = MaskGITPrior if name == "maskgit" else GPTPrior
    return cls(**common, **SIZES[size][name]).to(device).eval()


def build_llamagen_gpt(path: str, size: str, codebook_size: int, grid: int, num_classes: int, device: str):
    """LlamaGen's class-conditional GPT from its checkout at ``path``, at our GPT's size (module doc)."""
    use_peer_checkout(path)
    from autoregressive.models.gpt import ModelArgs, Transformer

    torch.manual_seed(0)
    gpt = SIZES[size]["gpt"]
    model = Transformer(ModelArgs(dim=gpt["hidden_size"], n_layer=gpt["num_layers"], n_head=gpt["num_heads"],
                                  vocab_size=codebook_size, num_classes=num_classes, block_size=grid * grid,
                                  cls_token_num=1, model_type="c2i", class_dropout_prob=0.1, token_dropout_p=0.0,
                                  attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0))
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.to(device).eval()


def make_generate(name: str, args):
    """(model, generate(n)): generate(n) samples the first n class labels (all for n=None), fresh seeded generator."""
    prior, _, steps = CONFIGURATIONS[name]
    all_labels = [i * args.num_classes // args.batch_size for i in range(args.batch_size)]
    if prior == LLAMAGEN:
        use_peer_checkout(args.llamagen)
        from autoregressive.models.generate import generate as llamagen_generate

        model = build_llamagen_gpt(args.llamagen, args.size, args.codebook_size, args.grid, args.num_classes,
                                   args.device)
        if args.compile:  # LlamaGen's generate() calls the model for prefill and every decode step
            model.compile()

        def generate(count: int | None):
            torch.manual_seed(0)
            labels = torch.tensor(all_labels[:count], device=args.device)
            return llamagen_generate(model, labels, args.grid * args.grid, cfg_scale=args.guidance_scale,
                                     temperature=1.0, top_k=0, top_p=1.0, sample_logits=True)
        return model, generate

    model = build_prior(prior, args.size, args.codebook_size, args.grid, args.num_classes, args.device)
    if args.compile:
        model.compile_sampling()
    options = {"num_inference_steps": steps} if prior == "maskgit" else {"use_cache": GPT_CACHES[name]}

    def generate(count: int | None):
        generator = torch.Generator(device=args.device).manual_seed(0)
        return model.generate(all_labels[:count], guidance_scale=args.guidance_scale, generator=generator, **options)
    return model, generate


def time_generate(generate, device: str, repeats: int, label: str = "",
                  full_warmup: bool = False) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds of ``repeats`` calls of generate(batch) after one warm-up call generate(1)
    (CUDA synchronised).

    The warm-up uses one image (same model, code path and options): it pays the one-off costs (lazy
    initialisation, kernel selection, allocator growth) without a full-batch call; the median of the
    repeats absorbs what is left. ``full_warmup`` (compiled models): warm up on the full batch, whose shapes
    the compiled graphs are specialised to, so no timed call pays a compilation."""
    generate(None if full_warmup else 1)
    times, cpu_times = [], []
    for _ in range(repeats):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        generate(None)
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        print(f"# {label}: {times[-1]:.3f} s ({cpu_times[-1]:.3f} s CPU)", file=sys.stderr, flush=True)
    return times, cpu_times


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int = 5) -> float:
    """Median over ``repeats`` calls after one warm-up: process CPU time on CPU (robust to other jobs on a shared
    machine), wall time on CUDA."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        times.append(clock() - start)
    return statistics.median(times)


def matmul_flops_per_second(rows: int, hidden: int, device: str) -> float:
    """FLOP/s of an fp32 [rows, d] x [d, 4d] matrix product (2 rows d 4d FLOPs)."""
    a, b = torch.randn(rows, hidden, device=device), torch.randn(hidden, 4 * hidden, device=device)
    return 2 * rows * hidden * 4 * hidden / median_seconds(lambda: torch.mm(a, b), device)


def read_bytes_per_second(device: str, num_bytes: int = 256 * 2**20) -> float:
    """Read bandwidth: bytes / time of summing an fp32 tensor of ``num_bytes``."""
    x = torch.ones(num_bytes // 4, device=device)
    return num_bytes / median_seconds(lambda: x.sum(), device)


MATMUL_OPS = {"aten::mm": torch.mm, "aten::addmm": torch.addmm, "aten::bmm": torch.bmm, "aten::baddbmm": torch.baddbmm}


def op_category(name: str) -> str:
    """'matmul', 'attention' or 'other' for a profiler op name."""
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    return "other"


CACHE_FLUSH_BYTES = 256 * 2**20  # written between making the operands and timing them: more than a last-level cache


def matmul_seconds(name: str, shapes: list, device: str, flush_bytes: int = CACHE_FLUSH_BYTES) -> float:
    """CPU (CUDA: wall) seconds of one ``name`` call with input ``shapes`` as the profiler records them (mm [[m, k],
    [k, n]], addmm [[n] or [m, n], [m, k], [k, n], ...], bmm [[b, m, k], [b, k, n]], baddbmm [[b, m, n], [b, m, k],
    [b, k, n], ...]), on cold random fp32 operands: 6 copies (the warm-up and 5 timed calls, each on its own), then
    ``flush_bytes`` written, so every call, like a decode step reading each weight once, reads them from memory."""
    op = MATMUL_OPS[name]
    used = [shape for shape in shapes if shape][:2 if name in ("aten::mm", "aten::bmm") else 3]
    repeats = 5
    copies = iter([[torch.randn(*shape, device=device) for shape in used] for _ in range(repeats + 1)])
    torch.ones(flush_bytes // 4, device=device)  # evicts the copies from the caches
    return median_seconds(lambda: op(*next(copies)), device, repeats=repeats)


def profile_breakdown(generate, device: str) -> dict:
    """Where one profiled generate(batch) call's time goes (module doc, ``--profile``): its wall seconds (the clock
    the profiler's op times use), the ops' self seconds per category (they and ``outside`` = the rest sum to the
    call's seconds), the three largest other ops, and the GEMM floor (every matrix product of the call timed alone
    at its shapes, on the CPU clock of the floors)."""
    clock = time.perf_counter
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, record_shapes=True):  # the first profiled full call runs several times
        generate(None)                                             # slower (here: in aten::cat / copy_); not timed
    synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        start = clock()
        generate(None)
        synchronize(device)
        call_seconds = clock() - start
    seconds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    others: dict[str, float] = {}
    gemm_floor = 0.0
    cuda = device.startswith("cuda")
    for event in prof.key_averages(group_by_input_shape=True):  # on CUDA: the kernels' self device time
        self_seconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        category = op_category(event.key)
        seconds[category] += self_seconds
        if category == "other":
            others[event.key] = others.get(event.key, 0.0) + self_seconds
        elif category == "matmul":
            gemm_floor += event.count * matmul_seconds(event.key, event.input_shapes, device)
    top = sorted(others.items(), key=lambda item: -item[1])[:3]
    return {"call_seconds": call_seconds, "matmul_seconds": seconds["matmul"], "attention_seconds": seconds["attention"],
            "other_seconds": seconds["other"], "top_other_ops": [[op, s] for op, s in top],
            "outside_seconds": max(call_seconds - sum(seconds.values()), 0.0), "gemm_floor_seconds": gemm_floor}


def run_worker(name: str, args) -> dict:
    """One configuration in this (fresh) process: timed generate calls, then its floor; a JSON-able row."""
    prior, method, steps = CONFIGURATIONS[name]
    model, generate = make_generate(name, args)
    repeats = args.no_cache_repeats if name == "gpt-no-cache" and args.no_cache_repeats else args.repeats
    with torch.inference_mode():
        times, cpu_times = time_generate(generate, args.device, repeats, f"{prior} {method}", full_warmup=args.compile)
        tokens = args.grid * args.grid
        params = sum(p.numel() for p in model.parameters())
        hidden = SIZES[args.size]["maskgit" if prior == "maskgit" else "gpt"]["hidden_size"]
        if prior == "maskgit":
            with FlopCounterMode(display=False) as counter:
                generate(None)
            floor = counter.get_total_flops() / matmul_flops_per_second(2 * args.batch_size * tokens, hidden,
                                                                        args.device)
        else:  # every decode step reads all weights but the (gathered) token and class embeddings
            embedding_params = args.codebook_size * hidden + (args.num_classes + 1) * hidden
            weight_bytes = (params - embedding_params) * next(model.parameters()).element_size()
            floor = tokens * weight_bytes / read_bytes_per_second(args.device)
        seconds = statistics.median(times)
        cpu_seconds = statistics.median(cpu_times) if not args.device.startswith("cuda") else seconds
        breakdown = profile_breakdown(generate, args.device) if args.profile else None
    if args.compile:
        method += ", compiled"
    return {"configuration": name, "prior": prior, "method": method, "forward_passes": steps or tokens, "params": params,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "repeats": len(times),
            "images_per_sec": args.batch_size / seconds, "floor_seconds": floor, "threads": torch.get_num_threads(),
            "profile": breakdown}


def worker_command(name: str, args) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.bench_sampling", "--worker", name, "--device", args.device,
           "--batch-size", str(args.batch_size), "--grid", str(args.grid), "--codebook-size", str(args.codebook_size),
           "--num-classes", str(args.num_classes), "--size", args.size, "--guidance-scale", str(args.guidance_scale),
           "--repeats", str(args.repeats)]
    if args.no_cache_repeats:
        cmd += ["--no-cache-repeats", str(args.no_cache_repeats)]
    if args.llamagen:
        cmd += ["--llamagen", args.llamagen]
    if args.profile:
        cmd.append("--profile")
    if args.compile:
        cmd.append("--compile")
    return cmd


def benchmark(args) -> tuple[list[dict], list[str]]:
    """(rows of the configurations that finished, error of each that failed: its name, exit code and traceback)."""
    names = [name for name in CONFIGURATIONS if name in args.configurations]
    if args.no_kv_free_gpt and "gpt-no-cache" in names:
        names.remove("gpt-no-cache")
    if LLAMAGEN in names and not args.llamagen:
        names.remove(LLAMAGEN)
    rows, failures = [], []
    for name in names:
        proc = subprocess.run(worker_command(name, args), capture_output=True, text=True, timeout=args.timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:]) or "no output"  # the traceback, not a log line
            killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
            failures.append(f"sampling benchmark {name} failed (exit code {proc.returncode}){killed}:\n{tail}")
            continue
        rows.append(json.loads(lines[-1]))
    return rows, failures


def markdown_table(rows: list[dict]) -> str:
    """``vs floor`` and ``vs ours`` compare CPU times (on CUDA: wall times)."""
    ours = next((r["cpu_seconds"] for r in rows if r.get("configuration") == "gpt-cache"), None)
    out = ["| prior | decoding | forward passes | params (M) | s / batch (median) | CPU s / batch | timed calls | "
           "images/s | floor s | vs floor | vs ours |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        versus_ours = f"{r['cpu_seconds'] / ours:.2f}x" if r["prior"] == LLAMAGEN and ours else "-"
        out.append(f"| {r['prior']} | {r['method']} | {r['forward_passes']} | {r['params'] / 1e6:.1f} | "
                   f"{r['seconds']:.3f} | {r['cpu_seconds']:.3f} | {r['repeats']} | {r['images_per_sec']:.3f} | "
                   f"{r['floor_seconds']:.3f} | {r['cpu_seconds'] / r['floor_seconds']:.2f}x | {versus_ours} |")
    return "\n".join(out)


def profile_table(rows: list[dict]) -> str:
    """The ``--profile`` table: seconds of one profiled call per category, and CPU time / max(GEMM floor, floor)."""
    out = ["| prior | decoding | CPU s / batch | profiled call, wall s | matrix products s | attention s | "
           "other ops s (largest) | outside ops s | GEMM floor s | vs GEMM floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["profile"]
        largest = ", ".join(f"{op.removeprefix('aten::')} {s:.2f}" for op, s in p["top_other_ops"])
        floor = max(p["gemm_floor_seconds"], r["floor_seconds"])
        out.append(f"| {r['prior']} | {r['method']} | {r['cpu_seconds']:.3f} | {p['call_seconds']:.3f} | "
                   f"{p['matmul_seconds']:.3f} | "
                   f"{p['attention_seconds']:.3f} | {p['other_seconds']:.3f} ({largest}) | {p['outside_seconds']:.3f} | "
                   f"{p['gemm_floor_seconds']:.3f} | {r['cpu_seconds'] / floor:.2f}x |")
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (CFG doubles the sequences)")
    parser.add_argument("--grid", type=int, default=16, help="token grid side h = w")
    parser.add_argument("--codebook-size", type=int, default=16384, help="K")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale s (must be > 1: CFG is on)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call")
    parser.add_argument("--no-cache-repeats", type=int, default=None,
                        help="timed calls for GPT without KV cache (default --repeats; each call recomputes the prefix, "
                             "O(L^2) token forwards: slow on CPU)")
    parser.add_argument("--no-kv-free-gpt", action="store_true",
                        help="skip GPT without KV cache (O(L^2) forward tokens: slow on CPU)")
    parser.add_argument("--configurations", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS),
                        help=f"which to run (default all; {LLAMAGEN} only with --llamagen)")
    parser.add_argument("--llamagen", default=None, metavar="PATH",
                        help=f"also run LlamaGen's GPT generate() ({LLAMAGEN}) from its checkout at PATH")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one call per configuration: where the time goes, and the GEMM floor")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per configuration")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile what each sampler's decoding steps run (ours: prior.compile_sampling(); "
                             "LlamaGen: its model), warmed up on the full batch")
    parser.add_argument("--worker", choices=sorted(CONFIGURATIONS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.grid, args.repeats, args.num_classes, args.no_cache_repeats or 1) < 1 or args.codebook_size < 2:
        parser.error("--batch-size, --grid, --repeats, --num-classes must be >= 1 and --codebook-size >= 2")
    if args.guidance_scale <= 1.0:  # LlamaGen's generate() switches CFG off at s <= 1
        parser.error("--guidance-scale must be > 1: the benchmark measures CFG sampling (2x batch)")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    args.llamagen = check_peer_path(parser, "--llamagen", args.llamagen, "autoregressive/models/gpt.py",
                                    "github.com/FoundationVision/LlamaGen")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(args.worker, args)), flush=True)
        return 0
    load_before = os.getloadavg()
    rows, failures = benchmark(args)
    load_after = os.getloadavg()
    if not rows:
        raise RuntimeError("\n\n".join(failures))
    sizes = SIZES[args.size]
    describe = lambda s: f"{s['num_layers']} layers x {s['hidden_size']} hidden, {s['num_heads']} heads"  # noqa: E731
    print(f"Prior sampling throughput, size '{args.size}' (MaskGIT {describe(sizes['maskgit'])}; "
          f"GPT {describe(sizes['gpt'])}; random weights), K={args.codebook_size}, {args.grid}x{args.grid} tokens, "
          f"batch {args.batch_size} with CFG s={args.guidance_scale} (2 x {args.batch_size} sequences per pass), "
          f"device={args.device}, {rows[0]['threads']} torch threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; tokens only (tokenizer decoding excluded); each "
          f"configuration in a fresh process, median of the timed calls after a "
          f"{'full-batch (compiling)' if args.compile else '1-image'} warm-up; load average "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f}"
          + (f"; {LLAMAGEN}: LlamaGen at commit {peer_commit(args.llamagen)}" if args.llamagen else "") + "\n")
    print(markdown_table(rows))
    if args.profile:
        print("\nWhere the time goes (one profiled call: wall seconds of each op's self time; the floors and the last "
              "column: CPU time):\n")
        print(profile_table(rows))
    if failures:  # the finished configurations' table is printed above, then the run fails naming the others
        raise RuntimeError("\n\n".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
