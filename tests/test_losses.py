"""Tokenizer losses: LPIPS (random VGG weights here), PatchGAN + hinge, adaptive GAN weight, TokenizerLoss."""
from __future__ import annotations

import dataclasses
import inspect
import urllib.error

import pytest
import torch
from torch import nn

from tokenizer.losses import (
    LPIPS,
    VGG16_TAP_CHANNELS,
    PatchDiscriminator,
    TokenizerLoss,
    TokenizerLossConfig,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    vgg16_features,
)


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


# --- LPIPS --------------------------------------------------------------------------------------
def test_lpips_zero_for_identical_positive_for_different(lpips):
    x, y = images(seed=0), images(seed=1)
    same = lpips(x, x)
    different = lpips(x, y)
    assert same.shape == (2,) and different.shape == (2,)
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)
    assert (different > 1e-3).all() and torch.isfinite(different).all()
    # a small perturbation is closer than an unrelated image
    assert (lpips(x, x + 0.05 * torch.randn_like(x)) < different).all()


def test_lpips_is_frozen_but_passes_gradients_to_inputs(lpips):
    assert all(not p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())
    x = images().requires_grad_(True)
    lpips(x, images(seed=1)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_rejects_mismatched_shapes(lpips):
    with pytest.raises(ValueError, match="equal shape"):
        lpips(images(size=32), images(size=16))


def test_lpips_loads_linear_heads_from_local_file(tmp_path, lpips):
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(VGG16_TAP_CHANNELS)}
    torch.save(heads, tmp_path / "vgg.pth")
    with_heads = LPIPS(pretrained=False, lpips_weights_path=tmp_path / "vgg.pth")
    with_heads.features.load_state_dict(lpips.features.state_dict())
    assert with_heads.uses_lpips_heads and lpips.uses_lpips_heads  # the fixture has the packaged heads
    for i, head in enumerate(with_heads.heads):
        assert torch.equal(head, heads[f"lin{i}.model.1.weight"]) and not head.requires_grad
    x, y = images(seed=0), images(seed=1)
    assert not torch.allclose(with_heads(x, y), lpips(x, y))

    del heads["lin3.model.1.weight"]
    torch.save(heads, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="layer 3"):
        LPIPS(pretrained=False, lpips_weights_path=tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="LPIPS"):
        LPIPS(pretrained=False, lpips_weights_path=tmp_path / "missing.pth")


def random_torchvision_vgg16_file(path, seed: int = 1):
    """A VGG16 checkpoint in torchvision's key format ("features.N.weight") with random He-initialised convs
    (locally constructed: the real ImageNet weights are a download)."""
    torch.manual_seed(seed)
    features = vgg16_features()
    for module in features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.normal_(module.bias, std=0.01)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return features


def test_lpips_by_default_is_the_published_v01_metric_of_the_lpips_package(tmp_path):
    """Default heads = the lpips wheel's v0.1 vgg.pth; with the same (random) VGG weights our distance equals the
    `lpips` package's own LPIPS-VGG implementation."""
    import importlib

    from tokenizer.losses import packaged_lpips_heads_path

    features = random_torchvision_vgg16_file(tmp_path / "vgg16.pth")
    ours = LPIPS(pretrained=True, vgg_weights_path=tmp_path / "vgg16.pth")
    assert ours.uses_lpips_heads and ours.variant == "LPIPS-VGG v0.1"
    published = torch.load(packaged_lpips_heads_path(), map_location="cpu", weights_only=True)
    for i, head in enumerate(ours.heads):
        assert torch.equal(head, published[f"lin{i}.model.1.weight"])

    reference = importlib.import_module("lpips").LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    with torch.no_grad():
        for name, parameter in reference.net.named_parameters():  # slice{s}.{torchvision index}.{weight|bias}
            index, kind = name.split(".")[1:]
            parameter.copy_(getattr(features[int(index)], kind))
    x, y = images(seed=0), images(seed=1)
    expected = reference.eval()(x, y).flatten()
    assert torch.allclose(ours(x, y), expected, rtol=1e-4, atol=1e-6), (ours(x, y), expected)


