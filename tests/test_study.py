"""experiments.study: the quantizer x K x seed sweep on a tiny synthetic config (two quantizers, one K, a few steps)."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ddp import free_port  # tests/ddp.py
from experiments import study
from common.training import read_history

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tokenizer" / "tiny.yaml"
RUN_OVERRIDES = ["train.max_steps=4", "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=0",
                 "train.image_log_every=0", "train.tracker=none", "train.progress_bar=false", "data.num_images=16",
                 "data.num_val_images=8", "eval.quantizer_init_batches=1", "model.base_channels=8"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_study(tmp_path, **fields):
    payload = {"tokenizer_configs": [str(TINY)], "quantizers": ["vq", "fsq"], "codebook_sizes": [1024],
               "seeds": [0], "overrides": RUN_OVERRIDES, "measure_memory": False,
               "evaluation": {"split": "val", "batch_size": 8}, "output_dir": str(tmp_path / "out"), **fields}
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(payload))  # JSON is YAML
    return path


@pytest.mark.slow
def test_sweep_over_seeds_writes_runs_rows_table_plots_and_reuses_finished_runs(tmp_path, capsys):
    """The tiny grid 2 quantizers x 1 K x 2 seeds: per-run results, one row per (quantizer, K) with mean / std
    over the seeds (checked against the runs), collapse fields, tables, plots; a second call reuses every run."""
    config = write_study(tmp_path, seeds=[0, 1])
    out = tmp_path / "out"
    results = study.main(["--config", str(config), "--output-dir", str(out)])
    assert [r["run"] for r in results] == ["vq_K1024_s0", "fsq_K1024_s0", "vq_K1024_s1", "fsq_K1024_s1"]

    for name in ("vq_K1024_s0", "fsq_K1024_s0", "vq_K1024_s1", "fsq_K1024_s1"):
        run_dir = out / "runs" / name
        result = json.loads((run_dir / "result.json").read_text())
        assert (run_dir / "tokenizer").is_dir()
        assert result["torch_threads"] == 1
        assert result["steps"] == 4 and result["K"] == 1024 and result["seed"] == int(name[-1])
        for key in ("psnr", "ssim", "utilisation", "perplexity", "bits_per_token", "log2_active_codes",
                    "images_per_sec", "final_loss", "train_seconds"):
            assert math.isfinite(result[key]), key
        assert 1 <= result["active_codes"] <= 1024
        assert result["rfid"] is None and any("rFID" in note for note in result["notes"])
        for baseline in ("mean_colour", "token_grid_thumbnail", "equal_bits_thumbnail"):
            assert result[f"psnr_{baseline}"] == result["baselines"][baseline]["psnr"]
            assert math.isfinite(result[f"psnr_{baseline}"])
        assert result["psnr_lead_over_equal_bits_db"] == pytest.approx(result["psnr"] - result["psnr_equal_bits_thumbnail"])
        assert result["effective_rate"]["log2_perplexity"] == pytest.approx(math.log2(result["perplexity"]))
        counts = json.loads((run_dir / "code_counts.json").read_text())["counts"]
        assert len(counts) == 1024 and sum(c > 0 for c in counts) == result["active_codes"]
        assert [row["step"] for row in read_history(run_dir)] == [2, 4]
        assert result["config"]["model"]["quantizer"] == name.split("_")[0]
        assert result["config"]["model"]["pre_quantizer_norm"] == "groupnorm_layernorm"
        assert result["config"]["train"]["max_steps"] == 4  # identical recipe for every run
    # the seed changes the run (initialisation, batch order), not the recipe
    first, second = (json.loads((out / "runs" / f"vq_K1024_s{s}" / "result.json").read_text()) for s in (0, 1))
    assert first["psnr"] != second["psnr"]
    assert {**first["config"]["train"], "seed": 0, "output_dir": ""} == {**second["config"]["train"], "seed": 0,
                                                                          "output_dir": ""}

    merged = json.loads((out / "results.json").read_text())
    assert len(merged["runs"]) == 4 and merged["collapse_rule"]["fraction_of_K"] == 0.01
    assert [(row["quantizer"], row["K"], row["seeds"]) for row in merged["rows"]] == [("vq", 1024, [0, 1]),
                                                                                      ("fsq", 1024, [0, 1])]
    for row in merged["rows"]:
        runs = [r for r in results if r["quantizer"] == row["quantizer"]]
        for key in ("psnr", "ssim", "active_codes", "utilisation", "perplexity", "bits_per_token", "final_loss",
                    "psnr_equal_bits_thumbnail", "psnr_lead_over_equal_bits_db"):
            values = [r[key] for r in runs]
            assert row[f"{key}_mean"] == pytest.approx(sum(values) / 2), key
            assert row[f"{key}_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2)), key
            assert row[f"{key}_n"] == 2
        assert "rfid_mean" not in row and "seed_mean" not in row and "K_mean" not in row
        assert row["num_seeds"] == 2 and row["steps"] == 4
        assert row["collapsed_seeds"] == sum(bool(r["collapse"]["collapsed"]) for r in runs)
    for r in merged["runs"]:
        assert r["collapse"]["threshold"] == pytest.approx(0.01 * 1024) and r["collapse"]["collapsed"] in (True, False)

    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["quantizer"] for row in rows] == ["vq", "fsq"]
    assert all(math.isfinite(float(row["psnr_mean"])) and math.isfinite(float(row["psnr_std"])) for row in rows)
    assert all(math.isfinite(float(row["psnr_equal_bits_thumbnail_mean"]))
               and math.isfinite(float(row["psnr_lead_over_equal_bits_db_std"])) for row in rows)
    with open(out / "runs.csv") as handle:
        run_rows = list(csv.DictReader(handle))
    assert [row["run"] for row in run_rows] == [r["run"] for r in results]
    assert all(math.isfinite(float(row["psnr_equal_bits_thumbnail"])) for row in run_rows)
    table = (out / "results.md").read_text()
    headline_header, full_header = [line for line in table.splitlines() if line.startswith("| quantizer | K | seeds |")]
    assert "lead over equal-bits dB" in headline_header and "recon. classified" in headline_header
    assert "equal-bits PSNR" in full_header and "lead over equal-bits dB" in full_header
    assert table.index("Headline:") < table.index(headline_header) < table.index("All columns:")
    summary_lines = [line for line in table.splitlines() if line.startswith("| vq | 1024 | 2 |")]
    assert len(summary_lines) == 2 and all(" ± " in line for line in summary_lines)
    assert "below 0.01 x K" in table
    for plot in ("rate_distortion", "utilisation_vs_K", "code_usage", "training_curves"):
        png = out / "plots" / f"{plot}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    for r in results:  # the codebook geometry of every run, from its evaluation counts
        geometry = json.loads((out / "plots" / "geometry" / r["run"] / "geometry.json").read_text())
        assert geometry["codebook_size"] == 1024 and geometry["active_codes"] == r["active_codes"]
        assert (out / "plots" / "geometry" / r["run"] / "codebook_geometry.png").read_bytes()[:4] == b"\x89PNG"

    # second invocation: finished runs are reused, nothing is retrained
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/tokenizer/*")}
    capsys.readouterr()
    again = study.main(["--config", str(config), "--output-dir", str(out)])
    log = capsys.readouterr().out
    assert log.count("[study] reusing finished run") == 4 and "[study] training" not in log
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/tokenizer/*")} == stamps
    assert [r["psnr"] for r in again] == [r["psnr"] for r in results]

    # a different recipe in the same folder is refused, not silently reused
    with pytest.raises(ValueError, match=r"different recipe.*train\.max_steps"):
        study.main(["--config", str(config), "--output-dir", str(out), "train.max_steps=5"])

    # --finished-only (a sweep still running): the finished runs are merged, the missing ones listed, none trained
    capsys.readouterr()
    partial = study.main(["--config", str(config), "--output-dir", str(out), "--seeds", "0", "1", "2", "--finished-only"])
    log = capsys.readouterr().out
    assert [r["run"] for r in partial] == [r["run"] for r in results] and "[study] training" not in log
    assert "not finished: vq_K1024_s2, fsq_K1024_s2" in log and not (out / "runs" / "vq_K1024_s2").exists()
    assert [row["seeds"] for row in json.loads((out / "results.json").read_text())["rows"]] == [[0, 1], [0, 1]]

    # --curves (a sweep still running): every run with a history, its last step and convergence so far; trains nothing
    curves = study.main(["--config", str(config), "--output-dir", str(out), "--seeds", "0", "1", "2", "--curves"])
    assert [c["run"] for c in curves] == [r["run"] for r in results] and "[study] training" not in capsys.readouterr().out
    assert all(c["last_step"] == 4 and c["converged"] is None for c in curves)  # no validation rows in these runs
    # the pre-quantizer LayerNorm's learnt scale is logged for every quantizer; the latent spread by LGQ only
    assert all(c["final_pre_norm_gamma_rms"] > 0 and c["final_latent_spread"] is None for c in curves)
    assert [c["final_pre_norm_gamma_rms"] for c in curves] == [r["final_pre_norm_gamma_rms"] for r in results]


@pytest.mark.slow
def test_study_processes_on_one_grid_share_it_and_never_run_one_run_twice_at_once(tmp_path):
    """A run another process holds (its run-folder lock) is put last, then waited for: the study trains the free run
    first and touches the held one only once the lock is released; --finished-only lists a held run as running."""
    from common.files import file_lock

    config, out = write_study(tmp_path), tmp_path / "out"
    held, free = out / "runs" / "vq_K1024_s0", out / "runs" / "fsq_K1024_s0"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with file_lock(held):  # this test process stands for a second study process running vq_K1024_s0
        proc = subprocess.Popen([sys.executable, "-m", "experiments.study", "--config", str(config), "--output-dir",
                                 str(out), "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not (free / "result.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        time.sleep(2)
        assert proc.poll() is None and not held.exists()  # waiting for the held run, not training into it
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "[study] vq_K1024_s0 is running in another process: coming back to it after the others" in log
    assert log.index("[study] training fsq_K1024_s0") < log.index("[study] training vq_K1024_s0")
    assert log.count("[study] training") == 2
    assert [r["run"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["vq_K1024_s0", "fsq_K1024_s0"]

    with file_lock(free):  # finished, but held by another process (e.g. in its second stage): not merged
        partial = study.main(["--config", str(config), "--output-dir", str(out), "--finished-only"])
    assert [r["run"] for r in partial] == ["vq_K1024_s0"]


@pytest.mark.parametrize("active", [[890.0], [206.0, 928.0]])
def test_log2_axes_label_their_ticks_even_for_one_codebook_size(active):
    """One K puts every point between two powers of two: the axis still shows plain-number labels inside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"quantizer": "lgq", "K": 2 ** (2 * i + 8), "active_codes_mean": a, "active_codes_std": 60.0,
             "psnr_mean": 30.0 + i, "psnr_std": 0.1} for i, a in enumerate(active)]
    fig, ax = plt.subplots()
    study.errorbars(ax, rows, {"lgq": "C0"}, "active_codes", "psnr", log_x=True)
    fig.canvas.draw()
    low, high = ax.get_xlim()
    labels = [tick.label1.get_text() for tick in ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
              if low <= tick.get_loc() <= high and tick.label1.get_visible() and tick.label1.get_text()]
    plt.close(fig)
    assert len(labels) >= 2 and all(label.replace(".", "").isdigit() for label in labels), labels


