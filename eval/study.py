"""Equal-budget quantizer study: one command sweeps quantizer x codebook size K x seed.

    python -m eval.study [--config configs/study/builtin.yaml] [--quick] [--output-dir outputs/study]
        [--quantizers lgq fsq simvq vq lfq] [--K 1024 4096] [--seeds 0] [--launcher inprocess|accelerate]
        [--dry-run] [--no-memory] [key=value ...]

Every run uses the IDENTICAL backbone, loss, recipe, data, step budget and training seed; only
``model.quantizer``, ``model.codebook_size`` and ``train.seed`` change (plus ``train.output_dir``).
Trailing ``key=value`` overrides go to every run (e.g. ``train.max_steps=500``).

Study config (YAML, see configs/study/*.yaml):
    tokenizer_configs: [base recipe files, merged in order]
    quantizer_config:  optional per-quantizer file, "{quantizer}" is substituted
                       (ImageNet: configs/tokenizer/imagenet_{quantizer}.yaml)
    quantizers / codebook_sizes / seeds: the sweep
    overrides: [key=value for every run]      launcher: inprocess | accelerate
    accelerate_args: [extra `accelerate launch` arguments]
    evaluation: {split, num_images, batch_size, inception_weights}
    measure_memory: true                      quick: {quantizers, codebook_sizes, seeds, overrides}

The training seed ``train.seed`` (initialisation, batch order) is swept; the data (``data.seed``: builtin
crop boxes, synthetic images) stays that of the recipe, so every run sees the same images.

Per run ``<output-dir>/runs/<quantizer>_K<K>_s<seed>/``: the trainer's folder (checkpoints, config.yaml,
``tokenizer/`` export, ``history.jsonl``: the logged values, written by the trainer under either launcher),
``train_record.json`` (training wall time, resumed or not), ``code_counts.json`` (evaluation bincount) and
``result.json``. A run whose export and result.json exist is reused; a run with checkpoints but no export
is resumed with ``--resume latest``. Invalid combinations (FSQ without a levels table entry for K, LFQ
with K not a power of two) are skipped with the reason printed.

Figures per run (eval.reconstruction on the evaluation split): rFID (when Inception weights exist),
PSNR, SSIM, codebook statistics from one bincount c over the evaluation set: active codes
A = #{k: c_k > 0}, utilisation A / K, perplexity exp(H(c / sum c)), bits per token = log2 perplexity,
log2 A; training throughput = median images/s over the logged windows (the first window, which holds
start-up, is dropped when there are several); quantizer peak memory = the most tensor memory one
forward+backward step of the quantizer alone holds at once, on N = batch_size x tokens_per_image tokens
of dimension latent_dim (eval.bench_quantizers: allocator events on CPU, max_memory_allocated on CUDA).

Outputs in ``<output-dir>``: results.json / results.csv / results.md (one row per run) and plots/*.png
(rate-distortion, utilisation vs K, sorted code-usage histograms, training curves).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Sequence

DEFAULT_CONFIG = "configs/study/builtin.yaml"
LAUNCHERS = ("inprocess", "accelerate")
STUDY_KEYS = {"tokenizer_configs", "quantizer_config", "quantizers", "codebook_sizes", "seeds", "overrides",
              "launcher", "accelerate_args", "evaluation", "measure_memory", "quick", "output_dir"}
EVALUATION_KEYS = {"split", "num_images", "batch_size", "inception_weights"}
TABLE_COLUMNS = ("run", "quantizer", "K", "seed", "steps", "psnr", "ssim", "rfid", "active_codes", "utilisation",
                 "perplexity", "bits_per_token", "log2_active_codes", "images_per_sec", "quantizer_peak_mib",
                 "final_loss", "train_seconds")


# ----------------------------------------------------------------------------- study config
@dataclasses.dataclass
class StudyConfig:
    tokenizer_configs: list[str]
    quantizer_config: str | None = None
    quantizers: list[str] = dataclasses.field(default_factory=lambda: ["lgq", "fsq", "simvq", "vq", "lfq"])
    codebook_sizes: list[int] = dataclasses.field(default_factory=lambda: [1024, 4096])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    overrides: list[str] = dataclasses.field(default_factory=list)
    launcher: str = "inprocess"
    accelerate_args: list[str] = dataclasses.field(default_factory=list)
    evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)
    measure_memory: bool = True
    quick: dict[str, Any] = dataclasses.field(default_factory=dict)
    output_dir: str = "outputs/study"


def load_study_config(path: str | os.PathLike) -> StudyConfig:
    """Read a study YAML; unknown keys and wrong types raise ValueError naming them."""
    from omegaconf import OmegaConf

    from lgq.cli import resolve_config_path

    path = resolve_config_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {str(path)!r} does not exist")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"study config {path} must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise ValueError(f"study config {path}: unknown keys {sorted(unknown)} (allowed: {sorted(STUDY_KEYS)})")
    if not raw.get("tokenizer_configs"):
        raise ValueError(f"study config {path}: tokenizer_configs (list of tokenizer recipe YAMLs) is required")
    cfg = StudyConfig(**raw)
    for key in ("tokenizer_configs", "quantizers", "codebook_sizes", "seeds", "overrides", "accelerate_args"):
        if not isinstance(getattr(cfg, key), list):
            raise ValueError(f"study config {path}: {key} must be a list, got {getattr(cfg, key)!r}")
    if cfg.launcher not in LAUNCHERS:
        raise ValueError(f"study config {path}: launcher must be one of {LAUNCHERS}, got {cfg.launcher!r}")
    bad_eval = set(cfg.evaluation) - EVALUATION_KEYS
    if bad_eval:
        raise ValueError(f"study config {path}: unknown evaluation keys {sorted(bad_eval)} "
                         f"(allowed: {sorted(EVALUATION_KEYS)})")
    bad_quick = set(cfg.quick) - {"quantizers", "codebook_sizes", "seeds", "overrides"}
    if bad_quick:
        raise ValueError(f"study config {path}: unknown quick keys {sorted(bad_quick)}")
    return cfg


# ----------------------------------------------------------------------------- the run plan
@dataclasses.dataclass
class RunSpec:
    quantizer: str
    codebook_size: int
    seed: int
    run_dir: Path
    config_files: list[str]
    overrides: list[str]  # every override of this run (study + CLI + the swept keys + output_dir)

    @property
    def name(self) -> str:
        return run_name(self.quantizer, self.codebook_size, self.seed)

    def train_argv(self, resume: bool) -> list[str]:
        """Arguments of tokenizer/train.py for this run."""
        argv = [item for path in self.config_files for item in ("--config", path)]
        if resume:
            argv += ["--resume", "latest"]
        return argv + list(self.overrides)


def run_name(quantizer: str, codebook_size: int, seed: int) -> str:
    return f"{quantizer}_K{codebook_size}_s{seed}"


def config_files_for(study: StudyConfig, quantizer: str) -> list[str]:
    from lgq.cli import resolve_config_path

    files = list(study.tokenizer_configs)
    if study.quantizer_config:
        files.append(study.quantizer_config.format(quantizer=quantizer))
    files = [str(resolve_config_path(path)) for path in files]
    for path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer config {path!r} (quantizer {quantizer}) does not exist")
    return files


def load_run_config(spec: RunSpec):
    """The merged TokenizerRunConfig of one run (raises on typos / invalid values)."""
    from lgq.config import load_config
    from tokenizer.config import TokenizerRunConfig

    return load_config(TokenizerRunConfig, spec.config_files, spec.overrides)


def combination_problem(run_cfg) -> str | None:
    """Why this quantizer cannot take this K (None if it can): builds the quantizer once to ask it."""
    from tokenizer.quantizers import build_quantizer

    model = run_cfg.model
    try:
        build_quantizer(model.quantizer, model.latent_dim, model.codebook_size, **dict(model.quantizer_options or {}))
    except ValueError as err:
        return str(err).splitlines()[0]
    return None


def plan_runs(study: StudyConfig, output_dir: Path, quantizers: Sequence[str], codebook_sizes: Sequence[int],
              seeds: Sequence[int], extra_overrides: Sequence[str] = ()) -> tuple[list[RunSpec], list[tuple[str, str]]]:
    """(runs to do, [(run name, reason skipped)]) for the cross product quantizer x K x seed."""
    from tokenizer.quantizers import QUANTIZERS

    for name in quantizers:
        if name not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {name!r}; choose from {sorted(QUANTIZERS)}")
    for K in codebook_sizes:
        if isinstance(K, bool) or not isinstance(K, int) or K < 2:
            raise ValueError(f"codebook sizes must be integers >= 2, got {K!r}")
    runs, skipped = [], []
    for quantizer in quantizers:
        files = config_files_for(study, quantizer)
        for K in codebook_sizes:
            for seed in seeds:
                run_dir = output_dir / "runs" / run_name(quantizer, K, seed)
                overrides = [*study.overrides, *extra_overrides, f"model.quantizer={quantizer}",
                             f"model.codebook_size={K}", f"train.seed={seed}", f"train.output_dir={run_dir}"]
                spec = RunSpec(quantizer, int(K), int(seed), run_dir, files, overrides)
                problem = combination_problem(load_run_config(spec))
                if problem is not None:
                    skipped.append((spec.name, problem))
                else:
                    runs.append(spec)
    return runs, skipped


# ----------------------------------------------------------------------------- one run
def has_checkpoints(run_dir: Path) -> bool:
    from lgq.training import list_checkpoints

    return bool(list_checkpoints(run_dir / "checkpoints"))


def train_script_path() -> str:
    """tokenizer/train.py, relative to the working directory when it lies below it (readable commands)."""
    script = Path(__file__).resolve().parents[1] / "tokenizer" / "train.py"
    try:
        return str(script.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(script)


def accelerate_command(spec: RunSpec, accelerate_args: Sequence[str], resume: bool) -> list[str]:
    """``accelerate launch [args] tokenizer/train.py --config ... [--resume latest] key=value ...``, spelled
    ``<this python> -m accelerate.commands.launch`` so that it runs in this environment whatever PATH says."""
    return [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args, train_script_path(),
            *spec.train_argv(resume)]


def train_run(spec: RunSpec, launcher: str, accelerate_args: Sequence[str] = (), dry_run: bool = False) -> dict:
    """Train (or resume) one run; writes and returns its train_record.json {"train_seconds", "resumed"}.

    The logged values stay in the run's ``history.jsonl`` (written by the Trainer's main process under either
    launcher; a resumed run's file covers the whole run, see ``lgq.training.truncate_history``)."""
    resume = has_checkpoints(spec.run_dir)
    start = time.time()
    if launcher == "accelerate":
        cmd = accelerate_command(spec, accelerate_args, resume)
        print("$ " + shlex.join(cmd), flush=True)
        if dry_run:
            return {"train_seconds": None, "resumed": resume}
        subprocess.run(cmd, check=True)
    else:
        from tokenizer.train import main as train_main

        print(f"[study] training {spec.name}" + (" (resuming from its latest checkpoint)" if resume else ""),
              flush=True)
        if dry_run:
            return {"train_seconds": None, "resumed": resume}
        train_main(spec.train_argv(resume))
    record = {"train_seconds": time.time() - start, "resumed": resume}
    write_json(spec.run_dir / "train_record.json", record)
    return record


