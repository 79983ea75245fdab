"""Index backpropagation quantization (IBQ, Shi et al. 2024), docs/method.md §2 (extra baseline).

Dot-product logits over one learnable codebook, a softmax, and a one-hot straight-through estimator:

    l_nk = x_n . c_k,     p_n = softmax_k(l_n),     i_n = argmax_k l_nk
    q_n  = (onehot(i_n) + p_n - stopgrad(p_n)) C  =  c_{i_n} + (p_n - stopgrad(p_n)) C

Forward value: c_{i_n} exactly. Gradients: to c_{i_n} through the one-hot value, and to x_n and
*all* codes through the logits (p_n - stopgrad(p_n) is 0 in value, so it sends no gradient to C
through the values: in code, q_soft = p_n stopgrad(C)).

Losses (the released IBQ quantization loss: three terms, then the optional entropy term):

    L_double   = mean ||q_n - x_n||^2                      (through the STE output: to x, to c_{i_n} and to all
                                                            codes via p_n; weight ``double_weight``, 1)
    L_commit   = mean ||stopgrad(c_{i_n}) - x_n||^2        (trains the encoder only; weight 1)
    L_codebook = mean ||c_{i_n} - stopgrad(x_n)||^2        (trains the chosen codes only; weight ``beta``, 0.25)
    L_entropy = mean_n H(p'_n) - gamma * H(mean_n p'_n),  p'_n = softmax_k(l_n / T_e)   weight ``entropy_weight``

mean_n p'_n is the mean over the global batch (all-reduced) in training, over the local batch in eval
mode.

Initialisation: by default (``init="random"``) the codes are K random encoder latents before step 0
(``init_from_latents``, the same data-driven init VQ and LGQ get from the trainer). With ``init="none"``
they stay N(0, 1/C): against LayerNorm'd latents (norm sqrt(C)) those codes are ~sqrt(C) times shorter than
the latents, so on the glyphs study recipe one code won every argmax within 25 steps in all 3 runs (K = 256,
1024, 4096), the sharpened entropy term (T_e = 0.01) sent no gradient back, and the runs ended with 1-3 active
codes, below the mean-colour baseline (README, the quantizer study).

Memory: the soft path (q_soft, the entropies) runs in chunks of tokens under activation checkpointing, so no
N x K tensor beyond one chunk is alive, in forward or backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.softmax import drop_softmax_tail
from tokenizer.quantizers.base import (Quantizer, QuantizerOutput, check_weight, entropy, fp32_quantizer_math,
                                       latents_to_tokens, nearest_neighbour_chunk_size, quantizer_output,
                                       sample_codes_from_latents, tokens_to_latents)


def _soft_path_chunk(x: torch.Tensor, codebook: torch.Tensor, entropy_temperature: float):
    """For one chunk of tokens: (q_soft = p stopgrad(C) [n, C], sum_n H(p'_n) scalar, sum_n p'_n [K]).

    Both softmaxes drop their tail below e^-40 of the row's largest probability (exactly 0, so none is
    denormal: ``common.softmax``); 0 log 0 := 0 in the entropy.
    """
    logits = x @ codebook.t()
    q_soft = torch.softmax(drop_softmax_tail(logits), dim=1) @ codebook.detach()
    log_p = torch.log_softmax(drop_softmax_tail(logits / entropy_temperature), dim=1)
    p = log_p.exp()
    return q_soft, -(p * log_p.masked_fill(p == 0, 0.0)).sum(), p.sum(0)


@torch.no_grad()
def max_dot_product_indices(x: torch.Tensor, codebook: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """i_n = argmax_k x_n . c_k in chunks of tokens."""
    indices = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        indices[start:start + chunk_size] = (x[start:start + chunk_size] @ codebook.t()).argmax(1)
    return indices


class IBQuantizer(Quantizer):
    """IBQ behind the shared interface (see module doc).

    Args:
        dim: latent channels C.  codebook_size: K >= 2.
        beta: weight of L_codebook (0.25).  double_weight: weight of L_double (1.0).
        entropy_weight: 0.05.  entropy_temperature: T_e (0.01).  diversity_gamma: 1.0.
        init: "random" (default: ``needs_init`` is True until ``init_from_latents`` copies K random encoder
            latents in) or "none" (codes stay N(0, 1/C); collapsed in the study, see the module doc).
        chunk_size: tokens per chunk; None = auto (chunk * K fp32 <= 64 MiB).
    Keep ``codebook`` out of weight decay.
    """

    no_weight_decay_parameter_names = ("codebook",)

    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, double_weight: float = 1.0,
                 entropy_weight: float = 0.05, entropy_temperature: float = 0.01, diversity_gamma: float = 1.0,
                 init: str = "random", chunk_size: int | None = None):
        super().__init__(dim, codebook_size)
        self.beta = check_weight("beta", beta)
        self.double_weight = check_weight("double_weight", double_weight)
        self.entropy_weight = check_weight("entropy_weight", entropy_weight)
        self.diversity_gamma = check_weight("diversity_gamma", diversity_gamma)
        if not (math.isfinite(entropy_temperature) and entropy_temperature > 0):
            raise ValueError(f"entropy_temperature must be a finite number > 0, got {entropy_temperature!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be None (auto) or >= 1, got {chunk_size!r}")
        if init not in ("random", "none"):
            raise ValueError(f"init must be 'random' or 'none', got {init!r}")
        self.init = init
        self.entropy_temperature = float(entropy_temperature)
        self.chunk_size = int(chunk_size) if chunk_size is not None else nearest_neighbour_chunk_size(codebook_size)
        self.codebook = nn.Parameter(torch.randn(self.codebook_size, self.dim) / self.dim**0.5)
        self.register_buffer("initialised", torch.tensor(init == "none"))

    @torch.no_grad()
    def init_from_latents(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Codes <- K random rows of the encoder latents [N, C] (``sample_codes_from_latents``; the quantizer's
        inputs, as in forward). Deterministic given ``generator`` (default: seeded with 0); call it with the
        same latents on every rank in DDP. Marks the quantizer initialised."""
        self.check_init_latents(latents)
        if generator is None:
            generator = torch.Generator(device=latents.device).manual_seed(0)
        codes = sample_codes_from_latents(latents.detach().float(), self.codebook_size, generator)
        self.codebook.data.copy_(codes.to(self.codebook.device, self.codebook.dtype))
        self.initialised.fill_(True)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self.check_latents(z)
        with fp32_quantizer_math(z.device.type):
            x = latents_to_tokens(z)
            codebook = self.codebook.float()
            indices = max_dot_product_indices(x.detach(), codebook.detach(), self.chunk_size)
            use_checkpoint = torch.is_grad_enabled() and (x.requires_grad or codebook.requires_grad)
            q_soft_chunks, entropy_sum, prob_sum = [], x.new_zeros(()), x.new_zeros(self.codebook_size)
            for start in range(0, x.shape[0], self.chunk_size):
                args = (x[start:start + self.chunk_size], codebook, self.entropy_temperature)
                chunk_out = checkpoint(_soft_path_chunk, *args, use_reentrant=False) if use_checkpoint else _soft_path_chunk(*args)
                q_soft_chunks.append(chunk_out[0])
                entropy_sum, prob_sum = entropy_sum + chunk_out[1], prob_sum + chunk_out[2]
            q_soft = torch.cat(q_soft_chunks)
            hard = F.embedding(indices, codebook)
            quantized = hard + (q_soft - q_soft.detach())

            num_tokens = self.global_count(x.shape[0], x.device)
            entropy_per_sample = entropy_sum / x.shape[0]
            entropy_codebook = entropy(self.global_sum(prob_sum) / num_tokens)
            loss_entropy = entropy_per_sample - self.diversity_gamma * entropy_codebook
            loss_double = F.mse_loss(quantized, x)
            loss_commit = F.mse_loss(hard.detach(), x)
            loss_codebook = F.mse_loss(hard, x.detach())
            loss = (self.double_weight * loss_double + loss_commit + self.beta * loss_codebook
                    + self.entropy_weight * loss_entropy)
        return quantizer_output(self, quantized, indices, loss, z.shape, loss_double=loss_double, loss_commit=loss_commit,
                                loss_codebook=loss_codebook, loss_entropy=loss_entropy, entropy_per_sample=entropy_per_sample,
                                entropy_codebook=entropy_codebook)

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, H, W] -> c_i [B, C, H, W], the forward value of ``quantized``."""
        self.check_indices(indices)
        batch, height, width = indices.shape
        return tokens_to_latents(F.embedding(indices.reshape(-1).long(), self.codebook.float()), batch, height, width)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}, "
                f"entropy_weight={self.entropy_weight}, init={self.init!r}")


__all__ = ["IBQuantizer", "max_dot_product_indices"]
