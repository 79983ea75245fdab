"""Finite scalar quantization (FSQ, Mentzer et al. 2023), docs/method.md §2.

Tokens x_n in R^C are projected to d = len(levels) channels, each channel j is bounded to L_j
values with a shifted tanh, rounded with a straight-through estimator and normalised to [-1, 1]:

    half_l_j = (L_j - 1)(1 + eps) / 2,   offset_j = 0.5 if L_j even else 0,
    shift_j  = atanh(offset_j / half_l_j)
    b_j      = tanh(y_j + shift_j) * half_l_j - offset_j       (so b(0) = 0)
    r_j      = round(b_j) in {-floor(L_j/2), ..., ceil(L_j/2) - 1}
    code_j   = r_j / floor(L_j/2)  +  (b_j - stopgrad(b_j)) / floor(L_j/2)     (STE, forward value exact)
    q_n      = P_out(code_n)

The implicit codebook is the grid of prod_j L_j points; indices are the mixed-radix numbers

    i_n = sum_j (r_j + floor(L_j/2)) * prod_{l<j} L_l.

There is no auxiliary loss (``loss`` is 0).

Levels table (product must equal K exactly):
    256 -> [8, 8, 4]              the FSQ paper's 2^8 entry [8, 6, 5] has product 240, not 256; [8, 8, 4] keeps
                                  K exact with d = 3 channels like the paper's entry and the 8/4 levels used below
    1000 -> [8, 5, 5, 5]          the FSQ paper's ~2^10 entry (product 1000)
    1024 -> [8, 8, 4, 4]          [8, 5, 5, 5] has product 1000, not 1024, so it cannot serve K = 1024;
                                  [8, 8, 4, 4] keeps K exact with the 8/4 levels used for the larger K
    4096 -> [8, 8, 8, 8]          the paper suggests [7, 5, 5, 5, 5] for ~2^12, but its product is 4375,
                                  not 4096; we keep K exact so every baseline has the same K.
    8192 -> [8, 8, 8, 4, 4]       (alternative [16, 8, 8, 8]: pass levels=[16, 8, 8, 8])
    16384 -> [8, 8, 8, 8, 4]
    65536 -> [8, 8, 8, 8, 4, 4]
"""
from __future__ import annotations

import math

import torch
from torch import nn

from tokenizer.quantizers.base import (Quantizer, QuantizerOutput, fp32_quantizer_math, latents_to_tokens,
                                       quantizer_output, tokens_to_latents)

FSQ_LEVELS: dict[int, tuple[int, ...]] = {
    256: (8, 8, 4),
    1000: (8, 5, 5, 5),
    1024: (8, 8, 4, 4),
    4096: (8, 8, 8, 8),
    8192: (8, 8, 8, 4, 4),
    16384: (8, 8, 8, 8, 4),
    65536: (8, 8, 8, 8, 4, 4),
}


def fsq_levels_for(codebook_size: int, levels=None) -> tuple[int, ...]:
    """The level list for K: explicit ``levels`` (checked: product == K, every L >= 2) or the table."""
    if levels is None:
        if int(codebook_size) not in FSQ_LEVELS:
            table = ", ".join(f"{k}: {list(v)}" for k, v in FSQ_LEVELS.items())
            raise ValueError(f"FSQ has no default levels for codebook_size={codebook_size}; pass levels=[...] "
                             f"whose product is {codebook_size}, or use one of the table entries {{{table}}}")
        return FSQ_LEVELS[int(codebook_size)]
    levels = tuple(int(level) for level in levels)
    if not levels or min(levels) < 2:
        raise ValueError(f"FSQ levels must be a non-empty list of integers >= 2, got {list(levels)}")
    if math.prod(levels) != int(codebook_size):
        raise ValueError(f"FSQ levels {list(levels)} have product {math.prod(levels)}, "
                         f"which does not equal codebook_size={codebook_size}")
    return levels


class FSQuantizer(Quantizer):
    """FSQ behind the shared interface (see module doc).

    Args:
        dim: latent channels C.  codebook_size: K = prod(levels).
        levels: explicit level list (default: from ``FSQ_LEVELS``); product must equal K.
        eps: the (1 + eps) widening of the tanh bound (1e-3).
    """

    def __init__(self, dim: int, codebook_size: int, *, levels=None, eps: float = 1e-3):
        super().__init__(dim, codebook_size)
        if not (math.isfinite(eps) and 0 <= eps < 1):
            raise ValueError(f"eps must lie in [0, 1), got {eps!r}")
        self.levels = fsq_levels_for(codebook_size, levels)
        self.eps = float(eps)
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1], dtype=torch.int64), 0)
        self.register_buffer("level_counts", levels_t, persistent=False)
        self.register_buffer("half_width", torch.floor(levels_t / 2), persistent=False)
        self.register_buffer("radix_basis", basis, persistent=False)
        self.project_in = nn.Linear(self.dim, len(self.levels))
        self.project_out = nn.Linear(len(self.levels), self.dim)

    def bound(self, y: torch.Tensor) -> torch.Tensor:
        """b = tanh(y + shift) * half_l - offset (module doc); values in (-floor(L/2) - eps', ceil(L/2) - 1 + eps')."""
        half_l = (self.level_counts - 1) * (1 + self.eps) / 2
        offset = torch.where(self.level_counts % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(y + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self.check_latents(z)
        with fp32_quantizer_math(z.device.type):
            bounded = self.bound(self.project_in(latents_to_tokens(z)))
            # the clamp only matters for huge L with eps >= 1/(L-1); it keeps every index in [0, K)
            rounded = torch.minimum(torch.round(bounded).detach().clamp_min(-self.half_width),
                                    self.level_counts - 1 - self.half_width)
            codes = (rounded + (bounded - bounded.detach())) / self.half_width
            indices = self.codes_to_indices(rounded / self.half_width)
            quantized = self.project_out(codes)
        return quantizer_output(self, quantized, indices, quantized.new_zeros(()), z.shape)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """i = sum_j (r_j + floor(L_j/2)) prod_{l<j} L_l with r = round(code * floor(L/2)); codes [N, d] -> [N]."""
        digits = torch.round(codes.detach() * self.half_width).long() + self.half_width.long()
        return (digits * self.radix_basis).sum(1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Mixed-radix digits of i: r_j = (i // prod_{l<j} L_l) mod L_j - floor(L_j/2); code = r / floor(L/2)."""
        digits = (indices.reshape(-1, 1).long() // self.radix_basis) % self.level_counts.long()
        return (digits.float() - self.half_width) / self.half_width

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, H, W] -> P_out(code_i) [B, C, H, W], the forward value of ``quantized``."""
        self.check_indices(indices)
        batch, height, width = indices.shape
        with fp32_quantizer_math(indices.device.type):
            return tokens_to_latents(self.project_out(self.indices_to_codes(indices)), batch, height, width)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, levels={list(self.levels)}"


__all__ = ["FSQuantizer", "FSQ_LEVELS", "fsq_levels_for"]
