"""The paper's headline claims, in the paper's form, from a study's runs (docs/method.md, "headline claims").

At K = 16384 on ImageNet the paper reports, as relative changes of LGQ against a baseline,

    vs FSQ:    rFID -11.88 %,  active codes -49.96 %
    vs SimVQ:  rFID  -6.06 %,  effective representation rate -49.45 %

Here, per K where both quantizers have >= 2 finished seeds, the relative change of LGQ against the baseline is

    r = (mean_LGQ - mean_base) / mean_base x 100 %

with a 95 % interval from Welch's t interval of the difference of the means, divided by mean_base (the
baseline's mean is treated as fixed: with 3 seeds per side the difference dominates the uncertainty). The
reconstruction distance is rFID when it was measured, else FD-<data> of the reconstructions (the data set's
classifier features against real val, the laptop stand-in); PSNR is reported beside it. The effective
representation rate is ambiguous in the paper: it is reported both as the perplexity exp H (the effective number
of codes, whose halving matches the paper's -49 %) and in bits, log2 exp H.

Verdict per claim (the claimed direction is "LGQ lower"): reproduced when the whole interval is below 0,
contradicted when it is entirely above 0, else "not resolvable at this scale".
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

PAPER_CLAIMS: tuple[dict[str, Any], ...] = (
    {"baseline": "fsq", "quantity": "reconstruction distance", "metrics": ("rfid", "classifier_fd"), "paper_pct": -11.88},
    {"baseline": "fsq", "quantity": "active codes", "metrics": ("active_codes",), "paper_pct": -49.96},
    {"baseline": "simvq", "quantity": "reconstruction distance", "metrics": ("rfid", "classifier_fd"), "paper_pct": -6.06},
    {"baseline": "simvq", "quantity": "effective representation rate (perplexity)", "metrics": ("perplexity",),
     "paper_pct": -49.45},
)
BASELINE_NAMES = {"fsq": "FSQ", "simvq": "SimVQ"}
CONTEXT_METRICS = (("psnr", "PSNR dB (higher is better)"),
                   ("bits_per_token", "effective rate in bits, log2 perplexity"))


def _t_quantile_975(dof: float) -> float:
    from scipy.stats import t  # scipy: a scikit-image dependency

    return float(t.ppf(0.975, dof))


def relative_change(lgq: Sequence[float], base: Sequence[float]) -> dict[str, Any] | None:
    """r = (mean(lgq) - mean(base)) / mean(base) x 100 with Welch's 95 % interval (module docstring); None with
    fewer than 2 values on a side or a zero baseline mean."""
    if len(lgq) < 2 or len(base) < 2:
        return None
    mean_l, mean_b = statistics.fmean(lgq), statistics.fmean(base)
    if mean_b == 0:
        return None
    var_l, var_b = statistics.variance(lgq) / len(lgq), statistics.variance(base) / len(base)
    se = math.sqrt(var_l + var_b)
    if se > 0:
        dof = (var_l + var_b) ** 2 / ((var_l ** 2) / (len(lgq) - 1) + (var_b ** 2) / (len(base) - 1))
        half = _t_quantile_975(dof) * se
    else:
        dof, half = float("inf"), 0.0
    scale = 100.0 / abs(mean_b)
    diff = mean_l - mean_b
    return {"relative_pct": diff * scale, "interval_pct": [(diff - half) * scale, (diff + half) * scale],
            "lgq_mean": mean_l, "baseline_mean": mean_b, "lgq_n": len(lgq), "baseline_n": len(base),
            "welch_dof": dof}


def verdict(change: dict[str, Any] | None) -> str:
    if change is None:
        return "not resolvable at this scale (fewer than 2 seeds on a side)"
    low, high = change["interval_pct"]
    if high < 0:
        return "reproduced (LGQ lower, interval below 0)"
    if low > 0:
        return "contradicted (LGQ higher, interval above 0)"
    return "not resolvable at this scale (interval contains 0)"


def _values(runs: Sequence[dict], metric: str) -> list[float]:
    return [float(r[metric]) for r in runs if r.get(metric) is not None]


def paper_claims(results: Sequence[dict]) -> list[dict[str, Any]]:
    """One entry per (claim, K): the metric used, the relative change with its interval, the paper's figure, the
    verdict, and the same relative change for the context metrics (PSNR, bits)."""
    by_key: dict[tuple[str, int], list[dict]] = {}
    for result in results:
        by_key.setdefault((result["quantizer"], int(result["K"])), []).append(result)
    entries = []
    for K in sorted({K for quantizer, K in by_key if quantizer == "lgq"}):
        for claim in PAPER_CLAIMS:
            lgq_runs, base_runs = by_key.get(("lgq", K), []), by_key.get((claim["baseline"], K), [])
            if not base_runs:
                continue
            metric = next((m for m in claim["metrics"]
                           if all(r.get(m) is not None for r in lgq_runs + base_runs)), None)
            change = relative_change(_values(lgq_runs, metric), _values(base_runs, metric)) if metric else None
            context = {name: relative_change(_values(lgq_runs, name), _values(base_runs, name))
                       for name, _ in CONTEXT_METRICS}
            entries.append({"claim": f"LGQ vs {BASELINE_NAMES[claim['baseline']]}: {claim['quantity']}", "baseline": claim["baseline"], "K": K, "metric": metric,
                            "paper_pct": claim["paper_pct"], **(change or {}), "verdict": verdict(change),
                            "context": context})
    return entries


def claims_markdown(entries: Sequence[dict]) -> str:
    """The claims table: relative change of LGQ against the baseline, 95 % interval, the paper's figure, verdict."""
    if not entries:
        return ""
    lines = ["| claim | K | metric | LGQ vs baseline | 95 % interval | paper (K = 16384, ImageNet) | PSNR change | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if "relative_pct" in e:
            change, interval = f"{e['relative_pct']:+.1f} %", "[{:+.1f}, {:+.1f}] %".format(*e["interval_pct"])
        else:
            change, interval = "n/a", "n/a"
        psnr = (e["context"] or {}).get("psnr")
        psnr_text = f"{psnr['relative_pct']:+.2f} %" if psnr else "n/a"
        lines.append(f"| {e['claim']} | {e['K']} | {e['metric'] or 'n/a'} | {change} | {interval} | "
                     f"{e['paper_pct']:+.2f} % | {psnr_text} | {e['verdict']} |")
    return "\n".join(lines)
