"""Softmax without denormal numbers: the tail far below a row's largest probability is exactly 0.

A peaked softmax (LGQ at small tau, IBQ's sharpened entropy, LFQ, a trained prior's logits) has most of
its probabilities at exp(l_k - max l) with l_k hundreds of nats below the maximum: below the smallest
normal fp32 number (``torch.finfo(torch.float32).tiny`` = 1.2e-38, exp(-87.3)) they are denormal, and
Intel and Apple cores compute on denormals at a small fraction of normal speed -- in the softmax itself
and in every product that reads p -- unless flush-to-zero is on in every thread (it is per thread, off by
default). Rather than depend on the thread state, the logits are truncated:

    s_nk = l_nk - max_j l_nj    if l_nk - max_j l_nj > -T,    else  -inf          (T = SOFTMAX_TAIL_NATS = 40)
    softmax(s)_nk = softmax(l)_nk renormalised over the kept entries; exactly 0 for the others.

Bounds (K entries per row, fp32): a dropped probability is < e^-T = 4.2e-18 of the row's largest, so a
row's dropped mass is < K e^-T (1.1e-12 at K = 2^18), far below fp32's resolution of 1 (2^-24 = 6e-8):
every sum over a row (sum_k p_k v_k, sum_k p_k^2, the normaliser) is unchanged up to fp32 rounding. A kept
probability is >= e^-T / K (1.6e-23 at K = 2^18), a normal number with headroom: its products with
gradients down to ~1e-15 stay normal too, so the backward pass of a softmax is denormal-free as well. The
truncation set is fixed per row, so the exact gradient of the truncated softmax is the usual softmax
backward with 0 at the dropped entries (``torch.threshold`` passes no gradient there).
"""
from __future__ import annotations

import torch

SOFTMAX_TAIL_NATS = 40.0  # T: logits more than T below their row's maximum get probability exactly 0


def drop_softmax_tail(logits: torch.Tensor, row_max: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """s = l - max_k l over the last dim, with s = -inf wherever s <= -T (module doc).

    ``softmax(s)`` / ``log_softmax(s)`` then equal those of l except for a tail of probability < e^-T times the
    row's largest, which is exactly 0 (-inf), so no probability is denormal. ``row_max`` [..., 1] if the caller
    has it (treated as a constant for autograd; default: the detached row maximum). ``out`` (no autograd):
    write s there, e.g. ``out=logits`` in place.
    """
    if row_max is None:
        row_max = logits.detach().amax(dim=-1, keepdim=True)
    if out is not None:
        return torch.threshold_(torch.sub(logits, row_max, out=out), -SOFTMAX_TAIL_NATS, float("-inf"))
    return torch.threshold(logits - row_max, -SOFTMAX_TAIL_NATS, float("-inf"))


def drop_log_probability_tail(log_probs: torch.Tensor) -> torch.Tensor:
    """log p with every entry <= -T set to -inf, for log-probabilities that are already normalised (their exp
    sums to 1 over the last dim, so max_k log p_k >= -log K): exp() of it has no probability in (0, e^-T) and
    no denormal; the dropped mass is < K e^-T, as for ``drop_softmax_tail``."""
    return torch.threshold(log_probs, -SOFTMAX_TAIL_NATS, float("-inf"))


__all__ = ["SOFTMAX_TAIL_NATS", "drop_softmax_tail", "drop_log_probability_tail"]