def test_generation_plot_shows_every_runs_full_and_pruned_figures_beside_the_seed_mean(tmp_path, monkeypatch):
    """A bimodal outcome (SimVQ at K = 1024: 0.937, 0.114, 0.091 classified) is drawn run by run, not only as its
    mean: one filled point per run's full-codebook stage, one hollow point per pruned stage."""
    from matplotlib.collections import PathCollection

    from experiments.study import plots

    def result(seed, accuracy, pruned):
        return {"quantizer": "simvq", "K": 1024, "seed": seed, "run": f"simvq_K1024_s{seed}", "psnr": 29.5,
                "active_codes": 500.0 + seed, "bits_per_token": 8.5,
                "generation": {"status": "ok", "classifier_accuracy": accuracy, "classifier_fd": 10.0},
                **({"generation_pruned": {"status": "ok", "classifier_accuracy": 0.95, "classifier_fd": 3.0}}
                   if pruned else {})}

    results = [result(0, 0.937, True), result(1, 0.114, True), result(2, 0.091, False)]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plt, _, colours = plots._plotting(results, tmp_path)
    plots.plot_generation(plt, results, study.aggregate_runs(results), colours, tmp_path / "generation.png")
    top_left = figures[0].axes[0]
    points = [c for c in top_left.collections if isinstance(c, PathCollection)]  # scatter points, not error bars
    full = [tuple(xy) for c in points if len(c.get_facecolors()) for xy in c.get_offsets()]
    hollow = [tuple(xy) for c in points if not len(c.get_facecolors()) for xy in c.get_offsets()]
    plt.close(figures[0])
    assert sorted(full) == [(500.0, 0.937), (501.0, 0.114), (502.0, 0.091)]
    assert sorted(hollow) == [(500.0, 0.95), (501.0, 0.95)]