def training_summary(history: list[dict] | None) -> dict[str, Any]:
    """Throughput (median images/s, first window dropped if several) and the last logged loss terms."""
    if not history:
        return {"images_per_sec": None, "final_losses": {}, "logged_steps": 0}
    speeds = [row["images_per_sec"] for row in history if "images_per_sec" in row]
    if len(speeds) > 1:
        speeds = speeds[1:]
    last = history[-1]
    losses = {k: v for k, v in last.items() if k == "loss" or k.startswith("loss/") or k.startswith("loss_")}
    return {"images_per_sec": statistics.median(speeds) if speeds else None, "final_losses": losses,
            "logged_steps": len(history)}


def quantizer_peak_memory(quantizer: str, codebook_size: int, num_tokens: int, dim: int) -> dict[str, Any]:
    """Peak memory of one quantizer forward+backward step (eval.bench_quantizers, fresh subprocess)."""
    import torch

    from eval.bench_quantizers import run_configuration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = types.SimpleNamespace(N=int(num_tokens), dim=int(dim), device=device, repeats=1, timeout=600)
    row = run_configuration(quantizer, args, int(codebook_size))
    return {"peak_bytes": row.get("peak_bytes"), "step_seconds": row.get("seconds"), "status": row.get("status"),
            "num_tokens": int(num_tokens), "dim": int(dim), "device": device,
            "protocol": "eval.bench_quantizers: one warm-up + 1 timed step, default quantizer options"}


