"""The one sampling loop of the project: class labels -> token grids with a prior and its scheduler.

    tokens = all "unknown"                                # [B, L]; the scheduler's mask id (K)
    for i, t in enumerate(scheduler.timesteps):           # MaskGIT: T steps; GPT: one step per token (L)
        logits = prior.sampling_logits(tokens, t, s_i)    # guided: l = l_u + s_i (l_c - l_u)
        tokens = scheduler.step(logits, t, tokens).prev_sample

``TokenSampling`` holds one call's loop; ``LGQPipeline.__call__`` runs it with its progress bar and
``callback_on_step_end`` and decodes the result, ``sample_token_grids`` (and so ``MaskGITPrior.generate`` /
``GPTPrior.generate``) runs it alone. Both priors expose the same two methods to the loop:
``start_sampling(labels, guided, use_cache) -> state`` and ``sampling_logits(tokens, t, scale, state)``.
The prior family is told by the class attribute ``decoding`` ("maskgit" or "autoregressive"), so this module
imports no prior class.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from prior.scheduler import GUIDANCE_SCHEDULES, AutoregressiveScheduler, MaskGITScheduler, guidance_scale_at
from prior.tokens import check_class_labels, normalize_grid_size


def is_maskgit_prior(prior: Any) -> bool:
    """True for priors decoded by iterative unmasking with a MaskGITScheduler (MaskGIT family)."""
    return getattr(prior, "decoding", None) == "maskgit"


def check_scheduler(prior: Any, scheduler: MaskGITScheduler | AutoregressiveScheduler | None):
    """The scheduler that decodes ``prior``: ``scheduler`` after checking it fits the prior's family, K and mask
    id. None is an error for MaskGIT priors (a pipeline records its schedule) and means the (stateless)
    ``AutoregressiveScheduler`` for GPT priors, e.g. in pipeline folders saved before GPT pipelines had one."""
    if is_maskgit_prior(prior):
        if not isinstance(scheduler, MaskGITScheduler):
            raise ValueError(f"a MaskGIT prior needs a MaskGITScheduler as scheduler, got {type(scheduler).__name__}")
        if int(scheduler.config.codebook_size) != int(prior.codebook_size) or scheduler.mask_id != prior.mask_token_id:
            raise ValueError(f"scheduler has codebook_size={scheduler.config.codebook_size}, mask id "
                             f"{scheduler.mask_id}; the prior has codebook_size={prior.codebook_size}, "
                             f"mask id {prior.mask_token_id}")
        return scheduler
    scheduler = AutoregressiveScheduler(codebook_size=int(prior.codebook_size)) if scheduler is None else scheduler
    if not isinstance(scheduler, AutoregressiveScheduler):
        raise ValueError(f"a GPT prior is decoded by an AutoregressiveScheduler, got {type(scheduler).__name__}")
    if int(scheduler.config.codebook_size) != int(prior.codebook_size):
        raise ValueError(f"scheduler codebook_size {scheduler.config.codebook_size} != prior codebook_size "
                         f"{prior.codebook_size}")
    return scheduler


def check_positive_number(name: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a float after checking it is a finite number > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def check_kv_cache_choice(use_cache: Any) -> None:
    """ValueError unless ``use_cache`` is a GPT prior's KV cache choice: True / "static", "dynamic" or False."""
    if not (isinstance(use_cache, bool) or use_cache in ("static", "dynamic")):
        raise ValueError(f"use_cache must be True, False, 'static' or 'dynamic', got {use_cache!r}")