def test_collapse_is_detected_from_history_with_its_step():
    K = 1000  # threshold 1% = 10 codes
    history = [{"step": 10, "codebook/perplexity": 200.0, "codebook/active_codes": 600},
               {"step": 20, "codebook/perplexity": 8.0, "codebook/active_codes": 50},   # a dip ...
               {"step": 30, "codebook/perplexity": 40.0, "codebook/active_codes": 90},  # ... that recovered
               {"step": 40, "l1": 0.1},                                                # no codebook stats: ignored
               {"step": 50, "codebook/perplexity": 30.0, "codebook/active_codes": 9},   # collapse from here on
               {"step": 60, "codebook/perplexity": 2.5, "codebook/active_codes": 3}]
    report = study.detect_collapse(history, K, 0.01)
    assert report["collapsed"] is True and report["collapse_step"] == 50 and report["first_below_step"] == 20
    assert report["threshold"] == 10.0 and report["min_perplexity"] == 2.5 and report["min_active_codes"] == 3
    healthy = study.detect_collapse(history[:3], K, 0.01)
    assert healthy["collapsed"] is False and healthy["collapse_step"] is None and healthy["first_below_step"] == 20
    assert study.detect_collapse([{"step": 1, "l1": 0.3}], K, 0.01)["collapsed"] is None


