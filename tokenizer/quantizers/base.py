"""The one interface every quantizer implements.

A quantizer maps latents z [B, C, H, W] to

    QuantizerOutput(quantized [B, C, H, W], indices [B, H, W] int64, loss scalar, stats dict)

and back from indices to latents with ``indices_to_latents``. It reports its codebook
size as ``codebook_size`` (K) and its input channel count as ``dim`` (C).

Training progress reaches quantizers through ``set_training_step(step, max_steps, steps_per_epoch)``,
by default as ``set_progress(step / max_steps)`` (a float in [0, 1]); quantizers with schedules (LGQ's
temperature, which can anneal over its own number of steps or epochs) use it, the others ignore it. Quantizers with data-driven initialisation implement ``init_from_latents``
and report ``needs_init``.

Quantizer math runs in fp32 even under autocast (``fp32_quantizer_math``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from common.metrics import perplexity_from_counts


NEAREST_NEIGHBOUR_BYTES_BUDGET = 64 * 2**20  # one [chunk, K] fp32 distance block stays <= ~64 MiB


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, C, H, W], forward value = hard codes
    indices: torch.Tensor  # [B, H, W], int64 in [0, K)
    loss: torch.Tensor  # scalar, already weighted, added to the generator loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


class Quantizer(nn.Module):
    """Base class: input validation, fp32 handling, shared statistics."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"latent dim must be >= 1, got {dim}")
        if int(codebook_size) < 2:
            raise ValueError(f"codebook_size K must be >= 2, got {codebook_size}")
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)

    # --- hooks -------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]; default: nothing depends on it."""

    def set_training_step(self, step: int, max_steps: int, steps_per_epoch: int | None = None) -> None:
        """The trainer's hook before optimisation step s of a ``max_steps`` run (``steps_per_epoch`` optimiser steps
        per epoch; None when the data has no length). Default: ``set_progress(min(1, s / max_steps))``; quantizers
        whose schedules have their own horizon (LGQ's ``tau_anneal_steps`` / ``tau_anneal_epochs``) override it."""
        self.set_progress(min(1.0, step / max(1, max_steps)))

    @torch.no_grad()
    def init_from_latents(self, latents: torch.Tensor) -> None:
        """Data-driven initialisation from latents [N, C]; default: nothing to do."""

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, H, W] int64 -> [B, C, H, W] quantized latents."""
        raise NotImplementedError

    # --- helpers for subclasses -----------------------------------------------------
    def check_latents(self, z: torch.Tensor) -> None:
        if z.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects latents [B, C, H, W], got shape {tuple(z.shape)}")
        if z.shape[1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects {self.dim} latent channels, got {z.shape[1]} (shape {tuple(z.shape)})"
            )
        if not torch.isfinite(z).all():
            raise ValueError(f"{type(self).__name__} received NaN or Inf latents")

    def check_indices(self, indices: torch.Tensor) -> None:
        if indices.dim() != 3:
            raise ValueError(f"indices must be [B, H, W], got shape {tuple(indices.shape)}")
        if indices.dtype.is_floating_point:
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]"
            )

    # --- batch statistics over processes ------------------------------------------------------
    def syncs_across_processes(self) -> bool:
        """Batch statistics (usage, code entropy) are all-reduced over processes only in training mode
        under torch.distributed. Every rank runs the same number of training steps; eval-mode forwards
        (token extraction, reconstruction evaluation, sampling, validation) may be reached by ranks a
        different number of times, so they call no collective and use their local batch."""
        return self.training and is_distributed()

    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        """sum over processes of t (differentiable, ``all_reduce_sum``) when syncing, else t."""
        return all_reduce_sum(t) if self.syncs_across_processes() else t

    def global_count(self, local_count: int, device: torch.device) -> torch.Tensor:
        """Number of tokens over processes (float scalar) when syncing, else the local count."""
        count = torch.tensor(float(local_count), device=device)
        if self.syncs_across_processes():
            dist.all_reduce(count)
        return count

    # --- data-driven initialisation (VQ, LGQ, IBQ) -------------------------------------------
    # Subclasses that use these keep an ``initialised`` bool buffer (saved with the weights).
    @property
    def needs_init(self) -> bool:
        """True until ``init_from_latents`` ran (quantizers without data-driven init: always False)."""
        return not bool(getattr(self, "initialised", True))

    def check_init_latents(self, latents: torch.Tensor) -> None:
        """``init_from_latents`` input check: latents [N >= 1, C], finite (ValueError naming the problem)."""
        if latents.dim() != 2 or latents.shape[1] != self.dim or latents.shape[0] < 1:
            raise ValueError(f"init_from_latents expects latents [N >= 1, {self.dim}], got shape {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("init_from_latents received NaN or Inf latents")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Weights saved before a quantizer had the ``initialised`` buffer hold a trained codebook: load them as
        # initialised, so loading an old export never re-initialises (or fails on) its codes.
        if hasattr(self, "initialised") and prefix + "initialised" not in state_dict:
            state_dict[prefix + "initialised"] = torch.tensor(True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # --- dead-code re-seeding (VQ, LGQ) ---------------------------------------------------
    # Subclasses that use these keep a ``codebook`` parameter [K, D], a ``usage_ema`` buffer [K]
    # (initialised to 1/K) and the floats ``reseed_threshold`` and ``usage_ema_decay``.
    def dead_code_mask(self) -> torch.Tensor:
        """Codes whose usage EMA fell below the threshold: usage_ema_k * K < reseed_threshold, bool [K]."""
        return self.usage_ema * self.codebook_size < self.reseed_threshold

    @torch.no_grad()
    def update_usage_ema(self, indices: torch.Tensor) -> None:
        """usage_ema <- decay * usage_ema + (1 - decay) * (hard counts / tokens), over the global batch."""
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float()
        if is_distributed():
            dist.all_reduce(counts)
        self.usage_ema.mul_(self.usage_ema_decay).add_(counts / counts.sum().clamp_min(1.0), alpha=1 - self.usage_ema_decay)

    @torch.no_grad()
    def reseed_dead_codes(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset every dead code (``dead_code_mask``) to a random row of ``latents`` [N, D].

        codebook[k] <- latents[n_k] with n_k ~ U{0..N-1}, and usage_ema[k] <- 1/K, for each dead k.
        In DDP the dead set is identical on every rank (the usage EMA is global) and rank 0's
        draws are broadcast, so codebooks stay in sync. Returns (dead indices [M] int64,
        replacements [M, D]) so subclasses can reset their own per-code state too.
        """
        dead = self.dead_code_mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return dead, latents.new_zeros(0, latents.shape[1], dtype=self.codebook.dtype)
        picks = torch.randint(latents.shape[0], (dead.numel(),), device=latents.device)
        replacements = latents[picks].to(self.codebook.dtype)
        if is_distributed():
            dist.broadcast(replacements, src=0)
        self.codebook.data[dead] = replacements
        self.usage_ema[dead] = 1.0 / self.codebook_size
        return dead, replacements

    def hard_stats(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch statistics of the hard indices: perplexity and number of distinct codes."""
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
        return {
            "perplexity": perplexity_from_counts(counts).float(),
            "active_codes": (counts > 0).sum().float(),
        }


def fp32_quantizer_math(device_type: str):
    """Context manager: disable autocast so quantizer math runs in fp32."""
    return torch.autocast(device_type=device_type, enabled=False)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _DifferentiableAllReduceSum(torch.autograd.Function):
    """y = sum_r x_r over processes r; dL/dx_r = sum_r' dL/dy_r' (the adjoint of a sum-all-reduce is itself).

    Built on ``torch.distributed.all_reduce`` (stable API) in both directions, on a copy so the
    input is never modified; replaces ``torch.distributed.nn.functional.all_reduce`` (deprecated).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over processes (identity when not distributed).

    The backward of an all-reduce-sum is again an all-reduce-sum, so with DDP's gradient
    averaging each rank ends up with exactly the gradient of the global objective.
    """
    if not is_distributed():
        return t
    return _DifferentiableAllReduceSum.apply(t)


# ------------------------------------------------ helpers shared by the quantizer modules
def nearest_neighbour_chunk_size(codebook_size: int, budget_bytes: int = NEAREST_NEIGHBOUR_BYTES_BUDGET) -> int:
    """Tokens per chunk so that one [chunk, K] fp32 score block fits in ``budget_bytes``."""
    return max(1, budget_bytes // (4 * int(codebook_size)))


@torch.no_grad()
def nearest_code_indices(x: torch.Tensor, codes: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """i_n = argmin_k ||x_n - c_k||^2 = argmax_k (2 x_n.c_k - ||c_k||^2) for x [N, D], codes [K, D].

    ||x_n||^2 does not change the argmin and is dropped. One matmul per chunk of tokens.
    """
    code_bias = -(codes * codes).sum(1)
    indices = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        scores = torch.addmm(code_bias, x[start:start + chunk_size], codes.t(), alpha=2.0)
        indices[start:start + chunk_size] = scores.argmax(1)
    return indices


def sample_codes_from_latents(latents: torch.Tensor, num_codes: int, generator: torch.Generator) -> torch.Tensor:
    """K codes drawn from latents [N, C] (the data-driven init): a random subset without replacement when
    N >= K; otherwise K draws with replacement plus Gaussian noise of 0.01 x max(the latents' std, 1e-3) (0.01
    for N = 1), so no two codes coincide, even for identical latents. Deterministic given ``generator`` (draws on its device). Returns [K, C]."""
    num_latents = latents.shape[0]
    if num_latents >= num_codes:
        picks = torch.randperm(num_latents, generator=generator, device=generator.device)[:num_codes]
        return latents[picks.to(latents.device)].clone()
    picks = torch.randint(num_latents, (num_codes,), generator=generator, device=generator.device)
    noise = torch.randn(num_codes, latents.shape[1], generator=generator, device=generator.device)
    scale = 0.01 * max(float(latents.std()), 1e-3) if num_latents > 1 else 0.01
    return latents[picks.to(latents.device)] + scale * noise.to(latents.device)


def latents_to_tokens(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> fp32 tokens [B*H*W, C] (row order b, h, w)."""
    return z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def tokens_to_latents(x: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``latents_to_tokens``: [B*H*W, C] -> [B, C, H, W]."""
    return x.reshape(batch, height, width, x.shape[1]).permute(0, 3, 1, 2).contiguous()


def quantizer_output(quantizer: Quantizer, quantized: torch.Tensor, indices: torch.Tensor, loss: torch.Tensor,
                     latent_shape: torch.Size, **loss_terms: torch.Tensor) -> QuantizerOutput:
    """Package token-level results: quantized [N, C] -> [B, C, H, W], indices [N] -> [B, H, W];
    stats = hard-index statistics (perplexity, active codes) + the detached ``loss_terms``."""
    batch, _, height, width = latent_shape
    stats = {**quantizer.hard_stats(indices), **{name: value.detach() for name, value in loss_terms.items()}}
    return QuantizerOutput(tokens_to_latents(quantized, batch, height, width), indices.reshape(batch, height, width), loss, stats)


def check_weight(name: str, value: float) -> float:
    """``value`` as a float after checking it is a finite number >= 0 (a loss weight); else a ValueError naming it."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_k p_k log p_k over the last dimension (nats), 0 log 0 := 0."""
    return -(p * p.clamp_min(1e-30).log()).sum(-1)
