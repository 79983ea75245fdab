"""Typed run configurations: dataclass schema + YAML file(s) + command-line ``key=value`` overrides.

A run's configuration is a dataclass (e.g. ``TokenizerRunConfig``) whose fields are other
dataclasses (``train: TrainConfig``, ``data: DataConfig``, ...). ``load_config`` builds it as

    config = schema defaults  <-  YAML file 1  <-  YAML file 2 ...  <-  CLI dotlist

(later sources win), with OmegaConf type checking, and returns a plain dataclass instance.
Every mistake is reported with the offending key and where it came from:

* unknown key (typo)  -> ``ConfigError`` naming the key, the source and the closest valid key;
* wrong type          -> ``ConfigTypeError`` (a ``TypeError``) naming the key and the source;
* missing file        -> ``FileNotFoundError``;
* semantic error      -> ``ValueError`` naming the key (each dataclass may define ``validate()``).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")

LR_SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and its source."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value has the wrong type for its key."""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by the tokenizer and the prior stage."""

    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000  # optimisation steps (each = grad_accum_steps micro-batches per process)
    batch_size: int = 8  # per process; global batch = batch_size * grad_accum_steps * num_processes
    grad_accum_steps: int = 1
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0  # AdamW decay; never applied to norms, biases, embeddings, codebooks
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr at max_steps) | "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm per optimizer; 0 = no clipping
    mixed_precision: str = "auto"  # "auto" = bf16 when the CUDA device supports it, else "no"; "no" | "bf16" | "fp16"
    ema_decay: float = 0.0  # weight EMA decay (e.g. 0.999); 0 = off
    compile: bool = False  # torch.compile every trained model's forward in place (nn.Module.compile; weights unchanged)
    log_every: int = 10
    image_log_every: int = 0  # 0 = no image logging
    checkpoint_every: int = 1000  # 0 = only the final checkpoint
    keep_checkpoints: int = 2  # keep the newest N checkpoints
    # accelerate's trackers: "none", one name ("tensorboard", "wandb", "mlflow", ...), a list of names, or "all" (every
    # installed one); a requested tracker whose package is missing stops the run at start-up (common.training.resolve_trackers)
    tracker: Any = "none"
    project_name: str = "lgq"
    run_name: Optional[str] = None
    resume: Optional[str] = None  # None | "latest" | path to a checkpoints/step_XXXXXXX directory
    expected_num_processes: Optional[int] = None  # assert the world size (catches silent 1-process launches)
    num_workers: int = 0  # DataLoader workers per process
    progress_bar: bool = True
    push_to_hub: bool = False  # upload the final export (with its README.md model card) with huggingface_hub
    hub_model_id: Optional[str] = None  # "user/name" or "name"; default: <output_dir name>-<export name>
    hub_private: bool = False

    def validate(self) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size,
                    "grad_accum_steps": self.grad_accum_steps, "lr": self.lr, "log_every": self.log_every}
        for key, value in positive.items():
            if not value > 0:
                raise ValueError(f"train.{key} must be > 0, got {value}")
        non_negative = {"warmup_steps": self.warmup_steps, "weight_decay": self.weight_decay,
                        "grad_clip": self.grad_clip, "image_log_every": self.image_log_every,
                        "checkpoint_every": self.checkpoint_every, "num_workers": self.num_workers}
        for key, value in non_negative.items():
            if value < 0:
                raise ValueError(f"train.{key} must be >= 0, got {value}")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be < train.max_steps ({self.max_steps})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.mixed_precision in ("False", "false"):
            # YAML 1.1 reads the documented value `no` (in a file or a key=value override) as the boolean False,
            # which OmegaConf stores as "False" in this string field: it means "no".
            self.mixed_precision = "no"
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in [0, 1) (0 = off), got {self.ema_decay}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        names = [self.tracker] if isinstance(self.tracker, str) else self.tracker
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"train.tracker must be a tracker name, a list of names, 'all' or 'none', got {self.tracker!r}")
        self.tracker = names[0] if len(names) == 1 else list(names)
        if self.expected_num_processes is not None and self.expected_num_processes < 1:
            raise ValueError(f"train.expected_num_processes must be >= 1 or null, got {self.expected_num_processes}")
        if not self.output_dir:
            raise ValueError("train.output_dir must not be empty")


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
def _valid_keys(schema: Any, parent_key: str) -> list[str]:
    node = schema if not parent_key else OmegaConf.select(schema, parent_key, default=None)
    try:
        return [str(k) for k in node.keys()]
    except AttributeError:
        return []


def _translate_error(err: OmegaConfBaseException, schema: Any, source: str) -> ConfigError:
    """Turn an OmegaConf error into a ConfigError naming key, source and (for typos) the closest key."""
    full_key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "?")
    if isinstance(err, ConfigKeyError):
        parent, _, leaf = full_key.rpartition(".")
        valid = _valid_keys(schema, parent)
        close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{(parent + '.') if parent else ''}{close[0]}'?" if close else ""
        return ConfigError(f"unknown config key '{full_key}' in {source}.{hint} "
                           f"Valid keys here: {', '.join(valid)}")
    message = str(getattr(err, "msg", err)).splitlines()[0]
    if isinstance(err, ValidationError):
        return ConfigTypeError(f"wrong type for config key '{full_key}' in {source}: {message}")
    return ConfigError(f"invalid config key '{full_key}' in {source}: {message}")


def validate_config(config: Any) -> None:
    """Call ``validate()`` on every dataclass in the tree that defines it (depth first)."""
    if not dataclasses.is_dataclass(config):
        return
    for f in dataclasses.fields(config):
        validate_config(getattr(config, f.name))
    check = getattr(config, "validate", None)
    if callable(check):
        check()


def load_config(schema_cls: type[T], config_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build ``schema_cls`` from its defaults, YAML file(s) merged in order, then ``key=value`` overrides.

    Returns a ``schema_cls`` instance (nested dataclasses, tuples, ...), validated.
    """
    schema = OmegaConf.structured(schema_cls)
    merged = schema
    paths = [] if config_path is None else ([config_path] if isinstance(config_path, (str, os.PathLike)) else list(config_path))
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file {path}: {err}") from err
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as err:
            raise _translate_error(err, schema, f"config file {path}") from None
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} must look like key=value")
        if item.startswith(("+", "~")):
            raise ConfigError(f"override {item!r}: Hydra-style '+'/'~' prefixes are not supported; use key=value")
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        except OmegaConfBaseException as err:
            raise _translate_error(err, schema, "command-line overrides") from None
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # e.g. a required field (???) left missing
        raise _translate_error(err, schema, "the merged config") from None
    validate_config(config)
    return config


def config_to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(config))
    return path




def with_later_defaults(stored: dict, defaults: dict) -> dict:
    """``stored`` (a config saved by an older lgq) completed, recursively, with the ``defaults`` entries it lacks.

    A key that lgq added after the config was written held its default then too (the behaviour it names did not
    exist), so comparing the completed config with a new one reports only what really changed."""
    completed = dict(stored)
    for key, value in defaults.items():
        if key not in completed:
            completed[key] = value
        elif isinstance(value, dict) and isinstance(completed[key], dict):
            completed[key] = with_later_defaults(completed[key], value)
    return completed


__all__ = ["TrainConfig", "ConfigError", "ConfigTypeError", "load_config", "validate_config",
           "save_config", "config_to_yaml", "with_later_defaults"]
