"""The training machinery shared by the tokenizer and the prior stage (accelerate-based).

A stage builds its models, optimizers and DataLoader, then hands them to a ``Trainer`` together
with a ``training_step(batch, step) -> dict`` function. The Trainer owns everything else:

    trainer = Trainer(cfg.train, run_config=cfg)                # accelerator, seed, config.yaml, trackers
    model, disc = trainer.setup(models={"model": m, "disc": d}, optimizers={"model": opt_g, "disc": opt_d},
                                train_loader=loader, ema_model="model")    # prepare + LR schedules + EMA + resume
    def training_step(batch, step):                              # one micro-batch; call trainer.backward(loss)
        ...
        return {"loss": loss, ...}
    trainer.fit(training_step)                                   # the loop
    trainer.export("tokenizer")                                  # EMA weights -> save_pretrained

The loop (``Trainer.fit``), per optimisation step s = 0 .. max_steps-1:

    seed all RNGs from (seed, s, process index)        -> dropout/augmentation independent of resume
    model.set_training_step(s, max_steps, steps/epoch)   -> schedules inside models (LGQ's tau, own horizon)
    grad_accum_steps x: next micro-batch, training_step (gradient sync on the last one only)
    all-reduce the returned logs; stop on NaN/Inf      -> nothing is stepped or saved for a bad step
    per optimizer: clip grad norm, step, LR schedule step, zero grads
    EMA update; log / log images / atomic checkpoint

Exact resume: a checkpoint (``accelerator.save_state``) holds models, optimizers, LR schedules,
grad scaler, RNG states, EMA and the step. Data position: the data stream is a function of the
number of consumed micro-batches (epoch = consumed // batches_per_epoch, seeded shuffling per
epoch, ``accelerator.skip_first_batches`` for the rest), and the stream is restarted after every
checkpoint in uninterrupted runs too, so that DataLoader prefetching / worker seeding happen at
the same points with the same RNG state in a resumed run. Hence a run killed at any point and
resumed ends with bit-identical weights on the same hardware and config (tested on CPU).

Preemption: SIGTERM or SIGUSR1 (what SLURM, Kubernetes and spot instances send before a kill) sets a flag on
the process that gets it. The flag rides along the one all-reduce of the step's logs (``_reduce_logs``), so every
rank learns it at the same step: all finish that step, write a checkpoint like the periodic ones (atomic) and
exit with ``PREEMPTED_EXIT_CODE`` = 75 (EX_TEMPFAIL, "try again": requeue and rerun with ``--resume latest``,
which continues exactly as from any checkpoint). No collective is added to the step. Such a checkpoint falls
between two restarts of the data stream; the resumed run rebuilds the stream as the uninterrupted run had it
(``_replay_stream``: it loads, without training, the batches since the last periodic checkpoint).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from PIL import Image
from accelerate import Accelerator, data_loader as accelerate_data_loader, utils as accelerate_utils
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from common.config import TrainConfig, save_config
from common.files import publish_folder, write_bytes_atomic
from common.hub import push_folder_to_hub, write_model_card

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})$")
CHECKPOINT_STATE_FILE = "trainer_state.json"  # written last into a checkpoint: step, processes, {file: bytes}
HISTORY_FILE = "history.jsonl"  # <output_dir>/history.jsonl: one {"step": s, **logs} line per log / image-log step
NO_DECAY_NAME_PARTS = ("codebook", "centres", "centers", "embedding", "embed_tokens", "pos_embed")


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run stopped on SIGTERM/SIGUSR1 after a checkpoint; requeue it
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(SystemExit):
    """Raised by ``Trainer.fit`` on every rank after the checkpoint of a preempted run (exit code 75)."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous checkpoints are intact."""


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term (or gradient norm) becomes NaN/Inf; the last checkpoint stays intact."""


# --------------------------------------------------------------------------------------------
# small pure helpers (tested directly)
# --------------------------------------------------------------------------------------------
def resolve_mixed_precision(value: str) -> str:
    """"auto" -> "bf16" when a CUDA device supports bf16, else "no"; other values pass through."""
    if value != "auto":
        return value
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX, oneDNN's own check), where
    bf16 autocast makes convolutions faster instead of emulating them; False when it cannot be told."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at optimisation step s (0-based), W = warmup_steps, S = max_steps, r = min_lr_ratio:

        s <  W : (s + 1) / W                                    (linear warm-up, reaches 1 at s = W - 1)
        s >= W : constant -> 1
                 cosine   -> r + (1 - r) * (1 + cos(pi * t)) / 2,   t = (s - W) / max(1, S - W - 1) clipped to [0, 1]

    so the cosine reaches exactly r * lr at the last step s = S - 1.
    (Own 10-line function rather than transformers' schedulers: importing transformers.optimization
    costs ~5 s per process, and the equation is explicit here.)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}")
    t = min(1.0, max(0.0, (step - warmup_steps) / max(1, max_steps - warmup_steps - 1)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with ``lr_factor``; stepped once per optimisation step."""
    factor = functools.partial(lr_factor, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                               schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def excluded_from_weight_decay(name: str, param: nn.Parameter) -> bool:
    """No decay for biases / norm scales (ndim < 2), embeddings and codebooks (decay would shrink
    unused centres toward 0), or any parameter tagged ``param.no_weight_decay = True``."""
    lowered = name.lower()
    return (param.ndim < 2 or getattr(param, "no_weight_decay", False)
            or any(part in lowered for part in NO_DECAY_NAME_PARTS))


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: [{params with decay, weight_decay}, {params without decay, 0.0}] (trainable only)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if excluded_from_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, cfg: TrainConfig, lr: float | None = None,
                    betas: tuple[float, float] | None = None) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters with the weight-decay exclusions above."""
    groups = parameter_groups(module, cfg.weight_decay)
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimise")
    return torch.optim.AdamW(groups, lr=cfg.lr if lr is None else lr, betas=tuple(betas or cfg.betas))


def compile_in_place(module: nn.Module) -> nn.Module:
    """``torch.compile`` of ``module``'s forward in place (``nn.Module.compile``): the module object, its parameters
    and its ``state_dict`` keys stay the same (no ``_orig_mod.`` wrapper), so checkpoints, EMA, DDP and
    ``save_pretrained`` exports are those of the eager model and load without compile. Graph breaks (the priors'
    input checks, the quantizers' statistics) fall back to eager for that part.

    Compiled backward passes keep their saved tensors (no "donated buffers"): the tokenizer's adaptive GAN weight
    (tokenizer/losses.py) differentiates the loss with ``retain_graph=True``, which donated buffers forbid."""
    torch._functorch.config.donated_buffer = False
    module.compile()
    return module


def seed_for_step(seed: int, step: int, process_index: int) -> int:
    """Distinct seed per (run seed, step, process): ((seed * 1000003) + step) * 4096 + rank, mod 2^63."""
    return (((int(seed) * 1_000_003) + int(step)) * 4096 + int(process_index)) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Completed checkpoints ``step_XXXXXXX`` sorted by step (temporary ``.tmp_*`` dirs are ignored)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir/checkpoints`` holds a completed checkpoint (an interrupted run that can resume)."""
    return bool(list_checkpoints(Path(run_dir) / "checkpoints"))


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None if it is complete: its
    ``trainer_state.json`` (written last) lists every file with its size in bytes; a missing file, another size
    (truncated) or an unreadable ``trainer_state.json`` is a problem. (Checkpoints from before that list are
    checked for their ``trainer_state.json`` only.)"""
    path = Path(path)
    state_file = path / CHECKPOINT_STATE_FILE
    if not state_file.is_file():
        return f"{CHECKPOINT_STATE_FILE} is missing"
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{CHECKPOINT_STATE_FILE} is unreadable ({err})"
    for name, size in sorted(state.get("files", {}).items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written (truncated or altered)"
    return None


def latest_complete_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint without a ``checkpoint_problem``, [(each newer one skipped, its problem)])."""
    skipped = []
    for path in reversed(list_checkpoints(checkpoint_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def resolve_resume_path(resume: str | None, checkpoint_dir: str | os.PathLike) -> Path | None:
    """None -> None; "latest" -> newest complete checkpoint or None if there is none; else an existing, complete
    checkpoint path (an incomplete one raises ValueError naming its problem)."""
    if not resume:
        return None
    if resume == "latest":
        return latest_complete_checkpoint(checkpoint_dir)[0]
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume!r}: no such checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"train.resume={resume!r} is incomplete: {problem}; pass an older checkpoint or latest")
    return path


def read_history(output_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The logged values of a run, from <output_dir>/history.jsonl (written by the main process at every
    log step, whatever the launcher or tracker, plus one row of validation scalars, e.g. ``val/psnr``, per
    image-log step). A line cut short by a crash is skipped; [] if no file."""
    path = Path(output_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def truncate_history(output_dir: str | os.PathLike, last_step: int) -> None:
    """Keep the history rows with step <= last_step (atomic rewrite): a resumed run re-logs the steps after
    its checkpoint, so the file of an interrupted + resumed run equals that of an uninterrupted one."""
    path = Path(output_dir) / HISTORY_FILE
    if not path.is_file():
        return
    kept = [row for row in read_history(output_dir) if row["step"] <= last_step]
    write_bytes_atomic(path, "".join(json.dumps(row) + "\n" for row in kept).encode())


def resolve_trackers(tracker: str | list[str]) -> list[str]:
    """``train.tracker`` -> the names for ``Accelerator(log_with=...)``, as accelerate understands them.

    "none" -> []; "all" -> every tracker accelerate supports whose package is installed; a name or a list of
    names -> those names, after checking each one: an unknown name or a tracker whose package is missing raises
    ValueError now, instead of accelerate dropping it with a debug-level log and the run training unlogged.
    """
    names = [tracker] if isinstance(tracker, str) else list(tracker)
    known = [t.value for t in accelerate_utils.LoggerType if t.value != "all"]

    def installed(name: str) -> bool:
        check = getattr(accelerate_utils, f"is_{name}_available", None)
        return bool(check()) if callable(check) else True

    if names == ["none"]:
        return []
    if names == ["all"]:
        return [name for name in known if installed(name)]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"train.tracker: unknown tracker(s) {unknown}; accelerate supports {known} (or 'all', 'none')")
    missing = [n for n in names if not installed(n)]
    if missing:
        raise ValueError(f"train.tracker asks for {missing}, but the package is not installed: "
                         f"pip install {' '.join(missing)} (or set train.tracker=none)")
    return names


def flatten_for_tracker(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {"train.lr": 3e-4, ...} with only int/float/str/bool values (tracker hparams)."""
    if is_dataclass(values):
        values = asdict(values)
    flat: dict[str, Any] = {}
    if isinstance(values, Mapping):
        for key, value in values.items():
            flat.update(flatten_for_tracker(value, f"{prefix}{key}."))
        return flat
    key = prefix[:-1]
    flat[key] = values if isinstance(values, (int, float, str, bool)) else str(values)
    return flat


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [-1, 1] -> [H, W, 3] uint8: round((x + 1) * 127.5) clipped to [0, 255]."""
    if images.dim() != 3 or images.shape[0] != 3:
        raise ValueError(f"expected an image grid [3, H, W], got {tuple(images.shape)}")
    array = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return array.permute(1, 2, 0).numpy()


class TrainingProgress:
    """The global optimisation step and the step at which the data stream was last (re)started, saved in every
    checkpoint (``register_for_checkpointing``). The stream restarts at step 0 and after every periodic
    checkpoint, so the two differ only in a checkpoint written on preemption."""

    def __init__(self) -> None:
        self.step = 0
        self.stream_start = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "stream_start": self.stream_start}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])
        self.stream_start = int(state.get("stream_start", self.step))


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Owns the accelerator, LR schedules, EMA, logging, checkpoints, resume, NaN guard and export.

    Args:
        cfg: the ``TrainConfig`` of the run.
        run_config: the whole run config (saved as ``<output_dir>/config.yaml`` and sent to the tracker).
        ddp_find_unused_parameters: forwarded to DDP (set True if some parameters get no gradient in a step).
    """

    def __init__(self, cfg: TrainConfig, run_config: Any = None, *, ddp_find_unused_parameters: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.image_dir = self.output_dir / "images"
        self.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
        trackers = resolve_trackers(cfg.tracker)  # before anything is written: a missing package fails now
        self.accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=1,  # accumulation is done by fit() (several optimizers, exact step semantics)
            step_scheduler_with_optimizer=False,  # schedules advance once per optimisation step, whatever the world size
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs"),
                                                automatic_checkpoint_naming=False),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=ddp_find_unused_parameters)],
        )
        accelerator = self.accelerator
        if cfg.expected_num_processes is not None and accelerator.num_processes != cfg.expected_num_processes:
            raise RuntimeError(
                f"train.expected_num_processes={cfg.expected_num_processes} but accelerate started "
                f"{accelerator.num_processes} process(es) (this is process {accelerator.process_index}). "
                "Note: `accelerate launch --cpu --num_processes 2` silently runs ONE process. For CPU DDP use "
                "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
                "--mixed_precision no --dynamo_backend no script.py ...`; on GPUs use `accelerate config` or "
                "`accelerate launch --multi_gpu --num_processes <N> ...`."
            )
        seed_everything(cfg.seed)
        self.is_main = accelerator.is_main_process
        self.progress = TrainingProgress()
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        self.ema_model_name: str | None = None
        self.train_loader = None
        self.streaming = False
        self.without_ddp: set[str] = set()
        self.resumed_from: Path | None = None
        self._stream: Iterator | None = None
        self.stop_signal: int | None = None  # set by the SIGTERM/SIGUSR1 handler of fit()
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, logs) of every log step of this process
        self.image_log_history: list[tuple[int, dict[str, float]]] = []  # (step, scalars) of every image-log step

        if cfg.resume is None and list_checkpoints(self.checkpoint_dir):
            raise ValueError(
                f"{self.checkpoint_dir} already holds checkpoints; pass train.resume=latest (or --resume latest) "
                f"to continue that run, or choose a new train.output_dir"
            )
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(run_config if run_config is not None else cfg, self.output_dir / "config.yaml")
        if trackers:
            init_kwargs = {"wandb": {"dir": str(self.output_dir)}}
            if cfg.run_name:
                init_kwargs["wandb"]["name"] = cfg.run_name
            accelerator.init_trackers(cfg.project_name, config=flatten_for_tracker(run_config or cfg),
                                      init_kwargs=init_kwargs)
        accelerator.wait_for_everyone()

    # ---------------------------------------------------------------------------------- setup
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def images_per_step(self) -> int:
        """Global images per optimisation step = batch_size * grad_accum_steps * num_processes."""
        return self.cfg.batch_size * self.cfg.grad_accum_steps * self.accelerator.num_processes

    def setup(self, models: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
              train_loader: torch.utils.data.DataLoader, ema_model: str | None = None,
              without_ddp: Iterable[str] = ()) -> list[nn.Module]:
        """Prepare models/optimizers/loader, build one LR schedule per optimizer, the EMA of
        ``models[ema_model]`` (if train.ema_decay > 0), and resume if train.resume asks for it.

        ``optimizers[name]`` optimises ``models[name]``. Models listed in ``without_ddp`` are placed on
        the device but not DDP-wrapped; their gradients are averaged over processes right before their
        optimizer step instead (one all-reduce per step). Use it for a GAN discriminator: its module can
        then be called in the generator pass (with frozen parameters) and in its own pass without DDP's
        "one forward per backward" constraints.

        Returns the prepared models in the order given (DDP-wrapped when distributed, except ``without_ddp``).
        """
        accelerator = self.accelerator
        unknown = set(optimizers) - set(models)
        if unknown:
            raise ValueError(f"optimizers {sorted(unknown)} have no model of the same name in {sorted(models)}")
        if ema_model is not None and ema_model not in models:
            raise ValueError(f"ema_model={ema_model!r} is not one of the models {sorted(models)}")
        self.without_ddp = set(without_ddp)
        if self.without_ddp - set(models):
            raise ValueError(f"without_ddp names {sorted(self.without_ddp - set(models))} are not models {sorted(models)}")
        opt_names = list(optimizers)
        for name, model in models.items():  # one by one, in the given order (= order inside checkpoints)
            if name in self.without_ddp:
                self.models[name] = accelerator.prepare_model(model, evaluation_mode=True)
            else:
                self.models[name] = accelerator.prepare(model)
        schedulers = [build_lr_scheduler(optimizers[n], self.cfg) for n in opt_names]
        # a stream (common/data/stream.py) deals its shards out to the processes itself: accelerate only places its
        # batches on the device. Its IterableDatasetShard would make every process read every shard, and its default
        # for an IterableDataset, dispatch_batches=True, has process 0 read every batch from its own shards and
        # broadcast it (two collectives per batch; the other processes' shards never read): both are switched off.
        self.streaming = bool(getattr(train_loader.dataset, "is_stream", False))
        loaders = [] if self.streaming else [train_loader]
        prepared = accelerator.prepare(*[optimizers[n] for n in opt_names], *schedulers, *loaders)
        self.optimizers = dict(zip(opt_names, prepared[: len(opt_names)]))
        self.schedulers = dict(zip(opt_names, prepared[len(opt_names): len(opt_names) + len(schedulers)]))
        if self.streaming:
            train_loader.dataset.check_readers(accelerator.num_processes, train_loader.num_workers)
            self.train_loader = accelerate_data_loader.prepare_data_loader(
                train_loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True,
                dispatch_batches=False)
        else:
            self.train_loader = prepared[-1]
        if not self.streaming and len(self.train_loader) == 0:
            raise ValueError(
                f"the training set yields no full batch of {self.cfg.batch_size} per process "
                f"({accelerator.num_processes} process(es)); lower train.batch_size or use more data"
            )
        if self.cfg.ema_decay > 0 and ema_model is not None:
            source = accelerator.unwrap_model(self.models[ema_model])
            # EMA_t = decay * EMA_{t-1} + (1 - decay) * theta_t (parameters and buffers), fp32, same device.
            self.ema = AveragedModel(source, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
            self.ema_model_name = ema_model
        accelerator.register_for_checkpointing(self.progress)
        if self.ema is not None:
            accelerator.register_for_checkpointing(self.ema)
        if self.cfg.compile:  # after the EMA copy, which stays eager (it is only averaged and exported)
            for name in models:
                compile_in_place(self.unwrap(name))
        self._maybe_resume()
        return [self.models[n] for n in models]

    def _maybe_resume(self) -> None:
        if self.cfg.resume == "latest":
            path, skipped = latest_complete_checkpoint(self.checkpoint_dir)
            for bad, problem in skipped:
                self.print(f"train.resume=latest: skipped the incomplete checkpoint {bad} ({problem})")
        else:
            path = resolve_resume_path(self.cfg.resume, self.checkpoint_dir)
        if self.accelerator.num_processes > 1:  # every process resumes from the checkpoint the main one chose
            path = accelerate_utils.broadcast_object_list([path])[0]
        if path is None:
            if self.is_main:  # a new run from step 0 starts a new history
                truncate_history(self.output_dir, 0)
            if self.cfg.resume == "latest":
                self.print(f"train.resume=latest: no complete checkpoint in {self.checkpoint_dir}, "
                           "starting from step 0")
            return
        self.accelerator.load_state(str(path))
        self.resumed_from = path
        if self.is_main:
            truncate_history(self.output_dir, self.progress.step)
        self.print(f"resumed from {path} at step {self.progress.step}")

    def unwrap(self, name: str = "model") -> nn.Module:
        return self.accelerator.unwrap_model(self.models[name])

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    # ---------------------------------------------------------------------------------- data
    def _batch_stream(self, consumed: int) -> Iterator[Any]:
        """Micro-batches from position ``consumed`` (micro-batches per process since step 0) onwards.

        Epoch e = consumed // L (L = batches per epoch per process) shuffles with seed (train.seed + e);
        the first (consumed mod L) batches of that epoch are skipped without loading them. A stream runs in passes
        without end, each seeded with the position it starts at (what that means for resume: common/data/stream.py).
        """
        if self.streaming:
            while True:
                self.train_loader.dataset.start_at(consumed)
                before = consumed
                for batch in self.train_loader:
                    consumed += 1
                    yield batch
                if consumed == before:
                    raise ValueError(f"the training stream of process {self.accelerator.process_index} yields no "
                                     f"full batch of {self.cfg.batch_size} images; lower train.batch_size or use "
                                     "more data")
        per_epoch = len(self.train_loader)
        epoch, skip = divmod(consumed, per_epoch)
        while True:
            loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            loader.set_epoch(epoch)
            yield from loader
            epoch, skip = epoch + 1, 0

    def first_batches(self, num_batches: int = 1) -> list[Any]:
        """The first ``num_batches`` micro-batches of epoch 0 (for data-driven init); does not move the stream."""
        batches = []
        for batch in self._batch_stream(0):
            batches.append(batch)
            if len(batches) >= num_batches:
                break
        return batches

    # ---------------------------------------------------------------------------------- per step
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss, scaled by 1 / grad_accum_steps (grad scaler handled)."""
        self.accelerator.backward(loss / self.cfg.grad_accum_steps)

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimiser steps per epoch (batches per process // grad_accum_steps); None for data without a length."""
        try:
            return max(1, len(self.train_loader) // self.cfg.grad_accum_steps)
        except TypeError:
            return None

    def _apply_schedules(self, module: nn.Module, step: int) -> None:
        """Schedules inside a model at optimisation step s: ``set_training_step(s, max_steps, steps_per_epoch)``
        where the model has it (its schedules choose their horizon), else ``set_progress(min(1, s / max_steps))``."""
        if hasattr(module, "set_training_step"):
            module.set_training_step(step, self.cfg.max_steps, self.steps_per_epoch)
        elif hasattr(module, "set_progress"):
            module.set_progress(min(1.0, step / self.cfg.max_steps))

    def _set_progress(self, step: int) -> None:
        for name in self.models:
            self._apply_schedules(self.unwrap(name), step)

    def _reduce_logs(self, step: int, micro_logs: list[Mapping[str, Any]]) -> tuple[dict[str, float], bool]:
        """(mean over micro-batches and processes of every log, whether any process got a stop signal): one
        all-reduce of the logs with this process's stop flag (0 or 1) appended; stop on any non-finite value."""
        keys = list(micro_logs[0])
        rows = [[torch.as_tensor(logs[k], device=self.device).detach().float().reshape(()) for k in keys]
                for logs in micro_logs]
        values = torch.stack([torch.stack(row) for row in rows]).mean(0) if keys else torch.zeros(0, device=self.device)
        flag = torch.tensor([float(self.stop_signal is not None)], device=self.device)
        values = torch.cat([values, flag])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        *means, stop = values.tolist()
        result = dict(zip(keys, means))
        bad = {k: v for k, v in result.items() if not math.isfinite(v)}
        if bad:
            self._raise_non_finite(step, bad)
        return result, stop > 0

    def _raise_non_finite(self, step: int, bad: Mapping[str, float]) -> None:
        latest = list_checkpoints(self.checkpoint_dir)
        raise NonFiniteLossError(
            f"non-finite training values at step {step}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + ". Training stopped before the optimizer step; nothing was saved for this step. "
            + f"Last good checkpoint: {latest[-1] if latest else 'none'}. "
            + "Consider a lower train.lr, train.grad_clip > 0 or train.mixed_precision=bf16/no."
        )

    def _optimizer_steps(self, step: int) -> dict[str, float]:
        """Clip, step and schedule every optimizer that received gradients; zero all grads."""
        norms: dict[str, float] = {}
        for name, optimizer in self.optimizers.items():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if any(p.grad is not None for p in params):
                if name in self.without_ddp:
                    self._average_gradients_over_processes(params)
                if self.cfg.grad_clip > 0:
                    norm = self.accelerator.clip_grad_norm_(params, self.cfg.grad_clip)
                    norms[f"grad_norm/{name}"] = float(norm)
                optimizer.step()
            with warnings.catch_warnings():  # an optimizer without grads yet (GAN warm-up) still follows the schedule
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                self.schedulers[name].step()
            optimizer.zero_grad(set_to_none=True)
        if self.mixed_precision != "fp16":  # under fp16 the grad scaler skips inf steps by design
            bad = {k: v for k, v in norms.items() if not math.isfinite(v)}
            if bad:
                self._raise_non_finite(step, bad)
        return norms

    def _average_gradients_over_processes(self, params: list[nn.Parameter]) -> None:
        """g <- (1/P) sum_ranks g for every parameter with a gradient (one flat all-reduce)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---------------------------------------------------------------------------------- the loop
    def fit(self, training_step: Callable[[Any, int], Mapping[str, Any]],
            on_log: Callable[[int], Mapping[str, Any]] | None = None,
            on_image_log: Callable[[int], Mapping[str, Any]] | None = None) -> dict[str, float]:
        """Run optimisation steps from the current step to train.max_steps.

        training_step(batch, step) -> logs: runs on one micro-batch and calls ``trainer.backward``;
            every returned value (tensor or float) is averaged, checked for NaN/Inf and logged.
        on_log(step) -> extra scalars, called on every process at log steps (may use collectives).
        on_image_log(step) -> {name: image grid [3, H, W] in [-1, 1] or scalar}, every image_log_every steps.
        Returns the last reduced logs. On SIGTERM / SIGUSR1 (module doc): checkpoint after the step at which every
        process has learned of it, then raise TrainingPreempted (SystemExit with code 75) on every process.
        """
        with self._stop_on_preemption_signals():
            return self._fit(training_step, on_log, on_image_log)

    def _fit(self, training_step, on_log, on_image_log) -> dict[str, float]:
        cfg, accelerator = self.cfg, self.accelerator
        step = self.progress.step
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (self.is_main and cfg.progress_bar),
                   dynamic_ncols=True, desc="train")
        last_logs: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        self._stream = None
        if self.progress.stream_start < step:  # resumed from a checkpoint written on preemption
            self._replay_stream(step)
        while step < cfg.max_steps:
            seed_everything(seed_for_step(cfg.seed, step, accelerator.process_index))
            if self._stream is None:  # (re)started at step 0, on resume and after every checkpoint
                self._stream = self._batch_stream(step * cfg.grad_accum_steps)
            self._set_progress(step)

            micro_logs = []
            for micro in range(cfg.grad_accum_steps):
                batch = next(self._stream)
                sync = micro == cfg.grad_accum_steps - 1
                with contextlib.ExitStack() as stack:
                    if not sync:
                        for model in self.models.values():
                            stack.enter_context(accelerator.no_sync(model))
                    micro_logs.append(dict(training_step(batch, step)))
            logs, stop = self._reduce_logs(step, micro_logs)  # raises on NaN/Inf before anything is stepped
            logs.update(self._optimizer_steps(step))
            if self.ema is not None:
                self.ema.update_parameters(self.unwrap(self.ema_model_name))
            step += 1
            self.progress.step = step
            window_steps += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                logs["images_per_sec"] = window_steps * self.images_per_step / max(elapsed, 1e-9)
                for name, scheduler in self.schedulers.items():
                    logs[f"lr/{name}"] = scheduler.get_last_lr()[0]
                if on_log is not None:
                    logs.update({k: float(v) for k, v in on_log(step).items()})
                accelerator.log(logs, step=step)
                self.history.append((step, dict(logs)))
                self._append_history(step, logs)
                bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}",
                                img_s=f"{logs['images_per_sec']:.1f}")
                window_start, window_steps = time.perf_counter(), 0
            if on_image_log is not None and cfg.image_log_every and step % cfg.image_log_every == 0:
                self.log_media(on_image_log(step), step)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                self.progress.stream_start = step  # the stream restarts here, in this run and in a resumed one
                self.save_checkpoint()
                self._stream = None
            elif stop:
                self.save_checkpoint()
            last_logs = logs
            if stop and step < cfg.max_steps:
                bar.close()
                self._stop_preempted(step)
        bar.close()
        return last_logs

    def _replay_stream(self, step: int) -> None:
        """Rebuild the data stream of an uninterrupted run at ``step``: restart it where that run did
        (``progress.stream_start`` = c) and draw the micro-batches of steps c .. step - 1 under each step's seed,
        without training on them. The DataLoader iterators (their seeds drawn from the global RNG when they are
        created) and the data position are then those of the uninterrupted run."""
        start, accum = self.progress.stream_start, self.cfg.grad_accum_steps
        for replayed in range(start, step):
            seed_everything(seed_for_step(self.cfg.seed, replayed, self.accelerator.process_index))
            if self._stream is None:
                self._stream = self._batch_stream(start * accum)
            for _ in range(accum):
                next(self._stream)
        self.print(f"replayed the data stream from step {start} to step {step} (checkpoint written on preemption)")

    def _stop_preempted(self, step: int) -> None:
        """After the checkpoint of ``step``: close the trackers and raise TrainingPreempted (exit code 75)."""
        got = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "a signal on another process"
        message = (f"preempted ({got}): stopped after step {step} with checkpoint "
                   f"{self.checkpoint_dir / f'step_{step:07d}'}; exit code {PREEMPTED_EXIT_CODE}. Continue with "
                   f"--resume latest (train.resume=latest)")
        self.print(message)
        self.end()
        raise TrainingPreempted(message)

    @contextlib.contextmanager
    def _stop_on_preemption_signals(self) -> Iterator[None]:
        """SIGTERM / SIGUSR1 set ``self.stop_signal`` for the block (previous handlers restored after it)."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return

        def request_stop(signum, frame):
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in PREEMPTION_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ---------------------------------------------------------------------------------- logging
    def _append_history(self, step: int, logs: Mapping[str, Any]) -> None:
        """One JSON line per log step in <output_dir>/history.jsonl (main process; see ``read_history``)."""
        if not self.is_main:
            return
        row = {"step": int(step), **{k: float(v) for k, v in logs.items()}}
        with open(self.output_dir / HISTORY_FILE, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def log_media(self, values: Mapping[str, Any], step: int) -> None:
        """Log scalars and image grids ([3, H, W] in [-1, 1]): PNG under <output_dir>/images/ + tracker."""
        scalars = {k: float(v) for k, v in values.items() if not (torch.is_tensor(v) and v.dim() == 3)}
        if scalars:
            self.accelerator.log(scalars, step=step)
            self.image_log_history.append((step, scalars))
            self._append_history(step, scalars)  # validation rows (e.g. val/psnr) of history.jsonl: training curves
        if not self.is_main:
            return

        for name, grid in values.items():
            if not (torch.is_tensor(grid) and grid.dim() == 3):
                continue
            array = images_to_uint8(grid)
            self.image_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(self.image_dir / f"{name.replace('/', '_')}_step{step:07d}.png")
            for tracker in self.accelerator.trackers:  # accelerate's tracker API (GeneralTracker.log_images)
                if tracker.name == "tensorboard":  # SummaryWriter.add_images wants a batch and its layout
                    tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")
                elif callable(getattr(tracker, "log_images", None)):
                    try:
                        tracker.log_images({name: [array]}, step=step)
                    except NotImplementedError:  # a tracker without image support keeps only the PNG
                        pass

    # ---------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Atomic checkpoint: save_state into checkpoints/.tmp_step_XXXXXXX, fsync every file, write
        ``trainer_state.json`` last (step, process count and every file's size: ``checkpoint_problem``), then rename
        to step_XXXXXXX; keep the newest train.keep_checkpoints. A crash mid-save leaves only a .tmp_ dir (ignored,
        replaced). A failed write on any process (e.g. the disk is full) removes the temporary folder and raises
        CheckpointWriteError on every process (one all-reduce each time); the previous checkpoints stay."""
        accelerator = self.accelerator
        step = self.progress.step
        final = self.checkpoint_dir / f"step_{step:07d}"
        temporary = self.checkpoint_dir / f".tmp_step_{step:07d}"
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if temporary.exists():
                shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        error = None
        try:
            accelerator.save_state(str(temporary))
        except OSError as err:
            error = err
        self._raise_if_checkpoint_failed(step, error, temporary)
        if self.is_main:
            try:
                files = {}
                for file in sorted(p for p in temporary.rglob("*") if p.is_file()):
                    with open(file, "rb") as fh:
                        os.fsync(fh.fileno())
                    files[str(file.relative_to(temporary))] = file.stat().st_size
                write_bytes_atomic(temporary / CHECKPOINT_STATE_FILE, json.dumps(
                    {"step": step, "num_processes": accelerator.num_processes,
                     "images_per_step": self.images_per_step, "files": files}).encode())
                publish_folder(temporary, final, replace=True)  # re-saving a step (a resumed finished run) swaps
            except OSError as err:
                error = err
        self._raise_if_checkpoint_failed(step, error, temporary)
        if self.is_main:
            for old in list_checkpoints(self.checkpoint_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def _raise_if_checkpoint_failed(self, step: int, error: OSError | None, temporary: Path) -> None:
        """Every process learns whether a checkpoint write failed on any of them (one all-reduce); if so the main
        one removes the temporary folder and all raise CheckpointWriteError naming the cause and what is intact."""
        failed = error is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(failed)], device=self.device)
            failed = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if not failed:
            return
        if self.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
        intact = latest_complete_checkpoint(self.checkpoint_dir)[0]
        cause = (f"{error.strerror or error} ({errno.errorcode.get(error.errno, error.errno)})" if error is not None
                 else "it failed on another process")
        raise CheckpointWriteError(
            error.errno if error is not None else errno.EIO,
            f"could not write the checkpoint of step {step} into {self.checkpoint_dir}: {cause}. The partial "
            f"checkpoint was removed; the newest intact checkpoint is {intact or 'none'}. Free space (or fix the "
            f"cause) and continue with --resume latest") from error

    # ---------------------------------------------------------------------------------- export
    def export(self, name: str, model_name: str | None = None) -> Path:
        """save_pretrained of the EMA weights (or the raw weights without EMA) to <output_dir>/<name>."""
        model_name = model_name or self.ema_model_name or next(iter(self.models))
        path = self.output_dir / name
        self.accelerator.wait_for_everyone()
        if self.ema is not None and model_name == self.ema_model_name:
            model = self.ema.module
        else:
            model = self.unwrap(model_name)
        self._apply_schedules(model, self.cfg.max_steps)  # end-of-training schedule values (LGQ's final tau), every rank
        if self.is_main:
            if not hasattr(model, "save_pretrained"):
                raise TypeError(f"{type(model).__name__} has no save_pretrained (needs diffusers ModelMixin)")
            model.save_pretrained(str(path))
        self.accelerator.wait_for_everyone()
        return path

    def end(self) -> None:
        """Close the process group the one clean way (``end_process_group``), then flush and close trackers."""
        end_process_group()
        self.accelerator.end_training()  # trackers; the group is already gone

    def finish(self, name: str, logs: Mapping[str, float], description: str | None = None, card=None) -> Path:
        """The end of a train script: ``export(name)``, its model card (``card``: an ``common.hub.CardInfo``, written
        as README.md), the upload when ``train.push_to_hub``, the closing line, then close the trackers."""
        path = self.export(name)
        cls = json.loads((path / "config.json").read_text()).get("_class_name") if self.is_main else None
        if self.is_main and card is not None:
            write_model_card(path, card)
        if self.is_main and self.cfg.push_to_hub:
            repo_id = self.cfg.hub_model_id or f"{self.output_dir.resolve().name}-{name}"
            url = push_folder_to_hub(path, repo_id, private=self.cfg.hub_private,
                                     commit_message=f"{description or name} after {self.step} steps")
            self.print(f"pushed {path} to the Hub: {url}")
        self.accelerator.wait_for_everyone()
        self.print(f"final step {self.step}: loss {logs.get('loss', float('nan')):.4f}; exported the "
                   f"{'EMA ' if self.ema is not None else ''}{description or name} to {path} "
                   f"(load with {cls}.from_pretrained('{path}'))")
        self.end()
        return path


# --------------------------------------------------------------------------------------------
# quantizer helpers
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def init_quantizer_from_data(trainer: Trainer, model_name: str = "model", num_batches: int = 1,
                             images_from_batch: Callable[[Any], torch.Tensor] = lambda batch: batch[0]) -> bool:
    """Data-driven quantizer init before step 0, identical on every process.

    Encodes the first ``num_batches`` micro-batches on each process, gathers the latents of all
    processes (accelerator.gather -> the same [N_global, C] on every rank), then calls
    ``quantizer.init_from_latents`` under the same seed everywhere. No-op when the quantizer does
    not need init or when the run was resumed (the checkpoint holds the initialised codebook).
    """
    model = trainer.unwrap(model_name)
    quantizer = getattr(model, "quantizer", None)
    if quantizer is None or not getattr(quantizer, "needs_init", False) or trainer.step > 0 or trainer.resumed_from:
        return False
    latents = []
    for batch in trainer.first_batches(num_batches):
        z = model.encode_latents(images_from_batch(batch).to(trainer.device))
        latents.append(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    gathered = trainer.accelerator.gather(torch.cat(latents).contiguous())
    seed_everything(trainer.cfg.seed)
    quantizer.init_from_latents(gathered)
    trainer.print(f"initialised the {type(quantizer).__name__} codebook from {gathered.shape[0]} encoder latents")
    return True


__all__ = [
    "Trainer", "TrainingProgress", "NonFiniteLossError", "TrainingPreempted", "PREEMPTED_EXIT_CODE", "lr_factor",
    "build_lr_scheduler", "build_optimizer",
    "parameter_groups", "excluded_from_weight_decay", "resolve_mixed_precision", "seed_for_step", "seed_everything",
    "list_checkpoints", "checkpoint_problem", "latest_complete_checkpoint", "CheckpointWriteError",
    "resolve_resume_path",
    "resolve_trackers", "init_quantizer_from_data", "images_to_uint8", "flatten_for_tracker",
]


def end_process_group() -> None:
    """The one clean end of every multi-process command: a barrier that every rank reaches, then
    ``torch.distributed.destroy_process_group()``; no collective may follow it. A no-op in one process.

    A rank that leaves the interpreter with the group still alive (or destroys it while another rank is still
    in a collective) can abort in gloo's teardown (``terminate called without an active exception``, signal 6).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def make_accelerator():
    """Accelerator on CUDA/MPS when present, else CPU (gloo for several processes).

    Raises if the launcher started several processes that did not join one process group: they
    would each extract everything into the same output folder.
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not (
        torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    )
    accelerator = Accelerator(cpu=use_cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate sees {accelerator.num_processes}: "
            "on CPU use `accelerate launch --multi_gpu --num_processes N` with ACCELERATE_USE_CPU=true"
        )
    return accelerator
