"""Equal-budget quantizer study: one command sweeps quantizer x codebook size K x seed.

    python -m experiments.study [--config configs/study/glyphs.yaml] [--quick] [--output-dir outputs/study]
        [--quantizers lgq vq fsq simvq lfq ibq] [--K 256 1024 4096] [--seeds 0 1 2]
        [--launcher inprocess|accelerate] [--dry-run] [--no-memory] [key=value ...]

Every run uses the IDENTICAL backbone (including the pre-quantizer norm, ``model.pre_quantizer_norm``), loss,
recipe, data and step budget; only ``model.quantizer``, ``model.codebook_size`` and ``train.seed`` change (plus
``train.output_dir``). Trailing ``key=value`` overrides go to every run (e.g. ``train.max_steps=500``).

Study config (YAML, see configs/study/*.yaml):
    tokenizer_configs: [base recipe files, merged in order]
    quantizer_config:  optional per-quantizer file, "{quantizer}" is substituted
                       (ImageNet: configs/tokenizer/imagenet_{quantizer}.yaml)
    quantizers / codebook_sizes / seeds: the sweep (default: 6 quantizers x K in {256, 1024, 4096} x seeds {0, 1, 2})
    collapse_fraction: a run has collapsed when its training-batch hard perplexity or active codes end
                       below this fraction of K (0.01; see ``detect_collapse``)
    overrides: [key=value for every run]      launcher: inprocess | accelerate
    accelerate_args: [extra `accelerate launch` arguments]
    evaluation: {split, num_images, batch_size, inception_weights}
    measure_memory: true                      quick: {quantizers, codebook_sizes, seeds, overrides}

The training seed ``train.seed`` (initialisation, batch order) is swept; the data (``data.seed``: builtin
crop boxes, synthetic images) stays that of the recipe, so every run sees the same images.

Per run ``<output-dir>/runs/<quantizer>_K<K>_s<seed>/``: the trainer's folder (checkpoints, config.yaml,
``tokenizer/`` export, ``history.jsonl``: the logged values, written by the trainer under either launcher),
``train_record.json`` (training wall time, resumed or not), ``code_counts.json`` (evaluation bincount) and
``result.json``. A run holds ``<run>.lock`` beside its folder while it trains, is evaluated and runs its second
stage, so study processes started on one grid (one per core) share it out: a run another process holds is put
last, then waited for and reused, never trained twice at once. A run whose export and result.json exist is reused; a run with checkpoints but no export
is resumed with ``--resume latest``. Invalid combinations (FSQ without a levels table entry for K, LFQ
with K not a power of two) are skipped with the reason printed.

Figures per run (eval.reconstruction on the evaluation split): rFID (when Inception weights exist),
PSNR, SSIM, codebook statistics from one bincount c over the evaluation set: active codes
A = #{k: c_k > 0}, utilisation A / K, perplexity exp(H(c / sum c)), bits per token = log2 perplexity,
log2 A; training throughput = median images/s over the logged windows (the first window, which holds
start-up, is dropped when there are several); quantizer peak memory = the most tensor memory one
forward+backward step of the quantizer alone holds at once, on N = batch_size x tokens_per_image tokens
of dimension latent_dim (experiments.bench_quantizers: allocator events on CPU, max_memory_allocated on CUDA);
the trivial baselines' PSNRs on the same images (``psnr_mean_colour``, ``psnr_token_grid_thumbnail``,
``psnr_equal_bits_thumbnail``; eval.reconstruction) and ``psnr_lead_over_equal_bits_db`` = PSNR minus
the equal-bits thumbnail's PSNR.

Seeds: every figure is reported per (quantizer, K) as mean and standard deviation over the finished seeds
(``aggregate_runs``: ``<metric>_mean``, ``<metric>_std`` = sample std, None with one seed), with the number of
seeds whose run collapsed.

Outputs in ``<output-dir>``: results.json ({"rows": one per (quantizer, K), "runs": one per run, "skipped",
"collapse_rule"}), results.csv (the rows), runs.csv (the runs), results.md (both tables) and plots/*.png
(rate-distortion with error bars over seeds, utilisation vs K, sorted code-usage histograms, training curves), and
per run plots/geometry/<run>/ (eval.codebook_geometry: geometry.json and codebook_geometry.png).

The package: ``config`` (the study YAML), ``plan`` (the runs), ``runs`` (train + evaluate one run), ``history``
(what a run's history.jsonl says), ``tables`` (seeds aggregated, merged outputs), ``plots``, ``generation`` (the second stage: a prior per run),
``claims`` (the paper's claims in its form), ``tuning`` (the equal tuning budget: trials chosen at one seed on a
split the study does not report), ``cli`` (``main``).

Tuning (the study config's ``tuning`` section, experiments.study.tuning): before the sweep, every quantizer x K
trains the same number of trials of its own knobs and the learning rate at ``tuning.seed`` into
``<output-dir>/tuning/<quantizer>_K<K>_trial<i>/``, scored on ``tuning.split`` (glyphs and synthetic have a
``tune`` split, the builtin photos one with ``data.tune_region`` > 0, set for the trials by ``tuning.overrides``;
never the reported one); the best trial's overrides join every seed's run. Every trial, failed ones
too, is listed in ``tuning/trials.json`` and ``tuning/trials.md``.
"""

