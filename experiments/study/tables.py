"""Seeds aggregated per (quantizer, K), and the merged outputs: results.json/.csv/.md, runs.csv."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from common.files import write_json
from experiments.study.claims import claims_markdown, paper_claims
from experiments.study.history import CONVERGENCE_GAIN_DB

BASELINE_COLUMNS = ("psnr_mean_colour", "psnr_token_grid_thumbnail", "psnr_equal_bits_thumbnail",
                    "psnr_lead_over_equal_bits_db")
TABLE_COLUMNS = ("run", "quantizer", "K", "seed", "steps", "psnr", *BASELINE_COLUMNS, "ssim", "rfid",
                 "classifier_accuracy", "classifier_fd", "classifier_kid_mean", "active_codes",
                 "utilisation", "perplexity", "bits_per_token", "log2_active_codes", "images_per_sec",
                 "quantizer_peak_mib", "final_mean_max_prob", "final_mean_sum_p_sq", "final_latent_spread",
                 "final_codebook_spread", "final_ste_gain", "final_pre_norm_gamma_rms", "val_psnr_last",
                 "psnr_gain_last_quarter_db", "converged", "final_loss", "train_seconds", "collapsed", "collapse_step")
# per-run fields that identify a run or are the same for every seed: not averaged
RUN_IDENTITY_KEYS = {"run", "quantizer", "K", "seed", "steps", "batch_size", "torch_threads", "run_dir", "config_format"}
# nested per-run dicts that are provenance, or duplicates of top-level figures: not averaged
# (baselines: their PSNRs are the top-level psnr_<baseline> fields)
NOT_AGGREGATED = {"config", "evaluation", "quantizer_memory", "effective_rate", "notes", "train_argv", "collapse",
                  "baselines"}
# the figures of the (quantizer, K) table, as (field, header)
ROW_TABLE = (("psnr", "PSNR dB"), ("psnr_equal_bits_thumbnail", "equal-bits PSNR"),
             ("psnr_lead_over_equal_bits_db", "lead over equal-bits dB"), ("ssim", "SSIM"), ("rfid", "rFID"),
             ("classifier_accuracy", "recon. classified"), ("classifier_fd", "FD (classifier)"),
             ("classifier_kid_mean", "KID (classifier)"), ("active_codes", "active"), ("utilisation", "util."), ("perplexity", "perplexity"),
             ("bits_per_token", "bits/token"), ("final_mean_max_prob", "mean max p"),
             ("final_mean_sum_p_sq", "mean sum p^2"), ("psnr_gain_last_quarter_db", "val PSNR gain, last quarter dB"),
             ("images_per_sec", "img/s"), ("quantizer_peak_mib", "quant. peak MiB"), ("train_seconds", "train s"))
# the headline table (README): quality, the equal-bits baseline, the classifier, the codebook and the second stage,
# full and pruned (a learned codebook's pruned figures are the ones to read: on a vocabulary with many dead codes the
# zero-bias MaskGIT prior's escape from the unigram plateau is chance, README "The second stage's budget, measured")
# (figure, column label, number format of mean and std)
HEADLINE_TABLE = (("psnr", "PSNR dB", "{:.2f}"), ("psnr_lead_over_equal_bits_db", "lead over equal-bits dB", "{:+.2f}"),
                  ("ssim", "SSIM", "{:.3f}"), ("classifier_accuracy", "recon. classified", "{:.3f}"),
                  ("classifier_fd", "FD (classifier)", "{:.1f}"), ("active_codes", "active codes", "{:.0f}"),
                  ("bits_per_token", "bits/token", "{:.2f}"),
                  ("generation/classifier_accuracy", "samples classified", "{:.3f}"),
                  ("generation/classifier_fd", "sample FD (classifier)", "{:.1f}"),
                  ("generation_pruned/classifier_accuracy", "pruned: samples classified", "{:.3f}"),
                  ("generation_pruned/classifier_fd", "pruned: sample FD", "{:.1f}"))
# the second stage (experiments.study.generation), as (field, header): the prior on the run's tokens, and on the
# tokens of the run's tokenizer with its codebook pruned to the used codes
GENERATION_TABLE = (("generation/classifier_accuracy", "samples classified", "{:.3f}"),
                    ("generation/classifier_fd", "sample FD (classifier)", "{:.1f}"),
                    ("generation/prior_final_loss", "prior final loss", "{:.3f}"),
                    ("generation/samples_per_second", "samples/s", "{:.1f}"),
                    ("generation/sampled_unused_code_share", "sampled tokens of unused codes", "{:.4f}"),
                    ("generation_pruned/codebook_size", "pruned K", "{:.0f}"),
                    ("generation_pruned/classifier_accuracy", "pruned: samples classified", "{:.3f}"),
                    ("generation_pruned/classifier_fd", "pruned: sample FD", "{:.1f}"),
                    ("generation_pruned/prior_final_loss", "pruned: prior final loss", "{:.3f}"))


# ----------------------------------------------------------------------------- seeds
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
        collapsed_seeds (how many runs collapsed, ``detect_collapse``), collapse_steps {seed: step};
        converged_seeds / convergence_known_seeds (``convergence_report``: runs whose validation PSNR flattened /
        runs with enough validation points to tell).
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
        for status in ("failed", "pending"):
            row[f"generation_{status}"] = [f"{r['run']}{'' if key == 'generation' else ' (pruned)'}" for r in runs
                                           for key in ("generation", "generation_pruned")
                                           if (r.get(key) or {}).get("status") == status]
        row["converged_seeds"] = sum(1 for r in runs if r.get("converged") is True)
        row["convergence_known_seeds"] = sum(1 for r in runs if r.get("converged") is not None)
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


def mean_std_cell(row: dict, key: str, number_format: str | None = None) -> str:
    """"mean ± std" of a row's figure (mean alone for one seed); ``number_format`` formats both, else 4/2
    significant digits. A figure that fewer of the row's seeds have (``<key>_n`` < ``num_seeds``, e.g. second
    stages still pending) says so: "(n of N seeds)"."""
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "n/a"
    if number_format is not None:
        text = number_format.format(mean)
        text = text if std is None else f"{text} ± {number_format.format(std).lstrip('+')}"
    else:
        text = _fmt(mean) if std is None else f"{_fmt(mean)} ± {std:.2g}"
    count, seeds = row.get(f"{key}_n"), row.get("num_seeds")
    return text if count is None or seeds is None or count >= seeds else f"{text} ({count} of {seeds} seeds)"


def markdown_table(rows: Sequence[dict]) -> str:
    """Per-run table (``table_rows``)."""
    header = ["quantizer", "K", "seed", "steps", "PSNR dB", "mean-colour PSNR", "grid-thumb. PSNR",
              "equal-bits PSNR", "lead over equal-bits dB", "SSIM", "rFID", "active", "util.", "perplexity",
              "bits/token", "log2 active", "mean max p", "mean sum p^2", "latent spread", "codebook spread",
              "STE gain", "LN gamma RMS", "val PSNR gain, last quarter dB", "img/s",
              "quant. peak MiB", "final loss", "train s", "collapsed at step"]
    keys = ["quantizer", "K", "seed", "steps", "psnr", *BASELINE_COLUMNS, "ssim", "rfid", "active_codes", "utilisation",
            "perplexity", "bits_per_token", "log2_active_codes", "final_mean_max_prob", "final_mean_sum_p_sq",
            "final_latent_spread", "final_codebook_spread", "final_ste_gain", "final_pre_norm_gamma_rms",
            "psnr_gain_last_quarter_db", "images_per_sec", "quantizer_peak_mib", "final_loss", "train_seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        collapsed = _fmt(row.get("collapse_step")) if row.get("collapsed") else ("no" if row.get("collapsed") is False
                                                                                 else "n/a")
        lines.append("| " + " | ".join([*(_fmt(row.get(k)) for k in keys), collapsed]) + " |")
    return "\n".join(lines)


def markdown_summary(rows: Sequence[dict], fraction: float, columns: Sequence[tuple] = ROW_TABLE) -> str:
    """The (quantizer, K) table: mean ± std over seeds of ``columns`` ((figure, label[, number format])) and
    the collapsed-seed count (``aggregate_runs``)."""
    header = ["quantizer", "K", "seeds", "collapsed", "converged", "steps", *(column[1] for column in columns)]
    lines = [f"Mean ± sample std over seeds. collapsed = seeds whose training-batch hard perplexity or active "
             f"codes ended below {fraction:g} x K (experiments.study.detect_collapse); converged = seeds whose "
             f"validation PSNR gained < {CONVERGENCE_GAIN_DB} dB over the last quarter of the steps, of those with "
             f"validation curves (experiments.study.convergence_report).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        known = row.get("convergence_known_seeds", 0)
        converged = f"{row.get('converged_seeds', 0)}/{known}" if known else "n/a"
        cells = [row["quantizer"], str(row["K"]), str(row["num_seeds"]), f"{row['collapsed_seeds']}/{row['num_seeds']}",
                 converged, _fmt(row.get("steps")), *(mean_std_cell(row, column[0], *column[2:]) for column in columns)]
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
    claims = paper_claims(results)
    paths = {"json": write_json(output_dir / "results.json",
                                {"rows": rows, "runs": list(results), "collapse_rule": rule, "claims": claims,
                                 "skipped": [{"run": n, "reason": r} for n, r in skipped]})}
    columns = list(dict.fromkeys(key for row in rows for key in row
                                 if key not in ("runs", "collapse_steps", "generation_failed", "generation_pending")))
    paths["csv"] = _write_csv(output_dir / "results.csv", columns, rows)
    paths["runs_csv"] = _write_csv(output_dir / "runs.csv", list(TABLE_COLUMNS), table_rows(results))
    text = ("Headline:\n\n" + markdown_summary(rows, collapse_fraction, HEADLINE_TABLE)
            + ("\n\nGeneration (a prior trained on each run's tokens):\n\n"
               + markdown_summary(rows, collapse_fraction, GENERATION_TABLE)
               if any("generation/classifier_accuracy_mean" in row for row in rows) else "")
            + "\n\nAll columns:\n\n" + markdown_summary(rows, collapse_fraction)
            + "\n\nPer run:\n\n" + markdown_table(table_rows(results)))
    if claims:
        text += ("\n\nThe paper's claims (relative change of LGQ against the baseline, 95 % Welch interval over "
                 "seeds; experiments.study.claims):\n\n" + claims_markdown(claims))
    failed = [name for row in rows for name in row["generation_failed"]]
    if failed:
        text += "\n\nSecond stage failed (see each run's result.json): " + ", ".join(failed)
    pending = [name for row in rows for name in row["generation_pending"]]
    if pending:
        text += ("\n\nSecond stage not made with the study's generation settings (--finished-only trains none: run "
                 "the study, or experiments.study.prior_budget with that recipe): " + ", ".join(pending))
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
