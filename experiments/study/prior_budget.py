"""How many steps does the study's second-stage prior need? (``python -m experiments.study.prior_budget``)

The study's second stage (experiments.study.generation) trains the same prior recipe on every run's tokens. Its
sample figures rank tokenizers only if that recipe has converged, so this command trains the recipe again on the
tokens of finished study runs at more steps (``train.max_steps=N``, the cosine over the longer run; nothing else
changes: same tokens, seed, sampler settings, classifier) and tabulates the samples against the budget:

    python -m experiments.study.prior_budget --study-dir outputs/study_6000 \\
        --runs vq_K1024_s0 lgq_K1024_s0 --steps 1100 2200 4400 [--pruned] [--prior-seed S] [--threads 1]

and, with ``--prior-set KEY=VALUE ...``, trains a changed recipe the same way (e.g. ``--prior-set train.lr=1e-3``
to ask whether a lower learning rate leaves the unigram plateau more reliably); the changes are checked against the
prior's config schema, and the budget, seed, data and output folder keep their own options.

A recipe is named by its changes to the prior's config file (``recipe_changes``: the overrides of the study's
``generation`` settings and ``--prior-set`` together, last value per key, without the keys that only change logging
or the budget); ``recipe`` is the config file as it is. Each (run, codebook, recipe, N) is one folder
``<study-dir>/prior_budget/<run>/<full|pruned>_steps<N>/`` (``_seed<S>`` appended for a ``--prior-seed`` other than
the run's seed, which the study's second stage uses, and ``_<key>-<value>`` per recipe change) with the prior run and
its ``generation.json`` (resumable: an interrupted prior resumes, a finished one is reused); the recipe and budget the
run's own second stage used are not trained again but read from the run's ``result.json``, and the study's second
stage in turn records a prior of this folder made with exactly its settings instead of training it again. Every
call rewrites ``<study-dir>/prior_budget/results.md`` (one row per run, codebook, recipe, seed and budget) and
``summary.md`` (``summary_table``: mean ± std over the runs' tokenizer seeds per quantizer, K, codebook, recipe and
budget). The tokens (and the pruned tokenizer) are the run's own (``<run>/generation*/tokens``),
made there if missing.

Converged (the criterion the table states): a budget N is converged when doubling it changes the share of samples
classified as their class by less than ``ACCURACY_TOLERANCE`` and lowers the samples' FD by less than
``FD_TOLERANCE`` (absolute; the spread of FD-glyphs over tokenizer seeds at one budget is ~1.4).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from common.cli import resolve_config_path
from common.config import ConfigError, load_config
from common.files import file_lock, write_bytes_atomic, write_json
from experiments.study.generation import BUDGET_FOLDER, failed_generation, run_generation, stage_tokens
from experiments.study.plan import parse_run_name
from experiments.study.runs import study_classifier
from experiments.study.tables import mean_std_cell
from prior.config import PriorRunConfig
from tokenizer.config import TokenizerRunConfig

ACCURACY_TOLERANCE = 0.01  # share of samples classified as their class
FD_TOLERANCE = 1.0  # FD of the samples' classifier features against real val
RECIPE = "recipe"  # the recipe column of the prior's config file as it is
# override keys that change what a prior logs or how long it trains (its own column), not its recipe
NEUTRAL_KEYS = ("train.tracker", "train.progress_bar", "train.image_log_every", "train.log_every",
                "train.checkpoint_every", "train.max_steps")
# keys a recipe change may not set: each has its own option (--steps, --prior-seed) or is the run's own
RESERVED_KEYS = ("train.max_steps", "train.seed", "train.output_dir", "train.resume", "data.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.study.prior_budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-dir", required=True, type=Path, help="a study's --output-dir (holds runs/)")
    parser.add_argument("--runs", nargs="+", required=True, help="run names under <study-dir>/runs, e.g. vq_K1024_s0")
    parser.add_argument("--steps", nargs="+", required=True, type=int, help="prior budgets (train.max_steps)")
    parser.add_argument("--pruned", action="store_true", help="the prior on the codebook pruned to its used codes")
    parser.add_argument("--prior-seed", type=int, default=None,
                        help="the prior's train.seed (default: the run's seed, as in the study's second stage); "
                             "another seed measures the spread a prior's own randomness adds")
    parser.add_argument("--prior-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="changes to the prior recipe (prior config keys, e.g. train.lr=1e-3); each its own "
                             "folder and table rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 per process on a shared CPU)")
    return parser.parse_args(argv)


def check_recipe_changes(changes: Sequence[str], settings: dict[str, Any], tokens: str | Path) -> list[str]:
    """The ``--prior-set`` changes, each ``key=value`` with a key of the prior's config schema (checked by loading
    the recipe with them on the run's ``tokens``: an unknown key or a bad value named by common.config) and none of
    ``RESERVED_KEYS``; returns them as given."""
    for change in changes:
        key, sep, _ = change.partition("=")
        if not sep or not key:
            raise ValueError(f"--prior-set {change!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        if key.startswith(RESERVED_KEYS):
            raise ValueError(f"--prior-set {change!r}: {key} is not a recipe change (the budget is --steps, the seed "
                             f"--prior-seed; the data and output folder are the run's)")
    if changes:
        try:
            load_config(PriorRunConfig, [resolve_config_path(settings["prior_config"])],
                        [*settings["overrides"], f"data.tokens={tokens}", *changes])
        except ConfigError as err:
            raise ValueError(f"--prior-set: {err}") from err
    return list(changes)


def override_key(item: Any) -> str:
    """The key of a ``key=value`` override."""
    return str(item).partition("=")[0]


def recipe_changes(settings: dict[str, Any]) -> list[str]:
    """A second stage's changes to its prior config file: its ``key=value`` overrides, the last one per key (the
    one OmegaConf's dotlist merge keeps) in the order of those last ones, without ``NEUTRAL_KEYS``."""
    overrides = [str(item) for item in settings["overrides"]]
    last = {override_key(item): index for index, item in enumerate(overrides)}
    return [item for index, item in enumerate(overrides)
            if last[override_key(item)] == index and override_key(item) not in NEUTRAL_KEYS]


