"""SimVQ (Zhu et al. 2024), docs/method.md §2: a frozen random codebook behind a learned linear map.

The codebook B in R^{K x C} is a fixed Gaussian buffer (B_kc ~ N(0, 1/C), drawn from a generator
seeded with ``seed``, saved in the state dict); the codes actually used are its image under a
learned linear map W in R^{C x C}:

    c_k = W b_k
    i_n = argmin_k ||x_n - c_k||^2                     (chunked matmul, ``nearest_code_indices``)
    q_n = c_{i_n} + (x_n - stopgrad(x_n))              (identity STE, forward value exact)

    L = mean ||stopgrad(x_n) - c_{i_n}||^2 + beta * mean ||x_n - stopgrad(c_{i_n})||^2

The codebook loss only trains W, which moves *all* codes at once (the paper's remedy for
codebook collapse).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.quantizers.base import (Quantizer, QuantizerOutput, check_weight, fp32_quantizer_math,
                                       latents_to_tokens, nearest_code_indices, nearest_neighbour_chunk_size,
                                       quantizer_output, tokens_to_latents)


class SimVQuantizer(Quantizer):
    """SimVQ behind the shared interface (see module doc).

    Args:
        dim: latent channels C.  codebook_size: K >= 2.
        beta: commitment weight (0.25).  codebook_weight: codebook-loss weight (1.0).
        seed: seed of the frozen Gaussian codebook (0).
        chunk_size: tokens per nearest-neighbour chunk; None = auto.
    """

    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, codebook_weight: float = 1.0,
                 seed: int = 0, chunk_size: int | None = None):
        super().__init__(dim, codebook_size)
        self.beta = check_weight("beta", beta)
        self.codebook_weight = check_weight("codebook_weight", codebook_weight)
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be None (auto) or >= 1, got {chunk_size!r}")
        self.chunk_size = int(chunk_size) if chunk_size is not None else nearest_neighbour_chunk_size(codebook_size)
        generator = torch.Generator().manual_seed(int(seed))
        self.register_buffer("frozen_codebook", torch.randn(self.codebook_size, self.dim, generator=generator) / self.dim**0.5)
        self.codebook_map = nn.Linear(self.dim, self.dim, bias=False)

    def codes(self) -> torch.Tensor:
        """c_k = W b_k for all k: [K, C] fp32 (differentiable w.r.t. W)."""
        return F.linear(self.frozen_codebook.float(), self.codebook_map.weight.float())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self.check_latents(z)
        with fp32_quantizer_math(z.device.type):
            x = latents_to_tokens(z)
            codes = self.codes()
            indices = nearest_code_indices(x.detach(), codes.detach(), self.chunk_size)
            hard = F.embedding(indices, codes)
            loss_codebook = F.mse_loss(hard, x.detach())
            loss_commit = F.mse_loss(x, hard.detach())
            quantized = hard.detach() + (x - x.detach())
            loss = self.codebook_weight * loss_codebook + self.beta * loss_commit
        return quantizer_output(self, quantized, indices, loss, z.shape, loss_codebook=loss_codebook, loss_commit=loss_commit)

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, H, W] -> c_i = W b_i [B, C, H, W], the forward value of ``quantized``."""
        self.check_indices(indices)
        batch, height, width = indices.shape
        with fp32_quantizer_math(indices.device.type):
            return tokens_to_latents(F.embedding(indices.reshape(-1).long(), self.codes()), batch, height, width)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}"


__all__ = ["SimVQuantizer"]