def test_rows_aggregate_seeds_and_count_collapsed_runs():
    runs = [{"run": f"vq_K256_s{s}", "quantizer": "vq", "K": 256, "seed": s, "steps": 9, "psnr": p, "rfid": None,
             "classifier": {"accuracy": a}, "config": {"x": 1}, "collapse": {"collapsed": c, "collapse_step": st}}
            for s, p, a, c, st in ((2, 20.0, 0.5, True, 40), (0, 22.0, 0.7, False, None), (1, 24.0, 0.9, True, 10))]
    (row,) = study.aggregate_runs(runs)
    assert row["seeds"] == [0, 1, 2] and row["num_seeds"] == 3 and row["steps"] == 9
    assert row["psnr_mean"] == pytest.approx(22.0) and row["psnr_std"] == pytest.approx(2.0)
    assert row["classifier/accuracy_mean"] == pytest.approx(0.7) and row["classifier/accuracy_std"] == pytest.approx(0.2)
    assert row["collapsed_seeds"] == 2 and row["collapse_steps"] == {"1": 10, "2": 40}
    assert "rfid_mean" not in row and "config/x_mean" not in row and "seed_mean" not in row
    (single,) = study.aggregate_runs(runs[:1])
    assert single["psnr_std"] is None and single["psnr_mean"] == 20.0
    # the headline table formats mean and std alike, per column; one seed shows the mean alone
    headline = study.markdown_summary([row, single], 0.01, [("psnr", "PSNR dB", "{:.2f}"), ("psnr", "lead", "{:+.1f}")])
    assert "| vq | 256 | 3 | 2/3 | n/a | 9 | 22.00 ± 2.00 | +22.0 ± 2.0 |" in headline  # no validation curves
    assert "| vq | 256 | 1 | 1/1 | n/a | 9 | 20.00 | +20.0 |" in headline
    for run, converged in zip(runs, (True, None, False)):
        run["converged"] = converged
    (row,) = study.aggregate_runs(runs)
    assert row["converged_seeds"] == 1 and row["convergence_known_seeds"] == 2
    assert "| vq | 256 | 3 | 2/3 | 1/2 | 9 |" in study.markdown_summary([row], 0.01, [("psnr", "PSNR dB", "{:.2f}")])


def test_convergence_is_the_validation_psnr_gain_over_the_last_quarter():
    rising = [{"step": s, "val/psnr": 10.0 + s / 100} for s in range(100, 1001, 100)]  # +1 dB per 100 steps
    report = study.convergence_report(rising + [{"step": 1000, "loss": 0.1}])
    # end window: steps 900, 1000 (19.5 dB); before: 700 (17.0 dB) (65% .. 75% of 1000: 700 only -> too few)
    assert report["converged"] is None and report["val_points"] == 10 and report["val_psnr_last"] == 20.0
    dense = [{"step": s, "val/psnr": 10.0 + s / 100} for s in range(50, 1001, 50)]
    report = study.convergence_report(dense)
    # end: 900, 950, 1000 -> 19.5; before: 650, 700, 750 -> 17.0; gain 2.5 dB: not converged
    assert report["psnr_gain_last_quarter_db"] == pytest.approx(2.5) and report["converged"] is False
    flat = [{"step": s, "val/psnr": 20.0 + (0.02 if s % 100 else 0.0)} for s in range(50, 1001, 50)]
    assert study.convergence_report(flat)["converged"] is True
    assert study.convergence_report([])["converged"] is None


def test_training_summary_reports_sharpness_of_the_last_quarter_and_skips_validation_rows():
    history = [{"step": s, "loss": 1.0 / s, "images_per_sec": 100.0, "quantizer/mean_max_prob": s / 1000,
                "quantizer/mean_sum_p_sq": s / 2000, "pre_norm/gamma_rms": 1.0 - s / 10000}
               for s in range(100, 1001, 100)]
    history.append({"step": 1000, "val/psnr": 18.0})  # the last row is a validation row
    summary = study.training_summary(history)
    assert summary["final_losses"] == {"loss": pytest.approx(1e-3)} and summary["logged_steps"] == 10
    assert summary["final_mean_max_prob"] == pytest.approx((0.8 + 0.9 + 1.0) / 3)  # steps >= 750
    assert summary["final_mean_sum_p_sq"] == pytest.approx((0.8 + 0.9 + 1.0) / 6)
    assert summary["final_pre_norm_gamma_rms"] == pytest.approx(1.0 - 0.09)
    assert summary["final_latent_spread"] is None  # not logged
    no_soft = study.training_summary([{"step": 10, "loss": 0.5}])
    assert no_soft["final_mean_max_prob"] is None and no_soft["converged"] is None
    assert no_soft["final_pre_norm_gamma_rms"] is None


