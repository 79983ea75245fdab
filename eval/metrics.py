"""Every metric of the project, defined once (see docs in README "Metrics").

Codebook statistics are computed from a histogram of *hard* indices over a whole
evaluation set (``torch.bincount``), never from a single batch unless stated.
"""
from __future__ import annotations

import math

import torch


def code_histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts c_k = #{n : i_n = k}, k = 0..K-1, as an int64 tensor of length K."""
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(
            f"indices must lie in [0, {codebook_size}); got range "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    return torch.bincount(flat, minlength=codebook_size)


def entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_k p_k log p_k (nats), p_k = c_k / sum_j c_j; 0 log 0 := 0."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float64, device=counts.device)
    p = counts / total
    return -(p * torch.log(p.clamp_min(1e-300))).sum()


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Perplexity = exp(H(p)) of the empirical code distribution."""
    return torch.exp(entropy_from_counts(counts))


def codebook_statistics(counts: torch.Tensor, tokens_per_image: int | None = None) -> dict[str, float]:
    """Codebook statistics of METHOD.md section 4 from a histogram of hard indices.

    active codes   = #{k : c_k > 0}
    utilisation    = active / K
    perplexity     = exp(H(c / sum c))
    bits per token = log2(perplexity)          ("effective rate", entropy form)
    log2 active    = log2(active)              ("effective rate", support form)
    bits per image = bits per token * tokens per image (when tokens_per_image is given)
    """
    counts = counts.detach().cpu()
    K = counts.numel()
    active = int((counts > 0).sum())
    ppl = float(perplexity_from_counts(counts))
    stats = {
        "codebook_size": K,
        "num_tokens": int(counts.sum()),
        "active_codes": active,
        "utilisation": active / K,
        "perplexity": ppl,
        "bits_per_token": math.log2(ppl) if ppl > 0 else 0.0,
        "log2_active_codes": math.log2(active) if active > 0 else 0.0,
    }
    if tokens_per_image is not None:
        stats["bits_per_image"] = stats["bits_per_token"] * tokens_per_image
    return stats
