"""Vector quantization (VQ-VAE / VQGAN), docs/method.md §2.

Tokens x_n in R^C (optionally projected to a low-dimensional lookup space e_n = P_in x_n in R^d
and l2-normalised there, LlamaGen-style) are replaced by their nearest code

    i_n = argmin_k ||e_n - c_k||^2 = argmin_k (||e_n||^2 - 2 e_n.c_k + ||c_k||^2)
    q_n = P_out( c_{i_n} + (e_n - stopgrad(e_n)) )         (identity straight-through estimator)

whose forward value is exactly P_out(c_{i_n}) and whose gradient w.r.t. e_n is the identity.

Losses (``QuantizerOutput.loss``):

    L_codebook = mean ||stopgrad(e_n) - c_{i_n}||^2        weight ``codebook_weight`` (1.0; not with ema=True)
    L_commit   = mean ||e_n - stopgrad(c_{i_n})||^2        weight ``beta`` (0.25)

With ``ema=True`` the codebook is not trained by gradients but by exponential moving averages
(decay gamma, Laplace-smoothed cluster sizes, statistics all-reduced across processes):

    N_k <- gamma N_k + (1 - gamma) n_k,      n_k = #{n : i_n = k}
    m_k <- gamma m_k + (1 - gamma) sum_{n : i_n = k} e_n
    N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j,     c_k = m_k / N~_k

The helpers ``nearest_code_indices`` and ``nearest_neighbour_chunk_size`` are shared with the
other nearest-neighbour quantizers (SimVQ). No N x K tensor larger than one chunk is ever alive.
"""
from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizer.quantizers.base import (Quantizer, QuantizerOutput, check_weight, fp32_quantizer_math, is_distributed,
                                       latents_to_tokens, nearest_code_indices, nearest_neighbour_chunk_size,
                                       quantizer_output, sample_codes_from_latents, tokens_to_latents)

VQ_INIT_METHODS = ("none", "random")