def test_invalid_combinations_are_skipped_with_a_reason(tmp_path):
    spec = study.load_study_config(write_study(tmp_path))
    runs, skipped = study.plan_runs(spec, tmp_path / "out", ["lfq", "fsq", "vq"], [1000, 2048], [0, 1])
    assert sorted(r.name for r in runs) == ["fsq_K1000_s0", "fsq_K1000_s1", "lfq_K2048_s0", "lfq_K2048_s1",
                                            "vq_K1000_s0", "vq_K1000_s1", "vq_K2048_s0", "vq_K2048_s1"]
    reasons = dict(skipped)
    assert "power of two" in reasons["lfq_K1000_s0"] and "levels" in reasons["fsq_K2048_s1"]
    run = next(r for r in runs if r.name == "vq_K2048_s1")
    assert {"model.quantizer=vq", "model.codebook_size=2048", "train.seed=1"} <= set(run.overrides)
    assert study.accelerate_command(run, ["--multi_gpu"], resume=True)[:6] == [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "tokenizer/train.py", "--config"]
    assert "--resume" in study.accelerate_command(run, [], resume=True)


def test_options_of_the_recipes_own_quantizer_do_not_reach_the_others(tmp_path):
    """A recipe written for LGQ may set LGQ-only options (quant_loss_weight): LGQ's runs keep them, the other
    quantizers train from a copy of the recipe without them and are not skipped; everything else is identical."""
    recipe = tmp_path / "lgq_recipe.yaml"
    recipe.write_text("model:\n  quantizer: lgq\n  quantizer_options:\n    quant_loss_weight: 0.25\n")
    config = write_study(tmp_path, tokenizer_configs=[str(TINY), str(recipe)], quantizers=["lgq", "fsq"],
                         codebook_sizes=[256])
    runs, skipped = study.plan_runs(study.load_study_config(config), tmp_path / "out", ["lgq", "fsq"], [256], [0])
    assert skipped == [] and [spec.name for spec in runs] == ["lgq_K256_s0", "fsq_K256_s0"]
    lgq_cfg, fsq_cfg = (study.load_run_config(spec) for spec in runs)
    assert lgq_cfg.model.quantizer_options == {"quant_loss_weight": 0.25} and fsq_cfg.model.quantizer_options == {}
    assert runs[0].config_files[-1] == str(recipe)
    assert Path(runs[1].config_files[-1]) == tmp_path / "out" / "recipes" / "fsq-lgq_recipe.yaml"
    assert lgq_cfg.train == fsq_cfg.train.__class__(**{**vars(fsq_cfg.train), "output_dir": lgq_cfg.train.output_dir,
                                                       "seed": lgq_cfg.train.seed})


def test_bad_study_config_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        study.load_study_config(write_study(tmp_path, steps=3))
    with pytest.raises(ValueError, match="launcher"):
        study.load_study_config(write_study(tmp_path, launcher="slurm"))
    with pytest.raises(FileNotFoundError):
        study.load_study_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unknown quantizer"):
        study.plan_runs(study.load_study_config(write_study(tmp_path)), tmp_path, ["nope"], [1024], [0])
    with pytest.raises(ValueError, match="distinct"):
        study.plan_runs(study.load_study_config(write_study(tmp_path)), tmp_path, ["vq"], [1024], [0, 0])
    with pytest.raises(ValueError, match="collapse_fraction"):
        study.load_study_config(write_study(tmp_path, collapse_fraction=1.5))


def test_dry_run_with_accelerate_prints_one_launch_per_run_and_resumes_interrupted_runs(tmp_path, capsys):
    config = write_study(tmp_path, launcher="accelerate", accelerate_args=["--num_processes", "2"])
    out = tmp_path / "out"
    (out / "runs" / "fsq_K1024_s0" / "checkpoints" / "step_0000002").mkdir(parents=True)  # an interrupted run
    assert study.main(["--config", str(config), "--output-dir", str(out), "--dry-run"]) == []
    launches = [line for line in capsys.readouterr().out.splitlines() if "-m accelerate.commands.launch" in line]
    assert len(launches) == 2
    assert "--num_processes 2" in launches[0] and "train.py" in launches[0] and "model.quantizer=vq" in launches[0]
    assert "--resume latest" not in launches[0] and "--resume latest" in launches[1]
    assert not (out / "results.csv").exists()


