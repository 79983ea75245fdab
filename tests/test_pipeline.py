"""LGQPipeline: sampling, label validation, output types, save/load round trip, dtype, assemble command."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import LGQPipeline
from pipelines import assemble
from prior.maskgit import MaskGITPrior
from prior.scheduler import MaskGITScheduler
from tokenizer.model import LGQTokenizer

K, NUM_CLASSES, GRID = 32, 4, 4


def tiny_tokenizer(seed: int = 0) -> LGQTokenizer:
    torch.manual_seed(seed)
    return LGQTokenizer(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_dim=8,
                        attention_resolutions="none", codebook_size=K)


def tiny_maskgit(seed: int = 1) -> MaskGITPrior:
    torch.manual_seed(seed)
    return MaskGITPrior(codebook_size=K, num_classes=NUM_CLASSES, grid_size=GRID, hidden_size=32, num_layers=1,
                        num_heads=2, dropout=0.1)


def tiny_gpt(seed: int = 2):
    from prior.gpt import GPTPrior

    torch.manual_seed(seed)
    return GPTPrior(codebook_size=K, num_classes=NUM_CLASSES, grid_size=GRID, hidden_size=32, num_layers=1,
                    num_heads=2)


@pytest.fixture(scope="module")
def pipe() -> LGQPipeline:
    return LGQPipeline(tokenizer=tiny_tokenizer(), prior=tiny_maskgit(), scheduler=MaskGITScheduler(codebook_size=K))


def sample(pipeline, labels=(0, 1, 3), seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    return pipeline(list(labels) if isinstance(labels, tuple) else labels,
                    generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_components_in_eval_mode_after_construction(pipe):
    assert not pipe.tokenizer.training and not pipe.prior.training
    assert pipe.image_size == (8, 8) and pipe.num_classes == NUM_CLASSES


def test_same_seed_same_images_different_seed_different_images(pipe):
    first, second, other = sample(pipe, seed=0), sample(pipe, seed=0), sample(pipe, seed=1)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_save_load_round_trip_is_exact_offline(pipe, tmp_path):
    before = sample(pipe, seed=3)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["tokenizer"] == ["tokenizer.model", "LGQTokenizer"]
    assert index["prior"] == ["prior.maskgit", "MaskGITPrior"]
    assert index["scheduler"] == ["prior.scheduler", "MaskGITScheduler"]
    assert list((tmp_path / "tokenizer").glob("*.safetensors")) and list((tmp_path / "prior").glob("*.safetensors"))
    loaded = LGQPipeline.from_pretrained(tmp_path)
    assert not loaded.tokenizer.training and not loaded.prior.training
    np.testing.assert_array_equal(before, sample(loaded, seed=3))


def test_int_list_and_tensor_labels(pipe):
    assert sample(pipe, labels=2).shape == (1, 8, 8, 3)
    from_list = sample(pipe, labels=[2, 0], seed=5)
    from_tensor = sample(pipe, labels=torch.tensor([2, 0]), seed=5)
    assert from_list.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(from_list, from_tensor)


@pytest.mark.parametrize("labels", [-1, NUM_CLASSES, [0, NUM_CLASSES], 1.5, [1.0, 2.0], "1", None, True, [],
                                    torch.tensor([0.0, 1.0]), torch.zeros(2, 2, dtype=torch.long)])
def test_label_validation_names_the_valid_range(pipe, labels):
    with pytest.raises(ValueError, match=rf"\[0, {NUM_CLASSES}\)"):
        pipe(labels, num_inference_steps=2)


@pytest.mark.parametrize("kwargs", [dict(num_inference_steps=0), dict(num_inference_steps=2.5), dict(temperature=0.0),
                                    dict(guidance_scale=-1.0), dict(output_type="latent"), dict(generator=0),
                                    dict(top_k=5)])
def test_bad_call_options_raise(pipe, kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    with pytest.raises(ValueError):
        pipe([0], **kwargs)


def test_output_types_follow_diffusers_conventions(pipe):
    as_np = sample(pipe, output_type="np", seed=7)
    as_pt = sample(pipe, output_type="pt", seed=7)
    as_pil = sample(pipe, output_type="pil", seed=7)
    assert as_np.dtype == np.float32 and as_np.shape == (3, 8, 8, 3)
    assert 0.0 <= as_np.min() and as_np.max() <= 1.0
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (3, 3, 8, 8) and as_pt.dtype == torch.float32
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    assert len(as_pil) == 3 and all(isinstance(im, Image.Image) and im.size == (8, 8) for im in as_pil)
    np.testing.assert_array_equal(np.asarray(as_pil[0]), (as_np[0] * 255).round().astype(np.uint8))
    images, = pipe([0], num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (1, 8, 8, 3)


def test_missing_component_folder_is_named(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "prior")
    with pytest.raises(FileNotFoundError, match="'prior'"):
        LGQPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        LGQPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no pipeline folder"):
        LGQPipeline.from_pretrained(tmp_path / "nowhere")


def test_inconsistent_components_are_rejected():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="scheduler"):
        LGQPipeline(tokenizer=tokenizer, prior=tiny_maskgit(), scheduler=None)
    other_prior = MaskGITPrior(codebook_size=2 * K, num_classes=2, grid_size=2, hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="codebook_size"):
        LGQPipeline(tokenizer=tokenizer, prior=other_prior, scheduler=MaskGITScheduler(codebook_size=2 * K))


def test_bf16_prior_keeps_quantizer_fp32_and_bit_exact(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    reference = {k: v.clone() for k, v in pipe.tokenizer.quantizer.state_dict().items()}
    loaded = LGQPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.prior.dtype == torch.bfloat16
    assert next(loaded.tokenizer.decoder.parameters()).dtype == torch.bfloat16
    for name, tensor in loaded.tokenizer.quantizer.state_dict().items():
        if reference[name].is_floating_point():
            assert tensor.dtype == torch.float32, name
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    images = sample(loaded, output_type="pt")
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    assert not loaded.prior.training


def test_gpt_prior_inside_pipeline_round_trip(tmp_path):
    pipeline = LGQPipeline(tokenizer=tiny_tokenizer(), prior=tiny_gpt(), scheduler=None)
    before = sample(pipeline, seed=11, top_k=8, top_p=0.9)
    assert before.shape == (3, 8, 8, 3)
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["prior"] == ["prior.gpt", "GPTPrior"]
    loaded = LGQPipeline.from_pretrained(tmp_path)
    assert loaded.scheduler is None and not loaded.prior.training
    np.testing.assert_array_equal(before, sample(loaded, seed=11, top_k=8, top_p=0.9))


@pytest.mark.parametrize("prior_factory", [tiny_maskgit, tiny_gpt], ids=["maskgit", "gpt"])
def test_assemble_command_detects_prior_type(tmp_path, prior_factory, capsys):
    tokenizer, prior = tiny_tokenizer(), prior_factory()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    prior.save_pretrained(tmp_path / "prior")
    assemble.main(["--tokenizer", str(tmp_path / "tokenizer"), "--prior", str(tmp_path / "prior"),
                   "--output", str(tmp_path / "pipeline"), "--mask-schedule", "arccos"])
    assert "LGQPipeline written to" in capsys.readouterr().out
    loaded = LGQPipeline.from_pretrained(tmp_path / "pipeline")
    assert type(loaded.prior) is type(prior)
    if isinstance(prior, MaskGITPrior):
        assert loaded.scheduler.config.mask_schedule == "arccos"
    else:
        assert loaded.scheduler is None
    assert sample(loaded, labels=[1]).shape == (1, 8, 8, 3)


def test_assemble_rejects_bad_exports(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="prior"):
        assemble.main(["--tokenizer", str(tmp_path / "tokenizer"), "--prior", str(tmp_path / "missing"),
                       "--output", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="prior class"):  # a tokenizer folder passed as the prior
        assemble.main(["--tokenizer", str(tmp_path / "tokenizer"), "--prior", str(tmp_path / "tokenizer"),
                       "--output", str(tmp_path / "out")])
