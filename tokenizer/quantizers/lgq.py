"""Learnable Geometric Quantization (LGQ), docs/method.md §1.

Latents x_n in R^C (already normalised by the model's pre-quantizer norm, the same for every quantizer:
`tokenizer.modules.PreQuantizerNorm`) are softly assigned to K learnable
centres c_k by the posterior responsibilities of an isotropic Gaussian mixture

    l_nk = -||x_n - c_k||^2 / tau  =  (2 x_n.c_k - ||c_k||^2) / tau + const_n
    p_n  = softmax_k(l_n)

and quantized with the soft-to-hard straight-through estimator

    q_soft,n = sum_k p_nk c_k
    i_n      = argmax_k p_nk                 (= nearest centre for euclidean logits)
    q_n      = q_soft,n + stopgrad(c_{i_n} - q_soft,n)

so the forward value is the hard centre while gradients flow through q_soft to the latents
*and* to the centres (d q_n / d x_n = (2/tau) Cov_{p_n}(c), not the identity).

Losses (already weighted, summed into ``QuantizerOutput.loss``):

    L_q     = MSE(q, x)                              weight ``quant_loss_weight`` (1.0)
    L_peak  = mean_n (1 - sum_k p_nk^2)              weight ``peak_weight``       (0.005)
    L_usage = K * sum_k u_k^2,  u = mean_n p_n       weight ``usage_weight``      (0.005)
    L_floor = relu(p_min - exp H(u))^2               weight ``usage_floor_weight``, only if usage_floor=p_min

u is the usage over the *global* batch in training: the per-process sums of p are all-reduced with the
differentiable ``all_reduce_sum`` and divided by the global token count (``Quantizer.global_sum`` /
``global_count``). Eval-mode forwards use the local batch and call no collective.

Memory: nothing of size N x K is ever alive. The soft path (q_soft, sum_k p_nk^2, sum_n p_n) runs
in chunks of tokens inside ``SoftAssignment`` (a custom autograd Function) whose backward
recomputes each chunk's probabilities from the saved inputs and per-token log-normalisers, so
peak memory grows with chunk * K.

``lgq_dense_reference`` is the plain autograd implementation over full N x K tensors; the tests
and ``experiments/bench_quantizers.py`` compare the chunked module against it.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from common.softmax import drop_softmax_tail
from tokenizer.quantizers.base import (Quantizer, QuantizerOutput, fp32_quantizer_math, nearest_code_indices,
                                       nearest_neighbour_chunk_size, sample_codes_from_latents)

TAU_SCHEDULES = ("linear", "cosine", "constant")
LOGIT_KINDS = ("euclidean", "cosine", "dot")
INIT_METHODS = ("random", "kmeans++", "lloyd")
auto_chunk_size = nearest_neighbour_chunk_size  # tokens per chunk: one [chunk, K] fp32 block stays ~<= 64 MiB


def tau_at_progress(progress: float, tau_start: float, tau_end: float, schedule: str) -> float:
    """Temperature at training progress p in [0, 1].

    linear:   tau = tau_start + p (tau_end - tau_start)
    cosine:   tau = tau_end + (tau_start - tau_end) (1 + cos(pi p)) / 2
    constant: tau = tau_start
    """
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":
        return tau_start + p * (tau_end - tau_start)
    if schedule == "cosine":
        return tau_end + 0.5 * (tau_start - tau_end) * (1.0 + math.cos(math.pi * p))
    if schedule == "constant":
        return tau_start
    raise ValueError(f"unknown tau_schedule {schedule!r}; choose one of {TAU_SCHEDULES}")


def logit_operands(x: torch.Tensor, centres: torch.Tensor, kind: str):
    """Express every logit kind as l_nk = (query_n . key_k + bias_k) / tau with value_k = c_k.

    euclidean: query = x,      key = 2 c,     bias = -||c||^2   (l = -||x - c||^2 / tau + const_n)
    dot:       query = x,      key = c,       bias = 0
    cosine:    query = x/|x|,  key = c/|c|,   bias = 0
    The value (what q_soft averages) is always the raw centre c_k.
    """
    if kind == "euclidean":
        return x, 2.0 * centres, -(centres * centres).sum(1), centres
    zeros = centres.new_zeros(centres.shape[0])
    if kind == "dot":
        return x, centres, zeros, centres
    if kind == "cosine":
        return F.normalize(x, dim=1, eps=1e-6), F.normalize(centres, dim=1, eps=1e-6), zeros, centres
    raise ValueError(f"unknown logits {kind!r}; choose one of {LOGIT_KINDS}")


class SoftAssignment(torch.autograd.Function):
    """Chunked soft path of LGQ with recomputation in backward.

    Forward, with l_nk = (query_n . key_k + bias_k) * inv_tau and p_n = softmax_k(l_n) without its denormal
    tail (``common.softmax.drop_softmax_tail``: p_nk = 0 exactly where l_nk <= max_j l_nj - T, T = 40, a dropped mass
    < K e^-40, invisible in fp32; docs/method.md §6), returns
        q_soft [N, C'] = p @ values,  p_sq [N] = sum_k p_nk^2,  usage_sum [K] = sum_n p_nk,
        indices [N] = argmax_k l_nk,  max_prob [N] = max_k p_nk      (last two non-differentiable).
    Saved for backward: the inputs and the (small) outputs q_soft and p_sq -- never an N x K tensor.

    Backward, for upstream gradients G_q [N, C'], g_s [N], g_u [K], per chunk of tokens:
        p_nk  = softmax_k(l_nk), the same tail dropped              (recomputed)
        g_nk  = G_q,n . v_k + g_u,k + 2 p_nk g_s,n                  (dL/dp_nk)
        <p,g>_n = G_q,n . q_soft,n + p_n . g_u + 2 g_s,n p_sq,n
        dl_nk = p_nk (g_nk - <p,g>_n)                                (softmax backward)
        dL/dquery = inv_tau dl @ key,  dL/dkey = inv_tau dl^T @ query,
        dL/dbias  = inv_tau sum_n dl_n,  dL/dvalues = p^T @ G_q.

    CPU performance notes (the soft path is memory-bound): biases and per-token terms enter the
    chunk matmuls as extra columns ([x, 1] . [k, b]) so each [chunk, K] block is written once by
    the GEMM; p comes from the fused softmax kernel; no p is denormal whatever the thread's
    flush-to-zero state (denormals cost Intel and Apple cores several times in the softmax and in
    every GEMM that reads p); the [chunk, K] work buffers are allocated once per call and reused
    (fresh 64 MiB allocations per chunk cost page faults).
    """

    @staticmethod
    def forward(ctx, query, keys, bias, values, inv_tau: float, chunk_size: int):
        num_tokens, num_codes = query.shape[0], keys.shape[0]
        q_soft = query.new_empty(num_tokens, values.shape[1])
        p_sq = query.new_empty(num_tokens)
        usage_sum = query.new_zeros(num_codes)
        indices = torch.empty(num_tokens, dtype=torch.long, device=query.device)
        max_prob = query.new_empty(num_tokens)
        query_one, keys_bias_t = _augmented_logit_operands(query, keys, bias, inv_tau)
        rows = min(chunk_size, num_tokens)
        logits_buffer, prob_buffer = query.new_empty(rows, num_codes), query.new_empty(rows, num_codes)
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            logits = torch.mm(query_one[start:stop], keys_bias_t, out=logits_buffer[: stop - start])  # [n, K]
            row_max, row_arg = logits.max(dim=1, keepdim=True)
            prob = torch.softmax(drop_softmax_tail(logits, row_max, out=logits), dim=1, out=prob_buffer[: stop - start])
            torch.mm(prob, values, out=q_soft[start:stop])
            p_sq[start:stop] = torch.bmm(prob[:, None, :], prob[:, :, None]).reshape(-1)
            usage_sum.addmv_(prob.t(), prob.new_ones(stop - start))
            indices[start:stop] = row_arg.squeeze(1)
            max_prob[start:stop] = prob.gather(1, row_arg).squeeze(1)
        del logits_buffer, prob_buffer
        ctx.save_for_backward(query, keys, bias, values, q_soft, p_sq)
        ctx.inv_tau = float(inv_tau)
        ctx.chunk_size = int(chunk_size)
        ctx.mark_non_differentiable(indices, max_prob)
        return q_soft, p_sq, usage_sum, indices, max_prob

    @staticmethod
    def backward(ctx, grad_q_soft, grad_p_sq, grad_usage, _grad_indices, _grad_max_prob):
        query, keys, bias, values, q_soft, p_sq = ctx.saved_tensors
        inv_tau, chunk_size = ctx.inv_tau, ctx.chunk_size
        need_query, need_keys, need_bias, need_values = ctx.needs_input_grad[:4]
        num_tokens, num_codes = query.shape[0], keys.shape[0]
        grad_query = torch.empty_like(query) if need_query else None
        grad_keys_bias = query.new_zeros(num_codes, query.shape[1] + 1) if (need_keys or need_bias) else None
        grad_values = torch.zeros_like(values) if need_values else None
        query_one, keys_bias_t = _augmented_logit_operands(query, keys, bias, inv_tau)
        # g_nk - <p,g>_n without its 2 p g_s part = [G_q,n, -<p,g>_n, 1] . [v_k, 1, g_u,k]
        ones_column = values.new_ones(num_codes, 1)
        values_aug_t = torch.cat([values, ones_column, grad_usage[:, None]], dim=1).t()
        grad_rows = torch.cat([grad_q_soft, torch.zeros_like(p_sq)[:, None], torch.ones_like(p_sq)[:, None]], dim=1)
        inner_fixed = torch.linalg.vecdot(grad_q_soft, q_soft) + 2.0 * grad_p_sq * p_sq
        two_grad_p_sq = 2.0 * grad_p_sq
        peak_grad = bool(grad_p_sq.any())
        rows = min(chunk_size, num_tokens)
        work_buffer, prob_buffer = query.new_empty(rows, num_codes), query.new_empty(rows, num_codes)
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            logits = torch.mm(query_one[start:stop], keys_bias_t, out=work_buffer[: stop - start])
            prob = torch.softmax(drop_softmax_tail(logits, out=logits), dim=1, out=prob_buffer[: stop - start])
            grad_rows_chunk = grad_rows[start:stop]
            grad_rows_chunk[:, -2] = -(torch.mv(prob, grad_usage) + inner_fixed[start:stop])  # -<p,g>_n
            grad_logits = torch.mm(grad_rows_chunk, values_aug_t, out=work_buffer[: stop - start])
            if peak_grad:
                grad_logits.addcmul_(prob, two_grad_p_sq[start:stop, None])
            grad_logits.mul_(prob)  # dl_nk
            if need_query:
                torch.mm(grad_logits, keys, out=grad_query[start:stop])
            if grad_keys_bias is not None:  # [dL/dkey | dL/dbias] += dl^T @ [x, 1]
                grad_keys_bias.addmm_(grad_logits.t(), query_one[start:stop])
            if need_values:
                grad_values.addmm_(prob.t(), grad_q_soft[start:stop])
        del work_buffer, prob_buffer
        if need_query:
            grad_query.mul_(inv_tau)
        grad_keys = grad_keys_bias[:, :-1].mul(inv_tau) if need_keys else None
        grad_bias = grad_keys_bias[:, -1].mul(inv_tau) if need_bias else None
        return grad_query, grad_keys, grad_bias, grad_values, None, None


def _augmented_logit_operands(query, keys, bias, inv_tau: float):
    """[x, 1] [N, C+1] and ([k, b] * inv_tau)^T [C+1, K]: one GEMM gives l = (x.k + b) * inv_tau."""
    query_one = torch.cat([query, query.new_ones(query.shape[0], 1)], dim=1)
    keys_bias_t = (torch.cat([keys, bias[:, None]], dim=1) * inv_tau).t()
    return query_one, keys_bias_t


def lgq_dense_reference(x: torch.Tensor, centres: torch.Tensor, tau: float, logits: str = "euclidean") -> dict:
    """Plain LGQ over full N x K tensors with ordinary autograd (reference for tests and benchmark).

    x [N, C] are the (already normalised) latents, centres [K, C]. Returns the straight-through
    output ``quantized``, ``q_soft``, ``indices``, the probabilities ``probs`` [N, K], the global
    usage ``usage`` [K] and the unweighted losses ``loss_quant``, ``loss_peak``, ``loss_usage``.
    Memory: several N x K fp32 tensors (1 GiB each at N = K = 16384).
    """
    if logits == "euclidean":
        sq_dist = (x * x).sum(1, keepdim=True) - 2.0 * x @ centres.t() + (centres * centres).sum(1)[None, :]
        scores = -sq_dist / tau
    elif logits == "dot":
        scores = x @ centres.t() / tau
    elif logits == "cosine":
        scores = F.normalize(x, dim=1, eps=1e-6) @ F.normalize(centres, dim=1, eps=1e-6).t() / tau
    else:
        raise ValueError(f"unknown logits {logits!r}; choose one of {LOGIT_KINDS}")
    probs = torch.softmax(scores, dim=1)
    indices = scores.argmax(dim=1)
    q_soft = probs @ centres
    quantized = q_soft + (centres[indices] - q_soft).detach()
    usage = probs.mean(dim=0)
    return {
        "quantized": quantized,
        "q_soft": q_soft,
        "indices": indices,
        "probs": probs,
        "usage": usage,
        "loss_quant": F.mse_loss(quantized, x),
        "loss_peak": (1.0 - (probs * probs).sum(1)).mean(),
        "loss_usage": centres.shape[0] * (usage * usage).sum(),
    }


class LGQuantizer(Quantizer):
    """LGQ: soft-to-hard straight-through quantization with learnable geometry (see module doc).

    Args:
        dim: latent channels C.  codebook_size: K >= 2.
        tau_start, tau_end, tau_schedule: temperature schedule over training progress
            ("linear" default, "cosine", "constant"); ``set_progress(p)`` updates the ``tau`` buffer.
        tau_anneal_steps, tau_anneal_epochs: the schedule's horizon (at most one; see ``schedule_progress``):
            tau reaches tau_end after that many optimiser steps, or per epoch as the authors do (tau constant
            within an epoch, tau_end from epoch E on); neither = over the whole run (``train.max_steps``).
        logits: "euclidean" (the method), "cosine" or "dot" (ablations).
        quant_loss_weight, peak_weight, usage_weight: loss weights (1.0, 0.005, 0.005).
        usage_floor: p_min in codes; adds ``usage_floor_weight * relu(p_min - exp H(u))^2``
            (off by default; note the term is in squared codes, so use a small weight).
        init: data-driven initialisation used by ``init_from_latents``: "random" (K random
            latents), "kmeans++" (D^2 sampling, O(N K C)) or "lloyd" (random + ``init_lloyd_steps``
            k-means steps). Before it is called the centres are N(0, I) (the scale of LayerNormed latents).
        reseed_dead, reseed_threshold, usage_ema_decay: optional dead-centre re-seeding (off by
            default for fidelity): during training an EMA of the hard-code frequency (global batch)
            is kept; a centre whose EMA falls below ``reseed_threshold / K`` is reset to a random
            current latent (DDP: rank 0 picks the latents and broadcasts them). Optimizer moments of
            re-seeded centres are not reset.
        chunk_size: tokens per chunk of the soft path; None = auto (chunk * K fp32 <= 64 MiB).

    The codebook is the parameter ``codebook`` [K, C]; keep it out of weight decay
    (``no_weight_decay_parameter_names``): AdamW decay shrinks unused centres toward 0.
    """

    no_weight_decay_parameter_names = ("codebook",)

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        tau_start: float = 1.0,
        tau_end: float = 0.1,
        tau_schedule: str = "linear",
        tau_anneal_steps: int | None = None,
        tau_anneal_epochs: int | None = None,
        logits: str = "euclidean",
        quant_loss_weight: float = 1.0,
        peak_weight: float = 0.005,
        usage_weight: float = 0.005,
        usage_floor: float | None = None,
        usage_floor_weight: float = 0.005,
        init: str = "random",
        init_lloyd_steps: int = 10,
        reseed_dead: bool = False,
        reseed_threshold: float = 0.01,
        usage_ema_decay: float = 0.99,
        chunk_size: int | None = None,
    ):
        super().__init__(dim, codebook_size)
        for name, value in (("tau_start", tau_start), ("tau_end", tau_end)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"unknown tau_schedule {tau_schedule!r}; choose one of {TAU_SCHEDULES}")
        for name, value in (("tau_anneal_steps", tau_anneal_steps), ("tau_anneal_epochs", tau_anneal_epochs)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        if tau_anneal_steps is not None and tau_anneal_epochs is not None:
            raise ValueError("set at most one of tau_anneal_steps and tau_anneal_epochs (the schedule's horizon), "
                             f"got {tau_anneal_steps} and {tau_anneal_epochs}")
        if logits not in LOGIT_KINDS:
            raise ValueError(f"unknown logits {logits!r}; choose one of {LOGIT_KINDS}")
        if init not in INIT_METHODS:
            raise ValueError(f"unknown init {init!r}; choose one of {INIT_METHODS}")
        for name, value in (("quant_loss_weight", quant_loss_weight), ("peak_weight", peak_weight),
                            ("usage_weight", usage_weight), ("usage_floor_weight", usage_floor_weight),
                            ("reseed_threshold", reseed_threshold)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if usage_floor is not None and not (math.isfinite(usage_floor) and usage_floor > 0):
            raise ValueError(f"usage_floor must be None or a number > 0 (a perplexity in codes), got {usage_floor!r}")
        if not 0.0 <= usage_ema_decay < 1.0:
            raise ValueError(f"usage_ema_decay must lie in [0, 1), got {usage_ema_decay!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be None (auto) or >= 1, got {chunk_size!r}")
        if int(init_lloyd_steps) < 0:
            raise ValueError(f"init_lloyd_steps must be >= 0, got {init_lloyd_steps!r}")
        self.tau_start, self.tau_end, self.tau_schedule = float(tau_start), float(tau_end), tau_schedule
        self.tau_anneal_steps, self.tau_anneal_epochs = tau_anneal_steps, tau_anneal_epochs
        self.logits = logits
        self.quant_loss_weight, self.peak_weight, self.usage_weight = quant_loss_weight, peak_weight, usage_weight
        self.usage_floor, self.usage_floor_weight = usage_floor, usage_floor_weight
        self.init, self.init_lloyd_steps = init, int(init_lloyd_steps)
        self.reseed_dead, self.reseed_threshold, self.usage_ema_decay = bool(reseed_dead), reseed_threshold, usage_ema_decay
        self.chunk_size = int(chunk_size) if chunk_size is not None else auto_chunk_size(self.codebook_size)

        self.codebook = torch.nn.Parameter(torch.randn(self.codebook_size, self.dim))
        self.register_buffer("tau", torch.tensor(float(tau_start)))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("usage_ema", torch.full((self.codebook_size,), 1.0 / self.codebook_size))

    # --- schedule / init hooks ----------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """Set tau from the schedule at training progress in [0, 1] (values outside are clamped)."""
        if not math.isfinite(float(progress)):
            raise ValueError(f"progress must be a finite float in [0, 1], got {progress!r}")
        self.tau.fill_(tau_at_progress(progress, self.tau_start, self.tau_end, self.tau_schedule))

    def schedule_progress(self, step: int, max_steps: int, steps_per_epoch: int | None = None) -> float:
        """Progress p in [0, 1] of the tau schedule before optimisation step s (0-based):

            tau_anneal_steps S:   p = min(1, s / S)                                     per step, whatever the run length
            tau_anneal_epochs E:  p = min(1, floor(s / steps_per_epoch) / max(E - 1, 1))  per epoch (the authors'
                                  ``update_model_for_epoch``: epoch e = 1..E gets p = (e - 1) / (E - 1))
            neither:              p = min(1, s / max_steps)                             over the whole run
        """
        if self.tau_anneal_steps is not None:
            return min(1.0, step / self.tau_anneal_steps)
        if self.tau_anneal_epochs is not None:
            if not steps_per_epoch:
                raise ValueError("tau_anneal_epochs needs the number of steps per epoch, which this data stream "
                                 "does not have (no length): use tau_anneal_steps")
            return min(1.0, (step // steps_per_epoch) / max(self.tau_anneal_epochs - 1, 1))
        return min(1.0, step / max(1, max_steps))

    def set_training_step(self, step: int, max_steps: int, steps_per_epoch: int | None = None) -> None:
        """tau from the schedule at ``schedule_progress(step, max_steps, steps_per_epoch)``."""
        self.set_progress(self.schedule_progress(step, max_steps, steps_per_epoch))

    def schedule_description(self) -> str:
        """One line for model cards: the tau schedule and its horizon."""
        if self.tau_schedule == "constant":
            return f"tau constant {self.tau_start:g}"
        horizon = (f"over {self.tau_anneal_steps} steps" if self.tau_anneal_steps is not None else
                   f"per epoch over {self.tau_anneal_epochs} epochs" if self.tau_anneal_epochs is not None else
                   "over the whole run")
        return f"tau {self.tau_schedule} {self.tau_start:g} -> {self.tau_end:g} {horizon}"

    @torch.no_grad()
    def init_from_latents(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise the centres from encoder latents [N, C] (the quantizer's inputs, as in forward).

        Deterministic given the latents and ``generator`` (default: a fresh generator seeded
        with 0 on the latents' device). In DDP, call it on every rank with the *same* latents
        (e.g. ``accelerator.gather`` of each rank's first-batch latents) -- or on rank 0 only and
        then broadcast the codebook and the ``initialised`` buffer. Marks the quantizer
        initialised so a resumed run does not re-initialise (``needs_init`` becomes False).
        With fewer latents than K it warns and samples with replacement plus small noise.
        """
        self.check_init_latents(latents)
        if generator is None:
            generator = torch.Generator(device=latents.device).manual_seed(0)
        x = latents.detach().to(device=generator.device, dtype=torch.float32)
        num_latents, num_codes = x.shape[0], self.codebook_size
        if num_latents < num_codes:
            warnings.warn(
                f"LGQ init: only {num_latents} latents for K={num_codes} centres; sampling with replacement "
                f"plus small noise (pass at least K latents for a proper {self.init!r} init)",
                stacklevel=2,
            )
            centres = sample_codes_from_latents(x, num_codes, generator)
        elif self.init == "kmeans++":
            centres = _kmeans_plus_plus(x, num_codes, generator)
        else:
            centres = sample_codes_from_latents(x, num_codes, generator)
            if self.init == "lloyd":
                centres = _lloyd_steps(x, centres, self.init_lloyd_steps, self.chunk_size)
        self.codebook.data.copy_(centres.to(self.codebook.device, self.codebook.dtype))
        self.usage_ema.fill_(1.0 / num_codes)
        self.initialised.fill_(True)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self.check_latents(z)
        batch, channels, height, width = z.shape
        with fp32_quantizer_math(z.device.type):
            x = z.float().permute(0, 2, 3, 1).reshape(-1, channels)
            if self.training and self.reseed_dead:
                self.reseed_dead_codes(x.detach())
            centres = self.codebook.float()
            q_soft, p_sq, usage_sum, indices, max_prob = self._soft_assignment(x, centres)
            hard = F.embedding(indices, centres.detach())
            quantized = q_soft + (hard - q_soft).detach()
            usage = self._global_usage(usage_sum, x.shape[0])
            loss_quant = F.mse_loss(quantized, x)
            loss_peak = (1.0 - p_sq).mean()
            loss_usage = self.codebook_size * (usage * usage).sum()
            soft_entropy = -(usage * usage.clamp_min(1e-30).log()).sum()
            soft_perplexity = soft_entropy.exp()
            loss = self.quant_loss_weight * loss_quant + self.peak_weight * loss_peak + self.usage_weight * loss_usage
            stats = {
                "tau": self.tau.detach().clone().float(),
                **self.hard_stats(indices),
                "mean_max_prob": max_prob.mean().detach(),  # sharpness: mean_n max_k p_nk
                "mean_sum_p_sq": p_sq.mean().detach(),      # sharpness: mean_n sum_k p_nk^2 (1 = one-hot)
                # geometry: mean_n ||x_n - mean x||^2 and mean_k ||c_k - mean c||^2 (latents vs centres)
                "latent_spread": x.detach().var(0, unbiased=False).sum(),
                "codebook_spread": centres.detach().var(0, unbiased=False).sum(),
                "ste_gain": self.straight_through_gain(x.detach(), centres.detach()),
                "soft_perplexity": soft_perplexity.detach(),
                "loss_quant": loss_quant.detach(),
                "loss_peak": loss_peak.detach(),
                "loss_usage": loss_usage.detach(),
            }
            if self.usage_floor is not None:
                loss_floor = F.relu(self.usage_floor - soft_perplexity) ** 2
                loss = loss + self.usage_floor_weight * loss_floor
                stats["loss_usage_floor"] = loss_floor.detach()
            if self.training and self.reseed_dead:
                self.update_usage_ema(indices)
                stats["dead_codes"] = self.dead_code_mask().sum().float()

        quantized = quantized.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(quantized, indices.reshape(batch, height, width), loss, stats)

    STE_GAIN_TOKENS = 512  # tokens of the batch the straight-through gain statistic is measured on

    @torch.no_grad()
    def straight_through_gain(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """How much of the decoder's gradient the soft-to-hard estimator passes to the encoder, relative to the
        identity of VQ's / FSQ's straight-through (1 = as much): the mean eigenvalue of dq~_n/dquery_n,

            gain = mean_n (1 / (tau C)) sum_k p_nk (v_k - q~_n) . (key_k - sum_j p_nj key_j)

        over the first ``STE_GAIN_TOKENS`` tokens (``logit_operands``: Euclidean logits, key = 2c, give
        (2 / (tau C)) tr Cov_{p_n}(c), docs/method.md §1; cosine logits: w.r.t. the normalised query)."""
        query, keys, bias, values = logit_operands(x[:self.STE_GAIN_TOKENS], centres, self.logits)
        inv_tau = 1.0 / float(self.tau)
        p = torch.softmax(drop_softmax_tail((query @ keys.T + bias) * inv_tau), dim=1)
        q_soft, key_mean = p @ values, p @ keys
        trace = p @ (values * keys).sum(1) - (q_soft * key_mean).sum(1)
        return (inv_tau * trace).mean() / x.shape[1]

    def _soft_assignment(self, x: torch.Tensor, centres: torch.Tensor):
        query, keys, bias, values = logit_operands(x, centres, self.logits)
        return SoftAssignment.apply(query, keys, bias, values, 1.0 / float(self.tau), self.chunk_size)

    def _global_usage(self, usage_sum: torch.Tensor, local_tokens: int) -> torch.Tensor:
        """u_k = (sum over processes of sum_n p_nk) / global token count; differentiable. Over the local
        batch in eval mode (``syncs_across_processes``)."""
        return self.global_sum(usage_sum) / self.global_count(local_tokens, usage_sum.device)

    def soft_usage(self, z: torch.Tensor) -> torch.Tensor:
        """Soft usage u [K] = mean_n p_n for latents z [B, C, H, W], over the global batch (all processes)
        in training mode, over the local batch in eval mode.

        Differentiable, like the u inside ``forward``; in training mode under DDP it is a collective (call
        it on every rank).
        """
        self.check_latents(z)
        with fp32_quantizer_math(z.device.type):
            x = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            usage_sum = self._soft_assignment(x, self.codebook.float())[2]
            return self._global_usage(usage_sum, x.shape[0])

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, H, W] int64 -> centres [B, C, H, W] (the forward value of ``quantized``)."""
        self.check_indices(indices)
        return F.embedding(indices.long(), self.codebook).permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, logits={self.logits}, tau={float(self.tau):.4g} "
                f"({self.tau_schedule} {self.tau_start:g}->{self.tau_end:g}), "
                f"chunk_size={self.chunk_size}")


def _kmeans_plus_plus(x: torch.Tensor, num_codes: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    centres = x.new_empty(num_codes, x.shape[1])
    first = int(torch.randint(x.shape[0], (1,), generator=generator, device=x.device))
    centres[0] = x[first]
    sq_dist = ((x - centres[0]) ** 2).sum(1)
    for k in range(1, num_codes):
        weights = sq_dist if float(sq_dist.sum()) > 0 else torch.ones_like(sq_dist)
        pick = torch.multinomial(weights, 1, generator=generator)
        centres[k] = x[pick[0]]
        torch.minimum(sq_dist, ((x - centres[k]) ** 2).sum(1), out=sq_dist)
    return centres


def _lloyd_steps(x: torch.Tensor, centres: torch.Tensor, steps: int, chunk_size: int) -> torch.Tensor:
    """``steps`` k-means (Lloyd) iterations; a centre with no assigned latent keeps its position."""
    for _ in range(steps):
        assign = nearest_code_indices(x, centres, chunk_size)
        counts = torch.bincount(assign, minlength=centres.shape[0]).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres = torch.where(filled[:, None], sums / counts.clamp_min(1.0)[:, None], centres)
    return centres


__all__ = ["LGQuantizer", "SoftAssignment", "lgq_dense_reference", "tau_at_progress", "auto_chunk_size"]
