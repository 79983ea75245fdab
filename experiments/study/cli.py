"""``python -m experiments.study``: parse the command line, plan, run, merge, plot."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch

from common.cli import config_help, parse_command_line
from common.files import lock_is_held
from common.training import read_history
from experiments.study.config import DEFAULT_CONFIG, LAUNCHERS, load_study_config
from experiments.study.generation import generation_settings
from experiments.study.history import LAST_QUARTER_FIELDS, convergence_report, detect_collapse, training_summary
from experiments.study.plan import plan_runs
from experiments.study.plots import make_plots, plot_curves
from experiments.study.runs import busy_ones_last, run_one
from experiments.study.tuning import given_choices, load_tuned, run_tuning, tuning_settings
from experiments.study.tables import (
    HEADLINE_TABLE,
    aggregate_runs,
    markdown_summary,
    write_merged,
)
from tokenizer.config import TokenizerRunConfig


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    import experiments.study as package  # its docstring is the command's manual

    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=package.__doc__.split("\n\n")[0],
                                     epilog=package.__doc__ + "\n" + config_help(TokenizerRunConfig),
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
    parser.add_argument("--curves", action="store_true",
                        help="train nothing: plot the training curves of every planned run that has a history "
                             "(finished or still running) into plots/training_curves.png and print each run's "
                             "validation-PSNR convergence so far")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: merge the runs that have finished (result.json) into the tables and "
                             "plots, e.g. while a long sweep is still running; the others are listed as missing, "
                             "and second stages not made with the study's generation settings as pending")
    parser.add_argument("--no-tuning", action="store_true",
                        help="skip the config's tuning section: every quantizer trains its recipe as it is (e.g. "
                             "the budget curves, which come before the tuning)")
    parser.add_argument("--use-trials", nargs="+", default=None, metavar="QUANTIZER:INDEX",
                        help="train no tuning trials: use these trials of the config's tuning section as chosen "
                             "(e.g. lgq:2 fsq:0 from a tuning table whose folder is gone); the sweep's runs are "
                             "the ones the tuning would have planned with that choice")
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
    if study.generation is not None and quick.get("generation"):  # the quick slice's smaller second stage
        study.generation = generation_settings({**study.generation, **quick["generation"]})
    if args.no_tuning:
        if args.use_trials:
            raise ValueError("--use-trials states the tuning's choice and --no-tuning drops the tuning: use one")
        study.tuning = None
    elif args.use_trials and study.tuning is None:
        raise ValueError(f"--use-trials: {args.config} has no tuning section whose trials it could name")
    if study.tuning is not None and quick.get("tuning"):  # the quick slice's smaller tuning (e.g. fewer trials)
        study.tuning = tuning_settings({**study.tuning, **quick["tuning"]}, study.evaluation.get("split", "val"))
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    tuned = None  # --curves reads histories only: the run folders do not depend on the tuning's choice
    if study.tuning is not None and not args.curves:  # the tuning first: its choices are part of every recipe
        if args.use_trials:
            tuned = given_choices(study.tuning, args.use_trials, quantizers, codebook_sizes)
            print(f"[study] tuning not trained: the given choice {' '.join(args.use_trials)} -> "
                  + "; ".join(f"{q} K={K}: {' '.join(o) or 'the recipe'}" for (q, K), o in tuned.items()), flush=True)
        elif args.finished_only:
            tuned = load_tuned(output_dir, study.tuning, quantizers, codebook_sizes)
        else:
            tuned = run_tuning(study, study.tuning, output_dir, quantizers, codebook_sizes, launcher, extra,
                               dry_run=args.dry_run)
    runs, skipped = plan_runs(study, output_dir, quantizers, codebook_sizes, seeds, extra, tuned=tuned)
    for name, reason in skipped:
        print(f"[study] skipping {name}: {reason}", flush=True)
    print(f"[study] {len(runs)} run(s) into {output_dir}: " + ", ".join(r.name for r in runs), flush=True)
    if not runs:
        raise ValueError("no valid quantizer x K combination to run (see the skip reasons above)")

    results = []
    start = time.time()
    if args.curves:
        return report_curves(runs, output_dir)
    if args.finished_only:
        missing = [spec.name for spec in runs if not (spec.run_dir / "result.json").is_file()]
        # a run another study process holds may be in its second stage: not finished, and never run twice at once
        running = [spec.name for spec in runs if spec.name not in missing and lock_is_held(spec.run_dir)]
        runs = [spec for spec in runs if spec.name not in missing + running]
        print(f"[study] --finished-only: {len(runs)} finished run(s); not finished: {', '.join(missing) or 'none'}"
              + (f"; running in another process: {', '.join(running)}" if running else ""), flush=True)
        if not runs:
            raise ValueError(f"--finished-only: no finished run in {output_dir}")
    for spec in (runs if args.dry_run else busy_ones_last(runs, lambda spec: spec.run_dir)):
        result = run_one(spec, study, launcher, study.measure_memory and not args.no_memory, dry_run=args.dry_run,
                         train_second_stage=not args.finished_only)
        if result is not None:
            result["run_dir"] = str(spec.run_dir)
            result["collapse"] = detect_collapse(read_history(spec.run_dir), spec.codebook_size,
                                                 study.collapse_fraction)
            results.append(result)
    if args.dry_run:
        return []
    planned_order = {spec.name: index for index, spec in enumerate(runs)}
    results.sort(key=lambda result: planned_order[result["run"]])  # a run deferred by busy_ones_last back in place
    paths = write_merged(results, output_dir, skipped, study.collapse_fraction)
    plots = make_plots(results, output_dir)
    print(markdown_summary(aggregate_runs(results), study.collapse_fraction, HEADLINE_TABLE))
    print(f"[study] {len(results)} run(s) in {time.time() - start:.0f} s; table {paths['md']}, csv {paths['csv']}, "
          f"plots: {', '.join(str(p) for p in plots)}", flush=True)
    return results



def report_curves(runs, output_dir: Path) -> list[dict]:
    """``--curves``: per planned run with a history.jsonl, its last step, last validation PSNR and convergence
    (``convergence_report``) and the last-quarter sharpness and geometry (``training_summary``), printed and
    returned; the training-curve plot of them all (``plot_training_curves``)."""
    rows = []
    for spec in runs:
        history = read_history(spec.run_dir)
        if not history:
            continue
        report = convergence_report(history)
        summary = training_summary(history)
        geometry = {key: summary[key] for key in LAST_QUARTER_FIELDS}
        rows.append({"run": spec.name, "quantizer": spec.quantizer, "K": spec.codebook_size, "seed": spec.seed,
                     "run_dir": str(spec.run_dir), "last_step": max(row["step"] for row in history), **report,
                     **geometry})
        gain = report["psnr_gain_last_quarter_db"]
        logged = ", ".join(f"{key.removeprefix('final_')} {value:.3g}" for key, value in geometry.items()
                           if value is not None)
        print(f"[study] {spec.name}: step {rows[-1]['last_step']}, val PSNR {report['val_psnr_last']}, gain over the "
              f"last quarter {'n/a' if gain is None else f'{gain:+.3f} dB'}, converged {report['converged']}"
              + (f"; last quarter: {logged}" if logged else ""), flush=True)
    if not rows:
        raise ValueError(f"--curves: no run in {output_dir} has a history yet")
    path = plot_curves(rows, output_dir)
    print(f"[study] curves of {len(rows)} run(s): {path}", flush=True)
    return rows


if __name__ == "__main__":
    main()
