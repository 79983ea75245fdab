"""What the two priors (MaskGIT, GPT) share: constructor checks, label dropout for classifier-free guidance,
and uniform noise drawn on the generator's device. Class-label and token-grid checks live in ``prior.tokens``."""
from __future__ import annotations

import torch


def uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """u ~ U(0, 1) drawn on the generator's device (so a CPU generator drives CUDA models), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def check_prior_hyperparameters(codebook_size: int, num_classes: int, hidden_size: int, num_heads: int,
                                label_dropout: float, class_names: list[str] | None = None) -> None:
    """Constructor checks shared by the MaskGIT and GPT priors (clear ValueError naming the bad value)."""
    if int(codebook_size) < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
    if class_names is not None and (len(class_names) != int(num_classes) or len(set(class_names)) != len(class_names)):
        raise ValueError(f"class_names must hold {num_classes} distinct names (one per class), got {len(class_names)} "
                         f"({len(set(class_names))} distinct)")


def drop_labels(labels: torch.Tensor, null_class: int, probability: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Label dropout: each label is replaced by ``null_class`` with the given probability."""
    if probability <= 0:
        return labels
    drop = uniform(labels.shape, generator, labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)