def recipe_label(changes: Sequence[str]) -> str:
    """The table's name of a prior recipe: ``recipe`` (the config file as it is), or its changes joined by
    spaces."""
    return " ".join(changes) if changes else RECIPE


def budget_folder(study_dir: Path, run: str, pruned: bool, steps: int, prior_seed: int | None = None,
                  changes: Sequence[str] = ()) -> Path:
    """``<study>/prior_budget/<run>/<full|pruned>_steps<N>[_seed<S>][_<key>-<value>...]`` (the seed suffix for a
    prior seed other than the run's; one suffix per recipe change, characters other than letters, digits, ``.``,
    ``+`` and ``-`` replaced by ``-``)."""
    suffix = "" if prior_seed is None else f"_seed{prior_seed}"
    for change in changes:
        suffix += "_" + re.sub(r"[^A-Za-z0-9.+-]", "-", change)
    return study_dir / BUDGET_FOLDER / run / f"{'pruned' if pruned else 'full'}_steps{steps}{suffix}"


def recipe_steps(settings: dict[str, Any]) -> int:
    """train.max_steps of the second stage's prior: its config file with its ``key=value`` overrides merged over it
    (OmegaConf's dotlist, as the prior's own config loading reads them)."""
    merged = OmegaConf.merge(OmegaConf.load(resolve_config_path(settings["prior_config"])),
                             OmegaConf.from_dotlist([str(item) for item in settings["overrides"]]))
    return int(merged.train.max_steps)


