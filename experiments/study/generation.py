"""The second stage of a study run: does this tokenizer make a good prior? (configured by the study's ``generation``)

For one finished tokenizer run (and, for the quantizers in ``generation.prune``, again with its codebook pruned to
the codes it uses on the training split, ``tokenizer.prune``'s default rule):

    tokens  = prior.extract of the train split                        -> <run>/<stage>/tokens/
    prior   = prior/train.py with generation.prior_config (+ overrides), seed = the run's seed
                                                                      -> <run>/<stage>/prior_run/
    samples = N class-balanced samples of the pipeline (tokenizer + prior), fixed sampler settings and seed
    figures = the data set's classifier on the samples (accuracy as their class, FD-<data> / KID-<data> of its
              features against real val; eval.classifier), the prior's last logged training loss (the masked-token
              cross-entropy for MaskGIT), sampling seconds and samples/s

``<stage>`` is ``generation`` (the tokenizer as trained) or ``generation_pruned``. Every step is resumable: tokens
with a meta.json are reused, an interrupted prior resumes from its latest checkpoint, a finished stage keeps its
``generation.json`` and is reused while the study's generation settings are unchanged. The prior recipe is the same
for every run, so only the tokenizer differs.

A stage already made elsewhere with exactly the study's settings, codebook and prior seed (a prior of
experiments.study.prior_budget, ``<study>/prior_budget/<run>/*/generation.json``) is recorded instead of training
the same prior again (``finished_elsewhere``); its ``source`` names the file. Otherwise a stage folder started with
other settings is refused (``check_same_settings``), never mixed. A study that trains nothing (``--finished-only``)
tabulates a stage not made with its settings as pending (``pending_stages``), never with another recipe's figures.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from common.cli import resolve_config_path
from common.data import build_image_dataset
from common.files import write_json
from common.metrics import to_uint8
from common.training import has_checkpoints, read_history

GENERATION_KEYS = {"prior_config", "overrides", "num_samples", "batch_size", "num_inference_steps", "guidance_scale",
                   "temperature", "seed", "prune"}
GENERATION_DEFAULTS: dict[str, Any] = {"prior_config": "configs/prior/glyphs.yaml", "overrides": [],
                                       "num_samples": 1000, "batch_size": 100, "num_inference_steps": 12,
                                       "guidance_scale": 3.0, "temperature": 0.7, "seed": 0, "prune": []}
RESULT_FILE = "generation.json"
SETTINGS_FILE = "settings.json"  # written when a stage starts: its tokens / prior belong to these settings
BUDGET_FOLDER = "prior_budget"  # <study>/prior_budget/<run>/<stage>: priors of other budgets and recipes


def stage_folder(run_dir: Path, pruned: bool) -> Path:
    return run_dir / ("generation_pruned" if pruned else "generation")


def check_same_settings(run_dir: Path, pruned: bool, settings: dict[str, Any]) -> None:
    """Refuse (ValueError naming the changed keys) a stage folder started with other generation settings: its
    tokens and prior would otherwise be reused for settings they were not made with."""
    path = stage_folder(run_dir, pruned) / SETTINGS_FILE
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    if previous != settings:
        changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
        raise ValueError(f"{stage_folder(run_dir, pruned)} was made with other generation settings (changed: "
                         f"{changed}); choose another --output-dir or delete that folder")


def prior_seed_of(generation: dict[str, Any]) -> int | None:
    """The ``train.seed`` a recorded stage's prior was trained with (from its ``protocol.prior_argv``)."""
    seeds = [item.partition("=")[2] for item in (generation.get("protocol") or {}).get("prior_argv", [])
             if str(item).startswith("train.seed=")]
    return int(seeds[-1]) if seeds else None


def finished_elsewhere(folders: Sequence[Path], settings: dict[str, Any], seed: int,
                       pruned: bool) -> dict[str, Any] | None:
    """The first finished stage among ``folders`` (each a folder with a ``generation.json``) made with exactly
    ``settings``, the same codebook (full or ``pruned``) and a prior of train.seed = ``seed``: the same prior on
    the same tokens, so it is recorded (with ``source``, its file) instead of being trained again; None if none."""
    for folder in folders:
        path = Path(folder) / RESULT_FILE
        if not path.is_file():
            continue
        found = json.loads(path.read_text())
        if (found.get("status") == "ok" and found.get("settings") == settings
                and found.get("pruned") == pruned and prior_seed_of(found) == seed):
            return {**found, "source": str(path)}
    return None