def test_lpips_without_heads_is_an_error_that_says_how_to_supply_them_unless_uniform_heads_opted_in(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real_find_spec(name, *a))
    for build in (lambda: LPIPS(pretrained=False), lambda: TokenizerLoss(perceptual_weight=1.0, lpips_pretrained=False)):
        with pytest.raises(FileNotFoundError, match="pip install lpips") as error:
            build()
        assert "lpips_weights_path" in str(error.value) and "lpips_uniform_heads=true" in str(error.value)
    uniform = TokenizerLoss(perceptual_weight=1.0, lpips_pretrained=False, lpips_uniform_heads=True).lpips
    assert not uniform.uses_lpips_heads and "not the published" in uniform.variant
    assert all(torch.equal(h, torch.full_like(h, 0.2)) for h in uniform.heads)
    with pytest.raises(ValueError, match="not both"):
        LPIPS(pretrained=False, lpips_weights_path="vgg.pth", uniform_heads=True)


def test_lpips_loads_vgg_weights_from_local_torchvision_file(tmp_path):
    torch.manual_seed(1)
    reference = vgg16_features()
    torch.save({f"features.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "vgg16.pth")
    loaded = LPIPS(pretrained=True, vgg_weights_path=tmp_path / "vgg16.pth")
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.features.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match="VGG16 weights not found"):
        LPIPS(pretrained=True, vgg_weights_path=tmp_path / "nothing.pth")


def test_lpips_pretrained_unavailable_offline_is_a_clear_runtime_error(monkeypatch):
    from torchvision.models import VGG16_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="perceptual_weight=0"):
        LPIPS(pretrained=True)
    with pytest.raises(RuntimeError, match="VGG16"):
        TokenizerLoss(perceptual_weight=1.0, lpips_pretrained=True)
    # switched off -> VGG never requested
    assert TokenizerLoss(perceptual_weight=0.0, lpips_pretrained=True).lpips is None


