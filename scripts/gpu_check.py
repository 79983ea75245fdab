"""One-shot CUDA check of the whole system at ImageNet width, on synthetic 256 px data (no download of data).

    python scripts/gpu_check.py [--output runs/gpu_check] [--tokenizer-steps 100] [--prior-steps 20]
    make gpu-check                                  # the same, with the repository's environment
    python scripts/gpu_check.py --dry-run           # tiny models on CPU: checks the script itself (CI does)

Stages, in order, each timed on one GPU (bf16 autocast, quantizer in fp32):

  tokenizer    tokenizer/train.py with imagenet_base.yaml + imagenet_lgq.yaml (full width, K = 16384,
               LPIPS-VGG, GAN from half-way), ``--tokenizer-steps`` steps, checkpoint + export
  extract      prior.extract of ``--extract-images`` synthetic images with the exported tokenizer
  maskgit_b    prior/train.py with imagenet_maskgit_b.yaml, ``--prior-steps`` steps on those tokens
  gpt_b        prior/train.py with imagenet_gpt_b.yaml, ``--prior-steps`` steps
  sample_*     pipelines.assemble + LGQPipeline sampling of one batch (MaskGIT 12 steps CFG 3; GPT KV cache)
  gen_fid      eval/gen_fid.py on ``--fid-samples`` MaskGIT samples against the synthetic val split
  quantizers   experiments.bench_quantizers (N = 16384 tokens, C = 64) for K = 16384, 65536 and 262144
               (FSQ has no levels table entry for 262144 and is left out there)

It stops at the first stage that raises (the traceback names it) and prints one table
(stage, work, s/step, img/s, peak memory, wall time), written as JSON to ``<output>/gpu_check.json``.
Peak memory: torch.cuda.max_memory_allocated() over the stage (none on CPU); for the quantizer rows the
benchmark's own peak above its inputs (``experiments.bench_quantizers``, also on CPU).
On a machine without CUDA it refuses unless ``--dry-run`` is given. The LPIPS VGG16 and Inception weights
are downloaded on first use (internet needed once; they are cached in $TORCH_HOME/hub/checkpoints).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python scripts/gpu_check.py from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TOKENIZER_CONFIGS = [ROOT / "configs" / "tokenizer" / "imagenet_base.yaml", ROOT / "configs" / "tokenizer" / "imagenet_lgq.yaml"]
PRIOR_CONFIGS = {"maskgit_b": ROOT / "configs" / "prior" / "imagenet_maskgit_b.yaml",
                 "gpt_b": ROOT / "configs" / "prior" / "imagenet_gpt_b.yaml"}
BENCH_SIZES = {16384: ["lgq", "vq", "fsq", "simvq", "lfq"], 65536: ["lgq", "vq", "fsq", "simvq", "lfq"],
               262144: ["lgq", "vq", "simvq", "lfq"]}


MARKER = ".gpu_check"


class StageFailed(RuntimeError):
    """A stage of the check failed; the message names it (the original error is chained)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/gpu_check", help="folder for the runs and gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU (tests the script, not a GPU)")
    parser.add_argument("--tokenizer-steps", type=int, default=100)
    parser.add_argument("--prior-steps", type=int, default=20)
    parser.add_argument("--extract-images", type=int, default=1024)
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--inception-weights", default=None, help="inception-v3-compat .pth (default: download)")
    args = parser.parse_args(argv)
    for name in ("tokenizer_steps", "prior_steps", "extract_images", "fid_samples"):
        if getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be >= 2")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes and config overrides of every stage: the ImageNet recipes on a GPU, tiny ones for --dry-run."""
    if not args.dry_run:
        return {
            "image_size": 256, "num_classes": 1000, "tokenizer_configs": TOKENIZER_CONFIGS,
            "tokenizer_overrides": [f"train.max_steps={args.tokenizer_steps}",
                                    f"loss.gan_start_step={args.tokenizer_steps // 2}"],
            "prior_overrides": [], "num_workers": 2, "sample_batch": 16, "fid_batch": 100, "inference_steps": 12,
            "bench": {"N": 16384, "dim": 64, "sizes": BENCH_SIZES, "repeats": 3},
        }
    tiny = ["model.base_channels=8", "model.channel_multipliers=[1,2,2]", "model.num_res_blocks=1",
            "model.latent_dim=4", "model.codebook_size=64", "model.attention_resolutions=none",
            "loss.perceptual_weight=0", "loss.disc_channels=8", "train.batch_size=4",
            "eval.quantizer_init_batches=1", "eval.num_val_images=4"]
    tiny_prior = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=null",
                  "model.codebook_size=64", "model.grid_size=8", "model.num_classes=4", "train.batch_size=4",
                  "sample.num_images=2"]
    return {
        "image_size": 32, "num_classes": 4, "tokenizer_configs": [ROOT / "configs" / "tokenizer" / "tiny.yaml"],
        "tokenizer_overrides": tiny + [f"train.max_steps={args.tokenizer_steps}", "loss.gan_start_step=1"],
        "prior_overrides": tiny_prior, "num_workers": 0, "sample_batch": 2, "fid_batch": 4, "inference_steps": 2,
        "bench": {"N": 256, "dim": 8, "sizes": {64: ["lgq"], 256: ["lfq"]}, "repeats": 1},
    }


