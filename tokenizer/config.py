"""Run configuration of `tokenizer/train.py` (schema for `common.config.load_config`).

    accelerate launch tokenizer/train.py --config configs/tokenizer/tiny.yaml model.quantizer=fsq train.max_steps=50

Sections: ``model`` (architecture + quantizer choice: ``model.quantizer=fsq model.codebook_size=4096``),
``loss`` (L1/L2 + LPIPS + GAN weights), ``data`` (which images), ``train`` (optimisation and
bookkeeping, shared with the prior stage), ``eval`` (cheap in-training measurements).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config import TrainConfig
from common.data import DataConfig
from tokenizer.losses import TokenizerLossConfig
from tokenizer.model import TokenizerModelConfig


@dataclass
class TokenizerEvalConfig:
    """In-training measurements.

    codebook_window: rolling window W (micro-batches per process) of hard indices for the logged
        codebook statistics (active codes, perplexity) — bincount over the last W batches of all processes.
    num_val_images: validation images reconstructed every train.image_log_every steps (PSNR, codebook
        statistics, PNG grid of originals vs reconstructions); 0 = off.
    quantizer_init_batches: first micro-batches per process whose encoder latents initialise a
        quantizer that needs data-driven init (LGQ), gathered over all processes.
    """

    codebook_window: int = 50
    num_val_images: int = 8
    quantizer_init_batches: int = 4

    def validate(self) -> None:
        if self.codebook_window < 1:
            raise ValueError(f"eval.codebook_window must be >= 1, got {self.codebook_window}")
        if self.num_val_images < 0:
            raise ValueError(f"eval.num_val_images must be >= 0, got {self.num_val_images}")
        if self.quantizer_init_batches < 1:
            raise ValueError(f"eval.quantizer_init_batches must be >= 1, got {self.quantizer_init_batches}")


@dataclass
class TokenizerRunConfig:
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    data: DataConfig = field(default_factory=DataConfig.unresolved)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/tokenizer"))
    eval: TokenizerEvalConfig = field(default_factory=TokenizerEvalConfig)

    def validate(self) -> None:
        factor = 2 ** (len(self.model.channel_multipliers) - 1)
        if self.data.image_size % factor:
            raise ValueError(f"data.image_size ({self.data.image_size}) must be divisible by the downsampling "
                             f"factor {factor} = 2 ** (len(model.channel_multipliers) - 1)")
        if self.data.num_workers and self.data.num_workers != self.train.num_workers:
            raise ValueError(f"data.num_workers={self.data.num_workers} is not used by the training loop; "
                             "set train.num_workers instead")


__all__ = ["TokenizerRunConfig", "TokenizerEvalConfig"]
