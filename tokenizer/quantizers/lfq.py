"""Lookup-free quantization (LFQ, MAGVIT-v2, Yu et al. 2023), docs/method.md §2.

Tokens x_n in R^C are projected to b = log2 K channels u_n = P_in x_n and quantized per channel to
the sign (the implicit codebook is {-1, +1}^b):

    s_nj = +1 if u_nj > 0 else -1
    code_n = s_n + (u_n - stopgrad(u_n))              (identity STE, forward value exact)
    i_n  = sum_j [s_nj = +1] 2^j
    q_n  = P_out(code_n)

Entropy regulariser. Soft assignments over the K codes c_k are p_nk = softmax_k(-||u_n - c_k||^2 / T);
since ||c_k||^2 = b for every code they factorise over bits,

    p_nk = prod_j p_nj(c_kj),   p_nj(+1) = sigmoid(4 u_nj / T).

    L_entropy = mean_n H(p_n) - gamma * H(pbar),   pbar = mean over the global batch of p_n

H(p_n) = sum_j H_b(p_nj) exactly. For H(pbar) two modes:
    "exact":      pbar_k = mean_n prod_j p_nj(c_kj) over all K codes, computed in chunks of tokens with
                  recomputation in backward (checkpointing), so memory grows with chunk * K, not N * K;
    "factorized": H(pbar) ~= sum_j H_b(mean_n p_nj), the entropy of the product of the per-bit marginals
                  (an upper bound of the exact value; O(N b), for very large K).
The batch sums (of p_nk or of p_nj) and the token count are all-reduced across processes in training
mode (the local batch in eval mode, see ``Quantizer.syncs_across_processes``).

    L = entropy_weight * L_entropy + commitment_weight * mean ||u_n - stopgrad(s_n)||^2
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.softmax import drop_log_probability_tail
from tokenizer.quantizers.base import (Quantizer, QuantizerOutput, check_weight, entropy, fp32_quantizer_math,
                                       latents_to_tokens, nearest_neighbour_chunk_size, quantizer_output,
                                       tokens_to_latents)

ENTROPY_MODES = ("exact", "factorized")


def binary_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H_b(p) = -p log p - (1 - p) log(1 - p) with p = sigmoid(a), computed stably from a (nats)."""
    p = torch.sigmoid(logits)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H_b(p) = -p log p - (1 - p) log(1 - p) (nats), elementwise, 0 log 0 := 0."""
    return entropy(torch.stack((p, 1 - p), dim=-1))


def _code_probability_sum(log_p_plus: torch.Tensor, log_p_minus: torch.Tensor, code_bits: torch.Tensor) -> torch.Tensor:
    """sum_n p_nk = sum_n exp(sum_j [c_kj=+1] log p_nj(+1) + [c_kj=-1] log p_nj(-1)) for one chunk -> [K], every
    p_nk < e^-40 counted as exactly 0 (no denormal: ``common.softmax``)."""
    log_p = log_p_plus @ code_bits.t() + log_p_minus @ (1.0 - code_bits).t()
    return drop_log_probability_tail(log_p).exp().sum(0)


class LFQuantizer(Quantizer):
    """LFQ behind the shared interface (see module doc).

    Args:
        dim: latent channels C.  codebook_size: K, a power of two (b = log2 K bits).
        entropy_weight: 0.1.  commitment_weight: 0.25.  diversity_gamma: weight of the batch entropy (1.0).
        temperature: T of the soft assignment (0.01, i.e. the inverse temperature 100 used by
            common LFQ implementations).
        entropy_mode: "exact" (default) or "factorized" (see module doc).
        chunk_size: tokens per chunk of the exact batch entropy; None = auto (chunk * K fp32 <= 64 MiB).
    """

    def __init__(self, dim: int, codebook_size: int, *, entropy_weight: float = 0.1, commitment_weight: float = 0.25,
                 diversity_gamma: float = 1.0, temperature: float = 0.01, entropy_mode: str = "exact",
                 chunk_size: int | None = None):
        super().__init__(dim, codebook_size)
        num_bits = int(codebook_size).bit_length() - 1
        if 2**num_bits != int(codebook_size):
            raise ValueError(f"LFQ needs codebook_size to be a power of two (K = 2^bits), got {codebook_size}")
        self.entropy_weight = check_weight("entropy_weight", entropy_weight)
        self.commitment_weight = check_weight("commitment_weight", commitment_weight)
        self.diversity_gamma = check_weight("diversity_gamma", diversity_gamma)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if entropy_mode not in ENTROPY_MODES:
            raise ValueError(f"unknown entropy_mode {entropy_mode!r}; choose one of {ENTROPY_MODES}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be None (auto) or >= 1, got {chunk_size!r}")
        self.num_bits, self.temperature, self.entropy_mode = num_bits, float(temperature), entropy_mode
        self.chunk_size = int(chunk_size) if chunk_size is not None else nearest_neighbour_chunk_size(codebook_size)
        self.register_buffer("bit_values", 2 ** torch.arange(num_bits, dtype=torch.int64), persistent=False)
        self.project_in = nn.Linear(self.dim, num_bits)
        self.project_out = nn.Linear(num_bits, self.dim)

    def indices_to_bits(self, indices: torch.Tensor) -> torch.Tensor:
        """Bits of i as 0/1 floats [..., b], bit j = (i >> j) & 1."""
        return ((indices.long().unsqueeze(-1) // self.bit_values) % 2).float()

    def codebook_entropy(self, bit_logits: torch.Tensor) -> torch.Tensor:
        """H(pbar) over the global batch (module doc), from per-bit logits a_nj = 4 u_nj / T [N, b]."""
        num_tokens = self.global_count(bit_logits.shape[0], bit_logits.device)
        if self.entropy_mode == "factorized":
            mean_bits = self.global_sum(torch.sigmoid(bit_logits).sum(0)) / num_tokens
            return binary_entropy(mean_bits).sum()
        code_bits = self.indices_to_bits(torch.arange(self.codebook_size, device=bit_logits.device))
        log_p_plus, log_p_minus = F.logsigmoid(bit_logits), F.logsigmoid(-bit_logits)
        prob_sum = bit_logits.new_zeros(self.codebook_size)
        for start in range(0, bit_logits.shape[0], self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            if torch.is_grad_enabled() and bit_logits.requires_grad:
                prob_sum = prob_sum + checkpoint(_code_probability_sum, log_p_plus[chunk], log_p_minus[chunk],
                                                 code_bits, use_reentrant=False)
            else:
                prob_sum = prob_sum + _code_probability_sum(log_p_plus[chunk], log_p_minus[chunk], code_bits)
        return entropy(self.global_sum(prob_sum) / num_tokens)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self.check_latents(z)
        with fp32_quantizer_math(z.device.type):
            u = self.project_in(latents_to_tokens(z))
            positive = u > 0
            signs = torch.where(positive, 1.0, -1.0)
            codes = signs + (u - u.detach())
            indices = (positive.long() * self.bit_values).sum(1)
            quantized = self.project_out(codes)

            bit_logits = 4.0 * u / self.temperature
            entropy_per_sample = binary_entropy_from_logits(bit_logits).sum(1).mean()
            entropy_codebook = self.codebook_entropy(bit_logits)
            loss_entropy = entropy_per_sample - self.diversity_gamma * entropy_codebook
            loss_commit = F.mse_loss(u, signs)
            loss = self.entropy_weight * loss_entropy + self.commitment_weight * loss_commit
        return quantizer_output(self, quantized, indices, loss, z.shape, entropy_per_sample=entropy_per_sample,
                                entropy_codebook=entropy_codebook, loss_entropy=loss_entropy, loss_commit=loss_commit)

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, H, W] -> P_out(2 bits - 1) [B, C, H, W], the forward value of ``quantized``."""
        self.check_indices(indices)
        batch, height, width = indices.shape
        with fp32_quantizer_math(indices.device.type):
            signs = 2.0 * self.indices_to_bits(indices.reshape(-1)) - 1.0
            return tokens_to_latents(self.project_out(signs), batch, height, width)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, bits={self.num_bits}, "
                f"temperature={self.temperature}, entropy_mode={self.entropy_mode}")


__all__ = ["LFQuantizer", "binary_entropy", "binary_entropy_from_logits"]
