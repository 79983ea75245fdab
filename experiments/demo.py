"""The one-command demo: the whole system on the built-in glyphs, coloured digits (``make demo``).

    python -m experiments.demo [--output-dir outputs/demo] [--data glyphs|builtin] [--quick] [--device auto]
                               [--inception-weights PATH] [--steps-scale F] [--threads N] [--force]
                               [--guidance-scale G] [--temperature T] [--seed S] [--train-seed N]

Stages (a line per stage; the training/extraction stages show their own tqdm bars), all written to ONE
output folder ``OUT``:

1. ``tokenizer``  train a small LGQ tokenizer (configs/tokenizer/<data>.yaml, ``tokenizer.train.main``)
                  -> ``OUT/tokenizer_run/tokenizer`` (save_pretrained export)
2. ``tokens``     token grids of the train split, plus horizontal flips where the data set flips
                  (``common.data.DATASET_DEFAULTS``: builtin yes, glyphs no) (``prior.extract``)
                  -> ``OUT/tokens``
3. ``prior``      a small class-conditional MaskGIT prior on them (configs/prior/<data>.yaml,
                  ``prior.train.main``) -> ``OUT/prior_run/prior``
4. ``pipeline``   ``pipelines.assemble.build_pipeline`` -> ``OUT/pipeline`` (LGQPipeline folder)
5. ``samples``    one row of samples per training class -> ``OUT/samples.png``
6. ``evaluation`` reconstruction (PSNR, SSIM, codebook statistics, trivial baselines on the val split; rFID
                  with Inception weights) and generation (the data set's classifier: accuracy of the samples,
                  FD/KID of its features; gFID / IS vs the train split with Inception weights)
                  -> ``OUT/reconstructions.png`` (top: originals, bottom: reconstructions)
7. ``report``     ``OUT/metrics.json`` (every figure + protocol + settings + timings) and ``OUT/report.md``.

FID needs torch-fidelity's Inception weights (``eval.fid``). When they cannot be found or downloaded the
FID/IS figures are ``null`` in metrics.json and the report says why - no other network is substituted.

Resuming: a stage whose export already exists in ``OUT`` is reused (printed), unless ``--force``; a training run
made with another ``--train-seed`` or ``--mixed-precision`` than asked is refused, naming both; an
interrupted tokenizer / prior training resumes from its latest checkpoint, an interrupted extraction
from its finished chunks. Samples and evaluation always run (they are quick).

Sizes: default = the data set's recipes (glyphs: 32 px, 8x8 tokens, K = 256; ~10 min with 2 threads on the
idle 2-core CPU, ~15 min on one core, README "The demo"); ``--quick`` = fewer steps and a smaller model (a few
minutes); ``--tiny`` = 32 px, a handful of steps (the end-to-end test). ``--steps-scale F`` multiplies every training length.

Threads: on CPU, torch uses ``--threads`` intra-op threads, default = the cores this process may use
(``os.sched_getaffinity``) minus the whole part of the 1-minute load average at start, at least 1
(``default_threads``).
More threads than free cores (oversubscription) made in-process training ~10x slower here (2 threads
on 2 cores with load ~10: 22 s/step; 1 thread: 2.1 s/step); pass ``--threads`` to choose yourself.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from omegaconf import OmegaConf
from torchvision.utils import make_grid

from common.cli import resolve_config_path  # the recipes ship with the package
from common.config import MIXED_PRECISION, load_config
from common.data import DATASET_DEFAULTS, DataConfig, build_image_dataset
from common.files import write_json
from common.metrics import image_grid, to_uint8
from common.training import cpu_supports_bf16, has_checkpoints, resolve_mixed_precision
from eval.classifier import ClassifierTrainConfig, classifier_dir, classifier_report, load_or_train_classifier
from eval.fid import InceptionFeatureExtractor, InceptionWeightsUnavailable, resolve_inception_weights
from eval.gen_fid import evaluate_generation, generate_samples
from eval.reconstruction import BASELINE_LABELS, evaluate_reconstruction
from pipelines.assemble import build_pipeline, save_pipeline
from pipelines.pipeline_lgq import LGQPipeline
from prior.extract import main as extract_main
from tokenizer.train import main as train_tokenizer

# The demo's data sets and their recipe files. Whether extraction adds horizontal flips is the data set's own
# default (common.data.DATASET_DEFAULTS[name]["random_flip"]: a mirrored digit is not its class).
DEMO_DATASETS: dict[str, dict[str, Any]] = {
    "glyphs": {"tokenizer_config": "configs/tokenizer/glyphs.yaml", "prior_config": "configs/prior/glyphs.yaml",
               "description": "digits rendered in the fonts that ship with matplotlib (`data.name=glyphs`)"},
    "builtin": {"tokenizer_config": "configs/tokenizer/builtin.yaml", "prior_config": "configs/prior/builtin.yaml",
                "description": "crops of the built-in scikit-image photos (`data.name=builtin`)"},
}
DEFAULT_DEMO_DATASET = "glyphs"

# Overrides of each size on top of the data set's recipe files (steps are then multiplied by --steps-scale);
# "data" holds the data overrides per demo data set.
SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "data": {},
        "tokenizer": [],
        "prior": [],
        "samples_per_class": 8,
        "generation_samples": 240,
        "sample_steps": 12,
        "classifier": {},
    },
    "quick": {
        "data": {"builtin": ["data.crops_per_photo=32", "data.val_crops_per_photo=16"],
                 "glyphs": ["data.num_images=5000", "data.num_val_images=500"]},
        "tokenizer": ["train.max_steps=80", "train.warmup_steps=10", "model.codebook_size=256",
                      "train.image_log_every=40", "train.checkpoint_every=40"],
        "prior": ["train.max_steps=150", "train.warmup_steps=10"],
        "samples_per_class": 6,
        "generation_samples": 60,
        "sample_steps": 8,
        "classifier": {},
    },
    "tiny": {
        "data": {"builtin": ["data.image_size=32", "data.crops_per_photo=4", "data.val_crops_per_photo=4"],
                 "glyphs": ["data.num_images=40", "data.num_val_images=20"]},
        "tokenizer": ["train.max_steps=3", "train.warmup_steps=1", "train.batch_size=4", "model.base_channels=8",
                      "model.channel_multipliers=[1,2,2]", "model.latent_dim=8", "model.codebook_size=64",
                      "train.image_log_every=0", "train.checkpoint_every=0", "train.log_every=1",
                      "eval.num_val_images=2", "eval.quantizer_init_batches=1"],
        "prior": ["train.max_steps=3", "train.warmup_steps=1", "train.batch_size=4", "model.hidden_size=32",
                  "model.num_layers=1", "model.num_heads=2", "train.image_log_every=0",
                  "train.checkpoint_every=0", "train.log_every=1"],
        "samples_per_class": 2,
        "generation_samples": 12,
        "sample_steps": 2,
        "classifier": {"epochs": 1, "widths": [8, 16], "feature_dim": 8},
    },
}


# ----------------------------------------------------------------------------- helpers
def banner(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """Intra-op threads for CPU training: the usable cores minus the ones other processes keep busy.

    threads = clamp(cores - floor(1-minute load average), 1, cores): a core counts as busy only for a whole
    runnable process's worth of load, because the demo's own start-up (imports, config) already adds up to
    ~0.5 to the average on an idle machine (measured: 0.38 -> 0.51 within 20 s). Measured here (2 cores, load ~10
    from other jobs): the builtin tokenizer took 22 s/step with 2 threads and 2.1 s/step with 1 - OpenMP
    threads that wait for each other on an oversubscribed CPU are far slower than one thread.
    """
    cores = usable_cores()
    try:
        busy = math.floor(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; anything else must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device auto or cpu)")
    return resolved


def scaled_steps(config_file: Path, overrides: Sequence[str], scale: float) -> list[str]:
    """Overrides with ``train.max_steps`` (and warm-up, logging/checkpoint periods) multiplied by ``scale``."""
    if scale == 1.0:
        return list(overrides)

    cfg = OmegaConf.merge(OmegaConf.load(config_file), OmegaConf.from_dotlist(list(overrides)))
    train = cfg.get("train", {})
    max_steps = max(2, round(int(train.get("max_steps", 1000)) * scale))
    result = [o for o in overrides if not o.startswith(("train.max_steps=", "train.warmup_steps="))]
    result.append(f"train.max_steps={max_steps}")
    warmup = int(train.get("warmup_steps", 0))
    result.append(f"train.warmup_steps={min(max_steps - 1, round(warmup * scale))}")
    return result


def find_export(run_dir: Path, class_names: Sequence[str]) -> Path | None:
    """The sub-folder of ``run_dir`` holding a save_pretrained export of one of ``class_names``."""
    if not run_dir.is_dir():
        return None
    for child in sorted(run_dir.iterdir()):
        config = child / "config.json"
        if config.is_file():
            try:
                if json.loads(config.read_text()).get("_class_name") in class_names:
                    return child
            except (OSError, json.JSONDecodeError):
                continue
    return None


def last_logged(history: Sequence[tuple[int, dict]], key: str) -> float | None:
    for _, logs in reversed(history or []):
        if key in logs:
            return float(logs[key])
    return None


def uint8_grid(images_u8: torch.Tensor, nrow: int) -> torch.Tensor:
    return make_grid(images_u8, nrow=nrow, padding=2, pad_value=255)


def save_png(grid_u8: torch.Tensor, path: Path) -> Path:
    Image.fromarray(grid_u8.permute(1, 2, 0).contiguous().numpy()).save(path)
    return path


# ----------------------------------------------------------------------------- the demo
class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.size = "tiny" if args.tiny else ("quick" if args.quick else "default")
        self.preset = SIZES[self.size]
        self.dataset = DEMO_DATASETS[args.data]
        self.out = Path(args.output_dir)
        self.device = resolve_device(args.device)
        self.timings: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.results: dict[str, Any] = {}
        self.tokenizer_dir = self.out / "tokenizer_run"
        self.tokens_dir = self.out / "tokens"
        self.prior_dir = self.out / "prior_run"
        self.pipeline_dir = self.out / "pipeline"
        self.classifier_dir = self.out / "classifier"

    # -- bookkeeping ---------------------------------------------------------------------------
    def stage(self, number: int, name: str, description: str, run: Callable[[], Any], reused: bool = False):
        banner(f"[{number}/7] {name}: {description}" + (" (reusing the existing export)" if reused else ""))
        start = time.time()
        value = run()
        seconds = round(time.time() - start, 2)
        self.timings[name] = {"seconds": seconds, "reused": bool(reused)}
        print(f"    {name}: {'reused' if reused else 'done'} in {seconds:.1f} s", flush=True)
        return value

    @property
    def tokenizer_config(self) -> str:
        return self.dataset["tokenizer_config"]

    @property
    def prior_config(self) -> str:
        return self.dataset["prior_config"]

    def flips(self) -> bool:
        """Extraction adds flipped grids exactly when the data set flips in training (its own default)."""
        return bool(DATASET_DEFAULTS[self.data_config().name]["random_flip"])

    def data_overrides(self) -> list[str]:
        return list(self.preset["data"].get(self.args.data, []))

    def stage_overrides(self) -> list[str]:
        """What ``--mixed-precision`` and ``--train-seed`` set in both training stages (the recipes' own
        ``train.mixed_precision`` / ``train.seed`` where not given)."""
        overrides = [] if self.args.mixed_precision is None else [f"train.mixed_precision={self.args.mixed_precision}"]
        return overrides + ([] if self.args.train_seed is None else [f"train.seed={self.args.train_seed}"])

    def check_reusable(self, run_dir: Path) -> None:
        """A training export is reused only if it was trained with what this call asks of it: ValueError naming
        each ``--train-seed`` / ``--mixed-precision`` that differs from the run's saved ``config.yaml``. Precisions
        are compared as resolved on this machine (``resolve_mixed_precision``: "auto" is "no" without a bf16 CUDA
        device), so a run trained with the recipe's auto is reused when fp32 is asked for and auto meant fp32."""
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            return
        trained = OmegaConf.load(saved).get("train", {})
        asked = {"seed": self.args.train_seed, "mixed_precision": self.args.mixed_precision}
        resolved = {"seed": lambda value: value, "mixed_precision": resolve_mixed_precision}
        differ = [f"train.{key} {trained.get(key)!r} (asked: {value!r})" for key, value in asked.items()
                  if value is not None and resolved[key](trained.get(key)) != resolved[key](value)]
        if differ:
            raise ValueError(f"{run_dir} holds a run trained with {', '.join(differ)}: pass --force to retrain, "
                             f"another --output-dir, or the run's own --mixed-precision / --train-seed to reuse it")

    def data_config(self):
        recipe = OmegaConf.load(resolve_config_path(self.tokenizer_config)).get("data", {})
        dotlist = [f"{k}={v}" for k, v in recipe.items()] + [o[len("data."):] for o in self.data_overrides()]
        return load_config(DataConfig, None, dotlist + ["random_flip=false"])

    # -- stages --------------------------------------------------------------------------------
    def train_tokenizer(self) -> Path:
        overrides = [*self.data_overrides(), *self.preset["tokenizer"], *self.stage_overrides(),
                     f"train.output_dir={self.tokenizer_dir}"]
        overrides = scaled_steps(resolve_config_path(self.tokenizer_config), overrides, self.args.steps_scale)
        if has_checkpoints(self.tokenizer_dir):
            print(f"    resuming the interrupted tokenizer run in {self.tokenizer_dir}")
            overrides.append("train.resume=latest")
        self.results["tokenizer_overrides"] = overrides
        trainer = train_tokenizer(["--config", str(resolve_config_path(self.tokenizer_config)), *overrides])
        self.results["tokenizer_training"] = {
            "steps": trainer.step,
            "final_loss": last_logged(trainer.history, "loss"),
            "final_val_psnr_during_training": last_logged(trainer.history, "val/psnr"),
            "mixed_precision": trainer.mixed_precision,  # as resolved: "no" = fp32
            "seed": trainer.cfg.seed,
        }
        return trainer.output_dir / "tokenizer"

    def extract(self, tokenizer_path: Path) -> dict:
        cfg = self.data_config()
        argv = [f"tokenizer={tokenizer_path}", f"output={self.tokens_dir}", "split=train",
                f"flip={'true' if self.flips() else 'false'}", f"data.name={cfg.name}",
                *[o for o in self.data_overrides()]]
        argv.append(f"data.image_size={cfg.image_size}")
        return extract_main(argv)

    def train_prior(self, tokenizer_path: Path) -> Path:
        try:
            from prior.train import main as train_prior  # lazy: an install without the prior stage reports the ImportError below
        except ImportError as err:
            raise RuntimeError(f"prior/train.py is not available ({err}): the prior stage cannot run") from err
        config = resolve_config_path(self.prior_config)
        if not config.is_file():
            raise FileNotFoundError(f"prior config {config} does not exist")
        overrides = [*self.preset["prior"], *self.stage_overrides(), f"data.tokens={self.tokens_dir}",
                     f"data.tokenizer={tokenizer_path}",
                     f"train.output_dir={self.prior_dir}"]
        overrides = scaled_steps(config, overrides, self.args.steps_scale)
        if has_checkpoints(self.prior_dir):
            print(f"    resuming the interrupted prior run in {self.prior_dir}")
            overrides.append("train.resume=latest")
        self.results["prior_overrides"] = overrides
        trainer = train_prior(["--config", str(config), *overrides])
        self.results["prior_training"] = {"steps": trainer.step, "final_loss": last_logged(trainer.history, "loss"),
                                          "mixed_precision": trainer.mixed_precision, "seed": trainer.cfg.seed}
        export = find_export(self.prior_dir, ("MaskGITPrior", "GPTPrior"))
        if export is None:
            raise FileNotFoundError(f"prior.train finished but no prior export was found in {self.prior_dir}")
        return export

    def assemble(self, tokenizer_path: Path, prior_path: Path):
        pipeline = build_pipeline(tokenizer_path, prior_path)
        save_pipeline(pipeline, self.pipeline_dir, tokenizer_path, prior_path)
        return pipeline

    @property
    def sampling_options(self) -> dict[str, Any]:
        """The sampler settings of the grid and of the scored samples (and recorded with both)."""
        return {"num_inference_steps": int(self.preset["sample_steps"]), "guidance_scale": self.args.guidance_scale,
                "temperature": self.args.temperature}

    def sample_grid(self, pipeline, train_classes: list[int], class_names: list[str]) -> Path:
        columns = int(self.preset["samples_per_class"])
        labels = torch.tensor([c for c in train_classes for _ in range(columns)])
        generator = torch.Generator(device="cpu").manual_seed(self.args.seed)
        with torch.no_grad():
            images = pipeline(labels, **self.sampling_options, generator=generator, output_type="pt").images
        grid = uint8_grid(to_uint8(images.cpu() * 2 - 1), nrow=columns)
        self.results["samples"] = {"rows": [class_names[c] for c in train_classes], "per_class": columns,
                                   **self.sampling_options, "seed": self.args.seed}
        return save_png(grid, self.out / "samples.png")

    def evaluate(self, pipeline, tokenizer, train_classes: list[int]) -> dict:
        data_cfg = self.data_config()
        val_set = build_image_dataset(data_cfg, "val")
        extractor, fid_reason = None, None
        try:
            weights = resolve_inception_weights(self.args.inception_weights, allow_download=True)
            extractor = InceptionFeatureExtractor(weights.path, device=self.device, allow_download=False)
        except InceptionWeightsUnavailable as err:
            fid_reason = str(err).splitlines()[0]
            self.notes.append(f"FID skipped: {fid_reason} rFID, gFID and IS are null. Pass --inception-weights "
                              f"PATH (pt_inception-2015-12-05 weights) to compute them.")
            print(f"    NOTE: FID/IS skipped - {fid_reason}", flush=True)

        classifier = self.classifier(data_cfg)  # (folder, model, metadata) or None

        # reconstruction
        tokenizer = tokenizer.to(self.device).eval()
        reconstruction = evaluate_reconstruction(
            tokenizer, val_set, batch_size=32, inception_weights=extractor.weights.path if extractor else None,
            compute_fid=extractor is not None, device=self.device, allow_download=False,
            protocol={"split": "val", "data": dataclasses.asdict(data_cfg)}, return_images=True)
        real_val_u8 = reconstruction.pop("images_u8")
        recon_u8, val_labels = reconstruction.pop("reconstructions_u8"), reconstruction.pop("labels")
        if classifier is not None:
            reconstruction.update(classifier_report(*classifier, recon_u8, val_labels, real_val_u8, device=self.device))
        if fid_reason is not None:
            reconstruction["notes"] = [n if "compute_fid=False" not in n else f"rFID not computed: {fid_reason}"
                                       for n in reconstruction["notes"]]
        # the data set's other validation splits (builtin: val_unseen_photos), PSNR/SSIM/codebook only
        other_splits = {}
        for split in data_cfg.splits():
            if split not in ("train", "val"):
                other_splits[split] = evaluate_reconstruction(
                    tokenizer, build_image_dataset(data_cfg, split), batch_size=32, compute_fid=False,
                    device=self.device, protocol={"split": split, "data": dataclasses.asdict(data_cfg)})
        # originals vs reconstructions: the first 8 val images (consecutive items cycle through the val photos)
        count = min(8, len(val_set))
        originals = torch.stack([val_set[i][0] for i in range(count)]).to(self.device)
        with torch.no_grad():
            recon = tokenizer.decode(tokenizer.encode(originals))
        grid = image_grid(originals.cpu(), recon.cpu())
        save_png(to_uint8(grid), self.out / "reconstructions.png")

        # generation: samples for FID/IS (Inception) and for the classifier metric
        num_samples = int(self.preset["generation_samples"])
        samples = None
        if extractor is not None or classifier is not None:
            samples = generate_samples(pipeline, num_samples, batch_size=32, classes=train_classes,
                                       **self.sampling_options, seed=self.args.seed, generator_device="cpu",
                                       feature_extractor=extractor,
                                       keep_images=classifier is not None, progress=True)
            samples["resolution"] = list(pipeline.image_size)
        if extractor is not None:
            data_options = [o[len("data."):] for o in self.data_overrides()]
            generation = evaluate_generation(samples, f"{data_cfg.name}:train", extractor, batch_size=32,
                                             data_overrides=data_options, image_size=data_cfg.image_size,
                                             isc_splits=min(10, num_samples))
        else:
            generation = evaluate_generation({}, f"{data_cfg.name}:train", None, weights_note=fid_reason)
        if classifier is not None:
            generation.update(classifier_report(*classifier, samples["images"], samples["labels"], real_val_u8,
                                                device=self.device))
        generation["protocol"] = {"num_samples": num_samples if samples is not None else 0,
                                  "classes": train_classes, "reference": f"{data_cfg.name} train split",
                                  **self.sampling_options, "seed": self.args.seed}
        return {"reconstruction": reconstruction, "reconstruction_other_splits": other_splits, "generation": generation}

    def classifier(self, data_cfg):
        """(folder, classifier, metadata) of the data set's classifier (eval.classifier), trained once into
        ``OUT/classifier/<name>-<size>px`` and reused; None with --no-classifier or fewer than 2 classes."""
        if self.args.no_classifier:
            self.notes.append("classifier metric skipped (--no-classifier)")
            return None

        if build_image_dataset(data_cfg, "train").num_classes < 2:
            self.notes.append(f"classifier metric skipped: data set {data_cfg.name!r} has fewer than 2 classes")
            return None
        folder = classifier_dir(self.classifier_dir, data_cfg)
        start = time.time()
        recipe = ClassifierTrainConfig(**self.preset["classifier"])
        model, metadata, trained = load_or_train_classifier(folder, data_cfg, recipe, device=self.device)
        self.timings["classifier"] = {"seconds": round(time.time() - start, 2), "reused": not trained}
        print(f"    classifier ({folder}): {'trained' if trained else 'reused'}, accuracy on real val "
              f"{metadata['real_val_accuracy']:.4f}", flush=True)
        return folder, model, metadata

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.args.force:
            for folder in (self.tokenizer_dir, self.tokens_dir, self.prior_dir, self.pipeline_dir, self.classifier_dir):
                if folder.exists():
                    print(f"--force: removing {folder}")
                    shutil.rmtree(folder)
        threads = torch.get_num_threads()
        print(f"LGQ demo ({self.size}) -> {self.out.resolve()} on {self.device}, {threads} torch threads, "
              f"steps x{self.args.steps_scale}", flush=True)

        for run_dir in (self.tokenizer_dir, self.prior_dir):
            self.check_reusable(run_dir)
        tokenizer_export = find_export(self.tokenizer_dir, ("LGQTokenizer",))
        tokenizer_path = self.stage(1, "tokenizer", f"train the LGQ tokenizer on {self.args.data}",
                                    self.train_tokenizer if tokenizer_export is None else lambda: tokenizer_export,
                                    reused=tokenizer_export is not None)
        tokens_done = (self.tokens_dir / "meta.json").is_file()
        tokens_description = "extract token grids of the train split" + (" (+ flips)" if self.flips() else "")
        meta = self.stage(2, "tokens", tokens_description, lambda: self.extract(tokenizer_path), reused=tokens_done)
        prior_export = find_export(self.prior_dir, ("MaskGITPrior", "GPTPrior"))
        prior_path = self.stage(3, "prior", "train the class-conditional MaskGIT prior",
                                (lambda: self.train_prior(tokenizer_path)) if prior_export is None
                                else (lambda: prior_export), reused=prior_export is not None)
        pipeline_done = (self.pipeline_dir / "model_index.json").is_file()
        pipeline = self.stage(4, "pipeline", "assemble the LGQPipeline",
                              (lambda: LGQPipeline.from_pretrained(self.pipeline_dir)) if pipeline_done
                              else (lambda: self.assemble(tokenizer_path, prior_path)), reused=pipeline_done)
        pipeline = pipeline.to(self.device)

        train_set = build_image_dataset(self.data_config(), "train")
        train_classes = list(train_set.split_labels)
        class_names = list(train_set.class_names)
        self.stage(5, "samples", "class-conditional sample grid (one row per training class)",
                   lambda: self.sample_grid(pipeline, train_classes, class_names))
        evaluation = self.stage(6, "evaluation", "reconstruction + generation metrics",
                                lambda: self.evaluate(pipeline, pipeline.tokenizer, train_classes))
        self.timings["total"] = {"seconds": round(time.time() - start, 2), "reused": False}
        metrics = self.metrics(meta, evaluation, threads, tokenizer_path, prior_path)
        self.stage(7, "report", "metrics.json + report.md", lambda: self.write_outputs(metrics))
        print(f"\nDemo finished in {self.timings['total']['seconds']:.0f} s: {self.out / 'report.md'}")
        return metrics

    def metrics(self, meta: dict, evaluation: dict, threads: int, tokenizer_path: Path, prior_path: Path) -> dict:
        previous, previous_metrics = {}, {}
        metrics_file = self.out / "metrics.json"
        if metrics_file.is_file():  # keep the training times / figures of the run that actually trained
            try:
                previous_metrics = json.loads(metrics_file.read_text())
                previous = previous_metrics.get("timings", {})
            except (OSError, json.JSONDecodeError):
                previous, previous_metrics = {}, {}
        for key in ("tokenizer_training", "prior_training", "tokenizer_overrides", "prior_overrides"):
            if key not in self.results:
                source = previous_metrics if key.endswith("training") else previous_metrics.get("settings", {})
                self.results[key] = source.get(key)
        timings = dict(self.timings)
        for name, entry in timings.items():
            if entry["reused"] and name in previous and not previous[name].get("reused", True):
                entry["seconds_when_run"] = previous[name]["seconds"]
            elif entry["reused"] and name in previous and "seconds_when_run" in previous[name]:
                entry["seconds_when_run"] = previous[name]["seconds_when_run"]
        try:
            load = os.getloadavg()
        except OSError:
            load = None
        return {
            "settings": {
                "size": self.size, "steps_scale": self.args.steps_scale, "device": str(self.device),
                "torch_threads": threads, "usable_cores": usable_cores(), "load_average_at_end": load,
                "seed": self.args.seed, "guidance_scale": self.args.guidance_scale,
                "temperature": self.args.temperature, "data": self.args.data, "data_description": self.dataset["description"],
                "tokenizer_config": self.tokenizer_config, "prior_config": self.prior_config,
                "size_overrides": {k: v for k, v in self.preset.items()},
                "tokenizer_overrides": self.results.get("tokenizer_overrides"),
                "prior_overrides": self.results.get("prior_overrides"),
                "torch": torch.__version__, "python": platform.python_version(),
            },
            "paths": {"tokenizer": str(tokenizer_path), "tokens": str(self.tokens_dir), "prior": str(prior_path),
                      "pipeline": str(self.pipeline_dir)},
            "tokens": {k: meta.get(k) for k in ("count", "grid_size", "codebook_size", "augmentations")},
            "tokenizer_training": self.results.get("tokenizer_training"),
            "prior_training": self.results.get("prior_training"),
            "samples": self.results.get("samples"),
            "reconstruction": evaluation["reconstruction"],
            "reconstruction_other_splits": evaluation.get("reconstruction_other_splits", {}),
            "generation": evaluation["generation"],
            # timings.total_s: the whole demo's wall time as one number (the interface other checks read)
            "timings": {**timings, "total_s": timings["total"]["seconds"]},
            "notes": self.notes,
        }

    def write_outputs(self, metrics: dict) -> None:
        write_json(self.out / "metrics.json", metrics)
        (self.out / "report.md").write_text(render_report(metrics))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def baseline_markdown(rec: dict) -> list[str]:
    """Markdown rows: the tokenizer against the trivial baselines of eval.reconstruction (PSNR lead in dB)."""
    bits = rec["protocol"].get("nominal_bits_per_image")
    lines = ["The tokenizer against trivial baselines on the same images (bits per image: the tokenizer's nominal "
             "rate tokens x log2 K; the thumbnails are 8-bit RGB, upsampled bicubically):", "",
             "| reconstruction | PSNR (dB) | SSIM | bits / image | tokenizer PSNR lead (dB) |", "|---|---:|---:|---:|---:|",
             f"| tokenizer | {_fmt(rec['psnr'], 2)} | {_fmt(rec['ssim'], 4)} | {_fmt(bits, 0)} | |"]
    for name, entry in rec.get("baselines", {}).items():
        size = entry["thumbnail_size"]
        label = BASELINE_LABELS.get(name, name) + (f" {size[0]}x{size[1]}" if size else "")
        lines.append(f"| {label} | {_fmt(entry['psnr'], 2)} | {_fmt(entry['ssim'], 4)} | {entry['bits_per_image']} | "
                     f"{entry['psnr_gain_db']:+.2f} |")
    return lines


