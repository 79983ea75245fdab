"""What the two priors (MaskGIT, GPT) share: constructor checks, label dropout for classifier-free guidance,
uniform noise drawn on the generator's device, and ``generate`` (one signature for both). Class-label and
token-grid checks live in ``prior.tokens``, the sampling loop in ``prior.sampling``."""
from __future__ import annotations

import torch

from prior.sampling import sample_token_grids


def uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """u ~ U(0, 1) drawn on the generator's device (so a CPU generator drives CUDA models), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def check_prior_hyperparameters(codebook_size: int, num_classes: int, hidden_size: int, num_heads: int,
                                label_dropout: float, class_names: list[str] | None = None) -> None:
    """Constructor checks shared by the MaskGIT and GPT priors (clear ValueError naming the bad value)."""
    if int(codebook_size) < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
    if class_names is not None and (len(class_names) != int(num_classes) or len(set(class_names)) != len(class_names)):
        raise ValueError(f"class_names must hold {num_classes} distinct names (one per class), got {len(class_names)} "
                         f"({len(set(class_names))} distinct)")


def drop_labels(labels: torch.Tensor, null_class: int, probability: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Label dropout: each label is replaced by ``null_class`` with the given probability."""
    if probability <= 0:
        return labels
    drop = uniform(labels.shape, generator, labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class TokenGridGenerator:
    """``generate`` of both priors: token grids through the one sampling loop (``prior.sampling``).

    A prior class sets ``decoding`` ("maskgit" or "autoregressive") and implements ``start_sampling`` /
    ``sampling_logits``; the options are those of ``LGQPipeline.__call__`` with the same defaults.
    """

    decoding: str

    def sampling_backbone(self) -> torch.nn.Module:
        """The transformer module every sampling step calls (what ``compile_sampling`` compiles)."""
        raise NotImplementedError

    def compile_sampling(self, **compile_options):
        """``torch.compile`` the module the sampling loop runs (``sampling_backbone``), in place
        (``nn.Module.compile``: the same parameters and ``state_dict`` keys, exports load without compile).

        ``nn.Module.compile()`` of the prior itself compiles ``forward`` only, which decoding does not call: the
        guided MaskGIT step goes through the head's input and the GPT step through the KV-cached backbone."""
        self.sampling_backbone().compile(**compile_options)
        return self

    @torch.no_grad()
    def generate(self, class_labels, *, num_inference_steps: int = 12, guidance_scale: float = 1.0,
                 temperature: float = 1.0, generator: torch.Generator | list[torch.Generator] | None = None,
                 scheduler=None, top_k: int | None = None, top_p: float | None = None,
                 mask_schedule: str | None = None, choice_temperature: float | None = None,
                 guidance_schedule: str = "constant", use_cache: bool | str = True,
                 schedule: str | None = None) -> torch.Tensor:
        """Token grids [B, h, w] int64 in [0, K), without a tokenizer.

        MaskGIT priors decode in ``num_inference_steps`` steps with ``scheduler`` (default: a cosine
        ``MaskGITScheduler``; ``mask_schedule`` or its older name ``schedule`` sets this call's schedule,
        ``choice_temperature`` the Gumbel-noise scale); GPT priors decode one token per step in raster order
        (``top_k``, ``top_p``; ``use_cache``: True / "static" a preallocated ``StaticCache``, "dynamic"
        transformers' growing ``DynamicCache``, False recomputes the prefix at every position: the same tokens
        each way). guidance_schedule "linear": s_i = 1 + (s - 1)(i + 1)/T. An option of the other family raises
        a ValueError naming it.
        """
        if schedule is not None:
            if mask_schedule is not None and mask_schedule != schedule:
                raise ValueError(f"schedule={schedule!r} and mask_schedule={mask_schedule!r} disagree (one name, "
                                 f"give one)")
            mask_schedule = schedule
        return sample_token_grids(self, class_labels, scheduler, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, temperature=temperature, generator=generator,
                                  top_k=top_k, top_p=top_p, mask_schedule=mask_schedule,
                                  choice_temperature=choice_temperature, guidance_schedule=guidance_schedule,
                                  use_cache=use_cache)
