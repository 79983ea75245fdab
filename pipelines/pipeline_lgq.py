"""`LGQPipeline`: class label -> token grid (prior) -> image (tokenizer decoder), as a diffusers pipeline.

    tokens = prior.generate(class_labels, ...)          # [B, h, w] int64 in [0, K)
    images = tokenizer.decode(tokens)                    # [B, 3, h*f, w*f] in [-1, 1]
    output = postprocess(images)                         # x -> (x + 1) / 2 in [0, 1]; PIL / numpy / torch

Components (recorded in ``model_index.json`` with their module paths, so this module imports them):

* ``tokenizer``: ``tokenizer.model.LGQTokenizer``;
* ``prior``: ``prior.maskgit.MaskGITPrior`` (iterative parallel decoding driven by the pipeline's
  ``scheduler``) or ``prior.gpt.GPTPrior`` (autoregressive decoding with its own loop);
* ``scheduler``: ``prior.scheduler.MaskGITScheduler``; optional (``None``) for GPT priors.

The pipeline is thin: it validates the inputs, calls the prior's sampler, decodes and post-processes.
Components are put in eval mode when the pipeline is built and when it is loaded. ``.to(dtype)`` /
``from_pretrained(..., torch_dtype=...)`` cast the prior and the tokenizer's encoder/decoder but keep
the tokenizer's quantizer (its codebook) in fp32, bit-exact.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from prior.scheduler import MaskGITScheduler
from tokenizer.model import LGQTokenizer

try:  # the prior modules are imported so that diffusers can resolve their classes from model_index.json
    from prior.maskgit import MaskGITPrior
except ImportError:  # pragma: no cover - only while the prior package is incomplete
    MaskGITPrior = None  # type: ignore[assignment,misc]
try:
    from prior.gpt import GPTPrior
except ImportError:  # pragma: no cover
    GPTPrior = None  # type: ignore[assignment,misc]

OUTPUT_TYPES = ("pil", "np", "pt")
REQUIRED_COMPONENTS = ("tokenizer", "prior")


def is_maskgit_prior(prior: Any) -> bool:
    """True for priors decoded by iterative unmasking with a scheduler (MaskGIT family)."""
    if MaskGITPrior is not None and isinstance(prior, MaskGITPrior):
        return True
    return "scheduler" in inspect.signature(prior.generate).parameters


def validate_class_labels(class_labels: Any, num_classes: int) -> torch.Tensor:
    """Class labels (int, sequence of ints, 1-D integer tensor / array) -> int64 tensor [B].

    Raises ValueError naming the valid range [0, num_classes) for anything else: floats, bools,
    strings, None, nested or empty sequences, out-of-range values.
    """
    valid = f"integers in [0, {num_classes}) (num_classes={num_classes})"
    if isinstance(class_labels, (bool, np.bool_)):
        raise ValueError(f"class_labels must be {valid}, got a bool")
    if isinstance(class_labels, (int, np.integer)):
        labels = torch.tensor([int(class_labels)], dtype=torch.int64)
    elif isinstance(class_labels, (list, tuple)):
        bad = [v for v in class_labels if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))]
        if bad:
            raise ValueError(f"class_labels must be {valid}, got non-integer entries {bad[:5]!r}")
        labels = torch.tensor([int(v) for v in class_labels], dtype=torch.int64)
    elif isinstance(class_labels, (torch.Tensor, np.ndarray)):
        labels = torch.as_tensor(class_labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be {valid}, got a tensor of dtype {labels.dtype}")
        if labels.dim() == 0:
            labels = labels.reshape(1)
        labels = labels.long()
    else:
        raise ValueError(f"class_labels must be {valid} (an int, a list of ints or a LongTensor), "
                         f"got {type(class_labels).__name__}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"class_labels must be a non-empty 1-D sequence of {valid}, got shape {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"class_labels must be {valid}, got values in [{lo}, {hi}]")
    return labels


def _check_positive_number(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


class LGQPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with an LGQ tokenizer and a MaskGIT or GPT token prior.

    Args:
        tokenizer: `LGQTokenizer` (decodes token grids to images).
        prior: `MaskGITPrior` or `GPTPrior` (samples token grids for class labels).
        scheduler: `MaskGITScheduler` for MaskGIT priors; `None` (or ignored) for GPT priors.

    Example::

        pipe = LGQPipeline.from_pretrained("runs/pipeline").to("cuda")
        images = pipe([207, 360], num_inference_steps=12, guidance_scale=3.0,
                      generator=torch.Generator("cuda").manual_seed(0)).images
    """

    model_cpu_offload_seq = "prior->tokenizer"
    _optional_components = ["scheduler"]

    def __init__(self, tokenizer: LGQTokenizer, prior: Any, scheduler: MaskGITScheduler | None = None):
        super().__init__()
        if not isinstance(tokenizer, LGQTokenizer):
            raise TypeError(f"tokenizer must be an LGQTokenizer, got {type(tokenizer).__name__}")
        if prior is None or not callable(getattr(prior, "generate", None)):
            raise TypeError(f"prior must be a MaskGITPrior or GPTPrior (with .generate), got {type(prior).__name__}")
        if int(prior.codebook_size) != int(tokenizer.codebook_size):
            raise ValueError(f"prior codebook_size {prior.codebook_size} != tokenizer codebook_size "
                             f"{tokenizer.codebook_size}: the prior was trained on another tokenizer's tokens")
        if is_maskgit_prior(prior):
            if scheduler is None:
                raise ValueError("a MaskGIT prior needs a MaskGITScheduler (scheduler=None given)")
            if int(scheduler.config.codebook_size) != int(prior.codebook_size):
                raise ValueError(f"scheduler codebook_size {scheduler.config.codebook_size} != prior codebook_size "
                                 f"{prior.codebook_size}")
        self.register_modules(tokenizer=tokenizer, prior=prior, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
        self.set_eval_mode()

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        return int(self.prior.num_classes)

    @property
    def grid_size(self) -> tuple[int, int]:
        grid = self.prior.grid_size
        return (int(grid), int(grid)) if isinstance(grid, (int, np.integer)) else (int(grid[0]), int(grid[1]))

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.grid_size
        f = int(self.tokenizer.downsample_factor)
        return h * f, w * f

    @property
    def uses_scheduler(self) -> bool:
        return is_maskgit_prior(self.prior)

    def set_eval_mode(self) -> "LGQPipeline":
        """Put every nn.Module component in eval mode (dropout off, no EMA codebook updates)."""
        for name in ("tokenizer", "prior"):
            module = getattr(self, name, None)
            if isinstance(module, torch.nn.Module):
                module.eval()
        return self

    # ------------------------------------------------------------------ dtype / device
    def to(self, *args, **kwargs):
        """diffusers' ``to`` (device and/or dtype), except that the tokenizer's quantizer stays fp32 (bit-exact)."""
        quantizer = getattr(getattr(self, "tokenizer", None), "quantizer", None)
        saved: dict[str, torch.Tensor] = {}
        if isinstance(quantizer, torch.nn.Module):
            for name, tensor in list(quantizer.named_parameters()) + list(quantizer.named_buffers()):
                if tensor.dtype == torch.float32:
                    saved[name] = tensor.detach().clone()
        # diffusers' ModelMixin.to warns about fp32 modules on every dtype cast (even with none declared);
        # the quantizer is handled here, so that warning is muted for the duration of the cast.
        modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
        level = modeling_logger.level
        modeling_logger.setLevel(logging.ERROR)
        try:
            result = super().to(*args, **kwargs)
        finally:
            modeling_logger.setLevel(level)
        if saved:
            tensors = dict(quantizer.named_parameters())
            tensors.update(dict(quantizer.named_buffers()))
            for name, original in saved.items():
                current = tensors[name]
                if current.dtype != torch.float32:
                    current.data = original.to(current.device)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a pipeline folder written by `save_pretrained` (or a hub id, for users with internet).

        Local folders are checked first: a missing ``model_index.json`` or a missing component folder
        raises FileNotFoundError naming the component. ``torch_dtype`` casts the prior and the
        tokenizer's encoder/decoder; the quantizer stays fp32 (loaded in fp32, never round-tripped).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~")):
            check_pipeline_folder(path)
        torch_dtype = kwargs.pop("torch_dtype", None)
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if torch_dtype is not None:
            pipeline.to(dtype=torch_dtype)
        pipeline.set_eval_mode()
        return pipeline

    # ------------------------------------------------------------------ sampling
    def sample_tokens(
        self,
        class_labels: torch.Tensor,
        num_inference_steps: int = 12,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        **prior_kwargs: Any,
    ) -> torch.Tensor:
        """Token grids [B, h, w] for validated labels: MaskGIT with ``self.scheduler``, GPT with its own loop.

        Options the prior does not support raise ValueError when set (e.g. top_k for a prior without it);
        ``num_inference_steps`` is ignored by GPT priors (one step per token).
        """
        generate = self.prior.generate
        params = inspect.signature(generate).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        wanted: dict[str, Any] = {"guidance_scale": guidance_scale, "temperature": temperature, "generator": generator}
        if self.uses_scheduler:
            wanted["scheduler"] = self.scheduler
            wanted["num_inference_steps"] = num_inference_steps
        optional = {"top_k": top_k, "top_p": top_p, **prior_kwargs}
        kwargs: dict[str, Any] = {}
        for key, value in wanted.items():
            if key in params or accepts_any:
                kwargs[key] = value
        for key, value in optional.items():
            if value is None:
                continue
            if key not in params and not accepts_any:
                raise ValueError(f"{type(self.prior).__name__}.generate does not support {key}; "
                                 f"supported options: {sorted(k for k in params if k != 'class_labels')}")
            kwargs[key] = value
        tokens = generate(class_labels, **kwargs)
        if isinstance(tokens, (tuple, list)):
            tokens = tokens[0]
        h, w = self.grid_size
        if tokens.dim() == 2:
            tokens = tokens.reshape(tokens.shape[0], h, w)
        return tokens.long()

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 12,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        top_k: int | None = None,
        top_p: float | None = None,
        return_dict: bool = True,
        **prior_kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per class label.

        Args:
            class_labels: an int, a list of ints or a 1-D integer tensor, each in [0, num_classes).
            num_inference_steps: MaskGIT decoding steps T (ignored by GPT priors).
            guidance_scale: classifier-free guidance s in l = l_u + s (l_c - l_u); 1 = conditional only.
            temperature: logit temperature of the token sampler (> 0).
            generator: a torch.Generator for reproducible sampling (same seed -> same images).
            output_type: "pil" (list of PIL images), "np" (float32 [B, H, W, 3] in [0, 1]) or
                "pt" (float32 tensor [B, 3, H, W] in [0, 1]).
            top_k, top_p: token filtering for priors that support it (GPT).
            return_dict: return an `ImagePipelineOutput` (else a tuple ``(images,)``).
        """
        labels = validate_class_labels(class_labels, self.num_classes)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        guidance_scale = _check_positive_number("guidance_scale", guidance_scale, allow_zero=True)
        temperature = _check_positive_number("temperature", temperature)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.set_eval_mode()

        labels = labels.to(self._execution_device)
        tokens = self.sample_tokens(labels, num_inference_steps=int(num_inference_steps),
                                    guidance_scale=guidance_scale, temperature=temperature, generator=generator,
                                    top_k=top_k, top_p=top_p, **prior_kwargs)
        images = self.tokenizer.decode(tokens.to(self.tokenizer.device))  # [-1, 1]
        images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def check_pipeline_folder(path: str | os.PathLike) -> dict:
    """Raise FileNotFoundError unless ``path`` is a pipeline folder with every registered component.

    Returns the parsed model_index.json.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no pipeline folder at {path!r} (expected the output of LGQPipeline.save_pretrained "
                                f"or python -m pipelines.assemble)")
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"{path!r} has no model_index.json: not a pipeline folder "
                                f"(build one with python -m pipelines.assemble)")
    with open(index_file) as handle:
        index = json.load(handle)
    for name in ("tokenizer", "prior", "scheduler"):
        entry = index.get(name)
        if name in REQUIRED_COMPONENTS and (entry is None or entry[0] is None):
            raise FileNotFoundError(f"pipeline folder {path!r}: model_index.json has no {name!r} component")
        if entry is None or entry[0] is None:
            continue
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"pipeline folder {path!r} is missing the {name!r} component "
                                    f"(no {name}/ sub-folder; expected {entry[1]} from {entry[0]})")
        if not any(f.endswith(".json") for f in os.listdir(folder)):
            raise FileNotFoundError(f"pipeline component {name!r} at {folder!r} has no config file")
    return index


__all__ = ["LGQPipeline", "validate_class_labels", "check_pipeline_folder", "is_maskgit_prior", "OUTPUT_TYPES"]
