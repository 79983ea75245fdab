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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


# ----------------------------------------------------------------------------- the train scripts under bf16
def run_recording_precision(stage: str, *args: str) -> dict:
    """Run ``<stage>/train.py args`` (through tests/scripts/train_record_precision.py); return its PRECISION record."""
    import json
    import subprocess
    import sys

    from test_tokenizer_train import ENV, ROOT

    cmd = [sys.executable, str(ROOT / "tests" / "scripts" / "train_record_precision.py"), stage, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PRECISION ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0][len("PRECISION "):])


def resume_copy(run_dir, copy_dir, resume_step: int, export_name: str):
    """A copy of a finished run cut back to its checkpoint at ``resume_step`` (= a run killed right after it)."""
    import shutil

    shutil.copytree(run_dir, copy_dir)
    for checkpoint in (copy_dir / "checkpoints").iterdir():
        if int(checkpoint.name.split("_")[1]) > resume_step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(copy_dir / export_name)


def checkpoint_and_export(run_dir, step: int, export_file) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted((run_dir / "checkpoints" / f"step_{step:07d}").glob("model*.safetensors")):
        tensors.update({f"{path.name}/{k}": v for k, v in load_file(str(path)).items()})
    tensors.update({f"export/{k}": v for k, v in load_file(str(run_dir / export_file)).items()})
    return tensors


def assert_finite_history(run_dir, steps):
    import math

    from common.training import read_history

    history = read_history(run_dir)
    assert [row["step"] for row in history if "loss" in row] == list(steps)  # training rows; val rows beside them
    bad = {(row["step"], k): v for row in history for k, v in row.items() if not math.isfinite(v)}
    assert not bad, bad


@pytest.mark.slow
def test_bf16_tokenizer_training_checkpoints_resumes_exactly_and_exports(tmp_path):
    from test_tokenizer_train import FAST, TINY

    from tokenizer.model import LGQTokenizer

    settings = ["--config", str(TINY), *FAST, "train.mixed_precision=bf16", "train.max_steps=6",
                "train.checkpoint_every=3", "train.image_log_every=3"]
    run_dir = tmp_path / "run"
    record = run_recording_precision("tokenizer", *settings, f"train.output_dir={run_dir}")
    assert record["linear_or_conv_outputs"] == ["torch.bfloat16"]  # encoder / decoder really ran in bf16
    assert record["quantizer_calls"] == 6 * 2  # steps x grad_accum_steps
    assert record["quantizer_inputs"] == [["torch.float32", False]]  # fp32 latents, autocast off inside
    assert_finite_history(run_dir, range(2, 7, 2))

    resumed_dir = tmp_path / "resumed"
    resume_copy(run_dir, resumed_dir, 3, "tokenizer")
    record = run_recording_precision("tokenizer", *settings, f"train.output_dir={resumed_dir}", "--resume", "latest")
    assert record["quantizer_calls"] == 3 * 2
    reference = checkpoint_and_export(run_dir, 6, "tokenizer/diffusion_pytorch_model.safetensors")
    result = checkpoint_and_export(resumed_dir, 6, "tokenizer/diffusion_pytorch_model.safetensors")
    assert reference.keys() == result.keys() and any(k.startswith("model_1") for k in result)  # + discriminator
    different = [k for k in reference if not torch.equal(reference[k], result[k])]
    assert not different, f"{len(different)} tensors differ after a bf16 resume, e.g. {different[:5]}"

    tokenizer = LGQTokenizer.from_pretrained(str(run_dir / "tokenizer")).eval()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in tokenizer.parameters())
    assert tokenizer.encode(torch.rand(2, 3, 16, 16) * 2 - 1).shape == (2, 8, 8)


@pytest.mark.slow
@pytest.mark.parametrize("prior_type", ["maskgit", "gpt"])
def test_bf16_prior_training_checkpoints_resumes_exactly_and_exports(prior_type, tmp_path):
    import numpy as np

    from prior.tokens import save_token_directory
    from test_tokenizer_train import ROOT

    rng = np.random.default_rng(0)
    save_token_directory(tmp_path / "tokens", rng.integers(0, 16, size=(16, 4, 4)), np.arange(16) % 4,
                         codebook_size=16, num_classes=4)
    settings = ["--config", str(ROOT / "configs" / "prior" / "tiny.yaml"), f"data.tokens={tmp_path / 'tokens'}",
                f"model.prior_type={prior_type}", "train.mixed_precision=bf16", "train.max_steps=4",
                "train.checkpoint_every=2", "train.log_every=1", "train.image_log_every=2", "train.progress_bar=false"]
    run_dir = tmp_path / "run"
    record = run_recording_precision("prior", *settings, f"train.output_dir={run_dir}")
    assert record["linear_or_conv_outputs"] == ["torch.bfloat16"]
    assert_finite_history(run_dir, range(1, 5))
    assert sorted(p.name for p in (run_dir / "images").glob("*.png")) == ["samples_step0000002.png",
                                                                          "samples_step0000004.png"]
    resumed_dir = tmp_path / "resumed"
    resume_copy(run_dir, resumed_dir, 2, "prior")
    run_recording_precision("prior", *settings, f"train.output_dir={resumed_dir}", "--resume", "latest")
    reference = checkpoint_and_export(run_dir, 4, "prior/diffusion_pytorch_model.safetensors")
    result = checkpoint_and_export(resumed_dir, 4, "prior/diffusion_pytorch_model.safetensors")
    different = [k for k in reference if not torch.equal(reference[k], result[k])]
    assert reference.keys() == result.keys() and not different, different[:5]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for k, v in result.items() if k.startswith("export/"))


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_torch_compile_of_encoder_decoder_and_priors_equals_eager():
    """Inductor on CPU. Encoder and decoder compile as one graph each (fullgraph); the priors' input checks
    (int(tokens.max()) etc.) break their graphs, which compile still runs correctly."""
    import torch._dynamo

    from prior.gpt import GPTPrior
    from prior.maskgit import MaskGITPrior

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LGQTokenizer(base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, latent_dim=4,
                         attention_resolutions="lowest", codebook_size=16).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    prior_sizes = dict(codebook_size=16, num_classes=3, grid_size=4, hidden_size=16, num_layers=1, num_heads=2)
    maskgit, gpt = MaskGITPrior(**prior_sizes, dropout=0.0).eval(), GPTPrior(**prior_sizes).eval()
    labels = torch.tensor([0, 2])
    cases = [
        ("encoder", model.encoder, (images,), True),
        ("decoder", model.decoder, (torch.randn(2, 4, 8, 8),), True),
        ("maskgit", maskgit, (torch.randint(0, 17, (2, 16)), labels), False),  # 16 = mask token
        ("gpt", gpt, (torch.randint(0, 16, (2, 16)), labels), False),
    ]
    with torch.no_grad():
        for name, module, inputs, fullgraph in cases:
            eager = module(*inputs)
            compiled = torch.compile(module, fullgraph=fullgraph)(*inputs)
            assert compiled.dtype == eager.dtype and compiled.shape == eager.shape, name
            assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5), (name, (compiled - eager).abs().max())