def evaluate_run(spec: RunSpec, run_cfg, evaluation: dict[str, Any]) -> dict[str, Any]:
    """eval.reconstruction on the run's export; writes code_counts.json, returns the metrics dict."""
    import torch

    from eval.fid import inception_weights_available
    from eval.reconstruction import evaluate_reconstruction
    from lgq.data import build_image_dataset
    from tokenizer.model import LGQTokenizer

    tokenizer = LGQTokenizer.from_pretrained(str(spec.run_dir / "tokenizer"))
    dataset = build_image_dataset(run_cfg.data, split=evaluation.get("split", "val"))
    weights = evaluation.get("inception_weights")
    compute_fid = inception_weights_available(weights, allow_download=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = evaluate_reconstruction(
        tokenizer, dataset, num_images=evaluation.get("num_images"), batch_size=int(evaluation.get("batch_size", 32)),
        inception_weights=weights, compute_fid=compute_fid, allow_download=False, device=device,
        return_code_counts=True)
    if not compute_fid:
        metrics["notes"] = [n for n in metrics["notes"] if not n.startswith("rFID")] + [
            "rFID not computed: Inception weights unavailable (see eval/fid.py for how to provide them)"]
    write_json(spec.run_dir / "code_counts.json", {"codebook_size": spec.codebook_size,
                                                   "counts": metrics.pop("code_counts")})
    return metrics


def _comparable(config: dict) -> dict:
    """A run config without the keys that may differ between invocations of the same run."""
    config = json.loads(json.dumps(config))
    for key in ("resume", "progress_bar"):
        config.get("train", {}).pop(key, None)
    return config


def check_same_recipe(spec: RunSpec, run_cfg) -> None:
    """Refuse to reuse or resume a run folder that was made with a different recipe (ValueError)."""
    from omegaconf import OmegaConf

    current = _comparable(_config_dict(run_cfg))
    result_path, saved_path = spec.run_dir / "result.json", spec.run_dir / "config.yaml"
    if result_path.is_file():
        previous = json.loads(result_path.read_text()).get("config")
    elif saved_path.is_file():
        previous = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    else:
        return
    previous = _comparable(previous or {})
    if previous != current:
        changed = sorted(f"{section}.{key}" for section in set(current) | set(previous)
                         for key in set(current.get(section, {})) | set(previous.get(section, {}))
                         if current.get(section, {}).get(key) != previous.get(section, {}).get(key))
        raise ValueError(f"{spec.run_dir} holds run {spec.name} with a different recipe (changed: {changed}); "
                         f"choose another --output-dir or delete that folder")


def run_one(spec: RunSpec, study: StudyConfig, launcher: str, measure_memory: bool, dry_run: bool = False) -> dict | None:
    """Reuse, resume or train one run, then evaluate it; returns its result dict (None on a dry run)."""
    result_path = spec.run_dir / "result.json"
    export = spec.run_dir / "tokenizer"
    run_cfg = load_run_config(spec)
    check_same_recipe(spec, run_cfg)
    if result_path.is_file() and export.is_dir():
        print(f"[study] reusing finished run {spec.name} ({result_path})", flush=True)
        return json.loads(result_path.read_text())
    record_path = spec.run_dir / "train_record.json"
    if export.is_dir() and record_path.is_file():
        print(f"[study] {spec.name}: export exists, evaluating only", flush=True)
        record = json.loads(record_path.read_text())
    else:
        record = train_run(spec, launcher, study.accelerate_args, dry_run=dry_run)
        if dry_run:
            return None
    metrics = evaluate_run(spec, run_cfg, study.evaluation)
    codebook = metrics["codebook"]
    tokens_per_image = metrics["protocol"]["tokens_per_image"]
    memory = None
    if measure_memory:
        memory = quantizer_peak_memory(spec.quantizer, spec.codebook_size,
                                       run_cfg.train.batch_size * tokens_per_image, run_cfg.model.latent_dim)
    from lgq.training import read_history

    history = read_history(spec.run_dir)
    summary = training_summary(history)
    notes = list(metrics.get("notes", []))
    if not history:
        notes.append(f"no training history in {spec.run_dir / 'history.jsonl'}: throughput and final losses are null")
    if record.get("resumed"):
        notes.append("run was resumed from a checkpoint: train_seconds covers the resumed part only")
    result = {
        "run": spec.name, "quantizer": spec.quantizer, "K": spec.codebook_size, "seed": spec.seed,
        "steps": run_cfg.train.max_steps, "batch_size": run_cfg.train.batch_size,
        "rfid": metrics["rfid"], "psnr": metrics["psnr"], "ssim": metrics["ssim"], "lpips": metrics["lpips"],
        "active_codes": codebook["active_codes"], "utilisation": codebook["utilisation"],
        "perplexity": codebook["perplexity"], "bits_per_token": codebook["bits_per_token"],
        "log2_active_codes": codebook["log2_active_codes"], "bits_per_image": codebook.get("bits_per_image"),
        "effective_rate": {"log2_active_codes": codebook["log2_active_codes"],
                           "log2_perplexity": codebook["bits_per_token"]},
        "images_per_sec": summary["images_per_sec"], "final_losses": summary["final_losses"],
        "final_loss": summary["final_losses"].get("loss"),
        "train_seconds": record.get("train_seconds"),
        "torch_threads": _torch_threads(),
        "quantizer_memory": memory,
        "quantizer_peak_mib": (memory["peak_bytes"] / 2**20) if memory and memory["peak_bytes"] is not None else None,
        "evaluation": metrics["protocol"], "notes": notes,
        "config": _config_dict(run_cfg),
        "train_argv": spec.train_argv(False),
    }
    write_json(result_path, result)
    print(f"[study] {spec.name}: PSNR {result['psnr']:.2f} dB, active {result['active_codes']}/{spec.codebook_size}, "
          f"perplexity {result['perplexity']:.1f}", flush=True)
    return result


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _config_dict(run_cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(run_cfg), resolve=True)


# ----------------------------------------------------------------------------- merged outputs
def write_json(path: str | os.PathLike, payload: Any) -> Path:
    from eval.reconstruction import write_json as atomic_write_json

    return atomic_write_json(path, payload)


def table_rows(results: Sequence[dict]) -> list[dict]:
    return [{column: result.get(column) for column in TABLE_COLUMNS} for result in results]


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    header = ["quantizer", "K", "seed", "steps", "PSNR dB", "SSIM", "rFID", "active", "util.", "perplexity",
              "bits/token", "log2 active", "img/s", "quant. peak MiB", "final loss", "train s"]
    keys = ["quantizer", "K", "seed", "steps", "psnr", "ssim", "rfid", "active_codes", "utilisation", "perplexity",
            "bits_per_token", "log2_active_codes", "images_per_sec", "quantizer_peak_mib", "final_loss",
            "train_seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def write_merged(results: Sequence[dict], output_dir: Path, skipped: Sequence[tuple[str, str]] = ()) -> dict[str, Path]:
    """results.json (full per-run dicts), results.csv and results.md (one row per run)."""
    rows = table_rows(results)
    paths = {"json": write_json(output_dir / "results.json",
                                {"runs": list(results), "skipped": [{"run": n, "reason": r} for n, r in skipped]})}
    csv_path = output_dir / "results.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(TABLE_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    paths["csv"] = csv_path
    text = markdown_table(rows)
    if skipped:
        text += "\n\nSkipped:\n" + "\n".join(f"- {name}: {reason}" for name, reason in skipped)
    md_path = output_dir / "results.md"
    md_path.write_text(text + "\n")
    paths["md"] = md_path
    return paths


# ----------------------------------------------------------------------------- plots
def make_plots(results: Sequence[dict], output_dir: Path) -> list[Path]:
    """PNG figures in <output_dir>/plots (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lgq.training import read_history

    plot_dir = output_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    quantizers = sorted({r["quantizer"] for r in results})
    colours = {q: plt.cm.tab10(i % 10) for i, q in enumerate(quantizers)}
    paths = []

    def scatter(ax, x_key, y_key, log_x=False):
        for q in quantizers:
            points = [(r[x_key], r[y_key]) for r in results if r["quantizer"] == q
                      and r.get(x_key) is not None and r.get(y_key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, color=colours[q], label=q)
                for r in results:
                    if r["quantizer"] == q and r.get(x_key) is not None and r.get(y_key) is not None:
                        ax.annotate(f"K{r['K']}", (r[x_key], r[y_key]), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")
        if log_x:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)

    distortions = [("psnr", "PSNR (dB, higher is better)")]
    if any(r.get("rfid") is not None for r in results):
        distortions.append(("rfid", "rFID (lower is better)"))
    fig, axes = plt.subplots(len(distortions), 2, figsize=(10, 4 * len(distortions)), squeeze=False)
    for row, (key, label) in enumerate(distortions):
        scatter(axes[row][0], "active_codes", key, log_x=True)
        axes[row][0].set_xlabel("active codes (log2 axis)")
        axes[row][0].set_ylabel(label)
        scatter(axes[row][1], "bits_per_token", key)
        axes[row][1].set_xlabel("bits per token = log2 perplexity")
        axes[row][1].set_ylabel(label)
    axes[0][0].legend()
    fig.suptitle("Rate-distortion (evaluation set)")
    fig.tight_layout()
    paths.append(_save(fig, plot_dir / "rate_distortion.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for q in quantizers:
        points = sorted((r["K"], r["utilisation"]) for r in results if r["quantizer"] == q)
        ax.plot(*zip(*points), marker="o", color=colours[q], label=q)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size K")
    ax.set_ylabel("utilisation = active / K")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, plot_dir / "utilisation_vs_K.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        counts_path = Path(r.get("run_dir", "")) / "code_counts.json"
        if not counts_path.is_file():
            continue
        counts = sorted(json.loads(counts_path.read_text())["counts"], reverse=True)
        total = max(sum(counts), 1)
        frequencies = [c / total for c in counts if c > 0]
        ax.plot(range(1, len(frequencies) + 1), frequencies, color=colours[r["quantizer"]], alpha=0.8,
                label=r["run"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (used codes, sorted by frequency)")
    ax.set_ylabel("frequency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, plot_dir / "code_usage.png"))

    # the total loss holds each quantizer's own terms (LFQ's entropy term is negative): not comparable, so plot
    # the pixel reconstruction error and the training-batch perplexity, which mean the same for every quantizer
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = (("l2", "pixel MSE on training batches"), ("codebook/perplexity", "code perplexity on training batches"))
    for r in results:
        history = read_history(r.get("run_dir", ""))
        for ax, (key, _) in zip(axes, curves):
            points = [(row["step"], row[key]) for row in history if key in row]
            if points:
                ax.plot(*zip(*points), color=colours[r["quantizer"]], alpha=0.8, label=r["run"])
    for ax, (_, label) in zip(axes, curves):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, plot_dir / "training_curves.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from lgq.cli import config_help
    from tokenizer.config import TokenizerRunConfig

    parser = argparse.ArgumentParser(prog="python -m eval.study", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__ + "\n" + config_help(TokenizerRunConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="study YAML (configs/study/*.yaml)")
    parser.add_argument("--quick", action="store_true", help="the config's quick slice (few quantizers, one K, few steps)")
    parser.add_argument("--output-dir", default=None, help="default: the config's output_dir (+ '_quick' with --quick)")
    parser.add_argument("--quantizers", nargs="+", default=None)
    parser.add_argument("--K", type=int, nargs="+", default=None, help="codebook sizes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None,
                        help="inprocess (CPU default) or accelerate (one `accelerate launch` subprocess per run)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan / commands, train nothing")
    parser.add_argument("--no-memory", action="store_true", help="skip the quantizer peak-memory measurement")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for in-process runs (default: torch's choice); 1 is much faster "
                             "than 2 on a machine whose cores are busy with other work")
    from lgq.cli import parse_command_line
    from tokenizer.config import TokenizerRunConfig

    # tokenizer config keys for every run: key=value or --key value (lgq.cli style; --help lists them)
    args, args.overrides = parse_command_line(parser, argv, TokenizerRunConfig)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    study = load_study_config(args.config)
    quick = study.quick if args.quick else {}
    quantizers = args.quantizers or quick.get("quantizers") or study.quantizers
    codebook_sizes = args.K or quick.get("codebook_sizes") or study.codebook_sizes
    seeds = args.seeds if args.seeds is not None else (quick.get("seeds") or study.seeds)
    launcher = args.launcher or study.launcher
    output_dir = Path(args.output_dir or (study.output_dir + ("_quick" if args.quick else "")))
    extra = [*quick.get("overrides", []), *args.overrides]

    runs, skipped = plan_runs(study, output_dir, quantizers, codebook_sizes, seeds, extra)
    for name, reason in skipped:
        print(f"[study] skipping {name}: {reason}", flush=True)
    print(f"[study] {len(runs)} run(s) into {output_dir}: " + ", ".join(r.name for r in runs), flush=True)
    if not runs:
        raise ValueError("no valid quantizer x K combination to run (see the skip reasons above)")

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    results = []
    start = time.time()
    for spec in runs:
        result = run_one(spec, study, launcher, study.measure_memory and not args.no_memory, dry_run=args.dry_run)
        if result is not None:
            result["run_dir"] = str(spec.run_dir)
            results.append(result)
    if args.dry_run:
        return []
    paths = write_merged(results, output_dir, skipped)
    plots = make_plots(results, output_dir)
    print(markdown_table(table_rows(results)))
    print(f"[study] {len(results)} run(s) in {time.time() - start:.0f} s; table {paths['md']}, csv {paths['csv']}, "
          f"plots: {', '.join(str(p) for p in plots)}", flush=True)
    return results


if __name__ == "__main__":
    main()
