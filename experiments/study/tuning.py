"""An equal tuning budget: every quantizer gets the same number of trials of its own knobs and the learning rate,
chosen at one seed on a split other than the one the study reports (configured by the study's ``tuning``).

    tuning:
      split: tune          # scored here; never the study's evaluation split (glyphs / synthetic have a "tune" split)
      seed: 0              # the training seed of every trial
      metric: psnr         # higher is better on ``split``
      overrides: []        # key=value overrides of every trial (not of the sweep), e.g. data.tune_region=0.35 to
                           # hold the builtin photos' tuning square out of the trials' training crops
      trials:              # per quantizer, a list of trials, each a list of key=value overrides ([] = the recipe)
        lgq: [[], [model.quantizer_options.quant_loss_weight=0.1], [train.lr=2e-3]]
        fsq: [[], [train.lr=2e-3], {256: ["model.quantizer_options.levels=[4,4,4,4]"],   # a trial whose values
                                    1024: ["model.quantizer_options.levels=[4,4,4,4,4]"]}]  # depend on K

For every planned quantizer and K, trial i trains ``<output-dir>/tuning/<quantizer>_K<K>_trial<i>/`` (the study's
overrides, then the trial's, at ``seed``) and is evaluated on ``split``; the trial with the best ``metric`` is the
quantizer's recipe at that K for every seed of the sweep (its overrides join the run's, so a run folder made with
another choice is refused by the recipe check). Every planned quantizer must have the same number of trials (the
budget), every trial is written down in ``tuning/trials.json`` / ``trials.md``, failed ones too (``status:
failed`` with the error; a quantizer whose trials all failed stops the sweep with that error). Finished trials are
reused, like the runs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import json

from common.files import file_lock, write_bytes_atomic, write_json

if TYPE_CHECKING:  # config.py validates the tuning section with tuning_settings: no import cycle at run time
    from experiments.study.config import StudyConfig
    from experiments.study.plan import RunSpec

TUNING_KEYS = {"split", "seed", "metric", "trials", "overrides"}
TUNING_METRICS = ("psnr", "ssim", "classifier_accuracy", "psnr_lead_over_equal_bits_db")


def is_dotlist(value: Any) -> bool:
    """Whether ``value`` is a list of ``key=value`` override strings."""
    return isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value)


def tuning_settings(raw: dict[str, Any] | None, evaluation_split: str) -> dict[str, Any] | None:
    """The validated ``tuning`` section (None = no tuning): ValueError naming a bad key or value."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"tuning must be a mapping with keys {sorted(TUNING_KEYS)}, got {raw!r}")
    unknown = set(raw) - TUNING_KEYS
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)} (allowed: {sorted(TUNING_KEYS)})")
    settings = {"split": "tune", "seed": 0, "metric": "psnr", "overrides": [], **raw}
    extra = settings["overrides"]
    if not is_dotlist(extra):
        raise ValueError(f"tuning.overrides must be a list of key=value strings (applied to every trial), got {extra!r}")
    if settings["split"] == evaluation_split:
        raise ValueError(f"tuning.split must differ from the split the study reports (evaluation.split = "
                         f"{evaluation_split!r}): a choice made on the reported images would flatter it")
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"tuning.seed must be an integer >= 0, got {seed!r}")
    if settings["metric"] not in TUNING_METRICS:
        raise ValueError(f"tuning.metric must be one of {TUNING_METRICS}, got {settings['metric']!r}")
    trials = settings.get("trials")
    if not isinstance(trials, dict) or not trials:
        raise ValueError("tuning.trials must map each quantizer to a list of trials (lists of key=value overrides)")
    for quantizer, entries in trials.items():
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"tuning.trials.{quantizer} must be a non-empty list of trials, got {entries!r}")
        for position, trial in enumerate(entries):
            if isinstance(trial, dict) and all(str(k).isdigit() for k in trial):  # JSON keys are strings
                trial = entries[position] = {int(k): v for k, v in trial.items()}
            per_k = trial.values() if isinstance(trial, dict) else [trial]
            if (isinstance(trial, dict) and not all(isinstance(k, int) for k in trial)) or not all(
                    is_dotlist(t) for t in per_k):
                raise ValueError(f"tuning.trials.{quantizer}: every trial is a list of key=value strings, or a "
                                 f"mapping from K to such a list, got {trial!r}")
    return settings


