"""One run: train (or resume, or reuse), evaluate, write result.json."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from omegaconf import OmegaConf

from common.config import with_later_defaults
from common.data import build_image_dataset
from common.files import file_lock, lock_is_held, write_json
from common.training import has_checkpoints, read_history
from eval.classifier import classifier_dir, classifier_report, load_or_train_classifier
from eval.fid import inception_weights_available
from eval.reconstruction import evaluate_reconstruction
from experiments.bench_quantizers import run_configuration
from experiments.study.config import StudyConfig
from experiments.study.generation import BUDGET_FOLDER, pending_stages, with_generation
from experiments.study.history import LAST_QUARTER_FIELDS, training_summary
from experiments.study.plan import RunSpec, load_run_config
from tokenizer.config import TokenizerRunConfig
from tokenizer.model import CONFIG_FORMAT, LGQTokenizer
from tokenizer.train import main as train_main


# ----------------------------------------------------------------------------- one run
def train_script_path() -> str:
    """tokenizer/train.py, relative to the working directory when it lies below it (readable commands)."""
    script = Path(__file__).resolve().parents[2] / "tokenizer" / "train.py"
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


def quantizer_peak_memory(quantizer: str, codebook_size: int, num_tokens: int, dim: int) -> dict[str, Any]:
    """Peak memory of one quantizer forward+backward step (experiments.bench_quantizers, fresh subprocess)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = types.SimpleNamespace(N=int(num_tokens), dim=int(dim), device=device, repeats=1, timeout=600,
                                 authors_lgq=None)  # bench_quantizers: no peer code
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
    for split in evaluation.get("other_splits") or []:  # e.g. builtin's val_unseen_photos: PSNR / SSIM / baselines
        other = evaluate_reconstruction(tokenizer, build_image_dataset(run_cfg.data, split=split),
                                        num_images=evaluation.get("num_images"),
                                        batch_size=int(evaluation.get("batch_size", 32)), compute_fid=False,
                                        allow_download=False, device=device)
        metrics[f"split_{split}"] = {
            "psnr": other["psnr"], "ssim": other["ssim"], "active_codes": other["codebook"]["active_codes"],
            **{f"psnr_{name}": entry["psnr"] for name, entry in other["baselines"].items()},
            "psnr_lead_over_equal_bits_db": other["baselines"]["equal_bits_thumbnail"]["psnr_gain_db"],
            "mean_colour_shift": other["mean_colour_shift"], "per_class": other["per_class"]}
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


def export_config_format(export: Path) -> int | None:
    """The ``config_format`` of a tokenizer export (1 for exports written before the key existed; None if absent)."""
    config_path = Path(export) / "config.json"
    if not config_path.is_file():
        return None
    return int(json.loads(config_path.read_text()).get("config_format", 1))


def check_same_recipe(spec: RunSpec, run_cfg) -> None:
    """Refuse to reuse or resume a run folder that was made with a different recipe, or whose export is of another
    ``config_format`` (format 1: "layernorm" then had no learnable scale and shift) (ValueError naming it)."""
    saved_format = export_config_format(spec.run_dir / "tokenizer")
    if saved_format is not None and saved_format != CONFIG_FORMAT:
        raise ValueError(f"{spec.run_dir} holds run {spec.name} exported in tokenizer config_format {saved_format} "
                         f"(now {CONFIG_FORMAT}: model.pre_quantizer_norm layernorm/groupnorm_layernorm have learnable "
                         "LN scale and shift; format 1 had none), so it is not the same model; choose another "
                         "--output-dir or delete that folder")
    current = _comparable(_config_dict(run_cfg))
    result_path, saved_path = spec.run_dir / "result.json", spec.run_dir / "config.yaml"
    if result_path.is_file():
        previous = json.loads(result_path.read_text()).get("config")
    elif saved_path.is_file():
        previous = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    else:
        return
    defaults = _comparable(OmegaConf.to_container(OmegaConf.structured(TokenizerRunConfig), resolve=True))
    previous = with_later_defaults(_comparable(previous or {}), defaults)
    if previous != current:
        changed = sorted(f"{section}.{key}" for section in set(current) | set(previous)
                         for key in set(current.get(section, {})) | set(previous.get(section, {}))
                         if current.get(section, {}).get(key) != previous.get(section, {}).get(key))
        raise ValueError(f"{spec.run_dir} holds run {spec.name} with a different recipe (changed: {changed}); "
                         f"choose another --output-dir or delete that folder")


Item = TypeVar("Item")


def busy_ones_last(items: Sequence[Item], run_dir_of: Callable[[Item], Path]) -> Iterator[Item]:
    """``items`` in order, except that one whose run folder another process holds (``lock_is_held``, e.g. a second
    study process given the same grid) goes back to the end of the queue, once: two processes started on one grid
    share its runs out instead of queueing behind each other. A run still held when its turn comes again is waited
    for (``run_one`` takes its lock) and then reused."""
    queue, deferred = list(items), set()
    while queue:
        item = queue.pop(0)
        run_dir = run_dir_of(item)
        if queue and run_dir not in deferred and lock_is_held(run_dir):
            deferred.add(run_dir)
            print(f"[study] {run_dir.name} is running in another process: coming back to it after the others",
                  flush=True)
            queue.append(item)
            continue
        yield item


