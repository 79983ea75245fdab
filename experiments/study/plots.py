"""The study's plots: rate-distortion, utilisation, code usage, training curves, codebook geometry."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from common.training import read_history
from eval.codebook_geometry import write_codebook_geometry
from experiments.study.tables import aggregate_runs
from tokenizer.model import LGQTokenizer


# ----------------------------------------------------------------------------- plots
def _plotting(results: Sequence[dict], output_dir: Path):
    """(pyplot on the Agg backend, <output_dir>/plots created, one tab10 colour per quantizer in order of appearance)."""
    import matplotlib  # lazy: plotting only; the Agg backend is chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = output_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    quantizers = list(dict.fromkeys(r["quantizer"] for r in results))
    return plt, plot_dir, {q: plt.cm.tab10(i % 10) for i, q in enumerate(quantizers)}


def make_plots(results: Sequence[dict], output_dir: Path) -> list[Path]:
    """PNG figures in <output_dir>/plots (matplotlib, Agg backend); error bars = sample std over seeds:
    rate-distortion, utilisation vs K, code-usage curves and training curves."""
    plt, plot_dir, colours = _plotting(results, output_dir)
    rows = aggregate_runs(results)
    return [plot_rate_distortion(plt, results, rows, colours, plot_dir / "rate_distortion.png"),
            plot_utilisation(plt, rows, colours, plot_dir / "utilisation_vs_K.png"),
            plot_code_usage(plt, results, colours, plot_dir / "code_usage.png"),
            plot_training_curves(plt, results, colours, plot_dir / "training_curves.png"),
            *([plot_generation(plt, results, rows, colours, plot_dir / "generation.png")]
              if any(row.get("generation/classifier_accuracy_mean") is not None for row in rows) else []),
            *geometry_plots(results, plot_dir / "geometry")]


def plot_curves(results: Sequence[dict], output_dir: Path) -> Path:
    """Only the training curves (``plot_training_curves``) into <output_dir>/plots/training_curves.png."""
    plt, plot_dir, colours = _plotting(results, output_dir)
    return plot_training_curves(plt, results, colours, plot_dir / "training_curves.png")


def plot_generation(plt, results: Sequence[dict], rows: Sequence[dict], colours: dict, path: Path) -> Path:
    """The second stage: sample quality (classified as their class; FD of classifier features, lower is better)
    against active codes, bits per token and reconstruction PSNR, mean ± std over seeds, and every run's own
    figures as points (filled: the full codebook; hollow: pruned to its used codes), so an outcome that differs
    between seeds is seen, not averaged away."""
    qualities = (("generation/classifier_accuracy", "samples classified as their class"),
                 ("generation/classifier_fd", "sample FD (classifier features)"))
    axes_x = (("active_codes", "active codes (log2 axis)", True), ("bits_per_token", "bits per token", False),
              ("psnr", "reconstruction PSNR dB", False))
    fig, axes = plt.subplots(len(qualities), len(axes_x), figsize=(15, 8), squeeze=False)
    for i, (y_key, y_label) in enumerate(qualities):
        for j, (x_key, x_label, log_x) in enumerate(axes_x):
            errorbars(axes[i][j], rows, colours, x_key, y_key, log_x=log_x)
            stage_points(axes[i][j], results, colours, x_key, y_key.split("/", 1)[1])
            axes[i][j].set_xlabel(x_label)
            axes[i][j].set_ylabel(y_label)
    axes[0][0].legend()
    fig.suptitle("Generation quality of a prior trained on each tokenizer's tokens (bars: mean ± std over seeds; "
                 "points: each run, hollow = codebook pruned to its used codes)")
    fig.tight_layout()
    return _save(fig, path)


def stage_points(ax, results: Sequence[dict], colours: dict, x_key: str, figure: str) -> None:
    """One point per run and second stage: filled for ``generation``, hollow for ``generation_pruned``."""
    for stage, filled in (("generation", True), ("generation_pruned", False)):
        for q in colours:
            points = [(r[x_key], r[stage][figure]) for r in results if r["quantizer"] == q
                      and r.get(x_key) is not None and (r.get(stage) or {}).get(figure) is not None]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, s=18, alpha=0.6, edgecolors=colours[q], linewidths=1.0,
                           facecolors=colours[q] if filled else "none", zorder=3)


def errorbars(ax, rows: Sequence[dict], colours: dict, x_key: str, y_key: str, log_x: bool = False) -> None:
    """One line per quantizer through its (mean x, mean y) points over K, with std error bars and K labels."""
    for q in colours:
        points = [row for row in rows if row["quantizer"] == q and row.get(f"{x_key}_mean") is not None
                  and row.get(f"{y_key}_mean") is not None]
        if not points:
            continue
        points.sort(key=lambda row: row[f"{x_key}_mean"])
        xs = [row[f"{x_key}_mean"] for row in points]
        ys = [row[f"{y_key}_mean"] for row in points]
        x_err = [row.get(f"{x_key}_std") or 0.0 for row in points]
        y_err = [row.get(f"{y_key}_std") or 0.0 for row in points]
        ax.errorbar(xs, ys, xerr=x_err, yerr=y_err, color=colours[q], label=q, marker="o", capsize=3,
                    linewidth=0.8)
        for row, x, y in zip(points, xs, ys):
            ax.annotate(f"K{row['K']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if log_x:
        log2_axis(ax)
    ax.grid(alpha=0.3)


def log2_axis(ax) -> None:
    """A log2 x axis whose ticks read as plain numbers (256, 1024, not 2^8); where the data span less than two
    octaves (one K: every point between two powers of two, which would leave no labelled tick) the ticks at 1.25,
    1.5 and 1.75 times each power of two are labelled too."""
    from matplotlib import ticker

    ax.set_xscale("log", base=2)
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    low, high = ax.get_xlim()
    if low > 0 and high / low < 4:
        ax.xaxis.set_minor_locator(ticker.LogLocator(base=2, subs=(1.25, 1.5, 1.75)))
        ax.xaxis.set_minor_formatter(plain)


def plot_rate_distortion(plt, results: Sequence[dict], rows: Sequence[dict], colours: dict, path: Path) -> Path:
    """PSNR (and rFID when measured) against active codes and against bits per token."""
    distortions = [("psnr", "PSNR (dB, higher is better)")]
    if any(r.get("rfid") is not None for r in results):
        distortions.append(("rfid", "rFID (lower is better)"))
    fig, axes = plt.subplots(len(distortions), 2, figsize=(10, 4 * len(distortions)), squeeze=False)
    for row_index, (key, label) in enumerate(distortions):
        errorbars(axes[row_index][0], rows, colours, "active_codes", key, log_x=True)
        axes[row_index][0].set_xlabel("active codes (log2 axis)")
        axes[row_index][0].set_ylabel(label)
        errorbars(axes[row_index][1], rows, colours, "bits_per_token", key)
        axes[row_index][1].set_xlabel("bits per token = log2 perplexity")
        axes[row_index][1].set_ylabel(label)
    axes[0][0].legend()
    fig.suptitle("Rate-distortion (evaluation set; mean ± std over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def plot_utilisation(plt, rows: Sequence[dict], colours: dict, path: Path) -> Path:
    """Codebook utilisation (active / K) against K, one line per quantizer."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for q in colours:
        points = sorted((row["K"], row["utilisation_mean"], row.get("utilisation_std") or 0.0) for row in rows
                        if row["quantizer"] == q and row.get("utilisation_mean") is not None)
        if points:
            ks, means, stds = zip(*points)
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, color=colours[q], label=q)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size K")
    ax.set_ylabel("utilisation = active / K")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def first_label(labelled: set[str], quantizer: str) -> str | None:
    """The quantizer's name the first time (one legend entry per quantizer), then None."""
    if quantizer in labelled:
        return None
    labelled.add(quantizer)
    return quantizer


