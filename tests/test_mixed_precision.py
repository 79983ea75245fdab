"""Mixed precision: every model output survives accelerate's fp32 output conversion, the quantizer stays
fp32 under bf16 autocast, and the real train scripts train, checkpoint, resume and export under bf16 (CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate.utils import convert_outputs_to_fp32, convert_to_fp32

from tokenizer.model import LGQTokenizer, TokenizerOutput
from tokenizer.quantizers import QUANTIZERS, QuantizerOutput

QUANTIZER_OPTIONS = {"fsq": {"levels": [4, 4]}}  # K = 16


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def accelerate_mixed_precision_forward(module: torch.nn.Module):
    """The forward accelerate installs under mixed precision (Accelerator.prepare_model):
    convert_outputs_to_fp32(autocast(forward))."""
    return convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(module.forward))


def tiny_tokenizer(quantizer: str) -> LGQTokenizer:
    torch.manual_seed(0)
    return LGQTokenizer(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, latent_dim=4,
                        attention_resolutions="none", quantizer=quantizer, codebook_size=16,
                        quantizer_options=QUANTIZER_OPTIONS.get(quantizer, {}))


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_tokenizer_output_survives_accelerate_fp32_conversion(quantizer):
    model = tiny_tokenizer(quantizer)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    output = accelerate_mixed_precision_forward(model)(images)
    assert type(output) is TokenizerOutput
    assert output.reconstruction.dtype == torch.float32 and output.reconstruction.shape == (2, 3, 8, 8)
    assert list(output.keys()) == ["reconstruction", "quantizer_output"]
    # the quantizer output passes through untouched; it was computed in fp32 with autocast off
    q = output.quantizer_output
    assert type(q) is QuantizerOutput
    assert q.quantized.dtype == torch.float32 and q.loss.dtype == torch.float32
    assert q.indices.dtype == torch.int64 and q.indices.shape == (2, 4, 4)
    assert all(v.dtype == torch.float32 for v in q.stats.values()), {k: v.dtype for k, v in q.stats.items()}
    assert torch.isfinite(output.reconstruction).all() and torch.isfinite(q.loss)
    # the tokens equal those of the same model run without autocast on the same fp32 latents
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = model.encode_latents(images)
    assert torch.equal(q.indices, model.quantize(latents).indices)
    # gradients flow back through the converted output
    (output.reconstruction.square().mean() + q.loss).backward()
    assert model.encoder.conv_in.weight.grad is not None

    tuple_output = accelerate_mixed_precision_forward(model)(images, return_dict=False)
    assert isinstance(tuple_output, tuple) and tuple_output[0].dtype == torch.float32
    assert type(tuple_output[1]) is QuantizerOutput


def test_tokenizer_output_rebuilt_from_a_dict_keeps_both_fields_and_refuses_a_missing_one():
    quantizer_output = QuantizerOutput(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                                       torch.tensor(0.5), {"perplexity": torch.tensor(1.0)})
    output = TokenizerOutput(reconstruction=torch.ones(1, 3, 4, 4, dtype=torch.bfloat16),
                             quantizer_output=quantizer_output)
    converted = convert_to_fp32(output)
    assert type(converted) is TokenizerOutput and converted.reconstruction.dtype == torch.float32
    assert converted.quantizer_output is quantizer_output and converted["quantizer_output"] is quantizer_output
    assert converted.to_tuple()[0] is converted.reconstruction
    assert dataclasses.is_dataclass(convert_to_fp32(quantizer_output))
    with pytest.raises(TypeError, match="quantizer_output"):
        TokenizerOutput(reconstruction=torch.ones(1, 3, 4, 4))


@pytest.mark.parametrize("prior_type", ["maskgit", "gpt"])
def test_prior_outputs_survive_accelerate_fp32_conversion(prior_type):
    from prior.config import PriorModelConfig
    from prior.train import PriorTrainingLoss, build_prior

    torch.manual_seed(0)
    cfg = PriorModelConfig(prior_type=prior_type, hidden_size=16, num_layers=1, num_heads=2, mlp_ratio=2.0,
                           dropout=0.0, label_dropout=0.1)
    prior = build_prior(cfg, codebook_size=16, grid_size=(2, 2), num_classes=3)
    tokens, labels = torch.randint(0, 16, (2, 2, 2)), torch.tensor([0, 2])
    loss, logs = accelerate_mixed_precision_forward(PriorTrainingLoss(prior))(tokens, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.requires_grad
    assert all(v.dtype == torch.float32 for v in logs.values()), {k: v.dtype for k, v in logs.items()}
    model_inputs = (torch.full((2, 4), 16), labels) if prior_type == "maskgit" else (tokens, labels)
    logits = accelerate_mixed_precision_forward(prior)(*model_inputs)
    assert logits.dtype == torch.float32 and logits.shape == (2, 4, 16)


def test_scheduler_output_survives_accelerate_fp32_conversion():
    from prior.scheduler import MaskGITSchedulerOutput

    for output in (MaskGITSchedulerOutput(prev_sample=torch.zeros(1, 4, dtype=torch.long)),
                   MaskGITSchedulerOutput(prev_sample=torch.zeros(1, 4, dtype=torch.long),
                                          pred_original_sample=torch.ones(1, 4, dtype=torch.long))):
        converted = convert_to_fp32(output)
        assert type(converted) is MaskGITSchedulerOutput and list(converted.keys()) == list(output.keys())
        assert torch.equal(converted.prev_sample, output.prev_sample)
