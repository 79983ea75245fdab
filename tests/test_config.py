"""common/config.py: schema + YAML + dotlist merging and its error messages."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common.config import ConfigError, ConfigTypeError, TrainConfig, load_config, save_config


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    note: str = "x"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_files_merge_in_order_then_overrides(tmp_path):
    base = write(tmp_path, "train:\n  lr: 0.001\n  max_steps: 50\n  betas: [0.5, 0.9]\n", "base.yaml")
    extra = write(tmp_path, "train:\n  max_steps: 70\nnote: extra\n", "extra.yaml")
    cfg = load_config(RunConfig, [base, extra], ["train.batch_size=3", "train.resume=latest"])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.train, TrainConfig)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size, cfg.note) == (0.001, 70, 3, "extra")
    assert cfg.train.betas == (0.5, 0.9) and cfg.train.resume == "latest"
    # the saved resolved config loads back to the same values
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(RunConfig, saved) == cfg


def test_typo_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    message = str(err.value)
    assert "train.warmup_step" in message and str(path) in message and "train.warmup_steps" in message


def test_typo_in_override_is_reported_with_suggestion():
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*command-line.*Did you mean 'train\.lr'"):
        load_config(RunConfig, None, ["train.lrr=0.1"])


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigTypeError, match=r"train\.max_steps") as err:
        load_config(RunConfig, write(tmp_path, "train:\n  max_steps: many\n"))
    assert isinstance(err.value, TypeError)
    with pytest.raises(TypeError, match=r"train\.lr.*command-line"):
        load_config(RunConfig, None, ["train.lr=fast"])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, None, ["train.lr"])
    with pytest.raises(ConfigError, match="not supported"):
        load_config(RunConfig, None, ["+train.new=1"])


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.warmup_steps=2000", "train.warmup_steps"),
    ("train.lr_schedule=linear", "train.lr_schedule"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.tracker=[]", "train.tracker"),
    ("train.tracker=[3]", "train.tracker"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
])
def test_semantic_errors_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(RunConfig, None, [override])


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    """YAML 1.1 reads `no` as False; the documented value must still work from the command line and from files."""
    from tokenizer.config import TokenizerRunConfig

    assert load_config(TokenizerRunConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(TokenizerRunConfig, path).train.mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        load_config(TokenizerRunConfig, None, ["train.mixed_precision=yes"])