def trial_overrides(trial: list[str] | dict[int, list[str]], codebook_size: int) -> list[str]:
    """The overrides of one trial at K (a trial is one list for every K, or a mapping K -> list)."""
    if isinstance(trial, dict):
        if int(codebook_size) not in trial:
            raise ValueError(f"the tuning trial {trial!r} gives no overrides for K={codebook_size}")
        return list(trial[int(codebook_size)])
    return list(trial)


def check_equal_budget(settings: dict[str, Any], quantizers: Sequence[str]) -> None:
    """ValueError unless every planned quantizer has trials, all the same number of them."""
    missing = [q for q in quantizers if q not in settings["trials"]]
    if missing:
        raise ValueError(f"tuning.trials has no trials for {missing}: every quantizer of the sweep gets the same "
                         f"tuning budget")
    counts = {q: len(settings["trials"][q]) for q in quantizers}
    if len(set(counts.values())) > 1:
        raise ValueError(f"tuning.trials gives the quantizers different budgets {counts}: each gets the same "
                         f"number of trials")


def trial_name(quantizer: str, codebook_size: int, index: int) -> str:
    return f"{quantizer}_K{codebook_size}_trial{index}"


def plan_trials(study: StudyConfig, settings: dict[str, Any], output_dir: Path, quantizers: Sequence[str],
                codebook_sizes: Sequence[int], extra_overrides: Sequence[str] = ()) -> list[tuple[RunSpec, int, list]]:
    """[(spec, trial index, trial overrides)] for every quantizer x K the sweep can run (as ``plan_runs`` decides),
    trial-major within each pair; ValueError when a trial is invalid at a K where the quantizer's recipe is valid
    (it would leave that pair with a smaller budget)."""
    from experiments.study.plan import plan_runs

    check_equal_budget(settings, quantizers)
    planned = []
    for quantizer in quantizers:
        recipe_specs, _ = plan_runs(study, output_dir, [quantizer], codebook_sizes, [settings["seed"]],
                                    extra_overrides)
        for K in [spec.codebook_size for spec in recipe_specs]:
            for index, trial in enumerate(settings["trials"][quantizer]):
                overrides = trial_overrides(trial, K)
                specs, skipped = plan_runs(study, output_dir / "tuning", [quantizer], [K], [settings["seed"]],
                                           [*extra_overrides, *settings["overrides"], *overrides])
                if not specs:
                    raise ValueError(f"tuning trial {index} of {quantizer} at K={K} ({overrides}) is invalid: "
                                     f"{skipped[0][1] if skipped else 'not runnable'}")
                run_dir = output_dir / "tuning" / trial_name(quantizer, K, index)  # not runs/<run>: its own folder
                kept = [o for o in specs[0].overrides if not o.startswith("train.output_dir=")]
                planned.append((dataclasses.replace(specs[0], run_dir=run_dir,
                                                    overrides=[*kept, f"train.output_dir={run_dir}"]),
                                index, overrides))
    return planned


def run_tuning(study: StudyConfig, settings: dict[str, Any], output_dir: Path, quantizers: Sequence[str],
               codebook_sizes: Sequence[int], launcher: str, extra_overrides: Sequence[str] = (),
               dry_run: bool = False) -> dict[tuple[str, int], list[str]]:
    """Train / reuse every trial, score it on ``settings['split']``, write the trial tables; returns the chosen
    overrides per (quantizer, K)."""
    from experiments.study.runs import busy_ones_last, run_one

    trial_study = copy.deepcopy(study)
    trial_study.generation = None  # a trial is scored on its reconstructions only
    trial_study.evaluation = {**study.evaluation, "split": settings["split"], "other_splits": []}
    metric = settings["metric"]
    records = []
    planned = plan_trials(study, settings, output_dir, quantizers, codebook_sizes, extra_overrides)
    print(f"[study] tuning: {len(planned)} trial(s) into {output_dir / 'tuning'}, seed {settings['seed']}, scored by "
          f"{metric} on split {settings['split']!r}", flush=True)
    for spec, index, trial in (planned if dry_run else busy_ones_last(planned, lambda item: item[0].run_dir)):
        print(f"[study] tuning trial {spec.run_dir.name}: {' '.join(trial) or 'the recipe'}", flush=True)
        record = {"quantizer": spec.quantizer, "K": spec.codebook_size, "trial": index, "overrides": trial,
                  "trial_overrides": settings["overrides"], "seed": settings["seed"], "split": settings["split"],
                  "run_dir": str(spec.run_dir)}
        try:
            result = run_one(spec, trial_study, launcher, measure_memory=False, dry_run=dry_run)
        except Exception as err:  # a failed trial is reported, never dropped
            record.update(status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0], metric=None)
            print(f"[study] tuning trial {spec.run_dir.name} failed: {record['error']}", flush=True)
        else:
            if result is None:  # dry run
                continue
            value = result.get(metric)
            record.update(status="ok", metric=value, psnr=result.get("psnr"),
                          active_codes=result.get("active_codes"), bits_per_token=result.get("bits_per_token"),
                          train_seconds=result.get("train_seconds"))
        records.append(record)
    if dry_run:
        return {}
    write_trials(output_dir, settings, records)  # failed trials too, before a pair whose trials all failed stops
    chosen = choose_trials(records, metric)
    return chosen_overrides(settings, chosen)