# --- discriminator and hinge -------------------------------------------------------------------------
def test_hinge_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1; VQGAN halves the sum
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_patch_discriminator_outputs_patch_logits(norm):
    disc = PatchDiscriminator(channels=16, n_layers=3, norm=norm)
    logits = disc(images(size=64))
    assert logits.shape == (2, 1, 6, 6)
    with torch.device("meta"):
        assert PatchDiscriminator()(torch.empty(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="instance")


# --- adaptive weight ---------------------------------------------------------------------------------
def test_adaptive_gan_weight_is_gradient_norm_ratio():
    torch.manual_seed(0)
    last = nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    out = x @ last.t()
    rec_loss = out.pow(2).mean()
    g_loss = -out.mean()
    weight = adaptive_gan_weight(rec_loss, g_loss, last)
    rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weight.item() > 0 and torch.isfinite(weight) and not weight.requires_grad
    # graph still usable afterwards (retain_graph)
    (rec_loss + weight * g_loss).backward()
    assert last.grad is not None


def test_adaptive_gan_weight_clamps_and_falls_back():
    last = nn.Parameter(torch.ones(3))
    rec_loss = (1e3 * last).sum()
    assert adaptive_gan_weight(rec_loss, 0.0 * last.sum(), last).item() == pytest.approx(1e4)
    with torch.no_grad():
        assert adaptive_gan_weight((last * 2).sum(), last.sum(), last).item() == 0.0
    other = nn.Parameter(torch.ones(3))
    assert adaptive_gan_weight(rec_loss, other.sum(), last).item() == 0.0  # g does not depend on W


# --- TokenizerLoss ---------------------------------------------------------------------------------
class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(z)


def _loss_module(**kwargs) -> TokenizerLoss:
    torch.manual_seed(0)
    options = dict(lpips_pretrained=False, gan_start_step=10, disc_channels=8, disc_layers=2)
    options.update(kwargs)
    return TokenizerLoss(**options)


def _count_calls(module: nn.Module) -> list[int]:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_tokenizer_loss_before_gan_start_has_no_gan_terms_and_no_discriminator_compute():
    loss_module = _loss_module()
    calls = _count_calls(loss_module.discriminator)
    decoder = TinyDecoder()
    x = images()
    reconstruction = decoder(torch.randn(2, 4, 32, 32))
    quantizer_loss = torch.tensor(0.3)
    total, logs = loss_module.generator_loss(x, reconstruction, quantizer_loss, step=9,
                                             last_layer=decoder.conv_out.weight)
    expected = (reconstruction - x).abs().mean() + loss_module.lpips(reconstruction, x).mean() + 0.3
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["gan_g"].item() == 0.0 and logs["gan_adaptive_weight"].item() == 0.0
    assert logs["perceptual"].item() > 0 and logs["quantizer"].item() == pytest.approx(0.3)
    assert all(not v.requires_grad for v in logs.values())
    d_loss, d_logs = loss_module.discriminator_loss(x, reconstruction, step=9)
    assert d_loss.item() == 0.0 and d_logs["disc_loss"].item() == 0.0
    assert calls == [] and not loss_module.gan_active(9)
    total.backward()
    assert decoder.conv_out.weight.grad is not None


def test_tokenizer_loss_after_gan_start_adds_weighted_gan_term_and_trains_discriminator():
    loss_module = _loss_module(gan_weight=0.1)
    calls = _count_calls(loss_module.discriminator)
    decoder = TinyDecoder()
    x = images()
    reconstruction = decoder(torch.randn(2, 4, 32, 32))
    total, logs = loss_module.generator_loss(x, reconstruction, torch.tensor(0.0), step=10,
                                             last_layer=decoder.conv_out.weight)
    assert loss_module.gan_active(10) and len(calls) == 1
    lam = logs["gan_adaptive_weight"]
    assert lam.item() > 0 and torch.isfinite(lam)
    nll = logs["l1"] + logs["perceptual"]
    assert total.item() == pytest.approx((nll + 0.1 * lam * logs["gan_g"]).item(), rel=1e-5)
    total.backward()

    for p in loss_module.discriminator.parameters():
        p.grad = None
    d_loss, d_logs = loss_module.discriminator_loss(x, reconstruction, step=10)
    assert len(calls) == 3 and d_loss.item() > 0
    assert d_logs["logits_real"].shape == () and d_logs["logits_fake"].shape == ()
    d_loss.backward()
    assert all(p.grad is not None for p in loss_module.discriminator.parameters())


def test_tokenizer_loss_in_no_grad_validation_and_without_adaptive_weight():
    loss_module = _loss_module()
    decoder = TinyDecoder()
    x = images()
    with torch.no_grad():
        reconstruction = decoder(torch.randn(2, 4, 32, 32))
        total, logs = loss_module.generator_loss(x, reconstruction, torch.tensor(0.0), step=100,
                                                 last_layer=decoder.conv_out.weight)
    assert torch.isfinite(total) and logs["gan_adaptive_weight"].item() == 0.0
    fixed = _loss_module(adaptive_gan_weight=False, perceptual_weight=0.0)
    reconstruction = decoder(torch.randn(2, 4, 32, 32))
    total, logs = fixed.generator_loss(x, reconstruction, 0.0, step=100)
    assert logs["gan_adaptive_weight"].item() == 1.0
    assert total.item() == pytest.approx((logs["l1"] + 0.1 * logs["gan_g"]).item(), rel=1e-5)


def test_tokenizer_loss_l2_and_disabled_components():
    x = images()
    y = images(seed=1)
    only_l2 = _loss_module(l1_weight=0.0, l2_weight=2.0, perceptual_weight=0.0, gan_weight=0.0)
    assert only_l2.lpips is None and only_l2.discriminator is None and not only_l2.gan_active(10**9)
    total, _ = only_l2.generator_loss(x, y, torch.tensor(0.0), step=10**9)
    assert total.item() == pytest.approx(2.0 * (x - y).pow(2).mean().item(), rel=1e-6)
    d_loss, _ = only_l2.discriminator_loss(x, y, step=10**9)
    assert d_loss.item() == 0.0
    with pytest.raises(ValueError, match="gan_weight"):
        TokenizerLoss(gan_weight=-1.0, perceptual_weight=0.0)
    with pytest.raises(ValueError, match="shape"):
        only_l2.generator_loss(x, images(size=16), 0.0, step=0)


def test_tokenizer_loss_bf16_reconstruction():
    loss_module = _loss_module()
    decoder = TinyDecoder()
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reconstruction = decoder(torch.randn(2, 4, 32, 32))
        total, logs = loss_module.generator_loss(x, reconstruction, torch.tensor(0.1), step=10,
                                                 last_layer=decoder.conv_out.weight)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(decoder.conv_out.weight.grad).all()


def test_loss_config_defaults_match_constructor_and_from_config():
    from omegaconf import OmegaConf

    signature = inspect.signature(TokenizerLoss.__init__)
    parameters = {name: p.default for name, p in signature.parameters.items() if name != "self"}
    defaults = dataclasses.asdict(TokenizerLossConfig())
    assert parameters == defaults
    cfg = OmegaConf.structured(TokenizerLossConfig(perceptual_weight=0.0, gan_weight=0.5, gan_start_step=3))
    built = TokenizerLoss.from_config(cfg)
    assert built.gan_weight == 0.5 and built.gan_start_step == 3 and built.lpips is None
    with pytest.raises(ValueError, match="unknown tokenizer loss option"):
        TokenizerLoss.from_config({"gan_wieght": 0.1})
