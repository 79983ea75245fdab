"""MaskGIT iterative parallel decoding as a diffusers scheduler.

Decoding starts from a fully masked grid of L tokens and runs T steps. At step t
(t = 0..T-1, ``ratio = (t + 1) / T``):

1. sample a candidate x_i ~ Categorical(softmax(logits_i / temperature)) at every masked position i
   (the probabilities below e^-40 of the largest are exactly 0, so none is denormal: ``common.softmax``);
2. confidence c_i = log p(x_i) + choice_temperature * (1 - ratio) * g_i, g_i ~ Gumbel(0, 1)
   (the Gumbel noise is annealed to 0 over the steps); already fixed tokens get c_i = +inf;
3. the number of tokens that stay masked after the step is
   n_t = floor(L * gamma(ratio)), clipped to [1, n_unknown - 1] (so every step fixes at least one
   token and, before the last step, at least one stays masked); n_{T-1} = 0;
4. the n_t masked positions with the lowest confidence are masked again, all others are fixed.

Mask schedules gamma: [0, 1] -> [0, 1], gamma(0) = 1, gamma(1) = 0:
``cosine`` gamma(r) = cos(pi r / 2) (MaskGIT default), ``linear`` gamma(r) = 1 - r,
``arccos`` gamma(r) = arccos(r) / (pi / 2), ``square`` gamma(r) = 1 - r^2.

Why not diffusers' AmusedScheduler: it lets already fixed tokens be masked again (its confidence
of known tokens is not +inf), has no arccos schedule, no annealed choice temperature and no
logit temperature; the step rule above is MaskGIT's (Chang et al. 2022).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from common.softmax import drop_softmax_tail

MASK_SCHEDULES = ("cosine", "linear", "arccos", "square")


def mask_schedule(ratio: torch.Tensor | float, schedule: str = "cosine") -> torch.Tensor:
    """gamma(r): the fraction of tokens still masked at progress r in [0, 1] (see module docstring)."""
    r = torch.as_tensor(ratio, dtype=torch.float64).clamp(0.0, 1.0)
    if schedule == "cosine":
        return torch.cos(r * math.pi / 2)
    if schedule == "linear":
        return 1.0 - r
    if schedule == "arccos":
        return torch.arccos(r) / (math.pi / 2)
    if schedule == "square":
        return 1.0 - r**2
    raise ValueError(f"unknown mask schedule {schedule!r}; choose one of {MASK_SCHEDULES}")


Generators = torch.Generator | list[torch.Generator] | None


def uniform_rows(num_rows: int, generator: Generators, device, dtype=torch.float32,
                 rows_per_sample: torch.Tensor | None = None) -> torch.Tensor:
    """u ~ U[0, 1) of shape [num_rows], drawn on the generator's device and moved to ``device``.

    ``generator`` is one torch.Generator (or None) for all rows, or a list with one generator per sample:
    then ``rows_per_sample`` [B] says how many consecutive rows belong to sample b, and sample b's rows are
    drawn with generator b only, so a sample's draws do not depend on the other samples in the batch.
    """
    if not isinstance(generator, list):
        gen_device = generator.device if generator is not None else device
        return torch.rand(num_rows, generator=generator, device=gen_device, dtype=dtype).to(device)
    if rows_per_sample is None or len(generator) != len(rows_per_sample):
        raise ValueError(f"a list of {len(generator)} generators needs one generator per sample "
                         f"(got {None if rows_per_sample is None else len(rows_per_sample)} samples)")
    counts = [int(n) for n in rows_per_sample.tolist()]
    if sum(counts) != num_rows:
        raise ValueError(f"rows_per_sample sums to {sum(counts)}, expected {num_rows} rows")
    draws = [torch.rand(n, generator=g, device=g.device, dtype=dtype).to(device) for g, n in zip(generator, counts)]
    return torch.cat(draws) if draws else torch.zeros(0, dtype=dtype, device=device)


def gumbel_noise(shape, generator: Generators, device, dtype=torch.float32,
                 rows_per_sample: torch.Tensor | None = None) -> torch.Tensor:
    """g = -log(-log(u)), u ~ U(0, 1), drawn with ``generator`` (see ``uniform_rows``; shape must be 1-D
    when a list of generators is given)."""
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    u = uniform_rows(shape.numel(), generator, device, torch.float32, rows_per_sample).view(shape)
    return -torch.log((-torch.log(u.clamp(1e-20, 1.0))).clamp_min(1e-20)).to(dtype)


CDF_CHUNK_BYTES = 64 * 2**20  # float64 CDF rows per chunk in sample_categorical


def sample_categorical(probs: torch.Tensor, generator: Generators,
                       rows_per_sample: torch.Tensor | None = None) -> torch.Tensor:
    """x ~ Categorical(probs) over the last dim by inverse-CDF sampling.

    Per row: F_k = sum_{j <= k} p_j (float64), u ~ U[0, 1) from ``generator`` (on its device), and
    x = #{k : F_k <= u F_K}, the index whose CDF interval [F_{k-1}, F_k) holds u F_K, so P(x = k) = p_k / F_K
    (rows need not be normalised; zero-probability entries are never drawn). One uniform per row instead
    of torch.multinomial's one exponential per entry: ~10x less work for K = 16384 on CPU, and the draws
    depend only on the seed, not on the device the probabilities live on. A list of generators draws each
    sample's rows with its own generator (``uniform_rows``).
    """
    num_codes = probs.shape[-1]
    flat = probs.reshape(-1, num_codes)
    drawn = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    if flat.shape[0] == 0:
        return drawn.view(probs.shape[:-1])
    u = uniform_rows(flat.shape[0], generator, flat.device, torch.float64, rows_per_sample).unsqueeze(1)
    rows = max(1, CDF_CHUNK_BYTES // (8 * num_codes))
    for start in range(0, flat.shape[0], rows):
        cdf = flat[start:start + rows].double().cumsum_(dim=-1)
        drawn[start:start + rows] = torch.searchsorted(cdf, u[start:start + rows] * cdf[:, -1:], right=True).squeeze(1)
    return drawn.clamp_(max=num_codes - 1).view(probs.shape[:-1])


def check_step_arguments(scheduler, timestep: int, temperature: float) -> int:
    """Shared checks of a token scheduler's ``step``: set_timesteps was called, t in [0, T), temperature > 0 -> t."""
    if scheduler.num_inference_steps is None:
        raise RuntimeError("call set_timesteps(...) before step()")
    t = int(timestep)
    if not 0 <= t < scheduler.num_inference_steps:
        raise ValueError(f"timestep must lie in [0, {scheduler.num_inference_steps}), got {t}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return t


@dataclass
class MaskGITSchedulerOutput(BaseOutput):
    """prev_sample: tokens after the step ([B, L] or [B, h, w], mask id where still masked);
    pred_original_sample: the sampled candidates at every position (fixed tokens kept)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class MaskGITScheduler(SchedulerMixin, ConfigMixin):
    """MaskGIT confidence-based unmasking (saved as ``scheduler_config.json``).

    Args:
        codebook_size: K; logits must have K entries and sampled tokens are always in [0, K).
        mask_token_id: id of the mask token in the inputs (default K).
        mask_schedule: "cosine" (default), "linear", "arccos" or "square".
        choice_temperature: scale of the annealed Gumbel noise added to the confidence (MaskGIT 4.5).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 1024,
        mask_token_id: int | None = None,
        mask_schedule: str = "cosine",
        choice_temperature: float = 4.5,
    ):
        if int(codebook_size) < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"unknown mask schedule {mask_schedule!r}; choose one of {MASK_SCHEDULES}")
        if choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self.mask_schedule: str = mask_schedule  # of the current decoding (set_timesteps); the config keeps the default

    @property
    def mask_id(self) -> int:
        mid = self.config.mask_token_id
        return int(self.config.codebook_size if mid is None else mid)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      mask_schedule: str | None = None) -> None:
        """Steps t = 0, 1, ..., T-1 (each one unmasks a share of tokens).

        ``mask_schedule`` overrides the configured schedule for this decoding only: the saved config
        (``scheduler_config.json``) is never changed by a call."""
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        mask_schedule = self.config.mask_schedule if mask_schedule is None else mask_schedule
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"unknown mask schedule {mask_schedule!r}; choose one of {MASK_SCHEDULES}")
        self.mask_schedule = mask_schedule
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.arange(self.num_inference_steps, device=device)

    def num_masked_after(self, timestep: int, seq_len: int) -> int:
        """floor(L * gamma((t + 1) / T)): tokens still masked after step t (before clipping)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        ratio = (int(timestep) + 1) / self.num_inference_steps
        return int(math.floor(seq_len * float(mask_schedule(ratio, self.mask_schedule)) + 1e-9))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Generators = None,
        temperature: float = 1.0,
        choice_temperature: float | None = None,
        return_dict: bool = True,
    ) -> MaskGITSchedulerOutput | tuple:
        """One MaskGIT step (module docstring). sample: tokens [B, L] or [B, h, w] with ``mask_id`` at masked
        positions. model_output: logits at every position, [B, L, K] or [B, h, w, K], or only at the M masked
        positions, [M, K] in row-major order of ``sample == mask_id`` (what the sampling loop passes: the fixed
        positions' logits are never used, so they need not be computed). Work is O(M K) either way.
        generator: one torch.Generator, or a list with one per sample (each sample's draws use its own)."""
        t = check_step_arguments(self, timestep, temperature)
        K = int(self.config.codebook_size)
        if model_output.shape[-1] != K:
            raise ValueError(f"logits must have codebook_size={K} entries in the last dim, got {model_output.shape[-1]}")
        choice_temperature = self.config.choice_temperature if choice_temperature is None else choice_temperature

        shape = sample.shape
        tokens = sample.reshape(shape[0], -1)
        L = tokens.shape[1]
        unknown = tokens == self.mask_id
        bad = (~unknown) & ((tokens < 0) | (tokens >= K))
        if bad.any():
            raise ValueError(f"tokens must lie in [0, {K}) or equal the mask id {self.mask_id}")
        if model_output.dim() == 2:
            num_masked = int(unknown.sum())
            if model_output.shape[0] != num_masked:
                raise ValueError(f"masked-position logits {tuple(model_output.shape)} need one row per masked "
                                 f"token; the tokens have {num_masked}")
            masked_logits = model_output.float()
        elif model_output.shape[:-1] == sample.shape:
            masked_logits = model_output.reshape(shape[0], L, K)[unknown].float()
        else:
            raise ValueError(f"logits {tuple(model_output.shape)} do not match tokens {tuple(sample.shape)}")

        # sample x_i and its log-probability at the masked positions only, in four passes over the [M, K] logits
        # (one buffer, written in place): s = (l - max l) / T with the tail dropped, p~ = exp(s), x ~ p~ / F
        # with F = sum_k p~_k, and log p(x) = log p~_x - log F (= log_softmax(l / T)_x up to rounding)
        n_unknown = unknown.sum(dim=1)
        probs = torch.mul(masked_logits, 1.0 / temperature)
        probs = drop_softmax_tail(probs, out=probs).exp_()  # [M, K] unnormalised; the largest entry of a row is 1
        drawn = sample_categorical(probs, generator, n_unknown)  # [M]
        candidates = tokens.masked_scatter(unknown, drawn)
        chosen_log_prob = probs.gather(-1, drawn.unsqueeze(-1)).squeeze(-1).log() - probs.sum(dim=-1).log()

        if t == self.num_inference_steps - 1:
            keep_masked = torch.zeros_like(n_unknown)
        else:
            target = self.num_masked_after(t, L)
            keep_masked = torch.clamp(torch.full_like(n_unknown, target), min=1)
            keep_masked = torch.minimum(keep_masked, (n_unknown - 1).clamp_min(0))

        noise_scale = float(choice_temperature) * (1.0 - (t + 1) / self.num_inference_steps)
        if noise_scale > 0:
            chosen_log_prob = chosen_log_prob + noise_scale * gumbel_noise(chosen_log_prob.shape, generator,
                                                                           chosen_log_prob.device,
                                                                           rows_per_sample=n_unknown)
        confidence = torch.full(tokens.shape, float("inf"), device=tokens.device).masked_scatter(unknown,
                                                                                               chosen_log_prob)
        # rank 0 = least confident; re-mask the keep_masked least confident (all of them unknown)
        ranks = confidence.argsort(dim=1, stable=True).argsort(dim=1)
        remask = ranks < keep_masked.unsqueeze(1)
        prev = torch.where(remask, torch.full_like(candidates, self.mask_id), candidates)

        prev = prev.view(shape)
        candidates = candidates.view(shape)
        if not return_dict:
            return (prev, candidates)
        return MaskGITSchedulerOutput(prev_sample=prev, pred_original_sample=candidates)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed entries become -inf; the most likely entry always stays.

    top-k keeps the k largest logits; top-p keeps the smallest prefix of the sorted distribution whose
    probability mass reaches p (an entry is kept if the mass strictly before it is < p).
    """
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = drop_softmax_tail(sorted_logits).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class AutoregressiveScheduler(SchedulerMixin, ConfigMixin):
    """Raster-order decoding for GPT priors as a diffusers scheduler (saved as ``scheduler_config.json``).

    Step t (t = 0..L-1) fills position t of the token sequence [B, L] (``unknown_token_id`` = K marks
    positions not decoded yet) with x_t ~ Categorical(softmax(top_p(top_k(l_t / temperature)))), where l_t
    [B, K] are the (guided) next-token logits the prior computed from the prefix; ``sample_categorical``
    draws with the caller's generator (one, or one per sample). Probabilities below e^-40 of the largest are
    exactly 0 (no denormal: ``common.softmax``).

    Args:
        codebook_size: K; logits have K entries and tokens are in [0, K).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, codebook_size: int = 1024):
        if int(codebook_size) < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    @property
    def mask_id(self) -> int:
        """Id of a position not decoded yet (K: outside the vocabulary, never fed to the prior)."""
        return int(self.config.codebook_size)

    def set_timesteps(self, seq_len: int, device: str | torch.device | None = None) -> None:
        """One step per token: t = 0, 1, ..., L-1."""
        if int(seq_len) < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.num_inference_steps = int(seq_len)
        self.timesteps = torch.arange(self.num_inference_steps, device=device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Generators = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        return_dict: bool = True,
    ) -> MaskGITSchedulerOutput | tuple:
        """model_output: next-token logits [B, K]; sample: tokens [B, L] -> tokens with position t filled."""
        t = check_step_arguments(self, timestep, temperature)
        K = int(self.config.codebook_size)
        if model_output.dim() != 2 or model_output.shape != (sample.shape[0], K):
            raise ValueError(f"next-token logits must be [B={sample.shape[0]}, K={K}], got {tuple(model_output.shape)}")
        logits = filter_logits(model_output.float() / temperature, top_k, top_p)
        drawn = sample_categorical(drop_softmax_tail(logits).softmax(dim=-1), generator,
                                   torch.ones(sample.shape[0], dtype=torch.long))  # [B]
        tokens = sample.clone()
        tokens.reshape(sample.shape[0], -1)[:, t] = drawn
        if not return_dict:
            return (tokens, tokens)
        return MaskGITSchedulerOutput(prev_sample=tokens, pred_original_sample=tokens)


GUIDANCE_SCHEDULES = ("constant", "linear")


def guidance_scale_at(step: int, num_steps: int, guidance_scale: float, schedule: str = "constant") -> float:
    """Classifier-free guidance scale for step ``step`` of ``num_steps``.

    Guided logits are l = l_u + s (l_c - l_u) (the diffusers / MUSE convention): s = 1 is the
    conditional model alone, s = 0 the unconditional one, s > 1 extrapolates away from l_u.
    ``constant``: s_t = s; ``linear``: s_t = 1 + (s - 1) (t + 1) / T (ramps from ~conditional to s).
    """
    if schedule == "constant":
        return float(guidance_scale)
    if schedule == "linear":
        return 1.0 + (float(guidance_scale) - 1.0) * (step + 1) / num_steps
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose one of {GUIDANCE_SCHEDULES}")


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """x = x_u + s (x_c - x_u) (one ``torch.lerp`` pass), on logits or on the input of an affine output head
    (then head(x) = l_u + s (l_c - l_u), since the head's bias is weighted (1 - s) + s = 1)."""
    return torch.lerp(uncond, cond, float(scale))
