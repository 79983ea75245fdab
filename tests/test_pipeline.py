"""LGQPipeline: sampling loop, callbacks, generators, label validation and names, output types, save/load round
trip, dtype, assemble command."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import LGQPipeline
from pipelines import assemble
from prior.maskgit import MaskGITPrior
from prior.scheduler import AutoregressiveScheduler, MaskGITScheduler, apply_guidance, filter_logits, guidance_scale_at
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
    assert index["tokenizer"] == ["lgq_component", "LGQTokenizer"]  # the folder's code: tests/test_remote_code.py
    assert index["prior"] == ["lgq_component", "MaskGITPrior"]
    assert index["scheduler"] == ["lgq_component", "MaskGITScheduler"]
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
                                    dict(guidance_scale=-1.0), dict(output_type="tokens"), dict(generator=0),
                                    dict(top_k=5), dict(use_cache=False), dict(mask_schedule="spiral"),
                                    dict(generator=[torch.Generator()] * 2), dict(callback_on_step_end_tensor_inputs=["x"]),
                                    dict(guidance_schedule="cubic")])
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


def test_tokenizer_from_pretrained_keeps_the_quantizer_fp32(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = LGQTokenizer.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)  # _keep_in_fp32_modules
    assert next(loaded.decoder.parameters()).dtype == torch.bfloat16
    for name, tensor in loaded.quantizer.state_dict().items():
        reference = tokenizer.quantizer.state_dict()[name]
        if reference.is_floating_point():
            assert tensor.dtype == torch.float32, name
            torch.testing.assert_close(tensor, reference, rtol=0, atol=0)


def test_gpt_prior_inside_pipeline_round_trip(tmp_path):
    pipeline = LGQPipeline(tokenizer=tiny_tokenizer(), prior=tiny_gpt(), scheduler=None)
    before = sample(pipeline, seed=11, top_k=8, top_p=0.9)
    assert before.shape == (3, 8, 8, 3)
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["prior"] == ["lgq_component", "GPTPrior"]
    loaded = LGQPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, AutoregressiveScheduler) and not loaded.prior.training
    np.testing.assert_array_equal(before, sample(loaded, seed=11, top_k=8, top_p=0.9))
    # folders saved before GPT pipelines had a scheduler (model_index "scheduler": [null, null]) still load
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["scheduler"] = [None, None]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(tmp_path / "scheduler")
    old_format = LGQPipeline.from_pretrained(tmp_path)
    assert isinstance(old_format.scheduler, AutoregressiveScheduler)
    np.testing.assert_array_equal(before, sample(old_format, seed=11, top_k=8, top_p=0.9))


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
        assert isinstance(loaded.scheduler, AutoregressiveScheduler)
    assert sample(loaded, labels=[1]).shape == (1, 8, 8, 3)


def test_assemble_writes_model_cards_and_pushes(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from common.hub import CardInfo, read_card_metadata, write_model_card

    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    tiny_maskgit().save_pretrained(tmp_path / "prior")
    write_model_card(tmp_path / "prior", CardInfo(kind="prior", title="tiny prior", description="a test prior",
                                                  training=[("optimisation steps", 30)], metrics=[("training loss", 1.25)],
                                                  metrics_protocol="the last training batch"))
    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, **kw: f"https://hub.example/{kw['repo_id']}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    output = tmp_path / "pipeline"
    assemble.main(["--tokenizer", str(tmp_path / "tokenizer"), "--prior", str(tmp_path / "prior"),
                   "--output", str(output), "--push-to-hub", "--hub-model-id", "someone/lgq-pipeline"])
    card = (output / "README.md").read_text()
    for text in ("LGQPipeline: MaskGITPrior", "| scheduler | MaskGITScheduler |", "| prior: optimisation steps | 30 |",
                 "| prior: training loss | 1.25 |", "the tokenizer export had no model card", "eval/gen_fid.py",
                 "LGQPipeline.from_pretrained", "license: apache-2.0", "num_inference_steps=12"):
        assert text in card, text
    assert read_card_metadata(output / "prior")["title"] == "tiny prior"  # the component's card travels with it
    assert [(u["repo_id"], Path(u["folder_path"])) for u in uploads] == [("someone/lgq-pipeline", output)]
    assert "pushed" in capsys.readouterr().out


def test_assemble_rejects_bad_exports(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="prior"):
        assemble.main(["--tokenizer", str(tmp_path / "tokenizer"), "--prior", str(tmp_path / "missing"),
                       "--output", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="prior class"):  # a tokenizer folder passed as the prior
        assemble.main(["--tokenizer", str(tmp_path / "tokenizer"), "--prior", str(tmp_path / "tokenizer"),
                       "--output", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- the sampling loop
# The loops below are the sampling code as it was before LGQPipeline.__call__ owned the loop (MaskGITPrior.generate
# and GPTPrior.generate without KV cache), kept as references: the pipeline must give the same tokens for the same
# seed. (GPT's cached decoding is compared with the uncached one in test_gpt.py.)
def reference_maskgit_tokens(prior, labels, num_inference_steps, guidance_scale, generator, schedule="cosine"):
    scheduler = MaskGITScheduler(codebook_size=prior.codebook_size, mask_schedule=schedule)
    scheduler.set_timesteps(num_inference_steps)
    labels = torch.as_tensor(labels)
    tokens = torch.full((labels.shape[0], prior.seq_len), prior.mask_token_id, dtype=torch.long)
    with torch.no_grad():
        for step in scheduler.timesteps.tolist():
            masked = tokens == prior.mask_token_id
            logits = prior.guided_logits(tokens, labels, guidance_scale, positions=masked)
            tokens = scheduler.step(logits, step, tokens, generator=generator).prev_sample
    return tokens.view(-1, *prior.grid_size)


def reference_gpt_tokens(prior, labels, guidance_scale, generator, top_k=None, guidance_schedule="constant"):
    from prior.scheduler import sample_categorical

    labels = torch.as_tensor(labels)
    model_labels = torch.cat([labels, torch.full_like(labels, prior.null_class)])
    tokens = torch.empty(labels.shape[0], 0, dtype=torch.long)
    with torch.no_grad():
        for i in range(prior.seq_len):
            out = prior.transformer(inputs_embeds=prior._embed(model_labels, tokens.repeat(2, 1)), use_cache=False)
            cond, uncond = out.logits[:, -1].float().chunk(2)
            logits = apply_guidance(cond, uncond, guidance_scale_at(i, prior.seq_len, guidance_scale, guidance_schedule))
            next_token = sample_categorical(filter_logits(logits, top_k).softmax(-1), generator)
            tokens = torch.cat([tokens, next_token.unsqueeze(1)], dim=1)
    return tokens.view(-1, *prior.grid_size)


def test_pipeline_loop_gives_the_reference_tokens_for_the_same_seed(pipe):
    prior = pipe.prior
    for schedule, scale in (("cosine", 1.0), ("arccos", 2.5)):
        expected = reference_maskgit_tokens(prior, [0, 1, 3], 5, scale, torch.Generator().manual_seed(4), schedule)
        got = pipe([0, 1, 3], num_inference_steps=5, guidance_scale=scale, mask_schedule=schedule,
                   generator=torch.Generator().manual_seed(4), output_type="latent").images
        assert torch.equal(got, expected)
        assert torch.equal(prior.generate([0, 1, 3], num_inference_steps=5, guidance_scale=scale, schedule=schedule,
                                          generator=torch.Generator().manual_seed(4)), expected)
    # images are the decoded reference tokens
    images = sample(pipe, labels=(0, 1, 3), seed=4, num_inference_steps=5, guidance_scale=2.5, mask_schedule="arccos",
                    output_type="pt")
    decoded = (pipe.tokenizer.decode(expected) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, decoded)
    gpt_pipe = LGQPipeline(tokenizer=tiny_tokenizer(), prior=tiny_gpt())
    for settings in (dict(guidance_scale=2.0, top_k=8), dict(guidance_scale=3.0, guidance_schedule="linear")):
        expected = reference_gpt_tokens(gpt_pipe.prior, [2, 0], generator=torch.Generator().manual_seed(9), **settings)
        got = gpt_pipe([2, 0], generator=torch.Generator().manual_seed(9), output_type="latent", **settings).images
        assert torch.equal(got, expected)


def test_latent_output_is_the_token_grid(pipe):
    tokens = pipe([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="latent").images
    assert tokens.dtype == torch.int64 and tokens.shape == (2, GRID, GRID) and ((tokens >= 0) & (tokens < K)).all()
    images = pipe([0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(images, (pipe.tokenizer.decode(tokens) / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("prior_factory", [tiny_maskgit, tiny_gpt], ids=["maskgit", "gpt"])
def test_callback_on_step_end_sees_every_step_and_can_change_tokens(prior_factory):
    pipeline = LGQPipeline(tokenizer=tiny_tokenizer(), prior=prior_factory(),
                           scheduler=MaskGITScheduler(codebook_size=K) if prior_factory is tiny_maskgit else None)
    seen = []

    def record(pipe, step_index, timestep, callback_kwargs):
        assert pipe is pipeline
        tokens = callback_kwargs["tokens"]
        seen.append((step_index, int(timestep), int((tokens == K).sum()), tuple(callback_kwargs["logits"].shape)))
        return {}

    final = pipeline([1, 3], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent",
                     callback_on_step_end=record, callback_on_step_end_tensor_inputs=["tokens", "logits"]).images
    steps = pipeline.num_timesteps
    assert steps == (4 if prior_factory is tiny_maskgit else GRID * GRID)
    assert [s[0] for s in seen] == list(range(steps)) and [s[1] for s in seen] == list(range(steps))
    undecided = [s[2] for s in seen]
    assert undecided == sorted(undecided, reverse=True) and undecided[-1] == 0 and undecided[0] > 0
    assert all(s[3][-1] == K for s in seen)

    # a callback that overwrites the tokens after the first step: decoding continues from its tokens
    def force_first_token(pipe, step_index, timestep, callback_kwargs):
        tokens = callback_kwargs["tokens"]
        if step_index == 0:
            tokens[:, 0] = 7
        return {"tokens": tokens}

    forced = pipeline([1, 3], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent",
                      callback_on_step_end=force_first_token).images
    assert (forced.view(2, -1)[:, 0] == 7).all() and final.shape == forced.shape


def test_progress_bar_follows_diffusers_config(pipe, capsys):
    pipe([0], num_inference_steps=3, output_type="latent")
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe([0], num_inference_steps=3, output_type="latent")
        assert "3/3" not in capsys.readouterr().err
    finally:
        pipe.set_progress_bar_config()


@pytest.mark.parametrize("prior_factory", [tiny_maskgit, tiny_gpt], ids=["maskgit", "gpt"])
def test_a_list_of_generators_seeds_each_image(prior_factory):
    pipeline = LGQPipeline(tokenizer=tiny_tokenizer(), prior=prior_factory(),
                           scheduler=MaskGITScheduler(codebook_size=K) if prior_factory is tiny_maskgit else None)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    options = dict(num_inference_steps=4, output_type="latent", guidance_scale=2.0)
    batch = pipeline([1, 3], generator=gens(5, 6), **options).images
    assert torch.equal(batch, pipeline([1, 3], generator=gens(5, 6), **options).images)
    # each image depends only on its own generator: the same (label, seed) alone gives the same grid
    assert torch.equal(batch[1:], pipeline([3], generator=gens(6), **options).images)
    assert torch.equal(batch[:1], pipeline([1], generator=gens(5), **options).images)


def test_per_call_schedule_does_not_change_the_saved_config(pipe, tmp_path):
    assert pipe.scheduler.config.mask_schedule == "cosine"
    arccos = sample(pipe, seed=2, mask_schedule="arccos", output_type="latent")
    assert pipe.scheduler.config.mask_schedule == "cosine"
    cosine = sample(pipe, seed=2, output_type="latent")
    assert torch.equal(cosine, sample(pipe, seed=2, mask_schedule="cosine", output_type="latent"))
    assert not torch.equal(arccos, cosine)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["mask_schedule"] == "cosine"


def test_class_names_id2label_and_get_label_ids(tmp_path):
    names = ["astronaut", "coffee", "rocket", "chelsea"]
    torch.manual_seed(1)
    prior = MaskGITPrior(codebook_size=K, num_classes=NUM_CLASSES, grid_size=GRID, hidden_size=32, num_layers=1,
                         num_heads=2, class_names=names)
    pipeline = LGQPipeline(tokenizer=tiny_tokenizer(), prior=prior, scheduler=MaskGITScheduler(codebook_size=K))
    assert pipeline.id2label == dict(enumerate(names))
    assert pipeline.get_label_ids(["coffee", "astronaut"]) == [1, 0] and pipeline.get_label_ids("chelsea") == [3]
    with pytest.raises(ValueError, match="unknown class name.*'tea'.*coffee"):
        pipeline.get_label_ids(["tea"])
    pipeline.save_pretrained(tmp_path)
    loaded = LGQPipeline.from_pretrained(tmp_path)
    assert loaded.id2label == dict(enumerate(names)) and loaded.get_label_ids(["rocket"]) == [2]
    with pytest.raises(ValueError, match="no class names"):
        LGQPipeline(tokenizer=tiny_tokenizer(), prior=tiny_maskgit(),
                    scheduler=MaskGITScheduler(codebook_size=K)).get_label_ids(["coffee"])
    with pytest.raises(ValueError, match="class_names"):
        MaskGITPrior(codebook_size=K, num_classes=NUM_CLASSES, grid_size=GRID, hidden_size=32, num_layers=1,
                     num_heads=2, class_names=names[:3])


def test_token_only_pipeline_and_generate_restore_the_training_mode():
    prior = tiny_maskgit().train()
    tokens = prior.generate([0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert prior.training and tokens.shape == (2, GRID, GRID)
    token_only = LGQPipeline(tokenizer=None, prior=prior, scheduler=MaskGITScheduler(codebook_size=K))
    with pytest.raises(ValueError, match="no tokenizer|needs a tokenizer"):
        token_only([0], num_inference_steps=2, output_type="pt")