def common_train_overrides(output_dir: Path, steps: int, num_workers: int) -> list[str]:
    return [f"train.output_dir={output_dir}", f"train.max_steps={steps}", "train.expected_num_processes=1",
            "train.mixed_precision=bf16", "train.tracker=none", "train.progress_bar=false",
            f"train.num_workers={num_workers}",
            f"train.log_every={max(1, steps // 4)}", "train.image_log_every=0", f"train.checkpoint_every={steps}",
            "train.warmup_steps=1"]


# ----------------------------------------------------------------------------- the stages
def stage_tokenizer(args, cfg, out: Path) -> dict[str, Any]:
    from tokenizer.train import main  # lazy: each stage imports what it runs (several entry points are named main)

    steps = args.tokenizer_steps
    configs = [item for path in cfg["tokenizer_configs"] for item in ("--config", str(path))]
    trainer = main([*configs, "data.name=synthetic", f"data.image_size={cfg['image_size']}",
                    f"data.num_images={steps * 32}", f"data.num_classes={cfg['num_classes']}",
                    *common_train_overrides(out / "tokenizer_run", steps, cfg["num_workers"]), *cfg["tokenizer_overrides"]])
    history = dict(trainer.history)
    check_finite("tokenizer", history)
    return {"steps": steps, "images": steps * trainer.images_per_step, "export": str(trainer.output_dir / "tokenizer")}


def stage_extract(args, cfg, out: Path, tokenizer: str) -> dict[str, Any]:
    from prior.extract import main  # lazy: each stage imports what it runs (several entry points are named main)

    meta = main(["--tokenizer", tokenizer, "--output", str(out / "tokens"), "--batch-size", "64",
                 "--chunk-size", "256", "--data.name", "synthetic", "--data.image_size", str(cfg["image_size"]),
                 "--data.num_images", str(args.extract_images), "--data.num_classes", str(cfg["num_classes"])])
    return {"images": meta["num_images"], "tokens": str(out / "tokens")}


def stage_prior(args, cfg, out: Path, name: str, tokens: str) -> dict[str, Any]:
    from prior.train import main  # lazy: each stage imports what it runs (several entry points are named main)

    steps = args.prior_steps
    overrides = [*common_train_overrides(out / f"{name}_run", steps, cfg["num_workers"]), f"data.tokens={tokens}",
                 *cfg["prior_overrides"]]
    trainer = main(["--config", str(PRIOR_CONFIGS[name]), *overrides])
    check_finite(name, dict(trainer.history))
    return {"steps": steps, "images": steps * trainer.images_per_step, "export": str(trainer.output_dir / "prior")}


def stage_sample(cfg, out: Path, name: str, tokenizer: str, prior: str, device: torch.device) -> dict[str, Any]:
    from pipelines.assemble import main as assemble  # lazy: each stage imports what it runs (several entry points are named main)
    from pipelines.pipeline_lgq import LGQPipeline  # lazy: each stage imports what it runs (several entry points are named main)

    folder = assemble(["--tokenizer", tokenizer, "--prior", prior, "--output", str(out / f"pipeline_{name}")])
    pipeline = LGQPipeline.from_pretrained(folder).to(device)
    pipeline.set_progress_bar_config(disable=True)
    labels = [i % cfg["num_classes"] for i in range(cfg["sample_batch"])]
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        images = pipeline(labels, num_inference_steps=cfg["inference_steps"], guidance_scale=3.0,
                          generator=generator, output_type="pt").images
    if not torch.isfinite(images).all():
        raise StageFailed(f"sample_{name}: non-finite images")
    return {"images": len(labels), "pipeline": str(folder)}


def stage_gen_fid(args, cfg, out: Path, pipeline: str) -> dict[str, Any]:
    from eval.gen_fid import main  # lazy: each stage imports what it runs (several entry points are named main)

    argv = ["--pipeline", pipeline, "--num-samples", str(args.fid_samples), "--batch-size", str(cfg["fid_batch"]),
            "--num-inference-steps", str(cfg["inference_steps"]), "--guidance-scale", "3.0",
            "--reference", "synthetic:val", "--data.num_val_images", str(args.fid_samples),
            "--data.num_classes", str(cfg["num_classes"]), "--output", str(out / "gen_fid.json"),
            "--expected-num-processes", "1"]
    if args.inception_weights:
        argv += ["--inception-weights", args.inception_weights]
    result = main(argv)
    if result["fid"] is None and not args.dry_run:
        raise StageFailed(f"gen_fid: no FID computed: {result['notes']}")
    return {"images": args.fid_samples, "fid": result["fid"]}


