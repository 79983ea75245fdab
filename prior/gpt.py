"""GPT prior: a causal transformer (transformers ``LlamaForCausalLM``) over raster-ordered tokens.

Sequence: [c, t_1, ..., t_L] with c the class embedding (index C = num_classes is the "null"
class for classifier-free guidance), fed through ``inputs_embeds``; the token embedding and the
output head both have exactly K entries (Llama's vocab_size = K, untied: safetensors refuses
tied weights). The logits at position i predict t_{i+1}:

    p(t_1..t_L | c) = prod_i p(t_i | c, t_<i),   loss = mean_i CE(logits_i, t_i).

Sampling: ``sampling_logits`` gives the next-token logits at position t from the prefix, using a
transformers KV cache (a preallocated ``StaticCache`` by default, ``DynamicCache`` with use_cache="dynamic"; passed as
``cache``, or ``past_key_values`` before transformers 5.24); CFG batches the conditional and the
null-class sequences and combines l = l_u + s (l_c - l_u) (s = 1 conditional, s = 0 unconditional), applied
to the last hidden states before the (linear, bias-free) output head, which then runs on B rows instead of 2B.
``prior.scheduler.AutoregressiveScheduler`` then samples t ~ Categorical(softmax(top_p(top_k(l / temperature))))
with the caller's generator; ``LGQPipeline.__call__`` runs the loop (``generate`` goes through it).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from prior.base import TokenGridGenerator, check_prior_hyperparameters, drop_labels
from prior.sampling import check_kv_cache_choice
from prior.scheduler import apply_guidance, filter_logits  # noqa: F401  (filter_logits: re-exported for callers)
from prior.tokens import check_class_labels, check_token_grid, normalize_grid_size

# transformers >= 5.24 names the KV cache argument (and output field) ``cache``; 5.0-5.23 call it
# ``past_key_values`` (deprecated since 5.24, removed in 5.40). Either way it holds a transformers Cache object.
KV_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class GPTPrior(TokenGridGenerator, ModelMixin, ConfigMixin):
    """Class-conditional autoregressive prior over token grids [B, h, w] with values in [0, K).

    Args:
        codebook_size: K. num_classes: C (null class = C). grid_size: h or (h, w).
        hidden_size, num_layers, num_heads, mlp_ratio: Llama width / depth / heads / FFN ratio.
        num_kv_heads: grouped-query heads (default num_heads). dropout: attention and embedding dropout.
        label_dropout: probability of replacing a label by the null class during training.
        class_names: optional name of each class (length num_classes), from the training data.
    """

    decoding = "autoregressive"  # prior.sampling: decoded one token per step (AutoregressiveScheduler)

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 16384,
        num_classes: int = 1000,
        grid_size: int | tuple[int, int] = 16,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        label_dropout: float = 0.1,
        rope_theta: float = 10000.0,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        check_prior_hyperparameters(codebook_size, num_classes, hidden_size, num_heads, label_dropout, class_names)
        self.codebook_size = int(codebook_size)
        self.num_classes = int(num_classes)
        self.grid_size = normalize_grid_size(grid_size)
        self.seq_len = self.grid_size[0] * self.grid_size[1]
        self.null_class = self.num_classes
        llama_config = LlamaConfig(
            vocab_size=self.codebook_size,
            hidden_size=hidden_size,
            intermediate_size=int(round(mlp_ratio * hidden_size)),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or num_heads,
            max_position_embeddings=self.seq_len + 1,
            attention_dropout=dropout,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        self.transformer = LlamaForCausalLM(llama_config)
        self.class_embedding = nn.Embedding(self.num_classes + 1, hidden_size)
        nn.init.normal_(self.class_embedding.weight, std=0.02)
        self.embedding_dropout = nn.Dropout(dropout)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.get_input_embeddings()

    def _labels_for_model(self, class_labels, batch: int) -> torch.Tensor:
        labels = check_class_labels(class_labels, self.num_classes, self.device, null_class=self.null_class)
        if labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape [B={batch}], got {tuple(labels.shape)}")
        return labels

    def _embed(self, class_labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[class embedding, token embeddings of ``tokens``] -> [B, 1 + tokens.shape[1], D]."""
        prefix = self.class_embedding(class_labels).unsqueeze(1)
        embeddings = torch.cat([prefix, self.token_embedding(tokens)], dim=1)
        return self.embedding_dropout(embeddings)

    def forward(self, tokens: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] or [B, h, w] in [0, K), labels [B] in [0, C] -> logits [B, L, K]; logits[:, i] predicts t_i."""
        tokens = check_token_grid(tokens, self.codebook_size, self.grid_size).to(self.device)
        labels = self._labels_for_model(class_labels, tokens.shape[0])
        embeddings = self._embed(labels, tokens[:, :-1])
        return self.transformer(inputs_embeds=embeddings, use_cache=False).logits

    def loss(self, tokens: torch.Tensor, class_labels, generator: torch.Generator | None = None,
             label_smoothing: float = 0.0):
        """Next-token cross-entropy over all L positions -> (loss, logs); label dropout in train mode."""
        targets = check_token_grid(tokens, self.codebook_size, self.grid_size).to(self.device)
        labels = check_class_labels(class_labels, self.num_classes, targets.device)
        if labels.shape[0] != targets.shape[0]:
            raise ValueError(f"got {labels.shape[0]} class labels for {targets.shape[0]} token grids")
        if self.training:
            labels = drop_labels(labels, self.null_class, self.config.label_dropout, generator)
        logits = self(targets, labels)
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets, label_smoothing=label_smoothing)
        with torch.no_grad():
            logs = {"loss": loss.detach(), "accuracy": (logits.argmax(-1) == targets).float().mean()}
        return loss, logs

    # ------------------------------------------------------------------ sampling
    def start_sampling(self, class_labels: torch.Tensor, guided: bool = True, use_cache: bool | str = True) -> dict:
        """Per-decoding state: the model's labels (with the null class appended when ``guided``: CFG batches
        the conditional and unconditional sequences) and the KV cache.

        ``use_cache``: True or "static" preallocates transformers' ``StaticCache`` for the 1 + L positions (each
        step writes in place; fixed shapes, as ``torch.compile`` wants; on CPU 1.24x faster than DynamicCache at
        GPT-B size, equal at the small size: README "Where the time goes"); "dynamic" uses ``DynamicCache``
        (created by the first forward, grown by concatenation at every step); False keeps no cache. Same tokens
        each way."""
        check_kv_cache_choice(use_cache)
        labels = class_labels.to(self.device)
        model_labels = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        cache = None
        if use_cache is True or use_cache == "static":
            cache = StaticCache(config=self.transformer.config, max_cache_len=self.seq_len + 1)
        return {"model_labels": model_labels, "guided": guided, "use_cache": use_cache is not False, "cache": cache}

    def sampling_backbone(self) -> torch.nn.Module:
        """transformers' ``LlamaModel`` under the head: every cached decoding step runs it on one position."""
        return self.transformer.model

    def sampling_logits(self, tokens: torch.Tensor, timestep: int, guidance_scale: float, state: dict) -> torch.Tensor:
        """Guided next-token logits [B, K] for position t = ``timestep`` given tokens[:, :t] (raster order).

        With the cache only the newest input goes through the transformer (the class prefix at t = 0, token
        t-1 after); without it the whole prefix is recomputed (same logits, O(L^2) work)."""
        t = int(timestep)
        guided, model_labels = state["guided"], state["model_labels"]
        backbone = self.transformer.model  # LlamaModel: the hidden states; lm_head maps them to logits
        if state["use_cache"]:
            if t == 0:
                step_input = self._embed(model_labels, tokens.new_empty(model_labels.shape[0], 0))  # the class prefix
            else:
                previous = tokens[:, t - 1]
                previous = torch.cat([previous, previous]) if guided else previous
                step_input = self.embedding_dropout(self.token_embedding(previous).unsqueeze(1))
            out = backbone(inputs_embeds=step_input, use_cache=True, **{KV_CACHE_ARGUMENT: state["cache"]})
            state["cache"] = getattr(out, KV_CACHE_ARGUMENT)  # the StaticCache given, or the DynamicCache made
        else:
            context = tokens[:, :t].repeat(2, 1) if guided else tokens[:, :t]
            out = backbone(inputs_embeds=self._embed(model_labels, context), use_cache=False)
        hidden = out.last_hidden_state[:, -1]
        if guided:
            # lm_head is linear, so guiding its input equals guiding the logits (up to rounding) at half the
            # head's work: lm_head(h_u + s (h_c - h_u)) = l_u + s (l_c - l_u)
            cond, uncond = hidden.chunk(2)
            hidden = apply_guidance(cond, uncond, guidance_scale)
        logits = self.transformer.lm_head(hidden).float()
        return logits
