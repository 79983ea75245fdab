"""Tokenizer training losses (VQGAN recipe): L1/L2 + LPIPS-VGG perceptual + hinge PatchGAN + quantizer loss.

Generator objective (step >= gan_start_step; the GAN term is 0 before):

    L_G = w_1 |x - x_hat|_1 + w_2 |x - x_hat|_2^2 + w_p LPIPS(x, x_hat)
          + w_gan * lambda * (-mean D(x_hat)) + L_quantizer
    lambda = clamp(||grad_{W_last} L_rec|| / (||grad_{W_last} L_g|| + 1e-4), 0, 1e4), detached
    (L_rec = the reconstruction + perceptual part, W_last = decoder's final conv weight)

Discriminator objective (hinge): L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))).

LPIPS here is the published LPIPS-VGG v0.1: torchvision's ImageNet VGG16 features and the v0.1 linear
heads shipped in the `lpips` wheel (or a local heads file). Missing VGG weights or heads are an error
that says how to supply them; uniform heads (not the published metric) only with an explicit opt-in
(``loss.lpips_uniform_heads=true``), see `LPIPS`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.models import VGG16_Weights

from tokenizer.modules import num_groups_for

# VGG16 `features` indices right after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_TAP_INDICES = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_HEADS_HELP = (
    "LPIPS needs the LPIPS v0.1 VGG linear heads: install the `lpips` package (pip install lpips; its wheel ships "
    "lpips/weights/v0.1/vgg.pth) or pass that file as loss.lpips_weights_path=PATH (eval: --lpips-weights PATH). "
    "For offline experiments without them, loss.lpips_uniform_heads=true uses uniform heads (an LPIPS-like loss, "
    "not the published metric), or switch the perceptual loss off with loss.perceptual_weight=0."
)


def packaged_lpips_heads_path() -> Path:
    """The LPIPS v0.1 VGG heads inside the installed `lpips` package (lpips/weights/v0.1/vgg.pth), located
    without importing the package; FileNotFoundError (with ``LPIPS_HEADS_HELP``) when it is not installed."""
    spec = importlib.util.find_spec("lpips")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    raise FileNotFoundError(f"the `lpips` package with its v0.1 weights is not installed. {LPIPS_HEADS_HELP}")


class LPIPS(nn.Module):
    """Perceptual distance on VGG16 features (Zhang et al. 2018, "LPIPS"), inputs in [-1, 1].

        d(x, y) = sum_l 1/(H_l W_l) sum_{h,w} sum_c w_lc (f^l_hwc(x) - f^l_hwc(y))^2

    where f^l are VGG16 activations at relu{1_2, 2_2, 3_3, 4_3, 5_3} of the LPIPS-scaled input, unit
    normalised along channels, and w_lc >= 0 are the linear heads.

    - `pretrained=True`: VGG16 ImageNet weights from torchvision (`VGG16_Weights.IMAGENET1K_V1`;
      downloaded into $TORCH_HOME/hub/checkpoints on first use, or read from `vgg_weights_path`).
    - heads: the LPIPS v0.1 linear heads from `lpips_weights_path` (the official `vgg.pth`, keys
      `lin{l}.model.1.weight`, or keys `heads.{l}.weight`, .pth or .safetensors), by default the copy in the
      installed `lpips` package (``packaged_lpips_heads_path``); missing -> FileNotFoundError saying how to
      supply them.
    - `uniform_heads=True` (explicit opt-in for offline experiments): w_lc = 1 / 5 (each layer's
      unit-normalised feature distance, range [0, 4], weighted equally), an "LPIPS-VGG-like" loss, NOT the
      published metric; `variant` says so.
    - `pretrained=False`: random VGG weights (tests only).

    The network is frozen: no parameter requires grad and it stays in eval mode even under `.train()`.
    Gradients still flow to the inputs. `forward` returns one distance per image, shape [B].
    """

    def __init__(
        self,
        pretrained: bool = True,
        lpips_weights_path: str | os.PathLike | None = None,
        vgg_weights_path: str | os.PathLike | None = None,
        uniform_heads: bool = False,
    ):
        super().__init__()
        if uniform_heads and lpips_weights_path is not None:
            raise ValueError("LPIPS: pass either lpips_weights_path (published heads) or uniform_heads=True, not both")
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ParameterList(
            [nn.Parameter(torch.full((1, c, 1, 1), 1.0 / len(VGG16_TAP_CHANNELS))) for c in VGG16_TAP_CHANNELS]
        )
        self.uses_lpips_heads = not uniform_heads
        if not uniform_heads:  # heads first: a missing heads file fails before the VGG download
            self._load_heads(lpips_weights_path if lpips_weights_path is not None else packaged_lpips_heads_path())
        self.features = _build_vgg16_features(pretrained, vgg_weights_path)
        self.variant = ("LPIPS-VGG v0.1" if self.uses_lpips_heads
                        else "LPIPS-VGG-like with uniform heads (not the published LPIPS)")
        if not pretrained:
            self.variant += ", random VGG weights (tests only)"
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """The perceptual network is frozen: always stays in eval mode."""
        return super().train(False)

    def _load_heads(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LPIPS linear-head weights not found at {path!r} (expected LPIPS v0.1 vgg.pth). "
                                    f"{LPIPS_HEADS_HELP}")
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        for layer, channels in enumerate(VGG16_TAP_CHANNELS):
            for key in (f"lin{layer}.model.1.weight", f"heads.{layer}.weight", f"heads.{layer}"):
                if key in state:
                    weight = state[key]
                    break
            else:
                raise ValueError(
                    f"{path!r} has no linear head for layer {layer} (looked for 'lin{layer}.model.1.weight' "
                    f"or 'heads.{layer}.weight'); keys: {sorted(state)[:10]}"
                )
            if weight.numel() != channels:
                raise ValueError(f"LPIPS head {layer} in {path!r} has {weight.numel()} weights, expected {channels}")
            self.heads[layer].data.copy_(weight.reshape(1, channels, 1, 1).float())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two images [B, 3, H, W] of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        batch = x.shape[0]
        h = torch.cat([x, y], dim=0)
        h = (h - self.shift.to(h.dtype)) / self.scale.to(h.dtype)
        distance = torch.zeros(batch, device=x.device, dtype=torch.float32)
        taps = iter(zip(VGG16_TAP_INDICES, self.heads))
        tap_index, head = next(taps)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == tap_index:
                feats = h.float()
                feats = feats / (feats.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                diff = (feats[:batch] - feats[batch:]).pow(2)
                distance = distance + (diff * head).sum(dim=1).mean(dim=(1, 2))
                nxt = next(taps, None)
                if nxt is None:
                    break
                tap_index, head = nxt
        return distance


VGG16_FEATURE_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 `features` up to relu5_3 (same layer indices, so its state-dict keys load as-is)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_FEATURE_PLAN:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


def _build_vgg16_features(pretrained: bool, vgg_weights_path: str | os.PathLike | None) -> nn.Sequential:
    """VGG16 features; ImageNet weights (torchvision VGG16_Weights.IMAGENET1K_V1) when pretrained.

    Raises FileNotFoundError for a missing `vgg_weights_path` and RuntimeError when the download fails.
    """
    features = vgg16_features()
    if not pretrained:
        return features
    if vgg_weights_path is not None:
        path = os.fspath(vgg_weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VGG16 weights not found at {path!r} (expected torchvision's vgg16-397923af.pth)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        try:
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as err:  # offline: URLError / OSError / HTTPError from the download
            raise RuntimeError(
                "LPIPS needs torchvision's ImageNet VGG16 weights (VGG16_Weights.IMAGENET1K_V1) and they could not be "
                f"loaded ({type(err).__name__}: {err}). Either run once with internet access (cached in "
                "$TORCH_HOME/hub/checkpoints/), copy vgg16-397923af.pth there or pass its path as "
                "loss.lpips_vgg_weights_path=PATH (eval: --lpips-vgg-weights PATH), or switch the perceptual loss "
                "off with loss.perceptual_weight=0."
            ) from err
    prefix = "features."
    feature_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = features.load_state_dict(feature_state, strict=False)
    # the full VGG16 has one more max-pool (index 30) than we keep; parameters must all be there
    if missing:
        raise RuntimeError(f"VGG16 weights are incomplete: missing {missing}")
    return features


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / VQGAN): logits [B, 1, h, w], one per overlapping patch.

    conv4x4/2 -> LeakyReLU(0.2) -> (n_layers - 1) x [conv4x4/2 -> norm -> LeakyReLU]
    -> conv4x4/1 -> norm -> LeakyReLU -> conv4x4/1 (1 channel).

    norm="batch" is VQGAN's choice. Caveat for multi-GPU: BatchNorm statistics are per process
    (and DDP broadcasts rank 0's running buffers); convert with `nn.SyncBatchNorm.convert_sync_batchnorm`
    or use norm="group" (GroupNorm, batch-independent) to avoid it.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if norm not in ("batch", "group"):
            raise ValueError(f"discriminator norm must be 'batch' or 'group', got {norm!r}")

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(num_groups_for(c), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = channels
        for layer in range(1, n_layers + 1):
            out = channels * min(2 ** layer, 8)
            stride = 2 if layer < n_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), norm_layer(out),
                       nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """VQGAN init: conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D = 1/2 [mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))] (VQGAN's hinge loss, with its factor 1/2)."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_G = -mean(D(x_hat))."""
    return -fake_logits.float().mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's adaptive weight lambda = clamp(||dL_rec/dW|| / (||dL_g/dW|| + 1e-4), 0, max_weight), detached.

    W = `last_layer` (the decoder's final conv weight). Returns 0 when gradients cannot be taken
    (no grad mode, e.g. validation, or a loss that does not depend on W).
    """
    zero = torch.zeros((), device=rec_loss.device)
    if not (torch.is_grad_enabled() and rec_loss.requires_grad and g_loss.requires_grad and last_layer.requires_grad):
        return zero
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)
    if rec_grad is None or g_grad is None:
        return zero
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


@dataclass
class TokenizerLossConfig:
    """Fields = `TokenizerLoss` arguments (the one home of their defaults; reused by the training config).

    gan_start_step: the discriminator and GAN term are off before this step (VQGAN's warm-up).
    disc_norm: "batch" (VQGAN) or "group" (batch-independent; DDP-safe without SyncBatchNorm).
    lpips_pretrained / lpips_weights_path / lpips_vgg_weights_path / lpips_uniform_heads: see `LPIPS`
    (lpips_uniform_heads=true: the explicit opt-in to a non-published, uniform-head LPIPS-like loss).
    """

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1
    gan_start_step: int = 20000
    adaptive_gan_weight: bool = True
    quantizer_weight: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    disc_norm: str = "batch"
    lpips_pretrained: bool = True
    lpips_weights_path: str | None = None
    lpips_vgg_weights_path: str | None = None
    lpips_uniform_heads: bool = False


_LOSS_DEFAULTS = TokenizerLossConfig()


class TokenizerLoss(nn.Module):
    """Combined tokenizer objective; see the module docstring for the equations.

    Components with weight 0 are not built (perceptual_weight=0 -> no VGG; gan_weight=0 -> no
    discriminator, `discriminator` is None). The trainer optimises `discriminator.parameters()` with its own
    optimizer and zeroes its grads before the discriminator step (the generator backward also reaches them).
    """

    def __init__(
        self,
        l1_weight: float = _LOSS_DEFAULTS.l1_weight,
        l2_weight: float = _LOSS_DEFAULTS.l2_weight,
        perceptual_weight: float = _LOSS_DEFAULTS.perceptual_weight,
        gan_weight: float = _LOSS_DEFAULTS.gan_weight,
        gan_start_step: int = _LOSS_DEFAULTS.gan_start_step,
        adaptive_gan_weight: bool = _LOSS_DEFAULTS.adaptive_gan_weight,
        quantizer_weight: float = _LOSS_DEFAULTS.quantizer_weight,
        disc_channels: int = _LOSS_DEFAULTS.disc_channels,
        disc_layers: int = _LOSS_DEFAULTS.disc_layers,
        disc_norm: str = _LOSS_DEFAULTS.disc_norm,
        lpips_pretrained: bool = _LOSS_DEFAULTS.lpips_pretrained,
        lpips_weights_path: str | None = _LOSS_DEFAULTS.lpips_weights_path,
        lpips_vgg_weights_path: str | None = _LOSS_DEFAULTS.lpips_vgg_weights_path,
        lpips_uniform_heads: bool = _LOSS_DEFAULTS.lpips_uniform_heads,
    ):
        super().__init__()
        for name, value in (("l1_weight", l1_weight), ("l2_weight", l2_weight), ("perceptual_weight", perceptual_weight),
                            ("gan_weight", gan_weight), ("quantizer_weight", quantizer_weight)):
            if float(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if int(gan_start_step) < 0:
            raise ValueError(f"gan_start_step must be >= 0, got {gan_start_step}")
        self.l1_weight = float(l1_weight)
        self.l2_weight = float(l2_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.gan_weight = float(gan_weight)
        self.gan_start_step = int(gan_start_step)
        self.use_adaptive_weight = bool(adaptive_gan_weight)
        self.quantizer_weight = float(quantizer_weight)
        self.lpips = (
            LPIPS(pretrained=lpips_pretrained, lpips_weights_path=lpips_weights_path,
                  vgg_weights_path=lpips_vgg_weights_path, uniform_heads=lpips_uniform_heads)
            if self.perceptual_weight > 0 else None
        )
        self.discriminator = (
            PatchDiscriminator(3, disc_channels, disc_layers, disc_norm) if self.gan_weight > 0 else None
        )

    @classmethod
    def from_config(cls, cfg: TokenizerLossConfig | Any) -> "TokenizerLoss":
        """Build from a `TokenizerLossConfig`, an OmegaConf node or a mapping."""
        if dataclasses.is_dataclass(cfg):
            values = dataclasses.asdict(cfg)
        else:
            try:
                from omegaconf import DictConfig, OmegaConf  # lazy: plain dicts and dataclasses are handled without omegaconf

                if isinstance(cfg, DictConfig):
                    cfg = OmegaConf.to_container(cfg, resolve=True)
            except ImportError:  # pragma: no cover
                pass
            values = dict(cfg)
        known = {f.name for f in dataclasses.fields(TokenizerLossConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer loss option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**values)

    def gan_active(self, step: int) -> bool:
        """True when the GAN terms are on: a discriminator exists and step >= gan_start_step."""
        return self.discriminator is not None and int(step) >= self.gan_start_step

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstruction: torch.Tensor,
        quantizer_loss: torch.Tensor | float,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator/tokenizer loss L_G (fp32 scalar) and detached per-term logs."""
        if images.shape != reconstruction.shape:
            raise ValueError(f"images {tuple(images.shape)} and reconstruction {tuple(reconstruction.shape)} differ in shape")
        target = images.float()
        recon = reconstruction.float()
        zero = torch.zeros((), device=images.device)
        l1 = (recon - target).abs().mean()
        l2 = (recon - target).pow(2).mean()
        rec_loss = self.l1_weight * l1 + self.l2_weight * l2
        perceptual = self.lpips(reconstruction, images).mean() if self.lpips is not None else zero
        nll = rec_loss + self.perceptual_weight * perceptual

        g_loss, lam, gan_term = zero, zero, zero
        if self.gan_active(step):
            g_loss = hinge_g_loss(self.discriminator(reconstruction))
            if self.use_adaptive_weight and last_layer is not None:
                lam = adaptive_gan_weight(nll, g_loss, last_layer)
            else:
                lam = torch.ones((), device=images.device)
            gan_term = self.gan_weight * lam * g_loss
        if not isinstance(quantizer_loss, torch.Tensor):
            quantizer_loss = torch.as_tensor(float(quantizer_loss), device=images.device)
        quantizer_loss = quantizer_loss.float()
        total = nll + gan_term + self.quantizer_weight * quantizer_loss
        logs = {
            "loss": total.detach(),
            "l1": l1.detach(),
            "l2": l2.detach(),
            "perceptual": perceptual.detach(),
            "quantizer": quantizer_loss.detach(),
            "gan_g": g_loss.detach(),
            "gan_adaptive_weight": lam.detach(),
        }
        return total, logs

    def discriminator_loss(
        self, images: torch.Tensor, reconstruction: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge discriminator loss on detached inputs; a constant 0 (no discriminator compute) before
        gan_start_step — check `gan_active(step)` and skip the backward then."""
        if not self.gan_active(step):
            zero = torch.zeros((), device=images.device)
            return zero, {"disc_loss": zero, "logits_real": zero, "logits_fake": zero}
        real_logits = self.discriminator(images.detach())
        fake_logits = self.discriminator(reconstruction.detach())
        loss = hinge_d_loss(real_logits, fake_logits)
        return loss, {
            "disc_loss": loss.detach(),
            "logits_real": real_logits.detach().float().mean(),
            "logits_fake": fake_logits.detach().float().mean(),
        }


__all__ = [
    "LPIPS", "PatchDiscriminator", "hinge_d_loss", "hinge_g_loss", "adaptive_gan_weight",
    "TokenizerLossConfig", "TokenizerLoss",
]