def write_trials(output_dir: Path, settings: dict[str, Any], records: Sequence[dict]) -> list[dict]:
    """Merge ``records`` into ``<output_dir>/tuning/trials.json`` and ``trials.md`` under a file lock (parallel study
    slices tune different quantizers into one folder): a stored trial of another (quantizer, K) stays while its
    overrides are still that trial's in ``settings``; a re-run trial replaces its stored row. Returns every row."""
    path = output_dir / "tuning" / "trials.json"
    with file_lock(path):
        stored = json.loads(path.read_text())["trials"] if path.is_file() else []
        fresh = {(r["quantizer"], r["K"], r["trial"]) for r in records}
        kept = [r for r in stored if (r["quantizer"], r["K"], r["trial"]) not in fresh
                and _still_configured(r, settings) and r.get("split") == settings["split"]
                and r.get("seed") == settings["seed"]]
        rows = sorted([*kept, *records], key=lambda r: (r["quantizer"], r["K"], r["trial"]))
        for pair_rows in _by_pair(rows).values():
            best = choose_trials(pair_rows, settings["metric"], strict=False)
            for row in pair_rows:
                row["chosen"] = best.get((row["quantizer"], row["K"])) == row["trial"]
        write_json(path, {"settings": settings, "trials": rows})
        write_bytes_atomic(path.with_name("trials.md"), trials_markdown(rows, settings).encode())
    return rows


def load_tuned(output_dir: Path, settings: dict[str, Any], quantizers: Sequence[str],
               codebook_sizes: Sequence[int]) -> dict[tuple[str, int], list[str]]:
    """The choices a finished tuning wrote into ``tuning/trials.json`` (for ``--finished-only``, which trains
    nothing); ValueError naming what is missing."""
    path = output_dir / "tuning" / "trials.json"
    if not path.is_file():
        raise ValueError(f"the study config asks for tuning and {path} does not exist: run the study (without "
                         f"--finished-only) to tune first")
    rows = json.loads(path.read_text())["trials"]
    wanted = {(q, int(K)) for q in quantizers for K in codebook_sizes}
    rows = [r for r in rows if (r["quantizer"], r["K"]) in wanted and _still_configured(r, settings)]
    missing = sorted(pair for pair in wanted if pair not in {(r["quantizer"], r["K"]) for r in rows})
    if missing:
        raise ValueError(f"{path} has no tuning trials for {missing} with the config's trials: run the study to "
                         f"tune them first")
    chosen = choose_trials(rows, settings["metric"])
    return chosen_overrides(settings, chosen)


