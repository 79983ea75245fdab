"""Equal-budget quantizer study: one command sweeps quantizer x codebook size K x seed.

    python -m experiments.study [--config configs/study/glyphs.yaml] [--quick] [--output-dir outputs/study]
        [--quantizers lgq vq fsq simvq lfq ibq] [--K 256 1024 4096] [--seeds 0 1 2]
        [--launcher inprocess|accelerate] [--dry-run] [--no-memory] [key=value ...]

Every run uses the IDENTICAL backbone (including the pre-quantizer norm, ``model.pre_quantizer_norm``), loss,
recipe, data and step budget; only ``model.quantizer``, ``model.codebook_size`` and ``train.seed`` change (plus
``train.output_dir``). Trailing ``key=value`` overrides go to every run (e.g. ``train.max_steps=500``).

Study config (YAML, see configs/study/*.yaml):
    tokenizer_configs: [base recipe files, merged in order]
    quantizer_config:  optional per-quantizer file, "{quantizer}" is substituted
                       (ImageNet: configs/tokenizer/imagenet_{quantizer}.yaml)
    quantizers / codebook_sizes / seeds: the sweep (default: 6 quantizers x K in {256, 1024, 4096} x seeds {0, 1, 2})
    collapse_fraction: a run has collapsed when its training-batch hard perplexity or active codes end
                       below this fraction of K (0.01; see ``detect_collapse``)
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
of dimension latent_dim (experiments.bench_quantizers: allocator events on CPU, max_memory_allocated on CUDA);
the trivial baselines' PSNRs on the same images (``psnr_mean_colour``, ``psnr_token_grid_thumbnail``,
``psnr_equal_bits_thumbnail``; eval.reconstruction) and ``psnr_lead_over_equal_bits_db`` = PSNR minus
the equal-bits thumbnail's PSNR.

Seeds: every figure is reported per (quantizer, K) as mean and standard deviation over the finished seeds
(``aggregate_runs``: ``<metric>_mean``, ``<metric>_std`` = sample std, None with one seed), with the number of
seeds whose run collapsed.

Outputs in ``<output-dir>``: results.json ({"rows": one per (quantizer, K), "runs": one per run, "skipped",
"collapse_rule"}), results.csv (the rows), runs.csv (the runs), results.md (both tables) and plots/*.png
(rate-distortion with error bars over seeds, utilisation vs K, sorted code-usage histograms, training curves), and
per run plots/geometry/<run>/ (eval.codebook_geometry: geometry.json and codebook_geometry.png).
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

import torch
from omegaconf import OmegaConf

from common.cli import config_help, parse_command_line, resolve_config_path
from common.config import load_config
from common.data import build_image_dataset
from common.files import write_bytes_atomic, write_json
from common.training import has_checkpoints, read_history
from eval.classifier import classifier_dir, classifier_report, load_or_train_classifier
from eval.codebook_geometry import write_codebook_geometry
from eval.fid import inception_weights_available
from eval.reconstruction import evaluate_reconstruction
from experiments.bench_quantizers import run_configuration
from tokenizer.config import TokenizerRunConfig
from tokenizer.model import LGQTokenizer
from tokenizer.quantizers import QUANTIZERS, build_quantizer
from tokenizer.train import main as train_main

DEFAULT_CONFIG = "configs/study/glyphs.yaml"
LAUNCHERS = ("inprocess", "accelerate")
STUDY_KEYS = {"tokenizer_configs", "quantizer_config", "quantizers", "codebook_sizes", "seeds", "overrides",
              "launcher", "accelerate_args", "evaluation", "measure_memory", "quick", "output_dir", "collapse_fraction"}
EVALUATION_KEYS = {"split", "num_images", "batch_size", "inception_weights"}
BASELINE_COLUMNS = ("psnr_mean_colour", "psnr_token_grid_thumbnail", "psnr_equal_bits_thumbnail",
                    "psnr_lead_over_equal_bits_db")
TABLE_COLUMNS = ("run", "quantizer", "K", "seed", "steps", "psnr", *BASELINE_COLUMNS, "ssim", "rfid",
                 "classifier_accuracy", "classifier_fd", "classifier_kid_mean", "active_codes",
                 "utilisation", "perplexity", "bits_per_token", "log2_active_codes", "images_per_sec",
                 "quantizer_peak_mib", "final_loss", "train_seconds", "collapsed", "collapse_step")
# per-run fields that identify a run or are the same for every seed: not averaged
RUN_IDENTITY_KEYS = {"run", "quantizer", "K", "seed", "steps", "batch_size", "torch_threads", "run_dir"}
# nested per-run dicts that are provenance, or duplicates of top-level figures: not averaged
# (baselines: their PSNRs are the top-level psnr_<baseline> fields)
NOT_AGGREGATED = {"config", "evaluation", "quantizer_memory", "effective_rate", "notes", "train_argv", "collapse",
                  "baselines"}
# the figures of the (quantizer, K) table, as (field, header)
ROW_TABLE = (("psnr", "PSNR dB"), ("psnr_equal_bits_thumbnail", "equal-bits PSNR"),
             ("psnr_lead_over_equal_bits_db", "lead over equal-bits dB"), ("ssim", "SSIM"), ("rfid", "rFID"),
             ("classifier_accuracy", "recon. classified"), ("classifier_fd", "FD (classifier)"),
             ("classifier_kid_mean", "KID (classifier)"), ("active_codes", "active"), ("utilisation", "util."), ("perplexity", "perplexity"),
             ("bits_per_token", "bits/token"), ("images_per_sec", "img/s"), ("quantizer_peak_mib", "quant. peak MiB"),
             ("train_seconds", "train s"))
# the headline table (README): quality, the equal-bits baseline, the classifier and the codebook
# (figure, column label, number format of mean and std)
HEADLINE_TABLE = (("psnr", "PSNR dB", "{:.2f}"), ("psnr_lead_over_equal_bits_db", "lead over equal-bits dB", "{:+.2f}"),
                  ("ssim", "SSIM", "{:.3f}"), ("classifier_accuracy", "recon. classified", "{:.3f}"),
                  ("classifier_fd", "FD (classifier)", "{:.1f}"), ("active_codes", "active codes", "{:.0f}"),
                  ("bits_per_token", "bits/token", "{:.2f}"))


# ----------------------------------------------------------------------------- study config
@dataclasses.dataclass
class StudyConfig:
    tokenizer_configs: list[str]
    quantizer_config: str | None = None
    quantizers: list[str] = dataclasses.field(default_factory=lambda: ["lgq", "vq", "fsq", "simvq", "lfq", "ibq"])
    codebook_sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 1024, 4096])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = dataclasses.field(default_factory=list)
    launcher: str = "inprocess"
    accelerate_args: list[str] = dataclasses.field(default_factory=list)
    evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)
    measure_memory: bool = True
    quick: dict[str, Any] = dataclasses.field(default_factory=dict)
    output_dir: str = "outputs/study"
    collapse_fraction: float = 0.01


def load_study_config(path: str | os.PathLike) -> StudyConfig:
    """Read a study YAML; unknown keys and wrong types raise ValueError naming them."""
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
    fraction = cfg.collapse_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"study config {path}: collapse_fraction must be a number in (0, 1), got {fraction!r}")
    cfg.collapse_fraction = float(fraction)
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


def config_files_for(study: StudyConfig, quantizer: str, output_dir: Path | None = None) -> list[str]:
    """The recipe files of one quantizer's runs. A recipe written for one quantizer (``model.quantizer``) may
    carry options of that quantizer only (``model.quantizer_options``, e.g. LGQ's ``quant_loss_weight``): for
    every other quantizer the study trains from a copy without them, ``<output_dir>/recipes/<quantizer>-<name>``,
    so every other value of the recipe stays identical and each quantizer keeps its own defaults."""
    files = list(study.tokenizer_configs)
    if study.quantizer_config:
        files.append(study.quantizer_config.format(quantizer=quantizer))
    files = [str(resolve_config_path(path)) for path in files]
    for index, path in enumerate(files):
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer config {path!r} (quantizer {quantizer}) does not exist")
        recipe = OmegaConf.load(path)
        model = recipe.get("model") or {}
        if model.get("quantizer_options") and model.get("quantizer", quantizer) != quantizer and output_dir is not None:
            del recipe.model["quantizer_options"]
            copy = output_dir / "recipes" / f"{quantizer}-{Path(path).name}"
            header = f"# {path} without its {model.get('quantizer')}-only quantizer_options (experiments/study.py)\n"
            write_bytes_atomic(copy, (header + OmegaConf.to_yaml(recipe)).encode())  # parallel slices share it
            files[index] = str(copy)
    return files


def load_run_config(spec: RunSpec):
    """The merged TokenizerRunConfig of one run (raises on typos / invalid values)."""
    return load_config(TokenizerRunConfig, spec.config_files, spec.overrides)


def combination_problem(run_cfg) -> str | None:
    """Why this quantizer cannot take this K (None if it can): builds the quantizer once to ask it."""
    model = run_cfg.model
    try:
        build_quantizer(model.quantizer, model.latent_dim, model.codebook_size, **dict(model.quantizer_options or {}))
    except ValueError as err:
        return str(err).splitlines()[0]
    return None


def plan_runs(study: StudyConfig, output_dir: Path, quantizers: Sequence[str], codebook_sizes: Sequence[int],
              seeds: Sequence[int], extra_overrides: Sequence[str] = ()) -> tuple[list[RunSpec], list[tuple[str, str]]]:
    """(runs to do, [(run name, reason skipped)]) for the cross product quantizer x K x seed, seed-major (every
    (quantizer, K) at the first seed, then at the next, ...) so an interrupted sweep covers the whole grid early."""
    for name in quantizers:
        if name not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {name!r}; choose from {sorted(QUANTIZERS)}")
    for K in codebook_sizes:
        if isinstance(K, bool) or not isinstance(K, int) or K < 2:
            raise ValueError(f"codebook sizes must be integers >= 2, got {K!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seeds must be integers >= 0, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    runs, skipped = [], []
    files = {quantizer: config_files_for(study, quantizer, output_dir) for quantizer in quantizers}
    for seed in seeds:
        for quantizer in quantizers:
            for K in codebook_sizes:
                run_dir = output_dir / "runs" / run_name(quantizer, K, seed)
                overrides = [*study.overrides, *extra_overrides, f"model.quantizer={quantizer}",
                             f"model.codebook_size={K}", f"train.seed={seed}", f"train.output_dir={run_dir}"]
                spec = RunSpec(quantizer, int(K), int(seed), run_dir, files[quantizer], overrides)
                problem = combination_problem(load_run_config(spec))
                if problem is not None:
                    skipped.append((spec.name, problem))
                else:
                    runs.append(spec)
    return runs, skipped


# ----------------------------------------------------------------------------- one run
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
    launcher; a resumed run's file covers the whole run, see ``common.training.truncate_history``)."""
    resume = has_checkpoints(spec.run_dir)
    start = time.time()
    if launcher == "accelerate":
        cmd = accelerate_command(spec, accelerate_args, resume)
        print("$ " + shlex.join(cmd), flush=True)
        if dry_run:
            return {"train_seconds": None, "resumed": resume}
        subprocess.run(cmd, check=True)
    else:
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
    """Peak memory of one quantizer forward+backward step (experiments.bench_quantizers, fresh subprocess)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = types.SimpleNamespace(N=int(num_tokens), dim=int(dim), device=device, repeats=1, timeout=600)
    row = run_configuration(quantizer, args, int(codebook_size))
    return {"peak_bytes": row.get("peak_bytes"), "step_seconds": row.get("seconds"), "status": row.get("status"),
            "num_tokens": int(num_tokens), "dim": int(dim), "device": device,
            "protocol": "experiments.bench_quantizers: one warm-up + 1 timed step, default quantizer options"}


def evaluate_run(spec: RunSpec, run_cfg, evaluation: dict[str, Any]) -> dict[str, Any]:
    """eval.reconstruction on the run's export; writes code_counts.json, returns the metrics dict."""
    tokenizer = LGQTokenizer.from_pretrained(str(spec.run_dir / "tokenizer"))
    dataset = build_image_dataset(run_cfg.data, split=evaluation.get("split", "val"))
    weights = evaluation.get("inception_weights")
    compute_fid = inception_weights_available(weights, allow_download=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier = study_classifier(spec.run_dir.parent.parent, run_cfg.data, device)
    metrics = evaluate_reconstruction(
        tokenizer, dataset, num_images=evaluation.get("num_images"), batch_size=int(evaluation.get("batch_size", 32)),
        inception_weights=weights, compute_fid=compute_fid, allow_download=False, device=device,
        return_code_counts=True, return_images=classifier is not None)
    if classifier is not None:
        real_u8, recon_u8, labels = metrics.pop("images_u8"), metrics.pop("reconstructions_u8"), metrics.pop("labels")
        metrics.update(classifier_report(*classifier, recon_u8, labels, real_u8, device=device))
    if not compute_fid:
        metrics["notes"] = [n for n in metrics["notes"] if not n.startswith("rFID")] + [
            "rFID not computed: Inception weights unavailable (see eval/fid.py for how to provide them)"]
    write_json(spec.run_dir / "code_counts.json", {"codebook_size": spec.codebook_size,
                                                   "counts": metrics.pop("code_counts")})
    return metrics


def study_classifier(output_dir: Path, data_cfg, device) -> tuple | None:
    """(folder, classifier, metadata) of the study data set's classifier (eval.classifier), trained once into
    ``<output_dir>/classifier/<name>-<size>px`` and shared by every run; None for fewer than 2 classes."""
    if build_image_dataset(data_cfg, "train").num_classes < 2:
        return None
    folder = classifier_dir(output_dir / "classifier", data_cfg)
    model, metadata, _ = load_or_train_classifier(folder, data_cfg, device=device)
    return folder, model, metadata


def _comparable(config: dict) -> dict:
    """A run config without the keys that may differ between invocations of the same run."""
    config = json.loads(json.dumps(config))
    for key in ("resume", "progress_bar"):
        config.get("train", {}).pop(key, None)
    return config


def check_same_recipe(spec: RunSpec, run_cfg) -> None:
    """Refuse to reuse or resume a run folder that was made with a different recipe (ValueError)."""
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
        "baselines": metrics["baselines"],
        **{f"psnr_{name}": entry["psnr"] for name, entry in metrics["baselines"].items()},
        "psnr_lead_over_equal_bits_db": metrics["baselines"]["equal_bits_thumbnail"]["psnr_gain_db"],
        # the data set's classifier on the reconstructions (null without one): does the content survive?
        **{key: metrics.get(key) for key in ("classifier_accuracy", "classifier_fd", "classifier_kid_mean")},
        "classifier_fd_name": metrics.get("classifier_fd_name"),
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
    return torch.get_num_threads()


def _config_dict(run_cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(run_cfg), resolve=True)


# ----------------------------------------------------------------------------- collapse and seeds
def detect_collapse(history: Sequence[dict], codebook_size: int, fraction: float) -> dict[str, Any]:
    """Codebook collapse of one run, from its history.jsonl rows (the training-batch codebook statistics,
    bincount over the rolling window of ``eval.codebook_window`` micro-batches).

    threshold = fraction * K. A logged step is *below* when ``codebook/perplexity`` < threshold or
    ``codebook/active_codes`` < threshold. The run has collapsed when its last logged step is below;
    ``collapse_step`` is the first step of that final below-threshold stretch (the step from which it never
    recovered), ``first_below_step`` the first below step at all (a dip that may have recovered).
    ``collapsed`` is None when the history holds no codebook statistics.
    """
    threshold = float(fraction) * int(codebook_size)
    logged = [row for row in history if "codebook/perplexity" in row or "codebook/active_codes" in row]
    report: dict[str, Any] = {"threshold": threshold, "fraction": float(fraction), "collapsed": None,
                              "collapse_step": None, "first_below_step": None, "min_perplexity": None,
                              "min_active_codes": None}
    if not logged:
        return report

    def below(row: dict) -> bool:
        return any(row.get(key) is not None and row[key] < threshold
                   for key in ("codebook/perplexity", "codebook/active_codes"))

    flags = [below(row) for row in logged]
    report["collapsed"] = flags[-1]
    if any(flags):
        report["first_below_step"] = logged[flags.index(True)]["step"]
    if flags[-1]:
        start = len(flags) - 1
        while start > 0 and flags[start - 1]:
            start -= 1
        report["collapse_step"] = logged[start]["step"]
    for key, name in (("codebook/perplexity", "min_perplexity"), ("codebook/active_codes", "min_active_codes")):
        values = [row[key] for row in logged if row.get(key) is not None]
        report[name] = min(values) if values else None
    return report


def numeric_fields(result: dict) -> dict[str, float]:
    """The figures of one run to average over seeds: numeric top-level fields and numeric fields of nested
    dicts ("group/name"), except identity fields and provenance (RUN_IDENTITY_KEYS, NOT_AGGREGATED)."""
    fields: dict[str, float] = {}
    for key, value in result.items():
        if key in RUN_IDENTITY_KEYS or key in NOT_AGGREGATED:
            continue
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                if _is_number(inner_value):
                    fields[f"{key}/{inner}"] = float(inner_value)
        elif _is_number(value):
            fields[key] = float(value)
    return fields


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate_runs(results: Sequence[dict]) -> list[dict]:
    """One row per (quantizer, K), in the order of first appearance, over the seeds of the finished runs:

        seeds, num_seeds, runs, steps; for every figure m (``numeric_fields``): m_mean, m_std (sample standard
        deviation, n - 1 in the denominator; None with fewer than two values) and m_n (runs that have it);
        collapsed_seeds (how many runs collapsed, ``detect_collapse``), collapse_steps {seed: step}.
    """
    groups: dict[tuple[str, int], list[dict]] = {}
    for result in results:
        groups.setdefault((result["quantizer"], int(result["K"])), []).append(result)
    rows = []
    for (quantizer, K), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        row: dict[str, Any] = {"quantizer": quantizer, "K": K, "seeds": [r["seed"] for r in runs],
                               "num_seeds": len(runs), "runs": [r["run"] for r in runs],
                               "steps": runs[0].get("steps")}
        per_run = [numeric_fields(r) for r in runs]
        for key in sorted({k for fields in per_run for k in fields}):
            values = [fields[key] for fields in per_run if key in fields]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
            row[f"{key}_n"] = len(values)
        collapses = [r.get("collapse") or {} for r in runs]
        row["collapsed_seeds"] = sum(1 for c in collapses if c.get("collapsed"))
        row["collapse_steps"] = {str(r["seed"]): c.get("collapse_step") for r, c in zip(runs, collapses)
                                 if c.get("collapsed")}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- merged outputs
def table_rows(results: Sequence[dict]) -> list[dict]:
    """Per-run table rows (TABLE_COLUMNS); collapse fields from the run's ``collapse`` report."""
    rows = []
    for result in results:
        collapse = result.get("collapse") or {}
        row = {column: result.get(column) for column in TABLE_COLUMNS}
        row["collapsed"], row["collapse_step"] = collapse.get("collapsed"), collapse.get("collapse_step")
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _mean_std(row: dict, key: str, number_format: str | None = None) -> str:
    """"mean ± std" of a row's figure (mean alone for one seed); ``number_format`` formats both, else 4/2
    significant digits."""
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "n/a"
    if number_format is not None:
        text = number_format.format(mean)
        return text if std is None else f"{text} ± {number_format.format(std).lstrip('+')}"
    return _fmt(mean) if std is None else f"{_fmt(mean)} ± {std:.2g}"


def markdown_table(rows: Sequence[dict]) -> str:
    """Per-run table (``table_rows``)."""
    header = ["quantizer", "K", "seed", "steps", "PSNR dB", "mean-colour PSNR", "grid-thumb. PSNR",
              "equal-bits PSNR", "lead over equal-bits dB", "SSIM", "rFID", "active", "util.", "perplexity",
              "bits/token", "log2 active", "img/s", "quant. peak MiB", "final loss", "train s", "collapsed at step"]
    keys = ["quantizer", "K", "seed", "steps", "psnr", *BASELINE_COLUMNS, "ssim", "rfid", "active_codes", "utilisation",
            "perplexity", "bits_per_token", "log2_active_codes", "images_per_sec", "quantizer_peak_mib", "final_loss",
            "train_seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        collapsed = _fmt(row.get("collapse_step")) if row.get("collapsed") else ("no" if row.get("collapsed") is False
                                                                                 else "n/a")
        lines.append("| " + " | ".join([*(_fmt(row.get(k)) for k in keys), collapsed]) + " |")
    return "\n".join(lines)


def markdown_summary(rows: Sequence[dict], fraction: float, columns: Sequence[tuple] = ROW_TABLE) -> str:
    """The (quantizer, K) table: mean ± std over seeds of ``columns`` ((figure, label[, number format])) and
    the collapsed-seed count (``aggregate_runs``)."""
    header = ["quantizer", "K", "seeds", "collapsed", "steps", *(column[1] for column in columns)]
    lines = [f"Mean ± sample std over seeds. collapsed = seeds whose training-batch hard perplexity or active "
             f"codes ended below {fraction:g} x K (experiments.study.detect_collapse).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["quantizer"], str(row["K"]), str(row["num_seeds"]), f"{row['collapsed_seeds']}/{row['num_seeds']}",
                 _fmt(row.get("steps")), *(_mean_std(row, column[0], *column[2:]) for column in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_merged(results: Sequence[dict], output_dir: Path, skipped: Sequence[tuple[str, str]] = (),
                 collapse_fraction: float = 0.01) -> dict[str, Path]:
    """results.json ({"rows", "runs", "skipped", "collapse_rule"}), results.csv (one row per (quantizer, K)),
    runs.csv (one row per run) and results.md (the headline table the README shows, the full (quantizer, K)
    table and the per-run table)."""
    rows = aggregate_runs(results)
    rule = {"fraction_of_K": collapse_fraction,
            "definition": "training-batch hard perplexity or active codes below fraction_of_K * K at the last "
                          "logged step; collapse_step = first step of that final below-threshold stretch"}
    paths = {"json": write_json(output_dir / "results.json",
                                {"rows": rows, "runs": list(results), "collapse_rule": rule,
                                 "skipped": [{"run": n, "reason": r} for n, r in skipped]})}
    columns = list(dict.fromkeys(key for row in rows for key in row if key not in ("runs", "collapse_steps")))
    paths["csv"] = _write_csv(output_dir / "results.csv", columns, rows)
    paths["runs_csv"] = _write_csv(output_dir / "runs.csv", list(TABLE_COLUMNS), table_rows(results))
    text = ("Headline:\n\n" + markdown_summary(rows, collapse_fraction, HEADLINE_TABLE)
            + "\n\nAll columns:\n\n" + markdown_summary(rows, collapse_fraction)
            + "\n\nPer run:\n\n" + markdown_table(table_rows(results)))
    if skipped:
        text += "\n\nSkipped:\n" + "\n".join(f"- {name}: {reason}" for name, reason in skipped)
    md_path = output_dir / "results.md"
    md_path.write_text(text + "\n")
    paths["md"] = md_path
    return paths


def _write_csv(path: Path, columns: list[str], rows: Sequence[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else
                                 (" ".join(map(str, row[k])) if isinstance(row.get(k), list) else row[k]))
                             for k in columns})
    return path


# ----------------------------------------------------------------------------- plots
def make_plots(results: Sequence[dict], output_dir: Path) -> list[Path]:
    """PNG figures in <output_dir>/plots (matplotlib, Agg backend); error bars = sample std over seeds:
    rate-distortion, utilisation vs K, code-usage curves and training curves."""
    import matplotlib  # lazy: plotting only; the Agg backend is chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: plotting only; the Agg backend is chosen before pyplot is imported

    plot_dir = output_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate_runs(results)
    quantizers = list(dict.fromkeys(r["quantizer"] for r in results))
    colours = {q: plt.cm.tab10(i % 10) for i, q in enumerate(quantizers)}
    return [plot_rate_distortion(plt, results, rows, colours, plot_dir / "rate_distortion.png"),
            plot_utilisation(plt, rows, colours, plot_dir / "utilisation_vs_K.png"),
            plot_code_usage(plt, results, colours, plot_dir / "code_usage.png"),
            plot_training_curves(plt, results, colours, plot_dir / "training_curves.png"),
            *geometry_plots(results, plot_dir / "geometry")]


def errorbars(ax, rows: Sequence[dict], colours: dict, x_key: str, y_key: str, log_x: bool = False) -> None:
    """One line per quantizer through its (mean x, mean y) points over K, with std error bars and K labels."""
    for q in colours:
        points = [row for row in rows if row["quantizer"] == q and row.get(f"{x_key}_mean") is not None
                  and row.get(f"{y_key}_mean") is not None]
        if not points:
            continue
        points.sort(key=lambda row: row[f"{x_key}_mean"])
        xs = [row[f"{x_key}_mean"] for row in points]
        ys = [row[f"{y_key}_mean"] for row in points]
        x_err = [row.get(f"{x_key}_std") or 0.0 for row in points]
        y_err = [row.get(f"{y_key}_std") or 0.0 for row in points]
        ax.errorbar(xs, ys, xerr=x_err, yerr=y_err, color=colours[q], label=q, marker="o", capsize=3,
                    linewidth=0.8)
        for row, x, y in zip(points, xs, ys):
            ax.annotate(f"K{row['K']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)


def plot_rate_distortion(plt, results: Sequence[dict], rows: Sequence[dict], colours: dict, path: Path) -> Path:
    """PSNR (and rFID when measured) against active codes and against bits per token."""
    distortions = [("psnr", "PSNR (dB, higher is better)")]
    if any(r.get("rfid") is not None for r in results):
        distortions.append(("rfid", "rFID (lower is better)"))
    fig, axes = plt.subplots(len(distortions), 2, figsize=(10, 4 * len(distortions)), squeeze=False)
    for row_index, (key, label) in enumerate(distortions):
        errorbars(axes[row_index][0], rows, colours, "active_codes", key, log_x=True)
        axes[row_index][0].set_xlabel("active codes (log2 axis)")
        axes[row_index][0].set_ylabel(label)
        errorbars(axes[row_index][1], rows, colours, "bits_per_token", key)
        axes[row_index][1].set_xlabel("bits per token = log2 perplexity")
        axes[row_index][1].set_ylabel(label)
    axes[0][0].legend()
    fig.suptitle("Rate-distortion (evaluation set; mean ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def plot_utilisation(plt, rows: Sequence[dict], colours: dict, path: Path) -> Path:
    """Codebook utilisation (active / K) against K, one line per quantizer."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for q in colours:
        points = sorted((row["K"], row["utilisation_mean"], row.get("utilisation_std") or 0.0) for row in rows
                        if row["quantizer"] == q and row.get("utilisation_mean") is not None)
        if points:
            ks, means, stds = zip(*points)
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, color=colours[q], label=q)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size K")
    ax.set_ylabel("utilisation = active / K")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def first_label(labelled: set[str], quantizer: str) -> str | None:
    """The quantizer's name the first time (one legend entry per quantizer), then None."""
    if quantizer in labelled:
        return None
    labelled.add(quantizer)
    return quantizer


def plot_code_usage(plt, results: Sequence[dict], colours: dict, path: Path) -> Path:
    """Rank-frequency curves of the used codes, one line per run."""
    labelled: set[str] = set()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        counts_path = Path(r.get("run_dir", "")) / "code_counts.json"
        if not counts_path.is_file():
            continue
        counts = sorted(json.loads(counts_path.read_text())["counts"], reverse=True)
        total = max(sum(counts), 1)
        frequencies = [c / total for c in counts if c > 0]
        ax.plot(range(1, len(frequencies) + 1), frequencies, color=colours[r["quantizer"]], alpha=0.6,
                label=first_label(labelled, r["quantizer"]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (used codes, sorted by frequency; one line per run)")
    ax.set_ylabel("frequency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(plt, results: Sequence[dict], colours: dict, path: Path) -> Path:
    """Pixel MSE and code perplexity on the training batches over the steps, one line per run."""
    # the total loss holds each quantizer's own terms (LFQ's entropy term is negative): not comparable, so plot
    # the pixel reconstruction error and the training-batch perplexity, which mean the same for every quantizer;
    # an x marks the step from which a run stayed collapsed
    labelled: set[str] = set()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = (("l2", "pixel MSE on training batches"), ("codebook/perplexity", "code perplexity on training batches"))
    for r in results:
        history = read_history(r.get("run_dir", ""))
        label = first_label(labelled, r["quantizer"])
        collapse_step = (r.get("collapse") or {}).get("collapse_step")
        for ax, (key, _) in zip(axes, curves):
            points = [(row["step"], row[key]) for row in history if key in row]
            if points:
                ax.plot(*zip(*points), color=colours[r["quantizer"]], alpha=0.6, label=label)
                marks = [(step, value) for step, value in points if step == collapse_step]
                if marks:
                    ax.scatter(*zip(*marks), marker="x", color=colours[r["quantizer"]], s=40)
    for ax, (_, label) in zip(axes, curves):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def geometry_plots(results: Sequence[dict], geometry_dir: Path) -> list[Path]:
    """Per run with an export and code_counts.json: eval.codebook_geometry's JSON and plot in geometry_dir/<run>/."""
    paths = []
    for r in results:
        run_dir = Path(r.get("run_dir", ""))
        counts_path, export = run_dir / "code_counts.json", run_dir / "tokenizer"
        if counts_path.is_file() and export.is_dir():
            tokenizer = LGQTokenizer.from_pretrained(str(export))
            geometry = write_codebook_geometry(tokenizer, json.loads(counts_path.read_text())["counts"],
                                               geometry_dir / run_dir.name, title=run_dir.name,
                                               protocol={"counts_file": str(counts_path)})
            paths.append(Path(geometry["plot"]))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # lazy: plotting only; the Agg backend is chosen before pyplot is imported

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n\n")[0],
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
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: merge the runs that have finished (result.json) into the tables and "
                             "plots, e.g. while a long sweep is still running; the others are listed as missing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for in-process runs (default: torch's choice); 1 is much faster "
                             "than 2 on a machine whose cores are busy with other work")

    # tokenizer config keys for every run: key=value or --key value (common.cli style; --help lists them)
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

        torch.set_num_threads(args.threads)

    results = []
    start = time.time()
    if args.finished_only:
        missing = [spec.name for spec in runs if not (spec.run_dir / "result.json").is_file()]
        runs = [spec for spec in runs if spec.name not in missing]
        print(f"[study] --finished-only: {len(runs)} finished run(s); not finished: {', '.join(missing) or 'none'}",
              flush=True)
        if not runs:
            raise ValueError(f"--finished-only: no finished run in {output_dir}")
    for spec in runs:
        result = run_one(spec, study, launcher, study.measure_memory and not args.no_memory, dry_run=args.dry_run)
        if result is not None:
            result["run_dir"] = str(spec.run_dir)
            result["collapse"] = detect_collapse(read_history(spec.run_dir), spec.codebook_size,
                                                 study.collapse_fraction)
            results.append(result)
    if args.dry_run:
        return []
    paths = write_merged(results, output_dir, skipped, study.collapse_fraction)
    plots = make_plots(results, output_dir)
    print(markdown_summary(aggregate_runs(results), study.collapse_fraction, HEADLINE_TABLE))
    print(f"[study] {len(results)} run(s) in {time.time() - start:.0f} s; table {paths['md']}, csv {paths['csv']}, "
          f"plots: {', '.join(str(p) for p in plots)}", flush=True)
    return results


if __name__ == "__main__":
    main()