def with_steps(settings: dict[str, Any], steps: int, changes: Sequence[str] = ()) -> dict[str, Any]:
    """The second stage's settings with the prior trained for ``steps`` and the recipe ``changes`` (they win over
    the settings' own values of their keys), in one order whatever the settings' order was: the logging overrides,
    ``train.max_steps=steps``, then ``recipe_changes``. The same recipe and budget so always give equal settings
    (the study's second stage records a budget folder's prior only when they are equal)."""
    combined = {**settings, "overrides": [*map(str, settings["overrides"]), *changes]}
    logging = [item for item in combined["overrides"]
               if override_key(item) in NEUTRAL_KEYS and override_key(item) != "train.max_steps"]
    return {**settings, "overrides": [*logging, f"train.max_steps={steps}", *recipe_changes(combined)]}


def check_prior_recipe(stage_dir: Path, steps: int, changes: Sequence[str] = ()) -> None:
    """Refuse a prior folder trained (or being trained) for another number of steps or with other values of the
    recipe's changed keys (``recipe_changes``)."""
    config = stage_dir / "prior_run" / "config.yaml"
    if not config.is_file():
        return
    found = OmegaConf.load(config)
    if int(found.train.max_steps) != steps:
        raise ValueError(f"{config.parent} is a prior of train.max_steps={found.train.max_steps}, not {steps}; "
                         f"delete it or choose another --study-dir")
    wanted = OmegaConf.from_dotlist(list(changes))
    for change in changes:
        key = change.partition("=")[0]
        if OmegaConf.select(found, key) != OmegaConf.select(wanted, key):
            raise ValueError(f"{config.parent} is a prior of {key}={OmegaConf.select(found, key)}, not {change}; "
                             f"delete it or choose another --study-dir")


def load_run(study_dir: Path, run: str) -> tuple[Path, dict[str, Any], Any]:
    """(run folder, its result.json, its tokenizer run config); a clear error for a missing or unfinished run."""
    run_dir = study_dir / "runs" / run
    result_path = run_dir / "result.json"
    if not result_path.is_file() or not (run_dir / "tokenizer").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a finished study run (no result.json or tokenizer/); run the "
                                f"study first")
    return run_dir, json.loads(result_path.read_text()), load_config(TokenizerRunConfig, [run_dir / "config.yaml"], [])


def budget_row(run: str, pruned: bool, steps: int, prior_seed: int, generation: dict[str, Any],
               source: str, changes: Sequence[str] = ()) -> dict[str, Any]:
    return {"run": run, "codebook": "pruned" if pruned else "full", "prior_steps": steps, "prior_seed": prior_seed,
            "recipe": recipe_label(changes),
            "status": generation.get("status"), "error": generation.get("error"),
            "codebook_size": generation.get("codebook_size"),
            "classifier_accuracy": generation.get("classifier_accuracy"),
            "classifier_fd": generation.get("classifier_fd"),
            "prior_final_loss": generation.get("prior_final_loss"),
            "sampled_unused_code_share": generation.get("sampled_unused_code_share"),
            "sampling_seconds": generation.get("sampling_seconds"), "source": source}


def series(row: dict[str, Any]) -> tuple[str, str, str, int]:
    """The rows one budget curve is made of: one run, codebook, prior recipe and prior seed (rows written before
    recipe changes existed are the recipe's)."""
    return row["run"], row["codebook"], row.get("recipe", RECIPE), row["prior_seed"]


def converged_budgets(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], int | None]:
    """Per (run, codebook, recipe, prior seed): the smallest measured N whose doubling 2N (also measured) gains less
    than the tolerances (module docstring); None when no measured pair shows it."""
    found: dict[tuple[str, str, str, int], int | None] = {}
    for key in sorted({series(row) for row in rows}):
        by_steps = {row["prior_steps"]: row for row in rows if series(row) == key and row["status"] == "ok"}
        found[key] = None
        for steps in sorted(by_steps):
            longer = by_steps.get(2 * steps)
            if longer is None:
                continue
            accuracy_gain = longer["classifier_accuracy"] - by_steps[steps]["classifier_accuracy"]
            fd_drop = by_steps[steps]["classifier_fd"] - longer["classifier_fd"]
            if abs(accuracy_gain) < ACCURACY_TOLERANCE and fd_drop < FD_TOLERANCE:
                found[key] = steps
                break
    return found


