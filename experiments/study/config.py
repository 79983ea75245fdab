"""The study config: a YAML of the sweep (``StudyConfig``, ``load_study_config``)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from omegaconf import OmegaConf

from common.cli import resolve_config_path
from experiments.study.generation import generation_settings
from experiments.study.tuning import check_equal_budget, tuning_settings

DEFAULT_CONFIG = "configs/study/glyphs.yaml"
LAUNCHERS = ("inprocess", "accelerate")
STUDY_KEYS = {"tokenizer_configs", "quantizer_config", "quantizers", "codebook_sizes", "seeds", "overrides",
              "launcher", "accelerate_args", "evaluation", "measure_memory", "quick", "output_dir", "collapse_fraction",
              "generation", "tuning"}
EVALUATION_KEYS = {"split", "num_images", "batch_size", "inception_weights", "other_splits"}
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
    generation: dict[str, Any] | None = None  # the second stage (experiments.study.generation); None = off
    tuning: dict[str, Any] | None = None  # the equal tuning budget (experiments.study.tuning); None = off


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
    bad_quick = set(cfg.quick) - {"quantizers", "codebook_sizes", "seeds", "overrides", "generation", "tuning"}
    if bad_quick:
        raise ValueError(f"study config {path}: unknown quick keys {sorted(bad_quick)}")
    fraction = cfg.collapse_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"study config {path}: collapse_fraction must be a number in (0, 1), got {fraction!r}")
    cfg.collapse_fraction = float(fraction)
    try:
        cfg.generation = generation_settings(cfg.generation)
        cfg.tuning = tuning_settings(cfg.tuning, cfg.evaluation.get("split", "val"))
        if cfg.tuning is not None:
            check_equal_budget(cfg.tuning, cfg.quantizers)
    except ValueError as err:
        raise ValueError(f"study config {path}: {err}") from None
    return cfg
