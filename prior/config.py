"""Run configuration of `prior/train.py` (schema for `common.config.load_config`).

    accelerate launch prior/train.py --config configs/prior/tiny.yaml data.tokens=runs/tokens/train model.prior_type=gpt

Sections: ``model`` (prior type + transformer size; K, grid and number of classes come from the token
data's meta.json), ``data`` (token directories, tokenizer for the fingerprint check and for decoding
samples), ``sample`` (the class-conditional sample grid logged every ``train.image_log_every`` steps),
``train`` (optimisation and bookkeeping, shared with the tokenizer stage: ``common.config.TrainConfig``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from common.config import ConfigError, TrainConfig
from prior.tokens import normalize_grid_size

PRIOR_TYPES = ("maskgit", "gpt")
OUTPUT_BIAS_INITS = ("zero", "unigram")


@dataclass
class PriorModelConfig:
    """Prior architecture.

    prior_type: "maskgit" (bidirectional, masked-token loss; prior.maskgit.MaskGITPrior) or "gpt"
        (causal Llama, next-token loss; prior.gpt.GPTPrior).
    hidden_size, num_layers, num_heads, mlp_ratio (FFN width = mlp_ratio * hidden_size), dropout.
    num_kv_heads: grouped-query heads of the GPT prior (null = num_heads); must stay null for MaskGIT.
    label_dropout: probability p of replacing a class label by the null class (classifier-free guidance).
    label_smoothing: epsilon of the smoothed cross-entropy, targets (1 - eps) one-hot + eps / K.
    output_bias_init: "zero" (MaskGIT's) or "unigram" (MaskGIT prior only): the output bias starts at the
        add-one smoothed log frequencies of the training tokens (MaskGITPrior.init_output_bias), so codes the
        tokenizer never uses start improbable instead of holding (K - used) / K of the first steps' probability.
    codebook_size, grid_size, num_classes: read from the token data's meta.json; leave null, or set them
        to assert what the data must be (a mismatch is an error, never silently used).
        num_classes is required here only when the token data does not record it.
    """

    prior_type: str = "maskgit"
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    num_kv_heads: Optional[int] = None
    label_dropout: float = 0.1
    label_smoothing: float = 0.0
    output_bias_init: str = "zero"
    codebook_size: Optional[int] = None
    grid_size: Optional[int] = None  # square grids; non-square data: leave null
    num_classes: Optional[int] = None

    def validate(self) -> None:
        if self.prior_type not in PRIOR_TYPES:
            raise ValueError(f"model.prior_type must be one of {PRIOR_TYPES}, got {self.prior_type!r}")
        for key in ("hidden_size", "num_layers", "num_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                             f"({self.num_heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"model.label_dropout must lie in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.output_bias_init not in OUTPUT_BIAS_INITS:
            raise ValueError(f"model.output_bias_init must be one of {OUTPUT_BIAS_INITS}, got {self.output_bias_init!r}")
        if self.output_bias_init != "zero" and self.prior_type != "maskgit":
            raise ValueError(f"model.output_bias_init={self.output_bias_init} needs model.prior_type=maskgit (the GPT "
                             f"prior's output head has no bias)")
        if self.num_kv_heads is not None:
            if self.prior_type != "gpt":
                raise ValueError("model.num_kv_heads (grouped-query attention) exists only for model.prior_type=gpt")
            if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
                raise ValueError(f"model.num_kv_heads ({self.num_kv_heads}) must divide model.num_heads "
                                 f"({self.num_heads})")
        for key in ("codebook_size", "grid_size", "num_classes"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"model.{key} must be >= 1 or null (= from the token data), got {value}")


@dataclass
class PriorDataConfig:
    """Training tokens.

    tokens: one token directory (written by `python -m prior.extract`) or a list of them, read together.
    use_augmentations: train on every stored augmentation of an image (e.g. its horizontal flip);
        false keeps only the un-augmented grid.
    tokenizer: path of the tokenizer (save_pretrained directory) the tokens came from. When given, the
        token data must carry its fingerprint (else: error), and the sample grids are decoded to images.
    """

    tokens: Any = None  # str | list[str]
    use_augmentations: bool = True
    tokenizer: Optional[str] = None

    @property
    def token_paths(self) -> list[str]:
        return [self.tokens] if isinstance(self.tokens, str) else list(self.tokens or [])

    def validate(self) -> None:
        paths = self.token_paths
        if self.tokens is None or not paths:
            raise ConfigError("data.tokens is required: a token directory (from `python -m prior.extract`) or a "
                              "list of them, e.g. data.tokens=runs/tokens/train")
        if not isinstance(self.tokens, (str, list, tuple)) or not all(isinstance(p, str) and p for p in paths):
            raise ConfigError(f"data.tokens must be a path or a list of paths, got {self.tokens!r}")


@dataclass
class PriorSampleConfig:
    """The sample grid logged every train.image_log_every steps (0 = never), from the EMA prior if any.

    num_images: class-conditional samples, labels spread evenly over the classes: y_i = floor(i C / n)
        (or the given class_labels). steps: MaskGIT decoding steps (GPT always takes h*w steps).
    guidance_scale s: logits l_u + s (l_c - l_u) (1 = no guidance). temperature divides the logits.
    top_k / top_p (GPT priors only): keep the k most likely tokens / the smallest set whose probability
        reaches p, renormalise, sample (None = off).
    seed: a dedicated generator, so sampling never touches the training RNG streams.
    Without data.tokenizer the grid shows the token ids as grey levels (id / (K - 1)).
    """

    num_images: int = 8
    steps: int = 12
    guidance_scale: float = 1.0
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    class_labels: Optional[list[int]] = None

    def validate(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"sample.num_images must be >= 1, got {self.num_images}")
        if self.steps < 1:
            raise ValueError(f"sample.steps must be >= 1, got {self.steps}")
        if self.temperature <= 0:
            raise ValueError(f"sample.temperature must be > 0, got {self.temperature}")
        if self.guidance_scale < 0:
            raise ValueError(f"sample.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sample.top_k must be >= 1 (or null), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sample.top_p must be in (0, 1] (or null), got {self.top_p}")
        if self.class_labels is not None and len(self.class_labels) != self.num_images:
            raise ValueError(f"sample.class_labels has {len(self.class_labels)} labels for "
                             f"sample.num_images={self.num_images}")


@dataclass
class PriorRunConfig:
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    data: PriorDataConfig = field(default_factory=PriorDataConfig)
    sample: PriorSampleConfig = field(default_factory=PriorSampleConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/prior"))

    def validate(self) -> None:
        if self.model.prior_type != "gpt" and (self.sample.top_k is not None or self.sample.top_p is not None):
            raise ValueError(f"sample.top_k / sample.top_p apply to GPT priors only (model.prior_type="
                             f"{self.model.prior_type}); remove them or set model.prior_type=gpt")


def resolve_data_shape(model: PriorModelConfig, meta: dict, source: str) -> dict[str, Any]:
    """K, grid and C for the prior: the token meta's values, checked against any given in ``model``.

    Returns {"codebook_size": K, "grid_size": (h, w), "num_classes": C}; ConfigError on a conflict
    or when C is known neither from the data nor from the config.
    """
    stored = {"codebook_size": int(meta["codebook_size"]), "grid_size": normalize_grid_size(meta["grid_size"]),
              "num_classes": None if meta.get("num_classes") is None else int(meta["num_classes"])}
    given = {"codebook_size": model.codebook_size,
             "grid_size": None if model.grid_size is None else normalize_grid_size(model.grid_size),
             "num_classes": model.num_classes}
    for key, value in given.items():
        if value is not None and stored[key] is not None and value != stored[key]:
            raise ConfigError(f"model.{key}={model.__dict__[key]} conflicts with the token data {source} "
                              f"({key}={stored[key]} in its meta.json); remove model.{key} from the config "
                              "(it is read from the data) or point data.tokens at matching tokens")
    if stored["num_classes"] is None:
        if given["num_classes"] is None:
            raise ConfigError(f"the token data {source} does not record num_classes; set model.num_classes")
        stored["num_classes"] = given["num_classes"]
    return stored


__all__ = ["PriorRunConfig", "PriorModelConfig", "PriorDataConfig", "PriorSampleConfig", "PRIOR_TYPES",
           "resolve_data_shape"]