def budget_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of every (run, codebook, N) with the converged budget per (run, codebook)."""
    converged = converged_budgets(rows)
    lines = ["| run | codebook | prior recipe | prior seed | prior steps | K | samples classified | sample FD | "
             "prior final loss | sampled tokens of unused codes | sampling s | converged at |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (*series(r), r["prior_steps"])):
        recipe = row.get("recipe", RECIPE)
        if row["status"] != "ok":
            lines.append(f"| {row['run']} | {row['codebook']} | {recipe} | {row['prior_seed']} | {row['prior_steps']} "
                         f"| - | failed: {row['error']} | - | - | - | - | - |")
            continue
        budget = converged[series(row)]
        share = row.get("sampled_unused_code_share")
        unused = "n/a" if share is None else f"{share:.4f}"  # n/a: a stage made before the share was recorded
        lines.append(f"| {row['run']} | {row['codebook']} | {recipe} | {row['prior_seed']} | {row['prior_steps']} | "
                     f"{row['codebook_size']} | "
                     f"{row['classifier_accuracy']:.3f} | {row['classifier_fd']:.1f} | "
                     f"{row['prior_final_loss']:.2f} | {unused} | {row['sampling_seconds']:.0f} | "
                     f"{budget if budget is not None else 'not shown'} |")
    lines.append("")
    lines.append(f"Converged at N: doubling N changes the share classified by < {ACCURACY_TOLERANCE} and lowers the "
                 f"sample FD by < {FD_TOLERANCE}.")
    return "\n".join(lines) + "\n"


SUMMARY_FIGURES = ("classifier_accuracy", "classifier_fd", "prior_final_loss", "sampling_seconds")


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (quantizer, K, codebook, prior recipe, prior steps, prior seed) over the study runs (tokenizer
    seeds) measured with it: runs, failed (runs whose prior failed), and for each of ``SUMMARY_FIGURES`` over the
    runs that did not fail its mean, sample std (n - 1; None for one run), min and max. The prior seed is "run" when
    each prior used its run's seed (the study's second stage), else the fixed ``--prior-seed``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        quantizer, K, seed = parse_run_name(row["run"])
        prior_seed = "run" if row["prior_seed"] == seed else str(row["prior_seed"])
        key = (quantizer, K, row["codebook"], row.get("recipe", RECIPE), row["prior_steps"], prior_seed)
        groups.setdefault(key, []).append(row)
    summary = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda r: parse_run_name(r["run"])[2])
        ok = [row for row in members if row["status"] == "ok"]
        entry = dict(zip(("quantizer", "K", "codebook", "recipe", "prior_steps", "prior_seed"), key))
        entry["runs"] = [row["run"] for row in members]
        entry["failed"] = [row["run"] for row in members if row["status"] != "ok"]
        for figure in SUMMARY_FIGURES:
            values = [float(row[figure]) for row in ok]
            entry[f"{figure}_mean"] = statistics.fmean(values) if values else None
            entry[f"{figure}_std"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{figure}_min"] = min(values) if values else None
            entry[f"{figure}_max"] = max(values) if values else None
        summary.append(entry)
    return summary


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``summary_rows``: mean ± std over the runs, with the range of the share classified."""
    lines = ["| quantizer | K | codebook | prior recipe | prior steps | prior seed | runs | failed | samples classified "
             "| classified min-max | sample FD | prior final loss | sampling s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in summary_rows(rows):
        accuracy_range = ("-" if entry["classifier_accuracy_min"] is None else
                          f"{entry['classifier_accuracy_min']:.3f}-{entry['classifier_accuracy_max']:.3f}")
        lines.append(f"| {entry['quantizer']} | {entry['K']} | {entry['codebook']} | {entry['recipe']} | "
                     f"{entry['prior_steps']} | {entry['prior_seed']} | {len(entry['runs'])} | "
                     f"{len(entry['failed'])} | {mean_std_cell(entry, 'classifier_accuracy', '{:.3f}')} | "
                     f"{accuracy_range} | {mean_std_cell(entry, 'classifier_fd', '{:.1f}')} | "
                     f"{mean_std_cell(entry, 'prior_final_loss', '{:.2f}')} | "
                     f"{mean_std_cell(entry, 'sampling_seconds', '{:.0f}')} |")
    lines.append("")
    lines.append("Mean ± sample std over the study runs (tokenizer seeds) of each group; a failed prior is counted, "
                 "not averaged. Prior seed \"run\": each prior trained with its run's seed, as the study's second "
                 "stage does.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bad = [steps for steps in args.steps if steps < 1]
    if bad:
        raise ValueError(f"--steps must be >= 1, got {bad}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for run in args.runs:
        run_dir, result, run_cfg = load_run(args.study_dir, run)
        key = "generation_pruned" if args.pruned else "generation"
        recorded = result.get(key) or {}
        if "settings" not in recorded:
            raise ValueError(f"{run} has no {key} stage in its result.json: the budgets are measured against the "
                             f"study's own second stage, so run the study (with its generation settings) first")
        settings = recorded["settings"]
        classifier = study_classifier(args.study_dir, run_cfg.data, device)
        if classifier is None:
            raise ValueError(f"{run}: the samples are scored by the data set's classifier, and "
                             f"{run_cfg.data.name!r} has fewer than 2 classes")
        with file_lock(run_dir):  # the tokens are the run's: made once, whoever asks first
            _, tokens = stage_tokens(run_dir, run_cfg.data, args.pruned)
        changes = check_recipe_changes(args.prior_set, settings, tokens)
        run_seed = int(result["seed"])
        prior_seed = run_seed if args.prior_seed is None else args.prior_seed
        for steps in args.steps:
            budget_settings = with_steps(settings, steps, changes)
            recipe = recipe_changes(budget_settings)
            if (recorded.get("status") == "ok" and recipe_steps(settings) == steps and prior_seed == run_seed
                    and recipe == recipe_changes(settings)):
                rows.append(budget_row(run, args.pruned, steps, prior_seed, recorded, f"{run}/result.json ({key})",
                                       recipe))
                continue
            stage_dir = budget_folder(args.study_dir, run, args.pruned, steps,
                                      None if prior_seed == run_seed else prior_seed, recipe)
            with file_lock(stage_dir):
                check_prior_recipe(stage_dir, steps, recipe)
                print(f"[prior_budget] {run} ({'pruned' if args.pruned else 'full'} codebook, "
                      f"{recipe_label(recipe)}): prior of {steps} steps", flush=True)
                try:
                    generation = run_generation(run_dir, prior_seed, run_cfg.data, budget_settings,
                                                classifier, pruned=args.pruned, device=device, stage_dir=stage_dir)
                except Exception as err:  # reported as failed in the table, never dropped
                    traceback.print_exc()
                    generation = failed_generation(err, budget_settings, args.pruned)
            rows.append(budget_row(run, args.pruned, steps, prior_seed, generation,
                                   str(stage_dir / "generation.json"), recipe))
    print(budget_table(rows))
    results = args.study_dir / BUDGET_FOLDER / "results.json"
    with file_lock(results):  # two processes on other runs or budgets share the table
        everything = merged_rows(results, rows)
        write_json(results, everything)
        write_bytes_atomic(results.with_suffix(".md"), budget_table(everything).encode())
        write_bytes_atomic(results.with_name("summary.md"), summary_table(everything).encode())
    return rows


def merged_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This call's rows over the rows an earlier call wrote to ``path`` (keyed by run, codebook, recipe, seed,
    steps)."""
    earlier = json.loads(path.read_text()) if path.is_file() else []
    merged = {(*series(row), row["prior_steps"]): row for row in [*earlier, *rows]}
    return [merged[key] for key in sorted(merged)]


if __name__ == "__main__":
    main()