@pytest.mark.slow
def test_accelerate_launcher_two_processes_records_history_and_resumes_an_interrupted_run(tmp_path, monkeypatch,
                                                                                          capfd):
    """A real 2-process CPU DDP run through ``--launcher accelerate`` (the GPU path), then the state of a run
    killed after its step-2 checkpoint: the next invocation resumes it and ends with the same result."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # --multi_gpu on CPU: see tests/ddp.py
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.chdir(ROOT)
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    config = write_study(tmp_path, quantizers=["lgq"], launcher="accelerate", accelerate_args=launch,
                         measure_memory=True, overrides=[*RUN_OVERRIDES, "train.checkpoint_every=2", "train.batch_size=2"])
    out = tmp_path / "out"
    (finished,) = study.main(["--config", str(config), "--output-dir", str(out)])
    assert "2 process(es), global batch 4" in capfd.readouterr().out
    assert math.isfinite(finished["images_per_sec"]) and math.isfinite(finished["final_loss"])
    # LGQ's soft path holds two [chunk, K] fp32 buffers; chunk = all 2 x 8 x 8 tokens of a process's step here
    assert finished["quantizer_memory"]["num_tokens"] == 128
    assert finished["quantizer_peak_mib"] * 2**20 >= 2 * 128 * 1024 * 4
    run_dir = out / "runs" / "lgq_K1024_s0"
    assert [row["step"] for row in read_history(run_dir)] == [2, 4]

    # interrupted after the step-2 checkpoint (its history.jsonl already holds step 4)
    for name in ("result.json", "train_record.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "tokenizer")
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    (resumed,) = study.main(["--config", str(config), "--output-dir", str(out)])
    log = capfd.readouterr().out
    assert "--resume latest" in log and "resumed from" in log and "step 2" in log
    assert [row["step"] for row in read_history(run_dir)] == [2, 4]
    for key in ("psnr", "ssim", "active_codes", "perplexity", "final_loss"):
        assert resumed[key] == pytest.approx(finished[key], rel=1e-5, abs=1e-6), key
    assert any("resumed" in note for note in resumed["notes"])


def test_a_run_folder_exported_in_the_old_config_format_is_refused(tmp_path):
    """Format-1 exports named the parameter-free LayerNorm "layernorm": not the same model as format 2's."""
    from types import SimpleNamespace

    run_dir = tmp_path / "runs" / "lgq_K256_s0"
    (run_dir / "tokenizer").mkdir(parents=True)
    (run_dir / "tokenizer" / "config.json").write_text(json.dumps({"pre_quantizer_norm": "layernorm"}))
    spec = SimpleNamespace(run_dir=run_dir, name="lgq_K256_s0")
    assert study.export_config_format(run_dir / "tokenizer") == 1
    with pytest.raises(ValueError, match="config_format 1.*learnable"):
        study.check_same_recipe(spec, run_cfg=None)


def test_a_run_folder_from_before_a_new_config_key_is_the_same_recipe_while_the_key_keeps_its_default(tmp_path):
    """A key lgq added later (here train.compile) is absent from an older run's config.yaml: at its default the run
    is reused / resumed; at another value it is a different recipe."""
    from types import SimpleNamespace

    from common.config import load_config
    from tokenizer.config import TokenizerRunConfig

    run_dir = tmp_path / "runs" / "vq_K256_s0"
    run_dir.mkdir(parents=True)
    tokenizer_config = ROOT / "configs" / "tokenizer" / "glyphs.yaml"
    old = OmegaConf.to_container(OmegaConf.structured(load_config(TokenizerRunConfig, [tokenizer_config])))
    del old["train"]["compile"]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(old))
    spec = SimpleNamespace(run_dir=run_dir, name="vq_K256_s0")
    study.check_same_recipe(spec, load_config(TokenizerRunConfig, [tokenizer_config]))
    with pytest.raises(ValueError, match=r"different recipe.*train\.compile"):
        study.check_same_recipe(spec, load_config(TokenizerRunConfig, [tokenizer_config], ["train.compile=true"]))


TINY_PRIOR = ROOT / "configs" / "prior" / "tiny.yaml"
PRIOR_OVERRIDES = ["train.max_steps=3", "train.warmup_steps=1", "train.batch_size=4", "train.log_every=1",
                   "train.image_log_every=0", "train.checkpoint_every=0", "train.tracker=none",
                   "train.progress_bar=false", "data.use_augmentations=false", "model.hidden_size=16",
                   "model.num_layers=1"]


