"""Locally constructed Inception weights for FID tests (no download).

Builds torch-fidelity's "inception-v3-compat" network (FeatureExtractorInceptionV3) with
random weights and saves its ``state_dict`` with ``torch.save`` - the format that
``feature_extractor_weights_path`` expects (torch-fidelity calls ``torch.load`` +
``load_state_dict(strict=True)``). Convolutions get He (Kaiming-normal, fan-in, ReLU)
init: with PyTorch's default init the activations shrink layer by layer and every input
maps to nearly the same 2048-d feature, so any pair of image sets has FID ~ 0. The
numbers measured with these weights test the plumbing, not image quality.
"""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch


def build_random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """state_dict of inception-v3-compat with He-initialised convs and a random fc layer."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        # Skip the weight download/load in the constructor: we only want the architecture.
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
                mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
            model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                torch.nn.init.zeros_(module.bias)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.random.set_rng_state(generator_state)


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write random inception-v3-compat weights to ``path`` (a .pth usable as weights path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_random_inception_state_dict(seed), path)
    return path