class VectorQuantizer(Quantizer):
    """Nearest-neighbour VQ with codebook + commitment losses and the identity STE (see module doc).

    Args:
        dim: latent channels C.  codebook_size: K >= 2.
        beta: commitment weight (0.25).  codebook_weight: codebook-loss weight (1.0, unused with ema).
        ema: train the codebook by EMA (decay ``ema_decay`` 0.99, Laplace ``ema_epsilon`` 1e-5)
            instead of gradients; the codebook parameter then has ``requires_grad=False``.
        codebook_dim: d < C for a low-dimensional lookup (linear C -> d in, d -> C out); None = look
            up in C directly (no projections).
        l2_normalize: l2-normalise lookup latents and codes (cosine-similarity lookup). The LlamaGen
            recipe is ``codebook_dim=8, l2_normalize=True``.
        reseed_dead, reseed_threshold, usage_ema_decay: optional dead-code re-seeding (off by default):
            an EMA of hard-code frequencies over the global batch is kept in training; a code whose
            EMA falls below ``reseed_threshold / K`` is reset to a random current lookup latent
            (DDP: rank 0 draws, then broadcasts).
        init: "random" (default: ``needs_init`` is True until ``init_from_latents`` copies K random encoder
            latents in, the data-driven init the trainer gives every quantizer that asks for it) or "none"
            (codes stay N(0, 1), or on the unit sphere with l2_normalize; prone to collapse: few codes lie
            near the latents and only those are ever trained).
        chunk_size: tokens per nearest-neighbour chunk; None = auto (chunk * K fp32 <= 64 MiB).

    The codebook (``codebook`` [K, d]) should be kept out of weight decay
    (``no_weight_decay_parameter_names``).
    """

    no_weight_decay_parameter_names = ("codebook",)

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        codebook_weight: float = 1.0,
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        codebook_dim: int | None = None,
        l2_normalize: bool = False,
        reseed_dead: bool = False,
        reseed_threshold: float = 0.01,
        usage_ema_decay: float = 0.99,
        init: str = "random",
        chunk_size: int | None = None,
    ):
        super().__init__(dim, codebook_size)
        self.beta = check_weight("beta", beta)
        self.codebook_weight = check_weight("codebook_weight", codebook_weight)
        self.reseed_threshold = check_weight("reseed_threshold", reseed_threshold)
        for name, value in (("ema_decay", ema_decay), ("usage_ema_decay", usage_ema_decay)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
        if not ema_epsilon > 0:
            raise ValueError(f"ema_epsilon must be > 0, got {ema_epsilon!r}")
        if codebook_dim is not None and int(codebook_dim) < 1:
            raise ValueError(f"codebook_dim must be None or >= 1, got {codebook_dim!r}")
        if init not in VQ_INIT_METHODS:
            raise ValueError(f"unknown init {init!r}; choose one of {VQ_INIT_METHODS}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be None (auto) or >= 1, got {chunk_size!r}")
        self.ema, self.ema_decay, self.ema_epsilon = bool(ema), float(ema_decay), float(ema_epsilon)
        self.l2_normalize = bool(l2_normalize)
        self.reseed_dead, self.usage_ema_decay = bool(reseed_dead), float(usage_ema_decay)
        self.init = init
        self.chunk_size = int(chunk_size) if chunk_size is not None else nearest_neighbour_chunk_size(codebook_size)
        self.lookup_dim = int(codebook_dim) if codebook_dim is not None else self.dim
        if codebook_dim is None:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        else:
            self.project_in, self.project_out = nn.Linear(self.dim, self.lookup_dim), nn.Linear(self.lookup_dim, self.dim)

        self.codebook = nn.Parameter(torch.randn(self.codebook_size, self.lookup_dim), requires_grad=not self.ema)
        self.register_buffer("initialised", torch.tensor(init == "none"))
        if self.ema:
            self.register_buffer("ema_cluster_size", torch.ones(self.codebook_size))
            self.register_buffer("ema_code_sum", self.codebook.detach().clone())
        if self.reseed_dead:
            self.register_buffer("usage_ema", torch.full((self.codebook_size,), 1.0 / self.codebook_size))

    # --- lookup space ---------------------------------------------------------------------------
    def lookup_latents(self, x: torch.Tensor) -> torch.Tensor:
        """e = P_in x, l2-normalised when ``l2_normalize``; x [N, C] -> [N, d]."""
        e = self.project_in(x)
        return F.normalize(e, dim=1, eps=1e-6) if self.l2_normalize else e

    def lookup_codes(self) -> torch.Tensor:
        """Codes in the lookup space (fp32, l2-normalised when ``l2_normalize``) [K, d]."""
        codes = self.codebook.float()
        return F.normalize(codes, dim=1, eps=1e-6) if self.l2_normalize else codes

    @torch.no_grad()
    def init_from_latents(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Copy K random encoder latents [N, C] (mapped to the lookup space) into the codebook.

        Sampling is without replacement when N >= K, else with replacement plus 1% noise.
        Deterministic given ``generator`` (default: seeded with 0). Call it with the same latents
        on every rank in DDP. Marks the quantizer initialised.
        """
        self.check_init_latents(latents)
        if generator is None:
            generator = torch.Generator(device=latents.device).manual_seed(0)
        with fp32_quantizer_math(latents.device.type):
            e = self.lookup_latents(latents.detach().float().to(self.codebook.device))
        codes = sample_codes_from_latents(e, self.codebook_size, generator)
        self.codebook.data.copy_(codes)
        if self.ema:
            self.ema_cluster_size.fill_(1.0)
            self.ema_code_sum.copy_(codes)
        self.initialised.fill_(True)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self.check_latents(z)
        with fp32_quantizer_math(z.device.type):
            e = self.lookup_latents(latents_to_tokens(z))
            if self.training and self.reseed_dead:
                self._reseed_dead_codes(e.detach())
            codes = self.lookup_codes()
            indices = nearest_code_indices(e.detach(), codes.detach(), self.chunk_size)
            hard = F.embedding(indices, codes)  # gradient reaches the codebook (codebook loss)
            loss_codebook = F.mse_loss(hard, e.detach())
            loss_commit = F.mse_loss(e, hard.detach())
            quantized = self.project_out(hard.detach() + (e - e.detach()))
            loss = self.beta * loss_commit
            if not self.ema:
                loss = loss + self.codebook_weight * loss_codebook
            terms = {"loss_codebook": loss_codebook, "loss_commit": loss_commit}
            if self.training and self.ema:
                self._ema_update(e.detach(), indices)
            if self.training and self.reseed_dead:
                self.update_usage_ema(indices)
                terms["dead_codes"] = self.dead_code_mask().sum().float()
        return quantizer_output(self, quantized, indices, loss, z.shape, **terms)

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, H, W] -> P_out(c_i) [B, C, H, W], the forward value of ``quantized``."""
        self.check_indices(indices)
        batch, height, width = indices.shape
        with fp32_quantizer_math(indices.device.type):
            codes = F.embedding(indices.reshape(-1).long(), self.lookup_codes())
            return tokens_to_latents(self.project_out(codes), batch, height, width)

    # --- EMA codebook and dead-code re-seeding ----------------------------------------------------
    @torch.no_grad()
    def _ema_update(self, e: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step with global-batch statistics (see module doc)."""
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros(self.codebook_size, e.shape[1], device=e.device).index_add_(0, indices, e)
        if is_distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_code_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.ema_epsilon) / (total + self.codebook_size * self.ema_epsilon) * total
        self.codebook.data.copy_(self.ema_code_sum / smoothed[:, None])

    @torch.no_grad()
    def _reseed_dead_codes(self, e: torch.Tensor) -> None:
        """Shared re-seeding (``Quantizer.reseed_dead_codes``) plus the EMA codebook state of the new codes."""
        dead, replacements = self.reseed_dead_codes(e)
        if self.ema and dead.numel():
            self.ema_cluster_size[dead] = 1.0
            self.ema_code_sum[dead] = replacements

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, lookup_dim={self.lookup_dim}, "
                f"l2_normalize={self.l2_normalize}, ema={self.ema}, beta={self.beta}, reseed_dead={self.reseed_dead}")


__all__ = ["VectorQuantizer"]