def given_choices(settings: dict[str, Any], given: Sequence[str], quantizers: Sequence[str],
                  codebook_sizes: Sequence[int]) -> dict[tuple[str, int], list[str]]:
    """``--use-trials lgq:2 fsq:0``: the tuning's choice stated instead of trained (e.g. a tuning whose folder was
    lost, its table kept): every planned quantizer names the index of one of its configured trials, whose
    overrides become its recipe at every K, exactly as if ``run_tuning`` had chosen it. ValueError naming a
    malformed entry, an unknown quantizer, an index out of range or a planned quantizer without a choice."""
    chosen: dict[str, int] = {}
    for entry in given:
        name, sep, index = entry.partition(":")
        if not sep or not index.strip().isdigit():
            raise ValueError(f"--use-trials entries are quantizer:trial_index (e.g. lgq:2), got {entry!r}")
        if name not in settings["trials"]:
            raise ValueError(f"--use-trials {entry!r}: the tuning section has no trials for {name!r} "
                             f"(it has {sorted(settings['trials'])})")
        if int(index) >= len(settings["trials"][name]):
            raise ValueError(f"--use-trials {entry!r}: {name} has {len(settings['trials'][name])} trial(s), "
                             f"indices 0..{len(settings['trials'][name]) - 1}")
        chosen[name] = int(index)
    missing = [q for q in quantizers if q not in chosen]
    if missing:
        raise ValueError(f"--use-trials names no trial for {missing}: every planned quantizer needs one")
    return chosen_overrides(settings, {(q, int(K)): chosen[q] for q in quantizers for K in codebook_sizes})


def chosen_overrides(settings: dict[str, Any], chosen: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[str]]:
    """{(quantizer, K): the overrides of its chosen trial index at that K} (``trial_overrides``)."""
    return {(q, K): trial_overrides(settings["trials"][q][index], K) for (q, K), index in chosen.items()}


def _still_configured(row: dict, settings: dict[str, Any]) -> bool:
    """Whether a stored trial row is still trial ``row['trial']`` of its quantizer in ``settings`` (with the same
    overrides of every trial)."""
    trials = settings["trials"].get(row["quantizer"], [])
    if row["trial"] >= len(trials) or row.get("trial_overrides", []) != settings.get("overrides", []):
        return False
    try:
        return row["overrides"] == trial_overrides(trials[row["trial"]], row["K"])
    except ValueError:
        return False


def _by_pair(rows: Sequence[dict]) -> dict[tuple[str, int], list[dict]]:
    pairs: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        pairs.setdefault((row["quantizer"], row["K"]), []).append(row)
    return pairs


def choose_trials(records: Sequence[dict], metric: str, strict: bool = True) -> dict[tuple[str, int], int]:
    """The index of the best finished trial (highest ``metric``; ties: the earlier trial) per (quantizer, K);
    ValueError naming a pair whose trials all failed (``strict=False``: such a pair is left out)."""
    chosen: dict[tuple[str, int], int] = {}
    best: dict[tuple[str, int], float] = {}
    pairs = {(r["quantizer"], r["K"]) for r in records}
    for record in records:
        value = record.get("metric")
        if record["status"] != "ok" or value is None or not math.isfinite(value):
            continue
        key = (record["quantizer"], record["K"])
        if key not in best or value > best[key]:
            best[key], chosen[key] = value, record["trial"]
    failed = sorted(pair for pair in pairs if pair not in chosen)
    if failed and strict:
        errors = "; ".join(f"{r['quantizer']} K={r['K']} trial {r['trial']}: {r.get('error')}"
                           for r in records if (r["quantizer"], r["K"]) in failed)
        raise ValueError(f"every tuning trial of {failed} failed ({errors})")
    return chosen


def trials_markdown(records: Sequence[dict], settings: dict[str, Any]) -> str:
    """Every trial, one row each, the chosen one marked."""
    every = " ".join(settings.get("overrides", []))
    lines = [f"Tuning: {len({r['trial'] for r in records})} trial(s) per quantizer and K, training seed "
             f"{settings['seed']}, scored by {settings['metric']} on split {settings['split']!r} (not the reported "
             "split)" + (f", every trial with {every}" if every else "") + ". Chosen = the best; its overrides are "
             "the quantizer's recipe for every seed.", "",
             f"| quantizer | K | trial | overrides | status | {settings['metric']} | active codes | bits/token | "
             "train s | chosen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        def fmt(value, spec=".4g"):
            return "n/a" if value is None else format(value, spec)
        status = r["status"] if r["status"] == "ok" else f"failed: {r.get('error', '')}"
        lines.append(f"| {r['quantizer']} | {r['K']} | {r['trial']} | {' '.join(r['overrides']) or '(recipe)'} | "
                     f"{status} | {fmt(r.get('metric'), '.4f')} | {fmt(r.get('active_codes'), 'd')} | "
                     f"{fmt(r.get('bits_per_token'))} | {fmt(r.get('train_seconds'), '.0f')} | "
                     f"{'yes' if r.get('chosen') else ''} |")
    return "\n".join(lines) + "\n"
