"""`LGQPipeline`: class label -> token grid (prior + scheduler) -> image (tokenizer decoder), as a diffusers pipeline.

    tokens = all "unknown"                                # [B, L]; the scheduler's mask id (K)
    for t in scheduler.timesteps:                         # MaskGIT: T steps; GPT: one step per token (L)
        logits = prior.sampling_logits(tokens, t, s_t)    # guided: l = l_u + s_t (l_c - l_u)
        tokens = scheduler.step(logits, t, tokens).prev_sample
    images = tokenizer.decode(tokens.view(B, h, w))       # [B, 3, h*f, w*f] in [-1, 1]
    output = postprocess(images)                          # x -> (x + 1) / 2 in [0, 1]; PIL / numpy / torch

The loop is ``prior.sampling.TokenSampling``, the only sampling loop of the project: ``LGQPipeline.__call__``
runs it with its progress bar and ``callback_on_step_end`` and decodes the tokens; ``MaskGITPrior.generate`` /
``GPTPrior.generate`` (``prior.sampling.sample_token_grids``) run it without a tokenizer.

Components (``model_index.json`` names their classes, and the code the folder carries for diffusers' generic
loader, ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``: ``pipelines/remote_code.py``):

* ``tokenizer``: ``tokenizer.model.LGQTokenizer`` (``None`` only for token-only sampling, ``output_type="latent"``);
* ``prior``: ``prior.maskgit.MaskGITPrior`` or ``prior.gpt.GPTPrior``: maps (tokens, labels) to logits;
* ``scheduler``: ``prior.scheduler.MaskGITScheduler`` (iterative unmasking) for MaskGIT priors,
  ``prior.scheduler.AutoregressiveScheduler`` (raster order) for GPT priors (built by default when ``None``,
  e.g. for pipeline folders saved before GPT pipelines had one).

Class names (``id2label``, ``get_label_ids``) come from the prior's ``class_names`` config entry, written at
prior training from the token data's classes. Components are put in eval mode when the pipeline is built,
loaded and called. ``.to(dtype)`` / ``from_pretrained(..., torch_dtype=...)`` cast the prior and the
tokenizer's encoder/decoder but keep the tokenizer's quantizer (its codebook) in fp32, bit-exact.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor

from prior.gpt import GPTPrior
from prior.maskgit import MaskGITPrior
from prior.sampling import TokenSampling, check_sampling_options, check_scheduler, is_maskgit_prior
from prior.scheduler import AutoregressiveScheduler, MaskGITScheduler
from prior.tokens import check_class_labels
from tokenizer.model import LGQTokenizer

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
COMPONENTS = ("tokenizer", "prior", "scheduler")
REQUIRED_COMPONENTS = ("tokenizer", "prior")
COMPONENT_CLASSES = {component_cls.__name__: component_cls for component_cls in
                     (LGQTokenizer, MaskGITPrior, GPTPrior, MaskGITScheduler, AutoregressiveScheduler)}


class LGQPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with an LGQ tokenizer and a MaskGIT or GPT token prior.

    Args:
        tokenizer: `LGQTokenizer` (decodes token grids to images); ``None`` for token-only sampling.
        prior: `MaskGITPrior` or `GPTPrior` (logits for tokens + class labels).
        scheduler: `MaskGITScheduler` for MaskGIT priors; `AutoregressiveScheduler` (default when ``None``)
            for GPT priors.

    Example::

        pipe = LGQPipeline.from_pretrained("runs/pipeline").to("cuda")
        labels = pipe.get_label_ids(["coffee", "astronaut"])
        images = pipe(labels, num_inference_steps=12, guidance_scale=3.0,
                      generator=torch.Generator("cuda").manual_seed(0)).images
    """

    model_cpu_offload_seq = "prior->tokenizer"
    _optional_components = ["scheduler", "tokenizer"]
    _callback_tensor_inputs = ["tokens", "logits"]

    def __init__(self, tokenizer: LGQTokenizer | None, prior: Any,
                 scheduler: MaskGITScheduler | AutoregressiveScheduler | None = None):
        super().__init__()
        if tokenizer is not None and not isinstance(tokenizer, LGQTokenizer):
            raise TypeError(f"tokenizer must be an LGQTokenizer (or None for token-only sampling), "
                            f"got {type(tokenizer).__name__}")
        if not isinstance(prior, (MaskGITPrior, GPTPrior)):
            raise TypeError(f"prior must be a MaskGITPrior or GPTPrior, got {type(prior).__name__}")
        if tokenizer is not None and int(prior.codebook_size) != int(tokenizer.codebook_size):
            raise ValueError(f"prior codebook_size {prior.codebook_size} != tokenizer codebook_size "
                             f"{tokenizer.codebook_size}: the prior was trained on another tokenizer's tokens")
        scheduler = check_scheduler(prior, scheduler)
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
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer: it samples token grids only (output_type='latent')")
        h, w = self.grid_size
        f = int(self.tokenizer.downsample_factor)
        return h * f, w * f

    @property
    def uses_scheduler(self) -> bool:
        """True when ``num_inference_steps`` matters (MaskGIT); GPT priors take one step per token."""
        return is_maskgit_prior(self.prior)

    @property
    def id2label(self) -> dict[int, str]:
        """Class index -> class name, from the prior's ``class_names`` (training data classes); {} if unknown."""
        names = getattr(self.prior.config, "class_names", None) or []
        return {i: str(name) for i, name in enumerate(names)}

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class index (the inverse of ``id2label``; diffusers' DiTPipeline convention)."""
        return {name: i for i, name in self.id2label.items()}

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class indices for class names, e.g. ``pipe.get_label_ids(["coffee", "astronaut"])`` -> ``[2, 0]``.

        Raises ValueError naming the unknown names and the valid ones (or saying that the pipeline's prior
        records no class names)."""
        names = [label] if isinstance(label, str) else list(label)
        lookup = self.labels
        if not lookup:
            raise ValueError("this pipeline's prior records no class names (trained before class names were "
                             "stored, or on data without them): pass class indices instead")
        unknown = [name for name in names if name not in lookup]
        if unknown:
            shown = ", ".join(sorted(lookup)[:20]) + (", ..." if len(lookup) > 20 else "")
            raise ValueError(f"unknown class name(s) {unknown}; this pipeline knows: {shown}")
        return [lookup[name] for name in names]

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

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
        # diffusers' ModelMixin.to casts every tensor, including LGQTokenizer._keep_in_fp32_modules (honoured only
        # by from_pretrained(torch_dtype=...)), and warns about it: the quantizer is restored below, so the warning
        # is muted for the duration of the cast.
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

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """diffusers' ``save_pretrained`` plus the code the folder needs to load without this repository
        (``pipelines/remote_code.py``): ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``."""
        super().save_pretrained(save_directory, **kwargs)
        try:  # lazy, by name: this module is itself bundled into the folders, where the bundler is not
            remote_code = importlib.import_module("pipelines.remote_code")
        except ImportError:
            logging.getLogger(__name__).warning(
                "saved without the pipeline's code (this LGQPipeline was loaded from a folder's remote code): "
                "load it with LGQPipeline.from_pretrained, or re-save it from the lgq repository")
            return
        remote_code.write_remote_code(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a pipeline folder written by `save_pretrained` (or a hub id, for users with internet) with this
        repository's classes.

        The components' classes are read from ``model_index.json`` by name (the module names there point at the
        folder's own code, for diffusers' loader: ``DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)``, which this method does not use). Local folders are checked first: a missing
        ``model_index.json`` or a missing component folder raises FileNotFoundError naming the component.
        ``torch_dtype`` casts the prior and the tokenizer's encoder/decoder; the quantizer stays fp32 (loaded in
        fp32, never round-tripped). Components can be passed in (``prior=...``) as with diffusers; ``cache_dir``,
        ``revision``, ``token``, ``local_files_only`` apply to hub ids, ``variant``, ``use_safetensors`` and
        ``low_cpu_mem_usage`` to the components' weights.
        """
        path = os.fspath(pretrained_model_name_or_path)
        passed = {name: kwargs.pop(name) for name in COMPONENTS if name in kwargs}
        torch_dtype = kwargs.pop("torch_dtype", None)
        hub_options = {k: kwargs.pop(k) for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        weight_options = {k: kwargs.pop(k) for k in ("variant", "use_safetensors", "low_cpu_mem_usage") if k in kwargs}
        if kwargs:
            raise TypeError(f"LGQPipeline.from_pretrained got unexpected options {sorted(kwargs)}")
        if os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~")):
            folder = path
        else:
            from huggingface_hub import snapshot_download  # lazy: only hub ids need it

            folder = snapshot_download(path, **hub_options)
        index = check_pipeline_folder(folder)
        components = {}
        for name in COMPONENTS:
            entry = index.get(name) or [None, None]
            if name in passed or entry[0] is None:
                components[name] = passed.get(name)
                continue
            if entry[1] not in COMPONENT_CLASSES:
                raise ValueError(f"pipeline folder {folder!r}: component {name!r} is a {entry[1]!r}; an LGQPipeline "
                                 f"component is one of {sorted(COMPONENT_CLASSES)}")
            component_cls = COMPONENT_CLASSES[entry[1]]
            options = weight_options if issubclass(component_cls, torch.nn.Module) else {}
            components[name] = component_cls.from_pretrained(folder, subfolder=name, **options)
        pipeline = cls(**components)
        pipeline.register_to_config(_name_or_path=path)
        if torch_dtype is not None:
            pipeline.to(dtype=torch_dtype)
        pipeline.set_eval_mode()
        return pipeline

    # ------------------------------------------------------------------ sampling
    def check_call_options(self, *, num_inference_steps, guidance_scale, temperature, top_k, top_p, mask_schedule,
                           choice_temperature, use_cache, guidance_schedule, generator, batch_size: int,
                           callback_on_step_end, callback_on_step_end_tensor_inputs) -> None:
        """ValueError for options the prior type does not have, bad values, and bad callback inputs."""
        check_sampling_options(self.prior, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               temperature=temperature, top_k=top_k, top_p=top_p, mask_schedule=mask_schedule,
                               choice_temperature=choice_temperature, use_cache=use_cache,
                               guidance_schedule=guidance_schedule, generator=generator, batch_size=batch_size)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs has to be in {self._callback_tensor_inputs}, "
                             f"but found {bad}")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 12,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        mask_schedule: str | None = None,
        choice_temperature: float | None = None,
        guidance_schedule: str = "constant",
        use_cache: bool | str = True,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per class label.

        Args:
            class_labels: an int, a list of ints or a 1-D integer tensor, each in [0, num_classes)
                (``get_label_ids`` maps class names to them).
            num_inference_steps: MaskGIT decoding steps T (GPT priors take one step per token).
            guidance_scale: classifier-free guidance s in l = l_u + s (l_c - l_u); 1 = conditional only.
            temperature: logit temperature of the token sampler (> 0).
            generator: a torch.Generator, or a list with one per class label (each image then depends only on
                its own generator), for reproducible sampling (same seed -> same images).
            output_type: "pil" (list of PIL images), "np" (float32 [B, H, W, 3] in [0, 1]), "pt" (float32
                tensor [B, 3, H, W] in [0, 1]) or "latent" (the token grids, int64 [B, h, w] in [0, K)).
            return_dict: return an `ImagePipelineOutput` (else a tuple ``(images,)``).
            top_k, top_p, use_cache: GPT only: token filtering; ``use_cache`` True / "static" (a preallocated
                StaticCache), "dynamic" (transformers' growing DynamicCache), or False (the prefix recomputed at
                every token): the same tokens each way.
            mask_schedule, choice_temperature: MaskGIT only: this call's mask schedule and Gumbel-noise scale
                (default: the scheduler's config, which a call never changes).
            guidance_schedule: "constant" (s_t = s) or "linear" (s_t = 1 + (s - 1)(t + 1)/T).
            callback_on_step_end: called after every step as ``callback(pipe, step_index, timestep,
                callback_kwargs)`` with the tensors named in ``callback_on_step_end_tensor_inputs``
                ("tokens": the sequences [B, L] with the scheduler's mask id at undecided positions; "logits":
                the step's guided logits); a returned dict's "tokens" replaces the tokens (for GPT only the
                positions not yet fed to the prior take effect). ``pipe._interrupt = True`` stops after the step.
        """
        labels = check_class_labels(class_labels, self.num_classes)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.tokenizer is None:
            raise ValueError(f"output_type={output_type!r} needs a tokenizer; this pipeline has none "
                             f"(use output_type='latent' for token grids)")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["tokens"]
        self.check_call_options(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                temperature=temperature, top_k=top_k, top_p=top_p, mask_schedule=mask_schedule,
                                choice_temperature=choice_temperature, use_cache=use_cache,
                                guidance_schedule=guidance_schedule, generator=generator, batch_size=len(labels),
                                callback_on_step_end=callback_on_step_end,
                                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        self.set_eval_mode()
        self._interrupt = False
        device = self._execution_device
        sampling = TokenSampling(self.prior, self.scheduler, labels, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, temperature=temperature, generator=generator,
                                 top_k=top_k, top_p=top_p, mask_schedule=mask_schedule,
                                 choice_temperature=choice_temperature, guidance_schedule=guidance_schedule,
                                 use_cache=use_cache, device=device)
        self._num_timesteps = len(sampling.timesteps)

        with self.progress_bar(total=len(sampling.timesteps)) as progress_bar:
            def after_step(i: int, t: int, tokens: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
                if callback_on_step_end is not None:
                    step_tensors = {"tokens": tokens, "logits": logits}
                    callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    tokens = callback_outputs.pop("tokens", tokens)
                progress_bar.update()
                return tokens, self.interrupt

            tokens = sampling.run(after_step)
        tokens = tokens.view(len(labels), *self.grid_size)

        # 3. decode
        if output_type == "latent":
            images = tokens
        else:
            if (tokens == self.scheduler.mask_id).any():
                raise RuntimeError("sampling stopped with undecided tokens (interrupted?): use output_type='latent'")
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
    for name in COMPONENTS:
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


__all__ = ["LGQPipeline", "check_pipeline_folder", "is_maskgit_prior",
           "OUTPUT_TYPES"]