def classifier_markdown(rec: dict, gen: dict) -> list[str]:
    """Markdown of the classifier metric (eval.classifier) for samples and reconstructions, if it ran."""
    if "classifier_accuracy" not in gen:
        return []
    protocol = gen["classifier_protocol"]
    fd, kid = gen["classifier_fd_name"], gen["classifier_kid_name"]
    lines = [f"Classifier metric: a small CNN trained on the {protocol['dataset']} train split "
             f"(`{protocol['classifier']}`, accuracy on real val {_fmt(gen['classifier_real_val_accuracy'], 4)}). "
             f"{fd} / {kid}: Frechet / kernel distance of its features to the real val images "
             f"(torch-fidelity; not FID/KID); precision / recall: improved precision and recall (k = 3) on the same "
             f"features (common/metrics.py).", "",
             f"| images | classified as their label | {fd} | {kid} | precision | recall |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, entry in (("class-conditional samples", gen), ("reconstructions of val", rec)):
        if "classifier_accuracy" in entry:
            lines.append(f"| {name} ({entry['classifier_protocol']['num_images']}) | "
                         f"{_fmt(entry['classifier_accuracy'], 3)} | {_fmt(entry['classifier_fd'], 3)} | "
                         f"{_fmt(entry['classifier_kid_mean'], 4)} ± {_fmt(entry['classifier_kid_std'], 4)} | "
                         f"{_fmt(entry.get('classifier_precision'), 3)} | {_fmt(entry.get('classifier_recall'), 3)} |")
    per_class = ", ".join(f"{name}: {_fmt(value, 2)}" for name, value in gen["classifier_per_class_accuracy"].items())
    return lines + ["", f"Samples classified as their label, per class: {per_class}.", ""]


def render_report(metrics: dict) -> str:
    """A short markdown report of a finished demo (what ran, settings, timings, figures, images)."""
    s, rec, gen = metrics["settings"], metrics["reconstruction"], metrics["generation"]
    codebook = rec["codebook"]
    lines = [
        "# LGQ demo report", "",
        f"Size **{s['size']}** (steps x{s['steps_scale']}) on **{s['device']}** with {s['torch_threads']} torch "
        f"threads ({s['usable_cores']} usable cores; load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in s['load_average_at_end']) if s['load_average_at_end'] else 'n/a'}), "
        f"torch {s['torch']}.", "",
        f"What ran: an LGQ tokenizer trained on {s.get('data_description', s.get('data', 'the demo data'))} "
        f"(`{s['tokenizer_config']}`), token grids of its train split, a class-conditional "
        f"MaskGIT prior (`{s['prior_config']}`), assembled into an `LGQPipeline` (`{metrics['paths']['pipeline']}`).",
        "",
        "## Timings", "", "| stage | seconds | |", "|---|---:|---|",
    ]
    for name, entry in metrics["timings"].items():
        if not isinstance(entry, dict):  # total_s repeats the total row as a bare number
            continue
        extra = "reused existing export" if entry.get("reused") else ""
        if "seconds_when_run" in entry:
            extra += f" (ran in {entry['seconds_when_run']:.0f} s in an earlier run)"
        lines.append(f"| {name} | {entry['seconds']:.1f} | {extra} |")
    rp = rec["protocol"]
    lines += [
        "", "## Reconstruction (val split)", "",
        f"{rp['num_images']} images at {'x'.join(map(str, rp['resolution']))}, token grid "
        f"{'x'.join(map(str, rp['token_grid']))}, K = {rp['codebook_size']}.", "",
        "| metric | value |", "|---|---:|",
        f"| rFID | {_fmt(rec['rfid'], 2)} |",
        f"| PSNR (dB) | {_fmt(rec['psnr'], 2)} |",
        f"| SSIM | {_fmt(rec['ssim'], 4)} |",
        f"| active codes | {codebook['active_codes']} / {codebook['codebook_size']} |",
        f"| utilisation | {_fmt(codebook['utilisation'], 4)} |",
        f"| perplexity | {_fmt(codebook['perplexity'], 1)} |",
        f"| bits / token | {_fmt(codebook['bits_per_token'], 3)} |",
    ]
    for split, other in metrics.get("reconstruction_other_splits", {}).items():
        equal_bits = other.get("baselines", {}).get("equal_bits_thumbnail")
        versus = f" (equal-bits thumbnail {_fmt(equal_bits['psnr'], 2)} dB)" if equal_bits else ""
        lines.append(f"| PSNR / SSIM on split `{split}` ({other['protocol']['num_images']} images) | "
                     f"{_fmt(other['psnr'], 2)} / {_fmt(other['ssim'], 4)}{versus} |")
    lines += [
        "", *baseline_markdown(rec),
        "", "![originals (top) vs reconstructions (bottom)](reconstructions.png)", "",
        "## Generation", "",
        "| metric | value |", "|---|---:|",
        f"| gFID vs train split | {_fmt(gen['fid'], 2)} |",
        f"| Inception Score | {_fmt(gen['inception_score_mean'], 2)} ± {_fmt(gen['inception_score_std'], 2)} |",
        f"| precision / recall vs train split (Inception features, k = 3) | {_fmt(gen.get('precision'), 3)} / "
        f"{_fmt(gen.get('recall'), 3)} |",
        f"| samples scored | {gen['protocol']['num_samples']} |",
        "",
        *classifier_markdown(rec, gen),
    ]
    if metrics.get("samples"):
        lines += [f"Sample grid: one row per training class ({', '.join(metrics['samples']['rows'])}), "
                  f"{metrics['samples']['num_inference_steps']} MaskGIT steps, guidance "
                  f"{metrics['samples']['guidance_scale']}, temperature {metrics['samples'].get('temperature', 1.0)}, "
                  f"seed {metrics['samples']['seed']}.", "",
                  "![class-conditional samples](samples.png)", ""]
    notes = [*metrics.get("notes", []), *rec.get("notes", []), *gen.get("notes", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    lines += ["Every figure with its protocol: `metrics.json`. Tiny data, few steps: these numbers show the "
              "system works end to end; they are not comparable with published ImageNet figures.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="the one folder everything is written to")
    parser.add_argument("--data", default=DEFAULT_DEMO_DATASET, choices=tuple(DEMO_DATASETS),
                        help="glyphs: coloured digits in matplotlib's fonts (class = digit; default); "
                             "builtin: crops of the built-in photos (class = photo)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer steps, smaller data (a few minutes on CPU)")
    size.add_argument("--tiny", action="store_true", help="32 px, a handful of steps (smoke test, ~1 min)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05 weights file for FID/IS")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every training length by F")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default: usable cores minus the load average, >= 1)")
    parser.add_argument("--mixed-precision", default=None, choices=MIXED_PRECISION,
                        help="train.mixed_precision of both training stages (default: bf16 on a CPU with native bf16, "
                             "e.g. AVX-512 BF16 or AMX; else the recipes' own, auto = bf16 on a CUDA device that "
                             "supports it, else fp32; the quantizer always runs in fp32)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance of sampling")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="softmax temperature of token sampling (0.7: more samples keep their digit than at 1.0, "
                             "README demo section)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="train.seed of both training stages (default: the recipes' own, 0); a demo per training "
                             "seed is what separates a change from the spread of training runs")
    parser.add_argument("--force", action="store_true", help="retrain every stage instead of reusing exports")
    parser.add_argument("--no-classifier", action="store_true",
                        help="skip the classifier metric (accuracy / FD / KID of samples and reconstructions)")
    args = parser.parse_args(argv)
    if not args.steps_scale > 0:
        parser.error(f"--steps-scale must be > 0, got {args.steps_scale}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def default_precision(device: torch.device) -> str | None:
    """The demo's training precision when ``--mixed-precision`` is not given: bf16 on a CPU with native bf16
    (``cpu_supports_bf16``; measured over three training seeds, README demo section: the tokenizer stage 1.35x
    faster, quality within the seeds' spread), else None (the recipes' own ``auto``: bf16 on a bf16 CUDA device,
    fp32 elsewhere)."""
    return "bf16" if device.type == "cpu" and cpu_supports_bf16() else None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.mixed_precision is None:
        args.mixed_precision = default_precision(device)
    if device.type == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # the in-process trainers follow --device cpu
        torch.set_num_threads(args.threads or default_threads())
    return Demo(args).run()


if __name__ == "__main__":
    main(sys.argv[1:])
