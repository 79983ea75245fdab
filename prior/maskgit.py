"""MaskGIT prior: a bidirectional transformer over a class token and h*w image tokens.

Backbone: transformers ``BertModel`` built from a ``BertConfig`` (no hub access), as in the
original MaskGIT (a BERT-style post-norm encoder). One embedding table holds

    ids 0..K-1            image tokens
    id  K                 the mask token (input only: the output head has K entries, the mask is never predicted)
    ids K+1 .. K+1+C      class tokens, C = num_classes, the last one (K+1+C) is the "null" class used for
                          classifier-free guidance (label dropout trains it)

The input sequence is [class token, t_1, ..., t_L] (L = h*w) with learned absolute positions;
logits for t_i are read at position i: logits = F.linear(MLM(h_i), E[:K]) + b, i.e. the output
layer shares the token embedding E without tying parameters (safetensors refuses tied weights).

Training (``masking_loss``): per sample u ~ U(0, 1), mask ratio r = cos(pi u / 2),
n = clamp(ceil(r L), 1, L) positions chosen uniformly at random are replaced by the mask id and
the loss is the cross-entropy on those masked positions only:

    loss = sum_{b,i} m_bi CE(logits_bi, x_bi) / sum_{b,i} m_bi.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import BertConfig, BertModel

from prior.base import TokenGridGenerator, check_prior_hyperparameters, drop_labels, uniform
from prior.scheduler import apply_guidance
from prior.tokens import check_class_labels, check_token_grid, normalize_grid_size


class MaskGITPrior(TokenGridGenerator, ModelMixin, ConfigMixin):
    """Class-conditional MaskGIT over token grids [B, h, w] with values in [0, K).

    Args:
        codebook_size: K (the mask token id is K).
        num_classes: C (the null class index is C).
        grid_size: h (square) or (h, w).
        hidden_size, num_layers, num_heads, mlp_ratio: transformer width / depth / heads / FFN ratio.
        dropout: hidden and attention dropout.
        label_dropout: probability of replacing a label by the null class during training (CFG).
        class_names: optional name of each class (length num_classes), from the training data; the
            pipeline's ``id2label`` / ``get_label_ids`` read it.
    """

    decoding = "maskgit"  # prior.sampling: decoded by iterative unmasking (MaskGITScheduler)

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 1024,
        num_classes: int = 1000,
        grid_size: int | tuple[int, int] = 16,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        label_dropout: float = 0.1,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        check_prior_hyperparameters(codebook_size, num_classes, hidden_size, num_heads, label_dropout, class_names)
        self.codebook_size = int(codebook_size)
        self.num_classes = int(num_classes)
        self.grid_size = normalize_grid_size(grid_size)
        self.seq_len = self.grid_size[0] * self.grid_size[1]
        self.mask_token_id = self.codebook_size
        self.null_class = self.num_classes
        self.class_offset = self.codebook_size + 1
        bert_config = BertConfig(
            vocab_size=self.codebook_size + 1 + self.num_classes + 1,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=int(round(mlp_ratio * hidden_size)),
            hidden_act="gelu",
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            max_position_embeddings=self.seq_len + 1,
            type_vocab_size=1,
            layer_norm_eps=1e-6,
        )
        self.transformer = BertModel(bert_config, add_pooling_layer=False)
        self.mlm_dense = nn.Linear(hidden_size, hidden_size)
        self.mlm_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.output_bias = nn.Parameter(torch.zeros(self.codebook_size))

    # ------------------------------------------------------------------ model
    def forward(self, tokens: torch.Tensor, class_labels: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] or [B, h, w] in [0, K] (K = mask), class_labels [B] in [0, C] (C = null) -> logits [B, L, K].

        positions: optional bool [B, L]; then only the selected positions go through the output head and
        the logits are [M, K] (M = positions.sum(), row-major): decoding needs the masked positions only."""
        return self.output_head(self.head_input(tokens, class_labels, positions))

    def output_head(self, head_input: torch.Tensor) -> torch.Tensor:
        """The affine map from ``head_input`` h [..., D] to logits: l = h E^T + b (E the tied token embeddings of
        the K codes, b [K] the output bias)."""
        token_embedding = self.transformer.embeddings.word_embeddings.weight[: self.codebook_size]
        return F.linear(head_input, token_embedding, self.output_bias)

    @torch.no_grad()
    def init_output_bias(self, code_counts) -> None:
        """b_k = log((c_k + 1) / (N + K)), N = sum_k c_k: the output bias set to the add-one smoothed log unigram
        frequencies of the training tokens (``code_counts`` [K], e.g. TokenDataset.code_counts()), so training
        starts at the unigram distribution with every code never seen at log(1 / (N + K)), instead of spreading
        the first steps' probability over all K codes (model.output_bias_init=unigram)."""
        counts = torch.as_tensor(code_counts, dtype=torch.float64).reshape(-1)
        if counts.numel() != self.codebook_size or bool((counts < 0).any()):
            raise ValueError(f"code_counts must be {self.codebook_size} non-negative counts (one per code), got "
                             f"{counts.numel()} values")
        log_frequency = torch.log((counts + 1.0) / (counts.sum() + self.codebook_size))
        self.output_bias.copy_(log_frequency.to(self.output_bias))

    def head_input(self, tokens: torch.Tensor, class_labels: torch.Tensor,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
        """h = LN(gelu(W_d x_L + b_d)) [B, L, D] (or [M, D] at ``positions``): the transformer's last hidden states
        after the MLM transform, what ``output_head`` maps to logits (arguments as in ``forward``)."""
        tokens = check_token_grid(tokens, self.codebook_size, self.grid_size, allow_mask=True)
        labels = torch.as_tensor(class_labels, device=tokens.device)
        if labels.dtype.is_floating_point or labels.shape != (tokens.shape[0],):
            raise ValueError(f"class_labels must be integer [B={tokens.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) > self.null_class:
            raise ValueError(f"class labels must lie in [0, {self.num_classes}) (or {self.null_class} = null class)")
        tokens = tokens.to(self.device)
        class_ids = (labels.long().to(self.device) + self.class_offset).unsqueeze(1)
        input_ids = torch.cat([class_ids, tokens], dim=1)
        hidden = self.transformer(input_ids=input_ids).last_hidden_state[:, 1:]
        if positions is not None:
            if positions.dtype != torch.bool or positions.numel() != tokens.numel() or positions.shape[0] != tokens.shape[0]:
                raise ValueError(f"positions must be a bool mask shaped like the tokens {tuple(tokens.shape)}, "
                                 f"got {positions.dtype} {tuple(positions.shape)}")
            hidden = hidden[positions.reshape(tokens.shape).to(hidden.device)]
        return self.mlm_norm(F.gelu(self.mlm_dense(hidden)))

    # ------------------------------------------------------------------ training
    def mask_tokens(self, tokens: torch.Tensor, generator: torch.Generator | None = None):
        """Cosine masking: per sample r = cos(pi u / 2), u ~ U(0,1); n = clamp(ceil(r L), 1, L) random positions.

        Returns (masked tokens [B, L] with the mask id at masked positions, mask [B, L] bool, r [B]).
        """
        B, L = tokens.shape
        u = uniform((B,), generator, tokens.device)
        ratio = torch.cos(math.pi / 2 * u)
        num_masked = torch.ceil(ratio * L).long().clamp(1, L)
        scores = uniform((B, L), generator, tokens.device)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        mask = ranks < num_masked.unsqueeze(1)
        masked = torch.where(mask, torch.full_like(tokens, self.mask_token_id), tokens)
        return masked, mask, ratio

    @staticmethod
    def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                             label_smoothing: float = 0.0) -> torch.Tensor:
        """sum_{masked} CE(logits, targets) / #masked (unmasked positions contribute nothing)."""
        per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none",
                                    label_smoothing=label_smoothing)
        weights = mask.float()
        return (per_token * weights).sum() / weights.sum().clamp_min(1.0)

    def masking_loss(self, tokens: torch.Tensor, class_labels, generator: torch.Generator | None = None,
                     label_smoothing: float = 0.0):
        """MaskGIT training loss (module docstring) -> (loss, logs). Label dropout applies in train mode."""
        targets = check_token_grid(tokens, self.codebook_size, self.grid_size).to(self.device)
        labels = check_class_labels(class_labels, self.num_classes, targets.device)
        if labels.shape[0] != targets.shape[0]:
            raise ValueError(f"got {labels.shape[0]} class labels for {targets.shape[0]} token grids")
        masked, mask, ratio = self.mask_tokens(targets, generator)
        if self.training:
            labels = drop_labels(labels, self.null_class, self.config.label_dropout, generator)
        logits = self(masked, labels)
        loss = self.masked_cross_entropy(logits, targets, mask, label_smoothing)
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets) & mask
            logs = {
                "loss": loss.detach(),
                "mask_ratio": mask.float().mean(),
                "masked_accuracy": correct.sum().float() / mask.sum().clamp_min(1),
            }
        return loss, logs

    def loss(self, tokens, class_labels, generator: torch.Generator | None = None, label_smoothing: float = 0.0):
        """Training loss shared by both prior types: here ``masking_loss``."""
        return self.masking_loss(tokens, class_labels, generator=generator, label_smoothing=label_smoothing)

    # ------------------------------------------------------------------ sampling
    def guided_logits(self, tokens: torch.Tensor, labels: torch.Tensor, guidance_scale: float,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """l = l_u + s (l_c - l_u): s = 1 -> conditional logits only, s = 0 -> unconditional (null class) only.
        ``positions`` as in ``forward`` (logits [M, K] of the selected positions).

        The output head is affine, so the guidance is applied to its input and the head runs once:
        (h_u + s (h_c - h_u)) E^T + b = l_u + s (l_c - l_u) (the bias passes through because (1 - s) + s = 1).
        That halves the [.., D] x [D, K] product and replaces three passes over the [M, K] logits by one over
        [M, D] (equal to guiding the logits up to fp32 rounding: test_maskgit)."""
        null = torch.full_like(labels, self.null_class)
        if guidance_scale == 1.0:
            return self(tokens, labels, positions)
        if guidance_scale == 0.0:
            return self(tokens, null, positions)
        both = self.head_input(torch.cat([tokens, tokens]), torch.cat([labels, null]),
                               None if positions is None else torch.cat([positions, positions]))
        cond, uncond = both.chunk(2)
        return self.output_head(apply_guidance(cond, uncond, guidance_scale))

    def start_sampling(self, class_labels: torch.Tensor, guided: bool = True, use_cache: bool = True) -> dict:
        """Per-decoding state for ``sampling_logits`` (MaskGIT needs only the labels; no cache)."""
        return {"labels": class_labels.to(self.device)}

    def sampling_backbone(self) -> torch.nn.Module:
        """The bidirectional transformer under ``head_input``: every decoding step runs it on [2B, 1 + L] ids."""
        return self.transformer

    def sampling_logits(self, tokens: torch.Tensor, timestep: int, guidance_scale: float, state: dict) -> torch.Tensor:
        """Guided logits [M, K] at the M still-masked positions of ``tokens`` [B, L] (row-major): what
        ``MaskGITScheduler.step`` consumes; the fixed positions' logits are never needed."""
        return self.guided_logits(tokens, state["labels"], guidance_scale, positions=tokens == self.mask_token_id)
