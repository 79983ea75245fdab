"""What a run's history.jsonl says: throughput, final losses, sharpness, convergence, collapse."""
from __future__ import annotations

import statistics
from typing import Any, Sequence

SHARPNESS_KEYS = {"mean_max_prob": "quantizer/mean_max_prob", "mean_sum_p_sq": "quantizer/mean_sum_p_sq"}
# where the latents sit: their spread and the centres' (LGQ), and the pre-quantizer LayerNorm's learnt scale
GEOMETRY_KEYS = {"latent_spread": "quantizer/latent_spread", "codebook_spread": "quantizer/codebook_spread",
                 "ste_gain": "quantizer/ste_gain", "pre_norm_gamma_rms": "pre_norm/gamma_rms"}
LAST_QUARTER_KEYS = {**SHARPNESS_KEYS, **GEOMETRY_KEYS}
LAST_QUARTER_FIELDS = tuple(f"final_{name}" for name in LAST_QUARTER_KEYS)  # training_summary's last-quarter means
CONVERGENCE_GAIN_DB = 0.1  # converged: validation PSNR gains less than this over the last quarter of the steps


def training_summary(history: list[dict] | None) -> dict[str, Any]:
    """Throughput (median images/s, first window dropped if several), the last logged loss terms, the
    assignment sharpness of the last quarter of the steps and the convergence of the validation PSNR.

    Sharpness (LGQ, None for quantizers without soft assignments): ``final_mean_max_prob`` = mean over the
    logged steps s >= 3/4 S of mean_n max_k p_nk, ``final_mean_sum_p_sq`` likewise of mean_n sum_k p_nk^2
    (1 = one-hot; training batches). ``final_latent_spread`` / ``final_codebook_spread`` / ``final_ste_gain`` /
    ``final_pre_norm_gamma_rms`` likewise of mean_n ||x_n - mean x||^2, mean_k ||c_k - mean c||^2, the
    straight-through gain (LGQuantizer.straight_through_gain: the mean eigenvalue of dq~/dx, 1 = the identity
    of VQ / FSQ) and the LayerNorm's RMS scale (None when not logged). Convergence (``convergence_report``) from the ``val/psnr`` rows.
    """
    if not history:
        return {"images_per_sec": None, "final_losses": {}, "logged_steps": 0,
                **dict.fromkeys(LAST_QUARTER_FIELDS), **convergence_report([])}
    train_rows = [row for row in history if "loss" in row] or history
    speeds = [row["images_per_sec"] for row in train_rows if "images_per_sec" in row]
    if len(speeds) > 1:
        speeds = speeds[1:]
    last = train_rows[-1]
    losses = {k: v for k, v in last.items() if k == "loss" or k.startswith("loss/") or k.startswith("loss_")}
    last_step = max(row["step"] for row in history)
    last_quarter = {}
    for name, key in LAST_QUARTER_KEYS.items():
        values = [row[key] for row in train_rows if key in row and row["step"] >= 0.75 * last_step]
        last_quarter[f"final_{name}"] = statistics.fmean(values) if values else None
    return {"images_per_sec": statistics.median(speeds) if speeds else None, "final_losses": losses,
            "logged_steps": len(train_rows), **last_quarter, **convergence_report(history)}


def convergence_report(history: Sequence[dict], gain_db: float = CONVERGENCE_GAIN_DB) -> dict[str, Any]:
    """Has the validation PSNR flattened? From the ``val/psnr`` rows (s_i, v_i) of history.jsonl:

        gain = mean{v_i : s_i >= 0.9 S} - mean{v_i : 0.65 S <= s_i <= 0.75 S},   S = last validation step

    i.e. the gain over (about) the last quarter of the steps, each end averaged over a window to damp the noise of
    single evaluations; ``converged`` = gain < ``gain_db`` (None without >= 2 points in each window).
    """
    points = [(row["step"], row["val/psnr"]) for row in history if "val/psnr" in row]
    report = {"val_psnr_last": points[-1][1] if points else None, "psnr_gain_last_quarter_db": None,
              "converged": None, "val_points": len(points)}
    if not points:
        return report
    last = points[-1][0]
    end = [v for s, v in points if s >= 0.9 * last]
    before = [v for s, v in points if 0.65 * last <= s <= 0.75 * last]
    if len(end) >= 2 and len(before) >= 2:
        gain = statistics.fmean(end) - statistics.fmean(before)
        report.update(psnr_gain_last_quarter_db=gain, converged=gain < gain_db)
    return report


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
