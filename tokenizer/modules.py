"""Building blocks of the VQGAN-style encoder and decoder (Esser et al., "Taming Transformers").

Encoder (resolution H -> H / 2^(L-1) for L = len(channel_multipliers) levels):

    conv_in -> [level l: num_res_blocks x (ResBlock [+ Attention]), Downsample unless last]
            -> mid (ResBlock, Attention, ResBlock) -> GroupNorm -> SiLU -> conv_out (latent_dim)

Decoder mirrors it: conv_in -> mid -> [level l = L-1..0: (num_res_blocks + 1) x (ResBlock [+ Attention]),
Upsample (nearest x2 + conv) unless l = 0] -> GroupNorm -> SiLU -> conv_out (image channels).
The decoder has one more ResBlock per level than the encoder, as in VQGAN.

Between encoder and quantizer sits ``PreQuantizerNorm``, the latent geometry that every quantizer
receives (docs/method.md §1): a GroupNorm on the latent channels, then a per-token LayerNorm with learnable
scale and shift (the authors' ``nn.LayerNorm``).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


MIN_CHANNELS_PER_GROUP = 4  # VQGAN's base width 128 in 32 groups; see `group_norm`


def num_groups_for(channels: int, max_groups: int = 32, min_channels_per_group: int = 1) -> int:
    """Largest g <= max_groups that divides `channels` with channels / g >= min_channels_per_group.

    GroupNorm needs channels % g == 0. With min_channels_per_group = 1 a narrow layer (channels <= 32)
    gets one group per channel, i.e. instance normalisation.
    """
    max_groups = max(1, min(max_groups, channels // max(1, int(min_channels_per_group))))  # <= channels
    for groups in range(max_groups, 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def group_norm(channels: int, min_channels_per_group: int = MIN_CHANNELS_PER_GROUP) -> nn.GroupNorm:
    """GroupNorm(g, channels), eps 1e-6, affine: g = 32 groups (VQGAN) for wide layers, fewer for narrow ones.

    Every group holds at least `min_channels_per_group` channels (default 4 = VQGAN's 128 / 32). With one
    channel per group GroupNorm is instance normalisation: it removes each channel's per-image mean, so a
    decoder whose last norm does that cannot output an image's mean colour (a 32-channel laptop decoder
    did exactly that before this floor existed). Exports written before it load with 1 (see
    `tokenizer.model.migrate_legacy_config`).
    """
    groups = num_groups_for(channels, min_channels_per_group=min_channels_per_group)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


NormLayer = Callable[[int], nn.Module]  # channels -> normalisation module
NORM_KINDS = ("group", "none")


def make_norm_layer(kind: str = "group", min_channels_per_group: int = MIN_CHANNELS_PER_GROUP) -> NormLayer:
    """The backbone's normalisation: "group" = `group_norm` (VQGAN), "none" = identity.

    "none" keeps each image's absolute colour in the residual stream: at laptop width (16-32 channels) and a few
    hundred steps a GroupNorm network learned per-image colours several times slower than the same network
    without norms (measured on glyphs; see configs/tokenizer/glyphs.yaml).
    """
    if kind == "group":
        return partial(group_norm, min_channels_per_group=int(min_channels_per_group))
    if kind == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


class ResBlock(nn.Module):
    """Pre-activation residual block: y = skip(x) + conv2(dropout(SiLU(GN(conv1(SiLU(GN(x))))))).

    skip is the identity when in_channels == out_channels, else a 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 norm_layer: NormLayer = group_norm):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = norm_layer(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = norm_layer(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual: y = x + W_o softmax(Q K^T / sqrt(C)) V.

    Q, K, V are 1x1 convolutions of GroupNorm(x) over the H*W positions; the attention itself is
    `F.scaled_dot_product_attention` (flash / memory-efficient kernels where available).
    """

    def __init__(self, channels: int, norm_layer: NormLayer = group_norm):
        super().__init__()
        self.norm = norm_layer(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width)
        # [B, 1 head, HW, C] for each of q, k, v
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in qkv.unbind(dim=1))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve H and W: 3x3 convolution with stride 2 after asymmetric zero padding (right/bottom by 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: a stack of ResBlocks, each optionally followed by self-attention."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float,
                 norm_layer: NormLayer = group_norm):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        channels = in_channels
        for _ in range(num_blocks):
            self.blocks.append(ResBlock(channels, out_channels, dropout, norm_layer))
            self.attentions.append(SelfAttention(out_channels, norm_layer) if attention else nn.Identity())
            channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, attention in zip(self.blocks, self.attentions):
            x = attention(block(x))
        return x


class MidBlock(nn.Module):
    """ResBlock -> SelfAttention -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, norm_layer: NormLayer = group_norm):
        super().__init__()
        self.block1 = ResBlock(channels, channels, dropout, norm_layer)
        self.attention = SelfAttention(channels, norm_layer)
        self.block2 = ResBlock(channels, channels, dropout, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attention(self.block1(x)))


def resolve_attention_levels(attention_resolutions: str | Sequence[int] | None, num_levels: int) -> list[int]:
    """Which levels (0 = full resolution, num_levels - 1 = lowest) get self-attention after each ResBlock.

    "lowest" -> [num_levels - 1] (VQGAN f16: attention at 16x16 for 256 px images); "none", None or []
    -> no level attention (the mid block always has one); a list of level indices is used as given.
    """
    if attention_resolutions is None:
        return []
    if isinstance(attention_resolutions, str):
        key = attention_resolutions.lower()
        if key == "lowest":
            return [num_levels - 1]
        if key == "none":
            return []
        raise ValueError(
            f"attention_resolutions must be 'lowest', 'none' or a list of level indices in [0, {num_levels}), "
            f"got {attention_resolutions!r}"
        )
    levels = []
    for level in attention_resolutions:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < num_levels:
            raise ValueError(
                f"attention_resolutions entries must be level indices in [0, {num_levels}) "
                f"(0 = full resolution), got {list(attention_resolutions)!r}"
            )
        levels.append(int(level))
    return sorted(set(levels))


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> latents [B, latent_dim, H / 2^(L-1), W / 2^(L-1)]."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        latent_dim: int,
        attention_levels: Sequence[int],
        dropout: float = 0.0,
        norm_layer: NormLayer = group_norm,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        channels = base_channels
        for level, width in enumerate(widths):
            self.levels.append(Level(channels, width, num_res_blocks, level in attention_levels, dropout, norm_layer))
            channels = width
            last = level == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else Downsample(channels))
        self.mid = MidBlock(channels, dropout, norm_layer)
        self.norm_out = norm_layer(channels)
        self.conv_out = nn.Conv2d(channels, latent_dim, kernel_size=3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for level, downsample in zip(self.levels, self.downsamples):
            h = downsample(level(h))
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B, latent_dim, h, w] -> images [B, out_channels, h * 2^(L-1), w * 2^(L-1)] (no output squashing)."""

    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        latent_dim: int,
        attention_levels: Sequence[int],
        dropout: float = 0.0,
        norm_layer: NormLayer = group_norm,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        channels = widths[-1]
        self.conv_in = nn.Conv2d(latent_dim, channels, kernel_size=3, padding=1)
        self.mid = MidBlock(channels, dropout, norm_layer)
        # stored from the lowest resolution (level L-1) up to full resolution (level 0)
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            self.levels.append(Level(channels, width, num_res_blocks + 1, level in attention_levels, dropout,
                                     norm_layer))
            channels = width
            self.upsamples.append(nn.Identity() if level == 0 else Upsample(channels))
        self.norm_out = norm_layer(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(latents))
        for level, upsample in zip(self.levels, self.upsamples):
            h = upsample(level(h))
        return self.conv_out(F.silu(self.norm_out(h)))


PRE_QUANTIZER_NORMS = ("groupnorm_layernorm", "layernorm", "groupnorm_layernorm_noaffine", "layernorm_noaffine", "none")


class PreQuantizerNorm(nn.Module):
    """Normalisation of the encoder latents z [B, C, h, w] in front of the quantizer, identical for every quantizer.

    kind "groupnorm_layernorm" (default):  z <- LN_token(GN(z))
    kind "layernorm":                      z <- LN_token(z)
    kind "groupnorm_layernorm_noaffine", "layernorm_noaffine": the same without LN's scale and shift
    kind "none":                           z <- z

    GN is ``group_norm(C)`` (affine, eps 1e-6; the encoder's last norm, on the latent channels) and, per token
    n = (b, y, x),

        LN_token(z)_n = gamma * (z_n - mean_c z_nc) / sqrt(var_c z_nc + 1e-6) + beta

    with learnable gamma, beta [C] (initialised to 1 and 0): ``nn.LayerNorm(C)``, which is what the authors' model
    puts in front of every quantizer (``pre_vq_norm = nn.LayerNorm(embedding_dim)`` in their quantization/model.py,
    PyTorch's default elementwise_affine=True; their eps is 1e-5). With gamma the latent scale is learnable, so
    LGQ's temperature is not fixed relative to it (without it every latent has squared norm exactly C).
    The "_noaffine" kinds (gamma = 1, beta = 0 fixed) are what tokenizers exported before lgq 0.1's format 2
    used under the names "layernorm" / "groupnorm_layernorm" (`tokenizer.model.migrate_legacy_config` maps them).
    Computed in fp32 with autocast off (like the quantizer); returns fp32.
    """

    def __init__(self, channels: int, kind: str = "groupnorm_layernorm", min_channels_per_group: int = MIN_CHANNELS_PER_GROUP):
        super().__init__()
        if kind not in PRE_QUANTIZER_NORMS:
            raise ValueError(f"pre_quantizer_norm must be one of {PRE_QUANTIZER_NORMS}, got {kind!r}")
        self.kind = kind
        self.channels = int(channels)
        self.group_norm = group_norm(channels, min_channels_per_group) if kind.startswith("groupnorm_") else None
        self.layer_norm = (nn.LayerNorm(channels, eps=1e-6, elementwise_affine=not kind.endswith("_noaffine"))
                           if kind != "none" else None)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.layer_norm is None:
            return z
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.group_norm is not None:
                gn = self.group_norm
                z = F.group_norm(z, gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps)
            ln = self.layer_norm
            weight, bias = (ln.weight.float(), ln.bias.float()) if ln.elementwise_affine else (None, None)
            tokens = F.layer_norm(z.permute(0, 2, 3, 1), (self.channels,), weight, bias, ln.eps)
            return tokens.permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def affine_stats(self) -> dict[str, torch.Tensor]:
        """The LayerNorm's learnt scale and shift as RMS over channels, sqrt(mean_c gamma_c^2) and
        sqrt(mean_c beta_c^2) ({} without them). With equal variance in every normalised channel, gamma_rms^2 * C
        is the latents' mean squared norm before the shift (C without gamma); a per-channel gamma can reshape
        the latents at an unchanged RMS."""
        ln = self.layer_norm
        if ln is None or not ln.elementwise_affine:
            return {}
        return {"gamma_rms": ln.weight.float().pow(2).mean().sqrt(), "beta_rms": ln.bias.float().pow(2).mean().sqrt()}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