@pytest.mark.slow
def test_second_stage_trains_a_prior_per_run_scores_its_samples_and_reports_failures(tmp_path, capsys):
    """generation: for each run its tokens, a prior with the same recipe, class-balanced samples scored by the
    data set's classifier; for the quantizers in prune, again on the codebook pruned to its used codes; tables,
    rows and the plot carry it; a second call reuses it; a stage that raises is reported as failed."""
    generation = {"prior_config": str(TINY_PRIOR), "overrides": PRIOR_OVERRIDES, "num_samples": 8, "batch_size": 4,
                  "num_inference_steps": 2, "guidance_scale": 2.0, "prune": ["lgq"]}
    config = write_study(tmp_path, quantizers=["lgq", "fsq"], codebook_sizes=[256], generation=generation)
    out = tmp_path / "out"
    results = study.main(["--config", str(config), "--output-dir", str(out)])
    by_run = {r["run"]: r for r in results}
    for name in ("lgq_K256_s0", "fsq_K256_s0"):
        stage = by_run[name]["generation"]
        assert stage["status"] == "ok" and stage["num_samples"] == 8 and stage["codebook_size"] == 256
        assert 0.0 <= stage["classifier_accuracy"] <= 1.0 and stage["classifier_fd"] >= 0.0
        assert math.isfinite(stage["prior_final_loss"]) and stage["prior_steps"] == 3
        assert stage["samples_per_second"] > 0
        assert 0.0 <= stage["sampled_unused_code_share"] <= 1.0 and 1 <= stage["sampled_active_codes"] <= 256
        saved = json.loads((out / "runs" / name / "result.json").read_text())["generation"]
        assert saved["classifier_accuracy"] == stage["classifier_accuracy"]
        meta = json.loads((out / "runs" / name / "generation" / "tokens" / "meta.json").read_text())
        assert meta["codebook_size"] == 256 and meta["split"] == "train"
    assert "generation_pruned" not in by_run["fsq_K256_s0"]  # FSQ has no codebook to prune
    pruned = by_run["lgq_K256_s0"]["generation_pruned"]
    assert pruned["status"] == "ok" and 1 <= pruned["codebook_size"] <= 256
    pruned_meta = json.loads((out / "runs" / "lgq_K256_s0" / "generation_pruned" / "tokens" / "meta.json").read_text())
    assert pruned_meta["codebook_size"] == pruned["codebook_size"]

    rows = {row["quantizer"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["lgq"]["generation/classifier_accuracy_mean"] == by_run["lgq_K256_s0"]["generation"]["classifier_accuracy"]
    assert rows["lgq"]["generation_pruned/codebook_size_mean"] == pruned["codebook_size"]
    table = (out / "results.md").read_text()
    assert "Generation (a prior trained on each run's tokens)" in table and "pruned: samples classified" in table
    # the headline leads with the pruned figures beside the full ones: a number for LGQ, n/a for FSQ (no codebook)
    headline = table[table.index("Headline:"):table.index("Generation (a prior")]
    header = next(line for line in headline.splitlines() if line.startswith("| quantizer |")).split(" | ")
    column = header.index("pruned: samples classified")
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in headline.splitlines()
             if line.startswith(("| lgq |", "| fsq |"))}
    assert float(cells["lgq"][column]) == round(pruned["classifier_accuracy"], 3) and cells["fsq"][column] == "n/a"
    assert (out / "plots" / "generation.png").read_bytes()[:4] == b"\x89PNG"

    # reused: nothing retrained
    prior_export = out / "runs" / "lgq_K256_s0" / "generation" / "prior_run" / "prior"
    stamps = {p: p.stat().st_mtime_ns for p in prior_export.iterdir()}
    capsys.readouterr()
    study.main(["--config", str(config), "--output-dir", str(out)])
    assert "second stage" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in prior_export.iterdir()} == stamps

    # other generation settings in the same folder are refused with the difference named, never mixed
    broken = write_study(tmp_path, quantizers=["fsq"], codebook_sizes=[256],
                         generation={**generation, "overrides": [*PRIOR_OVERRIDES, "model.no_such_key=1"]})
    with pytest.raises(ValueError, match=r"other generation settings \(changed: \['overrides'\]\)"):
        study.main(["--config", str(broken), "--output-dir", str(out), "--no-memory"])
    # a failing second stage is kept as failed and listed, the tokenizer results stay
    other = tmp_path / "other"
    (failed,) = study.main(["--config", str(broken), "--output-dir", str(other), "--no-memory"])
    assert failed["generation"]["status"] == "failed" and "no_such_key" in failed["generation"]["error"]
    assert math.isfinite(failed["psnr"])
    assert "Second stage failed (see each run's result.json): fsq_K256_s0" in (other / "results.md").read_text()


def test_a_table_cell_averaged_over_fewer_than_the_rows_seeds_says_how_many():
    from experiments.study.tables import mean_std_cell

    row = {"num_seeds": 3, "psnr_mean": 29.25, "psnr_std": 0.06, "psnr_n": 3,
           "generation/classifier_accuracy_mean": 0.99, "generation/classifier_accuracy_std": None,
           "generation/classifier_accuracy_n": 1}
    assert mean_std_cell(row, "psnr", "{:.2f}") == "29.25 ± 0.06"
    assert mean_std_cell(row, "generation/classifier_accuracy", "{:.3f}") == "0.990 (1 of 3 seeds)"
    assert mean_std_cell(row, "generation/classifier_fd", "{:.1f}") == "n/a"
    assert mean_std_cell({"x_mean": 1.0, "x_std": None}, "x", "{:.1f}") == "1.0"  # no seed count: as it is


def test_unused_code_share_counts_sampled_tokens_of_codes_absent_from_the_train_tokens(tmp_path):
    import torch

    from experiments.study.generation import unused_code_share
    from prior.tokens import save_token_directory

    train = torch.tensor([[[0, 1], [1, 2]], [[2, 2], [0, 0]]])  # codes 0-2 used, 3-7 never
    save_token_directory(tmp_path, train, torch.tensor([0, 1]), codebook_size=8)
    sampled = torch.tensor([[[0, 3], [1, 7]], [[2, 2], [2, 0]]])  # 2 of 8 sampled tokens from unused codes
    assert unused_code_share(sampled, tmp_path) == (0.25, 5)
    assert unused_code_share(train, tmp_path) == (0.0, 3)


