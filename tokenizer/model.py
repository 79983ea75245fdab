"""`LGQTokenizer`: VQGAN-style encoder -> pre-quantizer norm -> quantizer (LGQ / VQ / FSQ / SimVQ / LFQ / IBQ) -> decoder.

    z = N(E(x)),  (q, indices) = Q(z),  x_hat = D(q)

N (``pre_quantizer_norm``, `tokenizer.modules.PreQuantizerNorm`) is the same for every quantizer: by default
the encoder's final GroupNorm on the latent channels followed by a per-token LayerNorm (docs/method.md §1),
so all quantizers, and their data-driven initialisations, see the same normalised latents.

Images are float tensors in [-1, 1], [B, 3, H, W]; H and W must be divisible by
``downsample_factor = 2 ** (len(channel_multipliers) - 1)``; token grids are int64 [B, H/f, W/f].

The model is a diffusers ``ModelMixin`` + ``ConfigMixin``: ``save_pretrained(dir)`` writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` and ``LGQTokenizer.from_pretrained(dir)``
rebuilds it offline. Exports written before ``pre_quantizer_norm`` existed (no such key in config.json) load
unchanged: "layernorm" for LGQ (whose quantizer then held that LayerNorm, option ``pre_norm``), "none" otherwise
(`migrate_legacy_config`). The module path ``tokenizer.model`` is recorded in pipeline checkpoints: do not move it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from tokenizer.modules import (MIN_CHANNELS_PER_GROUP, PRE_QUANTIZER_NORMS, Decoder, Encoder, PreQuantizerNorm,
                               make_norm_layer, resolve_attention_levels)
from tokenizer.quantizers import QuantizerOutput, build_quantizer
from tokenizer.quantizers.base import fp32_quantizer_math


@dataclass
class TokenizerModelConfig:
    """The one home of the tokenizer's architecture defaults (fields = `LGQTokenizer.__init__` arguments).

    Defaults are the ImageNet-256 recipe: 16x downsampling (16x16 tokens), latent dim 64, K = 16384.
    `attention_resolutions`: "lowest", "none" or a list of level indices (0 = full resolution).
    `pre_quantizer_norm`: the latent normalisation in front of every quantizer, one of
    "groupnorm_layernorm" (default; the authors' model), "layernorm" (per-token LayerNorm only) or "none".
    `norm`: the backbone's normalisation, "group" (GroupNorm, VQGAN; default) or "none" (the laptop glyphs recipe).
    `norm_min_channels_per_group`: floor on channels per GroupNorm group in the whole network (default 4, as
    in VQGAN's 128 channels / 32 groups; 1 allows instance normalisation in narrow layers, see
    `tokenizer.modules.group_norm`). Wide recipes (>= 128 channels) are unaffected.
    """

    in_channels: int = 3
    base_channels: int = 128
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    latent_dim: int = 64
    attention_resolutions: Any = "lowest"
    dropout: float = 0.0
    quantizer: str = "lgq"
    codebook_size: int = 16384
    quantizer_options: dict = field(default_factory=dict)
    pre_quantizer_norm: str = "groupnorm_layernorm"
    norm: str = "group"
    norm_min_channels_per_group: int = MIN_CHANNELS_PER_GROUP


_DEFAULTS = TokenizerModelConfig()
CODEBOOK_PRUNING_KEY = "codebook_pruning"  # config entry of a pruned export (tokenizer/prune.py)
# Stored as ``config_format`` in every export. 2: "layernorm" / "groupnorm_layernorm" have LN's learnable scale and
# shift; exports without the key (format 1) meant the parameter-free LN by those names (`migrate_legacy_config`).
CONFIG_FORMAT = 2


@dataclass
class TokenizerOutput(BaseOutput):
    """reconstruction: decoder output [B, 3, H, W] (not clamped); quantizer_output: `QuantizerOutput`.

    Both fields are required. ``quantizer_output`` carries a ``None`` default only because of the
    diffusers ``BaseOutput`` protocol: accelerate's fp32 conversion of model outputs under mixed
    precision (``accelerate.utils.convert_to_fp32``) rebuilds every Mapping as ``type(out)(dict)``, and
    ``BaseOutput`` accepts that one-dict form only when the later fields default to ``None``.
    ``__post_init__`` still refuses an output without a quantizer output.
    """

    reconstruction: torch.Tensor
    quantizer_output: QuantizerOutput | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.get("quantizer_output") is None:
            raise TypeError("TokenizerOutput needs both reconstruction and quantizer_output")


class LGQTokenizer(ModelMixin, ConfigMixin):
    """Discrete image tokenizer: VQGAN encoder/decoder around a quantizer chosen by name."""

    _supports_gradient_checkpointing = False
    # The quantizer (codebook, LGQ's temperature state, ...) stays fp32: diffusers honours this in
    # ``from_pretrained(..., torch_dtype=...)``, which loads every tensor under ``quantizer.`` in fp32. Its
    # ``ModelMixin.to(dtype)`` casts everything regardless (it only warns), so ``LGQPipeline.to`` restores the
    # quantizer's fp32 tensors after a cast.
    _keep_in_fp32_modules = ["quantizer"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = _DEFAULTS.in_channels,
        base_channels: int = _DEFAULTS.base_channels,
        channel_multipliers: Sequence[int] = tuple(_DEFAULTS.channel_multipliers),
        num_res_blocks: int = _DEFAULTS.num_res_blocks,
        latent_dim: int = _DEFAULTS.latent_dim,
        attention_resolutions: str | Sequence[int] | None = _DEFAULTS.attention_resolutions,
        dropout: float = _DEFAULTS.dropout,
        quantizer: str = _DEFAULTS.quantizer,
        codebook_size: int = _DEFAULTS.codebook_size,
        quantizer_options: dict | None = None,
        pre_quantizer_norm: str = _DEFAULTS.pre_quantizer_norm,
        norm: str = _DEFAULTS.norm,
        norm_min_channels_per_group: int = _DEFAULTS.norm_min_channels_per_group,
        config_format: int = CONFIG_FORMAT,
    ):
        super().__init__()
        if int(config_format) != CONFIG_FORMAT:
            raise ValueError(f"config_format {config_format} is not {CONFIG_FORMAT}: this lgq reads older exports through "
                             "`migrate_legacy_config` (load with from_pretrained) and cannot read newer ones")
        if pre_quantizer_norm not in PRE_QUANTIZER_NORMS:
            raise ValueError(f"pre_quantizer_norm must be one of {PRE_QUANTIZER_NORMS}, got {pre_quantizer_norm!r}")
        if "pre_norm" in dict(quantizer_options or {}):
            raise ValueError(
                "quantizer_options.pre_norm no longer exists: the per-token LayerNorm moved from the LGQ quantizer "
                "into the model, in front of every quantizer; set pre_quantizer_norm='groupnorm_layernorm' (default), "
                "'layernorm_noaffine' (the former pre_norm=True) or 'none' (the former pre_norm=False) instead"
            )
        channel_multipliers = [int(m) for m in channel_multipliers]
        if not channel_multipliers or any(m < 1 for m in channel_multipliers):
            raise ValueError(f"channel_multipliers must be a non-empty list of positive ints, got {channel_multipliers}")
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels),
                            ("num_res_blocks", num_res_blocks), ("latent_dim", latent_dim),
                            ("norm_min_channels_per_group", norm_min_channels_per_group)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        num_levels = len(channel_multipliers)
        attention_levels = resolve_attention_levels(attention_resolutions, num_levels)
        self.in_channels = int(in_channels)
        self.downsample_factor = 2 ** (num_levels - 1)
        norm_layer = make_norm_layer(norm, norm_min_channels_per_group)
        self.encoder = Encoder(in_channels, base_channels, channel_multipliers, num_res_blocks, latent_dim,
                               attention_levels, dropout, norm_layer)
        self.decoder = Decoder(in_channels, base_channels, channel_multipliers, num_res_blocks, latent_dim,
                               attention_levels, dropout, norm_layer)
        self.pre_quantizer_norm = PreQuantizerNorm(latent_dim, pre_quantizer_norm, int(norm_min_channels_per_group))
        self.quantizer = build_quantizer(quantizer, latent_dim, codebook_size, **dict(quantizer_options or {}))

    def __getattr__(self, name: str) -> Any:
        # diffusers' ModelMixin.__getattr__ answers config keys before submodules; the config key
        # "quantizer" (a name) must not shadow the submodule `self.quantizer` (the module).
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            return modules[name]
        return super().__getattr__(name)

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' config -> __init__ arguments, after `migrate_legacy_config` (from_config / from_pretrained).

        ``codebook_pruning`` (the record `tokenizer.prune` writes: kept codes, old-to-new index map) is no
        constructor argument: it is passed on as a stored config entry, so the loaded model's config keeps it.
        """
        config = migrate_legacy_config(config_dict)
        pruning = config.pop(CODEBOOK_PRUNING_KEY, None)
        init_dict, unused_kwargs, hidden_dict = super().extract_init_dict(config, **kwargs)
        if pruning is not None:
            hidden_dict[CODEBOOK_PRUNING_KEY] = pruning
        return init_dict, unused_kwargs, hidden_dict

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a tokenizer saved with `save_pretrained` (local folder) or a hub id (users with internet).

        A local path that does not exist, or a folder without config.json, raises FileNotFoundError.
        """
        path = os.fspath(pretrained_model_name_or_path)
        folder = os.path.join(path, kwargs["subfolder"]) if kwargs.get("subfolder") else path
        looks_local = _looks_like_local_path(path)
        if looks_local:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"no tokenizer checkpoint folder at {folder!r} (expected a save_pretrained output)")
            if not os.path.isfile(os.path.join(folder, cls.config_name)):
                raise FileNotFoundError(
                    f"{folder!r} has no {cls.config_name}: not a folder written by LGQTokenizer.save_pretrained"
                )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # --- properties ------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return int(self.quantizer.codebook_size)

    @property
    def latent_dim(self) -> int:
        return int(self.quantizer.dim)

    def last_layer_weight(self) -> torch.nn.Parameter:
        """The decoder's final conv weight: the layer the VQGAN adaptive GAN weight differentiates against."""
        return self.decoder.conv_out.weight

    # --- validation ------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> None:
        """Raise TypeError / ValueError unless images is a float tensor [B, in_channels, H, W], H, W % f == 0."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, {self.in_channels}, H, W], got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D [B, {self.in_channels}, H, W], got shape {tuple(images.shape)}")
        if not images.dtype.is_floating_point:
            raise TypeError(
                f"images must be a floating point tensor in [-1, 1], got dtype {images.dtype} "
                f"(shape {tuple(images.shape)}); convert uint8 with x.float() / 127.5 - 1"
            )
        if images.shape[1] != self.in_channels:
            raise ValueError(f"images must have {self.in_channels} channels, got shape {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"image height and width must be divisible by the downsample factor {f}, got shape {tuple(images.shape)}"
            )

    # --- the three stages ------------------------------------------------------------------
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """z = N(E(x)): [B, 3, H, W] -> [B, latent_dim, H/f, W/f], the continuous latents the quantizer receives
        (after ``pre_quantizer_norm``; fp32 unless that norm is "none")."""
        self.check_images(images)
        return self.pre_quantizer_norm(self.encoder(images))

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """Q(z) in fp32 with autocast disabled, whatever the surrounding precision."""
        with fp32_quantizer_math(latents.device.type):
            return self.quantizer(latents.float())

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """x_hat = D(q): [B, latent_dim, h, w] -> [B, 3, h*f, w*f] (unclamped; runs under ambient autocast)."""
        if quantized.dim() != 4 or quantized.shape[1] != self.latent_dim:
            raise ValueError(
                f"decode_latents expects [B, {self.latent_dim}, h, w] latents, got shape {tuple(quantized.shape)}"
            )
        return self.decoder(quantized)

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> TokenizerOutput | tuple:
        """Reconstruct: x_hat = D(Q(E(x))). Returns TokenizerOutput(reconstruction, quantizer_output)."""
        quantizer_output = self.quantize(self.encode_latents(images))
        reconstruction = self.decode_latents(quantizer_output.quantized)
        if not return_dict:
            return reconstruction, quantizer_output
        return TokenizerOutput(reconstruction=reconstruction, quantizer_output=quantizer_output)

    # --- token API -------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> token grid [B, H/f, W/f] int64 in [0, K).

        Runs in the module's current mode: call `.eval()` first (dropout; quantizers with EMA updates).
        """
        return self.quantize(self.encode_latents(images)).indices.long()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token grid [B, h, w] int in [0, K) -> images [B, 3, h*f, w*f] clamped to [-1, 1]."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor [B, h, w], got {type(indices).__name__}")
        self.quantizer.check_indices(indices)
        latents = self.quantizer.indices_to_latents(indices.long().to(self.device))
        return self.decode_latents(latents.to(self.dtype)).clamp(-1.0, 1.0)

    # --- training hooks --------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (step / max_steps), forwarded to the quantizer (LGQ anneals tau)."""
        progress = float(progress)
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must lie in [0, 1], got {progress}")
        self.quantizer.set_progress(progress)

    def set_training_step(self, step: int, max_steps: int, steps_per_epoch: int | None = None) -> None:
        """The trainer's schedule hook (optimisation step, run length, steps per epoch), forwarded to the quantizer,
        whose schedule decides its own horizon (LGQ: ``tau_anneal_steps`` / ``tau_anneal_epochs``)."""
        self.quantizer.set_training_step(int(step), int(max_steps), steps_per_epoch)

    @torch.no_grad()
    def init_quantizer_from_images(self, images: torch.Tensor | Iterable[torch.Tensor]) -> bool:
        """Data-driven quantizer init: encode the images (with the pre-quantizer norm), flatten latents to [N, C] and call
        `quantizer.init_from_latents`. Accepts one batch or an iterable of batches.
        Returns True if an initialisation happened, False if the quantizer does not need one.
        """
        if not getattr(self.quantizer, "needs_init", False):
            return False
        batches = [images] if isinstance(images, torch.Tensor) else list(images)
        if not batches:
            raise ValueError("init_quantizer_from_images needs at least one batch of images")
        latents = []
        for batch in batches:
            z = self.encode_latents(batch.to(device=self.device))
            latents.append(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        self.quantizer.init_from_latents(torch.cat(latents, dim=0))
        return True


def build_tokenizer(cfg: TokenizerModelConfig | Mapping[str, Any] | None = None, **overrides: Any) -> LGQTokenizer:
    """Build `LGQTokenizer` from a `TokenizerModelConfig`, an OmegaConf node or a plain dict (plus overrides)."""
    if cfg is None:
        values: dict[str, Any] = {}
    elif dataclasses.is_dataclass(cfg):
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    else:
        try:
            from omegaconf import DictConfig, OmegaConf  # lazy: plain dicts and dataclasses are handled without omegaconf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(cfg, Mapping):
            raise TypeError(f"build_tokenizer expects a TokenizerModelConfig or a mapping, got {type(cfg).__name__}")
        values = dict(cfg)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TokenizerModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown tokenizer model option(s) {unknown}; valid options: {sorted(known)}")
    values = _plain(values)
    return LGQTokenizer(**values)


def migrate_legacy_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored tokenizer config of an older export -> the config of the same model now (a copy).

    * Without ``pre_quantizer_norm`` (written before it existed): the model had no norm between encoder and
      quantizer and LGQ normalised its own input with a parameter-free per-token LayerNorm unless
      ``quantizer_options.pre_norm`` was false: LGQ with pre_norm (default true) -> "layernorm_noaffine", anything
      else -> "none"; ``pre_norm`` is dropped from the quantizer options.
    * Without ``norm_min_channels_per_group`` (written before the GroupNorm floor): 1, the old grouping.
    * Without ``config_format`` (format 1): "layernorm" / "groupnorm_layernorm" were parameter-free then ->
      "layernorm_noaffine" / "groupnorm_layernorm_noaffine" (their weights have no LN scale and shift).
    Keys that are present are kept.
    """
    config = dict(config)
    if "norm_min_channels_per_group" not in config:
        config["norm_min_channels_per_group"] = 1  # written before the floor: narrow layers used instance norm
    if "pre_quantizer_norm" not in config:
        options = dict(config.get("quantizer_options") or {})
        lgq_pre_norm = bool(options.pop("pre_norm", True))
        quantizer = str(config.get("quantizer", _DEFAULTS.quantizer)).lower()
        config["pre_quantizer_norm"] = "layernorm" if quantizer == "lgq" and lgq_pre_norm else "none"
        config["quantizer_options"] = options
    if "config_format" not in config:
        if config["pre_quantizer_norm"] in ("layernorm", "groupnorm_layernorm"):
            config["pre_quantizer_norm"] += "_noaffine"
        config["config_format"] = CONFIG_FORMAT
    return config


def _looks_like_local_path(path: str) -> bool:
    """Anything but a bare hub id "owner/name" is treated as a local folder."""
    if os.path.exists(path) or os.path.isabs(path):
        return True
    posix = path.replace(os.sep, "/")
    if posix.startswith((".", "~")):
        return True
    return len([part for part in posix.split("/") if part]) != 2 or posix.endswith("/")


def _plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> plain Python (JSON-serialisable config)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf  # lazy: plain dicts and dataclasses are handled without omegaconf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["LGQTokenizer", "TokenizerOutput", "TokenizerModelConfig", "build_tokenizer", "migrate_legacy_config"]