def check_sampling_options(prior: Any, *, num_inference_steps, guidance_scale, temperature, top_k, top_p,
                           mask_schedule, choice_temperature, use_cache, guidance_schedule, generator,
                           batch_size: int) -> None:
    """ValueError for options the prior family does not have and for bad values (naming the option)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    check_positive_number("guidance_scale", guidance_scale, allow_zero=True)
    check_positive_number("temperature", temperature)
    maskgit = is_maskgit_prior(prior)
    only = {"top_k": (top_k, False), "top_p": (top_p, False), "use_cache": (None if use_cache is True else use_cache, False),
            "mask_schedule": (mask_schedule, True), "choice_temperature": (choice_temperature, True)}
    for name, (value, for_maskgit) in only.items():
        if value is not None and for_maskgit != maskgit:
            raise ValueError(f"{name} is an option of {'MaskGIT' if for_maskgit else 'GPT'} priors; "
                             f"this pipeline's prior is a {type(prior).__name__}")
    if not maskgit:
        check_kv_cache_choice(use_cache)
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < check_positive_number("top_p", top_p) <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if isinstance(generator, list):
        if len(generator) != batch_size or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator must be one torch.Generator or a list of {batch_size} (one per class "
                             f"label), got a list of {len(generator)}")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, a list of them or None, got {type(generator).__name__}")


class TokenSampling:
    """One sampling call: the timesteps, the starting tokens and ``step`` (prior logits -> scheduler step).

    Options are those of ``LGQPipeline.__call__`` (checked there or in ``sample_token_grids``); per-call options
    never change the scheduler's saved config.
    """

    def __init__(self, prior: Any, scheduler: MaskGITScheduler | AutoregressiveScheduler, labels: torch.Tensor, *,
                 num_inference_steps: int, guidance_scale: float, temperature: float, generator,
                 top_k: int | None, top_p: float | None, mask_schedule: str | None, choice_temperature: float | None,
                 guidance_schedule: str, use_cache: bool, device: torch.device):
        self.prior, self.scheduler, self.labels = prior, scheduler, labels.to(device)
        self.guidance_scale, self.guidance_schedule = float(guidance_scale), guidance_schedule
        self.temperature, self.generator = float(temperature), generator
        # 1. timesteps and this call's step options
        if is_maskgit_prior(prior):
            scheduler.set_timesteps(int(num_inference_steps), device=device, mask_schedule=mask_schedule)
            self.step_options = {"choice_temperature": choice_temperature}
        else:
            scheduler.set_timesteps(prior.seq_len, device=device)
            self.step_options = {"top_k": top_k, "top_p": top_p}
        self.timesteps: list[int] = scheduler.timesteps.tolist()
        guided = guidance_scale != 1.0 or guidance_schedule != "constant"
        # 2. start from "nothing decoded"
        self.initial_tokens = torch.full((len(labels), prior.seq_len), scheduler.mask_id, dtype=torch.long,
                                         device=device)
        self.state = prior.start_sampling(self.labels, guided=guided, use_cache=use_cache)

    def step(self, i: int, t: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens after step i, the step's guided logits): s_i from the guidance schedule, the prior's logits,
        the scheduler's step."""
        scale = guidance_scale_at(i, len(self.timesteps), self.guidance_scale, self.guidance_schedule)
        logits = self.prior.sampling_logits(tokens, t, scale, self.state)
        tokens = self.scheduler.step(logits, t, tokens, generator=self.generator, temperature=self.temperature,
                                     **self.step_options).prev_sample
        return tokens, logits

    def run(self, after_step: Callable[[int, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, bool]] | None = None
            ) -> torch.Tensor:
        """The loop: tokens [B, L]. ``after_step(i, t, tokens, logits) -> (tokens, stop)`` may replace the tokens
        and stop early (the pipeline's callbacks, progress bar and interrupt)."""
        tokens = self.initial_tokens
        for i, t in enumerate(self.timesteps):
            tokens, logits = self.step(i, t, tokens)
            if after_step is not None:
                tokens, stop = after_step(i, t, tokens, logits)
                if stop:
                    break
        return tokens


@torch.no_grad()
def sample_token_grids(prior: Any, class_labels: Any, scheduler: MaskGITScheduler | AutoregressiveScheduler | None = None,
                       *, num_inference_steps: int = 12, guidance_scale: float = 1.0, temperature: float = 1.0,
                       generator: torch.Generator | list[torch.Generator] | None = None, top_k: int | None = None,
                       top_p: float | None = None, mask_schedule: str | None = None,
                       choice_temperature: float | None = None, guidance_schedule: str = "constant",
                       use_cache: bool = True) -> torch.Tensor:
    """Token grids [B, h, w] int64 from ``prior`` alone (no tokenizer), with the options of ``LGQPipeline.__call__``
    and its defaults; the prior runs in eval mode and its train/eval mode is restored afterwards."""
    labels = check_class_labels(class_labels, int(prior.num_classes))
    check_sampling_options(prior, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           temperature=temperature, top_k=top_k, top_p=top_p, mask_schedule=mask_schedule,
                           choice_temperature=choice_temperature, use_cache=use_cache,
                           guidance_schedule=guidance_schedule, generator=generator, batch_size=len(labels))
    if scheduler is None and is_maskgit_prior(prior):  # generate's default: the cosine schedule
        scheduler = MaskGITScheduler(codebook_size=int(prior.codebook_size), mask_token_id=int(prior.mask_token_id))
    scheduler = check_scheduler(prior, scheduler)
    was_training = prior.training
    prior.eval()
    try:
        sampling = TokenSampling(prior, scheduler, labels, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, temperature=temperature, generator=generator,
                                 top_k=top_k, top_p=top_p, mask_schedule=mask_schedule,
                                 choice_temperature=choice_temperature, guidance_schedule=guidance_schedule,
                                 use_cache=use_cache, device=prior.device)
        return sampling.run().view(len(labels), *normalize_grid_size(prior.grid_size))
    finally:
        prior.train(was_training)