from experiments.study.claims import (
    PAPER_CLAIMS,
    claims_markdown,
    paper_claims,
    relative_change,
    verdict,
)
from experiments.study.cli import main, parse_args
from experiments.study.config import (
    DEFAULT_CONFIG,
    EVALUATION_KEYS,
    LAUNCHERS,
    STUDY_KEYS,
    StudyConfig,
    load_study_config,
)
from experiments.study.generation import (
    GENERATION_DEFAULTS,
    GENERATION_KEYS,
    data_dotlist,
    generation_settings,
    run_generation,
    with_generation,
)
from experiments.study.history import (
    CONVERGENCE_GAIN_DB,
    SHARPNESS_KEYS,
    convergence_report,
    detect_collapse,
    training_summary,
)
from experiments.study.plan import (
    RunSpec,
    combination_problem,
    config_files_for,
    load_run_config,
    plan_runs,
    run_name,
)
from experiments.study.plots import (
    errorbars,
    first_label,
    geometry_plots,
    make_plots,
    plot_code_usage,
    plot_generation,
    plot_rate_distortion,
    plot_training_curves,
    plot_utilisation,
)
from experiments.study.runs import (
    accelerate_command,
    busy_ones_last,
    check_same_recipe,
    evaluate_run,
    export_config_format,
    quantizer_peak_memory,
    run_one,
    study_classifier,
    train_run,
    train_script_path,
)
from experiments.study.tables import (
    BASELINE_COLUMNS,
    HEADLINE_TABLE,
    NOT_AGGREGATED,
    ROW_TABLE,
    RUN_IDENTITY_KEYS,
    TABLE_COLUMNS,
    aggregate_runs,
    markdown_summary,
    markdown_table,
    numeric_fields,
    table_rows,
    write_merged,
)
from experiments.study.tuning import (
    TUNING_KEYS,
    TUNING_METRICS,
    check_equal_budget,
    choose_trials,
    load_tuned,
    plan_trials,
    run_tuning,
    trial_overrides,
    trials_markdown,
    tuning_settings,
    write_trials,
)

__all__ = ["BASELINE_COLUMNS", "CONVERGENCE_GAIN_DB", "DEFAULT_CONFIG", "EVALUATION_KEYS", "GENERATION_DEFAULTS",
           "GENERATION_KEYS", "HEADLINE_TABLE",
           "LAUNCHERS", "NOT_AGGREGATED", "PAPER_CLAIMS", "ROW_TABLE", "RUN_IDENTITY_KEYS", "RunSpec", "SHARPNESS_KEYS", "STUDY_KEYS",
           "StudyConfig", "TABLE_COLUMNS", "accelerate_command", "busy_ones_last", "aggregate_runs", "check_same_recipe", "claims_markdown",
           "combination_problem", "config_files_for", "convergence_report", "data_dotlist", "generation_settings", "run_generation", "with_generation", "detect_collapse", "errorbars",
           "evaluate_run", "export_config_format", "first_label", "geometry_plots", "load_run_config",
           "load_study_config", "main", "make_plots", "markdown_summary", "markdown_table", "numeric_fields", "paper_claims",
           "parse_args", "plan_runs", "plot_code_usage", "plot_generation", "plot_rate_distortion", "plot_training_curves",
           "plot_utilisation", "quantizer_peak_memory", "relative_change", "run_name", "run_one", "study_classifier", "table_rows",
           "train_run", "train_script_path", "training_summary", "verdict", "write_merged",
           "TUNING_KEYS", "TUNING_METRICS", "check_equal_budget", "choose_trials", "load_tuned", "plan_trials",
           "run_tuning", "trial_overrides", "trials_markdown", "tuning_settings", "write_trials"]