def run_one(spec: RunSpec, study: StudyConfig, launcher: str, measure_memory: bool, dry_run: bool = False,
            train_second_stage: bool = True) -> dict | None:
    """Reuse, resume or train one run, then evaluate it and run its second stage (with ``train_second_stage`` False,
    a finished run's second stage is only read: ``second_stage``); returns its result dict (None on a dry run). The
    whole of it holds ``file_lock(run_dir)``: a second process given the same run waits for it, then reuses it,
    instead of training into the same folder at once."""
    with file_lock(spec.run_dir, enabled=not dry_run):
        return _run_one(spec, study, launcher, measure_memory, dry_run, train_second_stage)


def _run_one(spec: RunSpec, study: StudyConfig, launcher: str, measure_memory: bool, dry_run: bool,
             train_second_stage: bool = True) -> dict | None:
    result_path = spec.run_dir / "result.json"
    export = spec.run_dir / "tokenizer"
    run_cfg = load_run_config(spec)
    check_same_recipe(spec, run_cfg)
    if result_path.is_file() and export.is_dir():
        print(f"[study] reusing finished run {spec.name} ({result_path})", flush=True)
        return second_stage(json.loads(result_path.read_text()), spec, run_cfg, study, dry_run, train_second_stage)
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
        "mean_colour_shift": metrics["mean_colour_shift"],
        "per_class": metrics["per_class"],  # {label: PSNR, baselines' PSNR, colour shift}: which classes fail
        # the data set's classifier on the reconstructions (null without one): does the content survive?
        **{key: metrics.get(key) for key in ("classifier_accuracy", "classifier_fd", "classifier_kid_mean")},
        "classifier_fd_name": metrics.get("classifier_fd_name"),
        "active_codes": codebook["active_codes"], "utilisation": codebook["utilisation"],
        "perplexity": codebook["perplexity"], "bits_per_token": codebook["bits_per_token"],
        "log2_active_codes": codebook["log2_active_codes"], "bits_per_image": codebook.get("bits_per_image"),
        "effective_rate": {"log2_active_codes": codebook["log2_active_codes"],
                           "log2_perplexity": codebook["bits_per_token"]},
        "images_per_sec": summary["images_per_sec"], "final_losses": summary["final_losses"],
        **{key: summary[key] for key in (*LAST_QUARTER_FIELDS, "val_psnr_last", "psnr_gain_last_quarter_db",
                                         "converged")},
        "config_format": export_config_format(export),
        "final_loss": summary["final_losses"].get("loss"),
        "train_seconds": record.get("train_seconds"),
        "torch_threads": _torch_threads(),
        "quantizer_memory": memory,
        "quantizer_peak_mib": (memory["peak_bytes"] / 2**20) if memory and memory["peak_bytes"] is not None else None,
        **{key: value for key, value in metrics.items() if key.startswith("split_")},  # evaluation.other_splits
        "evaluation": metrics["protocol"], "notes": notes,
        "config": _config_dict(run_cfg),
        "train_argv": spec.train_argv(False),
    }
    write_json(result_path, result)
    print(f"[study] {spec.name}: PSNR {result['psnr']:.2f} dB, active {result['active_codes']}/{spec.codebook_size}, "
          f"perplexity {result['perplexity']:.1f}", flush=True)
    return second_stage(result, spec, run_cfg, study, dry_run)


def second_stage(result: dict, spec: RunSpec, run_cfg, study: StudyConfig, dry_run: bool = False,
                 train: bool = True) -> dict:
    """The study's ``generation`` stage for a finished run (experiments.study.generation), saved into its
    result.json; the result unchanged when the study has no generation settings. A prior that
    experiments.study.prior_budget already trained on this run with exactly these settings is recorded, not trained
    again. With ``train`` False no prior is trained: what is not made with the study's settings is returned as
    pending (``pending_stages``; result.json keeps its record)."""
    if study.generation is None or dry_run:
        return result
    device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier = None  # only a stage that is trained scores samples: nothing to load (or train) otherwise
    if train:
        classifier = study_classifier(spec.run_dir.parent.parent, run_cfg.data, device)
        if classifier is None:
            raise ValueError(f"the study's generation stage scores samples with the data set's classifier, and "
                             f"{run_cfg.data.name!r} has fewer than 2 classes")
    budget_stages = sorted(path for path in (spec.run_dir.parent.parent / BUDGET_FOLDER / spec.name).glob("*")
                           if path.is_dir())  # priors experiments.study.prior_budget trained on this run's tokens
    if with_generation(result, spec.run_dir, spec.quantizer, spec.seed, run_cfg.data, study.generation, classifier,
                       device, elsewhere=budget_stages, train=train):
        write_json(spec.run_dir / "result.json", result)
    return result if train else pending_stages(result, spec.quantizer, study.generation)


def _torch_threads() -> int:
    return torch.get_num_threads()


def _config_dict(run_cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(run_cfg), resolve=True)