def generation_settings(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """The study's ``generation`` mapping with defaults filled in (None = no second stage); unknown keys raise."""
    if raw is None:
        return None
    unknown = set(raw) - GENERATION_KEYS
    if unknown:
        raise ValueError(f"unknown generation keys {sorted(unknown)} (allowed: {sorted(GENERATION_KEYS)})")
    settings = {**GENERATION_DEFAULTS, **raw}
    for key in ("num_samples", "batch_size", "num_inference_steps"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 1:
            raise ValueError(f"generation.{key} must be an integer >= 1, got {settings[key]!r}")
    if not isinstance(settings["overrides"], list) or not isinstance(settings["prune"], list):
        raise ValueError("generation.overrides and generation.prune must be lists")
    return settings


def data_dotlist(data_cfg, prefix: str = "data.") -> list[str]:
    """A resolved DataConfig as ``data.key=value`` overrides (JSON values, which OmegaConf's dotlist parses)."""
    return [f"{prefix}{key}={json.dumps(value) if value is not None else 'null'}"
            for key, value in dataclasses.asdict(data_cfg).items()]


def real_images_u8(dataset) -> torch.Tensor:
    """The images of a data set as uint8 [N, 3, H, W] (the classifier metric's real reference)."""
    return to_uint8(torch.stack([dataset[i][0] for i in range(len(dataset))]))


def stage_tokens(run_dir: Path, data_cfg, pruned: bool = False) -> tuple[Path, Path]:
    """(tokenizer, tokens) of a run's stage, made where missing: the run's tokenizer (for ``pruned``, its codebook
    cut to the codes it uses on the train split, ``tokenizer.prune``, saved in ``<run>/<stage>/tokenizer``) and its
    train-split token grids (``prior.extract``, unflipped, in ``<run>/<stage>/tokens``)."""
    from prior.extract import main as extract_main
    from tokenizer.prune import main as prune_main

    source_dir = stage_folder(run_dir, pruned)
    source_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = run_dir / "tokenizer"
    data_args = data_dotlist(data_cfg)
    if pruned:
        pruned_tokenizer = source_dir / "tokenizer"
        if not (pruned_tokenizer / "config.json").is_file():
            prune_main([f"tokenizer={tokenizer}", f"output={pruned_tokenizer}", "split=train", "overwrite=true",
                        *data_args])
        tokenizer = pruned_tokenizer
    tokens = source_dir / "tokens"
    if not (tokens / "meta.json").is_file():
        extract_main([f"tokenizer={tokenizer}", f"output={tokens}", "split=train", "flip=false", *data_args])
    return tokenizer, tokens


def unused_code_share(sampled: torch.Tensor, tokens_dir: Path) -> tuple[float, int]:
    """(share of the sampled tokens whose code never occurs in the prior's train tokens, distinct codes sampled):
    share = (1 / N) sum_n [count_train(z_n) = 0] over the N sampled tokens z_n. A prior that learnt its data never
    samples a code it was not shown; a large share points at dead codes reaching the samples."""
    import numpy as np

    from prior.tokens import TokenDataset

    train_counts = TokenDataset(tokens_dir).code_counts()  # validated: a truncated tokens.npy is named, not miscounted
    codes = sampled.reshape(-1).numpy()
    return float((train_counts[codes] == 0).mean()) if codes.size else 0.0, int(np.unique(codes).size)


def run_generation(run_dir: Path, seed: int, data_cfg, settings: dict[str, Any], classifier, pruned: bool = False,
                   device: str | torch.device = "cpu", stage_dir: Path | None = None) -> dict[str, Any]:
    """The second stage of one run (module docstring); returns and writes ``<stage_dir>/generation.json``.

    ``stage_dir`` (default ``<run>/<stage>``) holds the prior, its settings and its result; the tokens (and the
    pruned tokenizer) always live in ``<run>/<stage>``: they depend on the tokenizer and the data only, so another
    prior recipe on the same run (experiments.study.prior_budget) reuses them."""
    from eval.classifier import classifier_report
    from eval.gen_fid import generate_samples
    from pipelines.assemble import build_pipeline
    from prior.train import main as train_prior

    stage_dir = stage_folder(run_dir, pruned) if stage_dir is None else Path(stage_dir)
    result_path = stage_dir / RESULT_FILE
    if result_path.is_file():
        previous = json.loads(result_path.read_text())
        if previous.get("settings") == settings and previous.get("status") == "ok":
            return previous
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(stage_dir / SETTINGS_FILE, settings)
    tokenizer, tokens = stage_tokens(run_dir, data_cfg, pruned)

    prior_dir = stage_dir / "prior_run"
    prior_config = str(resolve_config_path(settings["prior_config"]))
    argv = ["--config", prior_config, *settings["overrides"], f"data.tokens={tokens}", f"data.tokenizer={tokenizer}",
            f"train.output_dir={prior_dir}", f"train.seed={seed}"]
    if not (prior_dir / "prior" / "config.json").is_file():
        if has_checkpoints(prior_dir):
            argv.append("train.resume=latest")
        train_prior(argv)
    history = [row for row in read_history(prior_dir) if "loss" in row]

    pipeline = build_pipeline(tokenizer, prior_dir / "prior").to(device)
    pipeline.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    samples = generate_samples(pipeline, settings["num_samples"], batch_size=settings["batch_size"],
                               num_inference_steps=settings["num_inference_steps"],
                               guidance_scale=settings["guidance_scale"], temperature=settings["temperature"],
                               seed=settings["seed"], generator_device="cpu", keep_images=True, keep_tokens=True)
    seconds = time.perf_counter() - start
    unused_share, sampled_codes = unused_code_share(samples["tokens"], tokens)
    real_val = real_images_u8(build_image_dataset(data_cfg, "val"))
    figures = classifier_report(*classifier, samples["images"], samples["labels"], real_val, device=device)
    result = {
        "status": "ok", "settings": settings, "pruned": pruned,
        "codebook_size": int(pipeline.tokenizer.codebook_size),
        "classifier_accuracy": figures["classifier_accuracy"], "classifier_fd": figures["classifier_fd"],
        "classifier_kid_mean": figures["classifier_kid_mean"], "classifier_fd_name": figures["classifier_fd_name"],
        "prior_final_loss": history[-1]["loss"] if history else None,
        "prior_steps": history[-1]["step"] if history else None,
        "sampled_unused_code_share": unused_share, "sampled_active_codes": sampled_codes,
        "sampling_seconds": seconds, "samples_per_second": settings["num_samples"] / max(seconds, 1e-9),
        "num_samples": settings["num_samples"],
        "protocol": {"prior_config": settings["prior_config"], "prior_argv": argv, "tokens": str(tokens),
                     "classifier": figures.get("classifier_protocol"),
                     "sampling": {k: settings[k] for k in ("num_inference_steps", "guidance_scale", "temperature",
                                                           "seed", "batch_size")},
                     "torch_threads": torch.get_num_threads()},
    }
    write_json(result_path, result)
    return result


def stage_keys(quantizer: str, settings: dict[str, Any]) -> list[tuple[bool, str]]:
    """(pruned, result key) of every second stage of a run: the full codebook, and the pruned one for the quantizers
    in ``settings["prune"]``."""
    return [(False, "generation"), *([(True, "generation_pruned")] if quantizer in settings["prune"] else [])]


PENDING = "pending"  # the status of a stage not made with the study's settings, when nothing may be trained


def pending_stages(result: dict[str, Any], quantizer: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``result`` (a copy) with every second stage not made with ``settings`` (missing, or another recipe's) as
    ``{"status": "pending", "settings": settings, "pruned": ...}``: what a study that trains nothing tabulates, so
    the tables never put another recipe's figures beside this one's (the run's result.json keeps its record)."""
    result = dict(result)
    for pruned, key in stage_keys(quantizer, settings):
        if (result.get(key) or {}).get("settings") != settings:
            result[key] = {"status": PENDING, "settings": settings, "pruned": pruned}
    return result


def failed_generation(error: BaseException, settings: dict[str, Any], pruned: bool) -> dict[str, Any]:
    """The record of a second stage that raised: kept in the run's result (reported as failed, never dropped)."""
    return {"status": "failed", "error": f"{type(error).__name__}: {error}", "settings": settings, "pruned": pruned}


def with_generation(result: dict[str, Any], run_dir: Path, quantizer: str, seed: int, data_cfg,
                    settings: dict[str, Any], classifier, device: str | torch.device = "cpu",
                    elsewhere: Sequence[Path] = (), train: bool = True) -> bool:
    """Add ``result["generation"]`` (and ``result["generation_pruned"]`` for quantizers in ``settings["prune"]``)
    where missing, failed or made with other settings; True if anything changed. A stage finished in one of the
    ``elsewhere`` folders with these settings and seed is recorded as it is (``finished_elsewhere``); with ``train``
    False nothing else is done (no prior trained, no folder checked). A stage that raises is recorded as failed
    (``failed_generation``) with its traceback printed, and the study goes on."""
    import traceback

    changed = False
    for pruned, key in stage_keys(quantizer, settings):
        previous = result.get(key) or {}
        if previous.get("status") == "ok" and previous.get("settings") == settings:
            continue
        found = finished_elsewhere(elsewhere, settings, seed, pruned)
        if found is not None:
            print(f"[study] {run_dir.name}: second stage{' (pruned codebook)' if pruned else ''} made with these "
                  f"settings in {found['source']}", flush=True)
            result[key] = found
            changed = True
            continue
        if not train:
            continue
        check_same_settings(run_dir, pruned, settings)  # raises: never mixed, never recorded as a failed stage
        print(f"[study] {run_dir.name}: second stage{' (pruned codebook)' if pruned else ''}", flush=True)
        try:
            result[key] = run_generation(run_dir, seed, data_cfg, settings, classifier, pruned=pruned, device=device)
        except Exception as err:  # reported as failed in the tables, not dropped (issue 21)
            traceback.print_exc()
            result[key] = failed_generation(err, settings, pruned)
        changed = True
    return changed
