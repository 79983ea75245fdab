"""``train.compile: true`` (common.training.compile_in_place) in both train scripts, and a compiled prior in the
pipeline: the same losses and tokens as eager, and checkpoints / exports that load without compile.

Inductor's own random numbers differ from eager's, so these comparisons set ``fallback_random`` (compiled code then
draws eager's random numbers: MaskGIT's masks, dropout); training runs leave it off."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from safetensors.torch import load_file

from prior.maskgit import MaskGITPrior
from prior.tokens import save_token_directory
from test_pipeline import sample, tiny_maskgit, tiny_tokenizer
from test_prior_train import CLASSES, K, TINY as PRIOR_TINY, class_patterned_tokens
from test_tokenizer_train import FAST, TINY as TOKENIZER_TINY

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # compiling takes tens of seconds


@pytest.fixture(autouse=True)
def eager_random_numbers():
    with inductor_config.patch(fallback_random=True):
        yield


def losses(trainer) -> list[float]:
    return [logs["loss"] for _, logs in trainer.history]


def assert_no_compile_wrappers(folder: Path) -> set[str]:
    keys = set()
    for file in folder.rglob("*.safetensors"):
        keys |= set(load_file(str(file)))
    assert keys and not any("_orig_mod" in key for key in keys), sorted(keys)[:5]
    return keys


def test_compiled_tokenizer_training_equals_eager(tmp_path):
    from tokenizer.model import LGQTokenizer
    from tokenizer.train import main

    def run(name: str, *extra: str):
        return main(["--config", str(TOKENIZER_TINY), *FAST, "loss.gan_weight=0", "train.max_steps=3",
                     "train.grad_accum_steps=1", "train.log_every=1", "train.image_log_every=0",
                     "train.checkpoint_every=0", f"train.output_dir={tmp_path / name}", *extra])

    eager, compiled = run("eager"), run("compiled", "train.compile=true")
    assert compiled.unwrap()._compiled_call_impl is not None and eager.unwrap()._compiled_call_impl is None
    # the first two steps agree to float precision; by the third the compiled kernels' rounding, amplified by the
    # optimizer's updates, moves the loss by ~1e-4 (relative) on this LGQ tokenizer (the priors stay at 1e-7)
    np.testing.assert_allclose(losses(compiled)[:2], losses(eager)[:2], rtol=1e-5)
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=1e-3)
    assert_no_compile_wrappers(tmp_path / "compiled" / "checkpoints")
    export_keys = assert_no_compile_wrappers(tmp_path / "compiled" / "tokenizer")
    assert export_keys == assert_no_compile_wrappers(tmp_path / "eager" / "tokenizer")
    loaded = LGQTokenizer.from_pretrained(tmp_path / "compiled" / "tokenizer")  # eager, no compile
    assert loaded._compiled_call_impl is None
    for name, tensor in compiled.ema.module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    reconstruction = loaded.eval()(torch.rand(2, 3, 16, 16) * 2 - 1).reconstruction
    assert reconstruction.shape == (2, 3, 16, 16) and torch.isfinite(reconstruction).all()


def test_compiled_prior_training_equals_eager_and_resumes_eagerly(tmp_path):
    from prior.train import main

    tokens_dir = tmp_path / "tokens" / "train"
    tokens, labels = class_patterned_tokens()
    save_token_directory(tokens_dir, tokens, labels, codebook_size=K, num_classes=CLASSES)

    def run(name: str, steps: int, *extra: str):
        return main(["--config", str(PRIOR_TINY), f"data.tokens={tokens_dir}", f"train.output_dir={tmp_path / name}",
                     f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=3",
                     "train.progress_bar=false", *extra])

    eager = run("eager", 4)
    compiled = run("compiled", 3, "train.compile=true")
    np.testing.assert_allclose(losses(compiled), losses(eager)[:3], rtol=1e-5)
    assert_no_compile_wrappers(tmp_path / "compiled" / "checkpoints")
    assert_no_compile_wrappers(tmp_path / "compiled" / "prior")
    # the compiled run's checkpoint resumes without compile, exactly where an eager run would be
    resumed = run("compiled", 4, "train.resume=latest")
    assert resumed.resumed_from is not None and resumed.unwrap()._compiled_call_impl is None
    np.testing.assert_allclose(losses(resumed)[-1], losses(eager)[-1], rtol=1e-5)
    loaded = MaskGITPrior.from_pretrained(tmp_path / "compiled" / "prior")
    reference = MaskGITPrior.from_pretrained(tmp_path / "eager" / "prior")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prior_type", ["maskgit", "gpt"])
def test_compiled_prior_samples_the_same_tokens(prior_type):
    """The documented way to compile a pipeline's prior for sampling: ``pipe.prior.compile_sampling()``. Compiled
    code runs in the guided decoding loop (dynamo captures frames there; ``pipe.prior.compile()``, which compiles
    ``forward`` only, captures none) and gives eager's tokens."""
    from torch._dynamo.utils import counters

    from pipelines import LGQPipeline
    from prior.scheduler import AutoregressiveScheduler, MaskGITScheduler
    from test_pipeline import tiny_gpt

    prior = tiny_maskgit() if prior_type == "maskgit" else tiny_gpt()
    scheduler = MaskGITScheduler(codebook_size=32) if prior_type == "maskgit" else AutoregressiveScheduler(codebook_size=32)
    pipe = LGQPipeline(tokenizer=tiny_tokenizer(), prior=prior, scheduler=scheduler)
    eager = sample(pipe, labels=(0, 1, 3), seed=4, output_type="latent", guidance_scale=2.0)
    torch._dynamo.reset()
    counters.clear()
    pipe.prior.compile()  # forward only: the decoding loop stays eager
    sample(pipe, labels=(0, 1, 3), seed=4, output_type="latent", guidance_scale=2.0)
    assert counters["stats"]["calls_captured"] == 0
    pipe.prior.compile_sampling()
    compiled = sample(pipe, labels=(0, 1, 3), seed=4, output_type="latent", guidance_scale=2.0)
    assert counters["stats"]["calls_captured"] > 0
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert "_orig_mod" not in "".join(pipe.prior.state_dict())