def stage_quantizers(cfg, out: Path, device: torch.device) -> dict[str, Any]:
    from experiments.bench_quantizers import parse_args as bench_args, run_configuration  # lazy: each stage imports what it runs (several entry points are named main)

    bench = cfg["bench"]
    rows = []
    for codebook_size, names in bench["sizes"].items():
        options = bench_args(["--N", str(bench["N"]), "--dim", str(bench["dim"]), "--device", device.type,
                              "--repeats", str(bench["repeats"]), "--K", str(codebook_size)])
        for name in names:
            row = run_configuration(name, options, codebook_size)
            rows.append(row)
            if row.get("status") != "ok":
                raise StageFailed(f"quantizers: {name} K={codebook_size}: {row.get('status')}")
    (out / "bench_quantizers.json").write_text(json.dumps(rows, indent=1))
    return {"rows": rows, "peak_bytes": max(row["peak_bytes"] for row in rows)}


def check_finite(stage: str, history: dict[int, dict[str, float]]) -> None:

    bad = {(step, k): v for step, row in history.items() for k, v in row.items() if not math.isfinite(v)}
    if bad or not history:
        raise StageFailed(f"{stage}: {'no logged steps' if not history else f'non-finite logged values {bad}'}")


# ----------------------------------------------------------------------------- running and reporting
def run_stage(name: str, function: Callable[[], dict[str, Any]], device: torch.device, rows: list[dict]) -> dict:
    print(f"[gpu_check] {name} ...", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        result = function()
    except Exception as err:
        raise StageFailed(f"gpu_check stage {name!r} failed: {type(err).__name__}: {err}") from err
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = result.pop("peak_bytes", None)
    if peak is None and device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    row = {"stage": name, "seconds": round(seconds, 2), "peak_gpu_mib": None if peak is None else round(peak / 2**20),
           **{k: v for k, v in result.items() if k != "rows"}}
    if "steps" in result:
        row["s_per_step"] = round(seconds / result["steps"], 4)
    if "images" in result:
        row["images_per_s"] = round(result["images"] / seconds, 2)
    rows.append(row)
    if "rows" in result:
        row["bench"] = [{k: r.get(k) for k in ("quantizer", "K", "N", "seconds", "peak_bytes")} for r in result["rows"]]
    print(f"[gpu_check] {name}: {seconds:.1f} s", flush=True)
    return result


def table(rows: list[dict]) -> str:
    def cell(value, digits=2):
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    lines = ["| stage | steps | images | s/step | img/s | peak MiB | wall s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {cell(row.get('steps'))} | {cell(row.get('images'))} | "
                     f"{cell(row.get('s_per_step'), 3)} | {cell(row.get('images_per_s'), 1)} | "
                     f"{cell(row.get('peak_gpu_mib'))} | {cell(row['seconds'], 1)} |")
        for bench in row.get("bench", []):
            lines.append(f"| &nbsp; {bench['quantizer']} K={bench['K']} (N={bench['N']}) | 1 | - | "
                         f"{cell(bench['seconds'], 3)} | - | {round(bench['peak_bytes'] / 2**20)} | - |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "python": platform.python_version(), "host": platform.node()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU, and torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine, "
                         "or use --dry-run for the tiny CPU version of the same stages.")
    os.environ.setdefault("WANDB_MODE", "offline")
    device = torch.device("cuda" if not args.dry_run else "cpu")
    if args.dry_run:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    cfg = settings(args)
    out = Path(args.output)
    if out.exists():  # a fresh check every time (the runs refuse existing checkpoints); never delete other folders
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise SystemExit(f"--output {out} exists and was not written by gpu_check: choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by scripts/gpu_check.py; deleted and rewritten by its next run\n")
    rows: list[dict] = []
    started = time.perf_counter()
    tokenizer = run_stage("tokenizer", lambda: stage_tokenizer(args, cfg, out), device, rows)["export"]
    tokens = run_stage("extract", lambda: stage_extract(args, cfg, out, tokenizer), device, rows)["tokens"]
    priors = {name: run_stage(name, lambda name=name: stage_prior(args, cfg, out, name, tokens), device, rows)["export"]
              for name in PRIOR_CONFIGS}
    pipelines = {name: run_stage(f"sample_{name}", lambda name=name: stage_sample(cfg, out, name, tokenizer,
                                                                                 priors[name], device), device, rows)
                 ["pipeline"] for name in PRIOR_CONFIGS}
    run_stage("gen_fid", lambda: stage_gen_fid(args, cfg, out, pipelines["maskgit_b"]), device, rows)
    run_stage("quantizers", lambda: stage_quantizers(cfg, out, device), device, rows)
    report = {"dry_run": args.dry_run, "total_seconds": round(time.perf_counter() - started, 1),
              "environment": environment(device), "stages": rows}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"\nGPU check on {report['environment'].get('gpu', device)} ({'dry run, ' if args.dry_run else ''}"
          f"total {report['total_seconds']} s; bf16 autocast, quantizer fp32)\n")
    print(table(rows))
    print(f"\nwritten to {out / 'gpu_check.json'}")
    return report


if __name__ == "__main__":
    main()