def plot_code_usage(plt, results: Sequence[dict], colours: dict, path: Path) -> Path:
    """Rank-frequency curves of the used codes, one line per run."""
    labelled: set[str] = set()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        counts_path = Path(r.get("run_dir", "")) / "code_counts.json"
        if not counts_path.is_file():
            continue
        counts = sorted(json.loads(counts_path.read_text())["counts"], reverse=True)
        total = max(sum(counts), 1)
        frequencies = [c / total for c in counts if c > 0]
        ax.plot(range(1, len(frequencies) + 1), frequencies, color=colours[r["quantizer"]], alpha=0.6,
                label=first_label(labelled, r["quantizer"]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (used codes, sorted by frequency; one line per run)")
    ax.set_ylabel("frequency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(plt, results: Sequence[dict], colours: dict, path: Path) -> Path:
    """Pixel MSE and code perplexity on the training batches (and, when logged, validation PSNR, the latents' and
    centres' spread and the mean max probability) over the steps, one line per run."""
    # the total loss holds each quantizer's own terms (LFQ's entropy term is negative): not comparable, so plot
    # the pixel reconstruction error and the training-batch perplexity, which mean the same for every quantizer;
    # an x marks the step from which a run stayed collapsed
    labelled: set[str] = set()
    curves = [("l2", "pixel MSE on training batches", True), ("codebook/perplexity", "code perplexity on training batches", True)]
    histories = [read_history(r.get("run_dir", "")) for r in results]
    logged = {key for history in histories for row in history for key in row}
    # panels shown only when some run logged them: validation PSNR; for LGQ's runs where the latents sit (their
    # spread; the centres' dashed) and how sharp the assignments are
    curves += [curve for curve in (("val/psnr", "validation PSNR dB (training weights)", False),
                                   ("quantizer/latent_spread", "mean ||x - mean x||^2 (dashed: centres)", True),
                                   ("quantizer/mean_max_prob", "mean max_k p_nk on training batches", False),
                                   ("quantizer/ste_gain", "straight-through gain (1 = identity)", True))
               if curve[0] in logged]
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5))
    for r, history in zip(results, histories):
        label = first_label(labelled, r["quantizer"])
        collapse_step = (r.get("collapse") or {}).get("collapse_step")
        for ax, (key, _, _) in zip(axes, curves):
            points = [(row["step"], row[key]) for row in history if key in row]
            if points:
                ax.plot(*zip(*points), color=colours[r["quantizer"]], alpha=0.6, label=label)
                marks = [(step, value) for step, value in points if step == collapse_step]
                if marks:
                    ax.scatter(*zip(*marks), marker="x", color=colours[r["quantizer"]], s=40)
            if key == "quantizer/latent_spread":
                centres = [(row["step"], row["quantizer/codebook_spread"]) for row in history
                           if "quantizer/codebook_spread" in row]
                if centres:
                    ax.plot(*zip(*centres), color=colours[r["quantizer"]], alpha=0.6, linestyle="--")
    for ax, (_, label, log_scale) in zip(axes, curves):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def geometry_plots(results: Sequence[dict], geometry_dir: Path) -> list[Path]:
    """Per run with an export and code_counts.json: eval.codebook_geometry's JSON and plot in geometry_dir/<run>/."""
    paths = []
    for r in results:
        run_dir = Path(r.get("run_dir", ""))
        counts_path, export = run_dir / "code_counts.json", run_dir / "tokenizer"
        if counts_path.is_file() and export.is_dir():
            tokenizer = LGQTokenizer.from_pretrained(str(export))
            geometry = write_codebook_geometry(tokenizer, json.loads(counts_path.read_text())["counts"],
                                               geometry_dir / run_dir.name, title=run_dir.name,
                                               protocol={"counts_file": str(counts_path)})
            paths.append(Path(geometry["plot"]))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # lazy: plotting only; the Agg backend is chosen before pyplot is imported

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