def test_generation_settings_fill_defaults_and_name_bad_keys(tmp_path):
    settings = study.generation_settings({"num_samples": 20})
    assert settings["num_samples"] == 20 and settings["prior_config"] == "configs/prior/glyphs.yaml"
    assert study.generation_settings(None) is None
    with pytest.raises(ValueError, match="unknown generation keys"):
        study.load_study_config(write_study(tmp_path, generation={"samples": 5}))
    with pytest.raises(ValueError, match="generation.num_samples must be an integer >= 1"):
        study.generation_settings({"num_samples": 0})


def test_paper_claims_are_relative_changes_with_welch_intervals_and_verdicts():
    from scipy.stats import ttest_ind

    def runs(quantizer, fds, codes, perplexities):
        return [{"run": f"{quantizer}_K256_s{s}", "quantizer": quantizer, "K": 256, "seed": s, "rfid": None,
                 "classifier_fd": fd, "active_codes": c, "perplexity": p, "psnr": 18.0 + s,
                 "bits_per_token": math.log2(p)} for s, (fd, c, p) in enumerate(zip(fds, codes, perplexities))]

    results = (runs("lgq", [10.0, 11.0, 12.0], [100, 104, 96], [60.0, 64.0, 62.0])
               + runs("fsq", [12.0, 13.0, 11.0], [200, 196, 204], [150.0, 140.0, 145.0])
               + runs("simvq", [10.5, 11.0, 12.5], [120, 110, 130], [120.0, 130.0, 125.0]))
    entries = {(e["baseline"], e["metric"]): e for e in study.paper_claims(results)}
    fd_fsq = entries[("fsq", "classifier_fd")]  # rFID not measured: FD-<data> of the reconstructions stands in
    assert fd_fsq["relative_pct"] == pytest.approx((11.0 - 12.0) / 12.0 * 100)
    # Welch: the interval's half width is t_0.975(dof) x se, the same se and dof as scipy's Welch t-test
    se = math.sqrt(1.0 / 3 + 1.0 / 3)
    t_stat = ttest_ind([10.0, 11.0, 12.0], [12.0, 13.0, 11.0], equal_var=False).statistic
    assert (11.0 - 12.0) / se == pytest.approx(t_stat)
    low, high = fd_fsq["interval_pct"]
    assert low < fd_fsq["relative_pct"] < high < 100 and fd_fsq["verdict"].startswith("not resolvable")
    codes = entries[("fsq", "active_codes")]
    assert codes["relative_pct"] == pytest.approx(-50.0) and codes["verdict"].startswith("reproduced")
    assert codes["paper_pct"] == -49.96 and codes["K"] == 256
    rate = entries[("simvq", "perplexity")]
    assert rate["relative_pct"] == pytest.approx((62.0 - 125.0) / 125.0 * 100) and rate["verdict"].startswith("reproduced")
    assert rate["context"]["psnr"]["relative_pct"] == pytest.approx(0.0)
    assert study.verdict({"interval_pct": [1.0, 3.0]}).startswith("contradicted")
    assert study.verdict(None).startswith("not resolvable")
    table = study.claims_markdown(study.paper_claims(results))
    assert "| LGQ vs FSQ: active codes | 256 | active_codes | -50.0 % |" in table


@pytest.mark.slow
def test_photo_study_reports_both_validation_splits(tmp_path):
    """configs/study/builtin.yaml evaluates val and val_unseen_photos: the second split's PSNR, SSIM and baselines
    are per-run fields and aggregated over seeds like the first's."""
    out = tmp_path / "photos"
    tiny = ["data.image_size=32", "data.crops_per_photo=2", "data.val_crops_per_photo=2", "train.max_steps=2",
            "train.warmup_steps=1", "train.checkpoint_every=0", "train.image_log_every=1", "eval.num_val_images=4",
            "model.base_channels=8", "eval.quantizer_init_batches=1", "train.log_every=1"]
    (result,) = study.main(["--config", "configs/study/builtin.yaml", "--output-dir", str(out), "--quantizers", "fsq",
                            "--seeds", "0", "--no-memory", "--no-tuning", *tiny])
    other = result["split_val_unseen_photos"]
    assert math.isfinite(other["psnr"]) and math.isfinite(other["ssim"]) and other["active_codes"] >= 1
    assert other["psnr_lead_over_equal_bits_db"] == pytest.approx(other["psnr"] - other["psnr_equal_bits_thumbnail"])
    assert other["psnr"] != result["psnr"]  # another set of images
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["split_val_unseen_photos/psnr_mean"] == other["psnr"]
    assert [r["step"] for r in read_history(out / "runs" / "fsq_K1024_s0") if "val/psnr" in r] == [1, 2]
