"""The run plan: quantizer x K x seed -> ``RunSpec`` (recipe files, overrides, run folder)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from common.cli import resolve_config_path
from common.config import load_config
from common.files import write_bytes_atomic
from experiments.study.config import StudyConfig
from tokenizer.config import TokenizerRunConfig
from tokenizer.quantizers import QUANTIZERS, build_quantizer


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


def parse_run_name(name: str) -> tuple[str, int, int]:
    """(quantizer, K, seed) of a ``run_name``; a ValueError naming the expected form for any other name."""
    match = re.fullmatch(r"([a-z0-9]+)_K(\d+)_s(\d+)", name)
    if match is None:
        raise ValueError(f"{name!r} is not a study run name (<quantizer>_K<codebook size>_s<seed>, e.g. lgq_K256_s0)")
    return match.group(1), int(match.group(2)), int(match.group(3))


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
            header = f"# {path} without its {model.get('quantizer')}-only quantizer_options (experiments.study)\n"
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
              seeds: Sequence[int], extra_overrides: Sequence[str] = (),
              tuned: dict[tuple[str, int], list[str]] | None = None) -> tuple[list[RunSpec], list[tuple[str, str]]]:
    """(runs to do, [(run name, reason skipped)]) for the cross product quantizer x K x seed, seed-major (every
    (quantizer, K) at the first seed, then at the next, ...) so an interrupted sweep covers the whole grid early.
    ``tuned``: the overrides the tuning chose per (quantizer, K) (experiments.study.tuning), after the others."""
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
                overrides = [*study.overrides, *extra_overrides, *(tuned or {}).get((quantizer, int(K)), []),
                             f"model.quantizer={quantizer}",
                             f"model.codebook_size={K}", f"train.seed={seed}", f"train.output_dir={run_dir}"]
                spec = RunSpec(quantizer, int(K), int(seed), run_dir, files[quantizer], overrides)
                problem = combination_problem(load_run_config(spec))
                if problem is not None:
                    skipped.append((spec.name, problem))
                else:
                    runs.append(spec)
    return runs, skipped
