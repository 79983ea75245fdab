"""`prior/train.py` end to end on tiny token grids (CPU, in-process): learning, export, exact resume,
sample grids decoded through a tokenizer, and the data/config consistency errors."""
from __future__ import annotations

import math
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from common.config import ConfigError, load_config
from prior.config import PriorRunConfig
from prior.tokens import save_token_directory, tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "prior" / "tiny.yaml"
K, CLASSES, GRID = 16, 4, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def class_patterned_tokens(num_grids: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grids [N, 4, 4] in [0, K): one fixed random pattern per class with 10% of the tokens resampled."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, K, size=(CLASSES, GRID, GRID))
    labels = np.arange(num_grids) % CLASSES
    tokens = patterns[labels].copy()
    noisy = rng.random(tokens.shape) < 0.1
    tokens[noisy] = rng.integers(0, K, size=int(noisy.sum()))
    return tokens, labels


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokens") / "train"
    tokens, labels = class_patterned_tokens()
    save_token_directory(directory, tokens, labels, codebook_size=K, num_classes=CLASSES,
                         class_names=[f"class_{c}" for c in range(CLASSES)])
    return directory


def train(output_dir: Path, tokens: Path, *overrides: str):
    from prior.train import main

    return main(["--config", str(TINY), f"data.tokens={tokens}", f"train.output_dir={output_dir}",
                 "train.progress_bar=false", *overrides])


def mean_of(history, key: str, steps) -> float:
    values = dict(history)
    return sum(values[s][key] for s in steps) / len(steps)


@pytest.mark.slow
@pytest.mark.parametrize("prior_type", ["maskgit", "gpt"])
def test_tiny_prior_learns_and_exports(prior_type, token_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    uploads = []  # the Hub upload is replaced: tests never reach the network
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, **kw: f"https://hub.example/{kw['repo_id']}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: uploads.append((kw, sorted(p.name for p in Path(kw["folder_path"]).iterdir()))))
    trainer = train(tmp_path / "run", token_dir, f"model.prior_type={prior_type}", "train.max_steps=30",
                    "train.log_every=1", "train.checkpoint_every=0", "train.image_log_every=15",
                    "train.push_to_hub=true", f"train.hub_model_id=someone/tiny-{prior_type}")
    history = trainer.history
    assert [s for s, _ in history] == list(range(1, 31))
    accuracy = "masked_accuracy" if prior_type == "maskgit" else "accuracy"
    for key in ("loss", accuracy, "lr/model", "grad_norm/model", "images_per_sec"):
        assert key in history[-1][1], key
    first, last = mean_of(history, "loss", range(1, 6)), mean_of(history, "loss", range(26, 31))
    assert last < 0.9 * first, (first, last)
    assert mean_of(history, accuracy, range(26, 31)) > mean_of(history, accuracy, range(1, 6))
    # token grids shown as grey levels (no data.tokenizer)
    assert sorted(p.name for p in (tmp_path / "run" / "images").glob("*.png")) == [
        "samples_step0000015.png", "samples_step0000030.png"]

    if prior_type == "maskgit":
        from prior.maskgit import MaskGITPrior as Prior

        options = {"num_inference_steps": 4}
    else:
        from prior.gpt import GPTPrior as Prior

        options = {}
    assert f"load with {Prior.__name__}.from_pretrained(" in capsys.readouterr().out  # the prior, not its loss wrapper
    # the export's model card, then the upload of the whole folder (card included) to the requested repo
    card = (tmp_path / "run" / "prior" / "README.md").read_text()
    for text in (Prior.__name__, f"| codebook size K | {K} |", "class_0, class_1", "| optimisation steps | 30 |",
                 "training loss", "Protocol: the last logged training batch at step 30", "license: apache-2.0",
                 f"{Prior.__name__}.from_pretrained("):
        assert text in card, text
    (upload, files), = uploads
    assert upload["repo_id"] == f"someone/tiny-{prior_type}" and Path(upload["folder_path"]) == tmp_path / "run" / "prior"
    assert {"README.md", "config.json", "diffusion_pytorch_model.safetensors"} <= set(files)
    prior = Prior.from_pretrained(str(tmp_path / "run" / "prior")).eval()
    assert (prior.codebook_size, prior.num_classes, prior.grid_size) == (K, CLASSES, (GRID, GRID))
    assert prior.config.class_names == [f"class_{c}" for c in range(CLASSES)]  # from the token data's meta.json
    samples = prior.generate([0, 1, 2, 3], guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **options)
    assert samples.shape == (4, GRID, GRID) and samples.dtype == torch.int64
    assert 0 <= int(samples.min()) and int(samples.max()) < K
    # the export is the EMA of the training weights, not the raw weights
    exported = load_file(str(tmp_path / "run" / "prior" / "diffusion_pytorch_model.safetensors"))
    raw = trainer.unwrap("model").prior.state_dict()
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = output_dir / "checkpoints" / "step_0000008"
    tensors = {f"checkpoint/{k}": v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    export = load_file(str(output_dir / "prior" / "diffusion_pytorch_model.safetensors"))
    tensors.update({f"export/{k}": v for k, v in export.items()})
    return tensors


@pytest.mark.slow
def test_resume_from_a_checkpoint_equals_uninterrupted_run(token_dir, tmp_path):
    # dropout, label dropout, grad accumulation, EMA and sample grids between steps all consume or touch RNG
    settings = ["model.dropout=0.1", "train.max_steps=8", "train.batch_size=4", "train.grad_accum_steps=2",
                "train.checkpoint_every=4", "train.image_log_every=2", "train.log_every=2"]
    reference = tmp_path / "uninterrupted"
    train(reference, token_dir, *settings)
    # the state of an interrupted run: the step-4 checkpoint only
    interrupted = tmp_path / "interrupted"
    shutil.copytree(reference, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step_0000008")
    shutil.rmtree(interrupted / "prior")
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_0000004"]

    trainer = train(interrupted, token_dir, *settings, "--resume", "latest")
    assert trainer.resumed_from is not None and trainer.resumed_from.name == "step_0000004"
    assert [s for s, _ in trainer.history] == [6, 8]
    expected, result = final_weights(reference), final_weights(interrupted)
    assert expected.keys() == result.keys()
    different = [k for k in expected if not torch.equal(expected[k], result[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_equals_uninterrupted_run(token_dir, tmp_path):
    from ddp import run_until_signal  # tests/ddp.py
    from common.training import PREEMPTED_EXIT_CODE

    settings = ["model.dropout=0.1", "train.max_steps=8", "train.batch_size=4", "train.grad_accum_steps=2",
                "train.checkpoint_every=4", "train.image_log_every=2", "train.log_every=2", "train.progress_bar=false"]
    reference = tmp_path / "uninterrupted"
    train(reference, token_dir, *settings)
    interrupted = tmp_path / "interrupted"
    script = ROOT / "tests" / "scripts" / "train_wait_for_signal.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LGQ_WAIT_AT_STEP": "5", "PYTHONPATH": str(ROOT)}
    # SIGTERM during step 5 (0-based): seen in step 6's all-reduce, so steps 0-6 are done: checkpoint step 7
    proc = run_until_signal([sys.executable, str(script), "prior", "--config", str(TINY), f"data.tokens={token_dir}",
                             f"train.output_dir={interrupted}", *settings], signal.SIGTERM, env)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-4000:]
    assert "preempted (SIGTERM): stopped after step 7" in proc.stdout
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_0000004", "step_0000007"]

    trainer = train(interrupted, token_dir, *settings, "--resume", "latest")
    assert trainer.resumed_from.name == "step_0000007" and [s for s, _ in trainer.history] == [8]
    expected, result = final_weights(reference), final_weights(interrupted)
    different = [k for k in expected if not torch.equal(expected[k], result[k])]
    assert expected.keys() == result.keys() and not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A random 2x-downsampling tokenizer with K = 16 (4x4 grids <-> 8x8 images), saved with save_pretrained."""
    from tokenizer.model import LGQTokenizer

    torch.manual_seed(0)
    model = LGQTokenizer(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_dim=4,
                         attention_resolutions="none", quantizer="vq", codebook_size=K)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    model.save_pretrained(str(path))
    return path


def test_samples_are_decoded_by_the_tokenizer_the_tokens_came_from(tiny_tokenizer, tmp_path):
    from PIL import Image
    from tokenizer.model import LGQTokenizer

    fingerprint = tokenizer_fingerprint(LGQTokenizer.from_pretrained(str(tiny_tokenizer)))
    tokens, labels = class_patterned_tokens()
    save_token_directory(tmp_path / "tokens", tokens, labels, codebook_size=K, num_classes=CLASSES,
                         tokenizer_path=str(tiny_tokenizer), tokenizer_hash=fingerprint)
    train(tmp_path / "run", tmp_path / "tokens", f"data.tokenizer={tiny_tokenizer}", "train.max_steps=2",
          "train.warmup_steps=0", "train.image_log_every=2", "train.checkpoint_every=0", "sample.num_images=3")
    grid = Image.open(tmp_path / "run" / "images" / "samples_step0000002.png")
    assert grid.size == (3 * (8 + 2) + 2, 8 + 2 * 2)  # three decoded 8x8 images with make_grid padding 2


def test_tokens_from_another_tokenizer_are_refused(tiny_tokenizer, tmp_path):
    tokens, labels = class_patterned_tokens()
    save_token_directory(tmp_path / "tokens", tokens, labels, codebook_size=K, num_classes=CLASSES,
                         tokenizer_path="elsewhere", tokenizer_hash="0" * 64)
    with pytest.raises(ValueError, match="do not come from data.tokenizer"):
        train(tmp_path / "run", tmp_path / "tokens", f"data.tokenizer={tiny_tokenizer}")
    assert not (tmp_path / "run").exists()  # refused before a run directory is created


@pytest.mark.parametrize("override, message", [
    ("model.codebook_size=1024", "model.codebook_size=1024 conflicts with the token data"),
    ("model.grid_size=16", "model.grid_size=16 conflicts with the token data"),
    ("model.num_classes=1000", "model.num_classes=1000 conflicts with the token data"),
])
def test_config_that_contradicts_the_token_data_is_refused(override, message, token_dir, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "run", token_dir, override)
    assert not (tmp_path / "run").exists()


def test_matching_data_shape_in_the_config_is_accepted_and_num_classes_can_come_from_the_config(tmp_path):
    from prior.config import resolve_data_shape

    cfg = load_config(PriorRunConfig, TINY, ["data.tokens=x", f"model.codebook_size={K}", f"model.grid_size={GRID}"])
    meta = {"codebook_size": K, "grid_size": [GRID, GRID], "num_classes": None}
    with pytest.raises(ConfigError, match="does not record num_classes; set model.num_classes"):
        resolve_data_shape(cfg.model, meta, "x")
    cfg.model.num_classes = 7
    assert resolve_data_shape(cfg.model, meta, "x") == {"codebook_size": K, "grid_size": (GRID, GRID), "num_classes": 7}


def test_unigram_output_bias_init_starts_training_at_the_token_frequencies(tmp_path):
    """Tokens that use 4 of K = 16 codes: the prior with model.output_bias_init=unigram starts from their smoothed
    frequencies (bias of the code never used ~ log(1 / (N + K))), so its first loss is below the zero-bias prior's
    (which spreads 12/16 of its probability over unused codes)."""
    tokens, labels = class_patterned_tokens()
    tokens %= 4
    directory = tmp_path / "tokens"
    save_token_directory(directory, tokens, labels, codebook_size=K, num_classes=CLASSES)
    first_loss = {}
    for init in ("zero", "unigram"):
        trainer = train(tmp_path / init, directory, f"model.output_bias_init={init}", "train.max_steps=1",
                        "train.warmup_steps=0",
                        "train.log_every=1", "train.checkpoint_every=0", "train.image_log_every=0", "train.seed=0")
        first_loss[init] = trainer.history[0][1]["loss"]
        bias = trainer.unwrap("model").prior.output_bias.detach()
        if init == "unigram":
            assert float(bias[4:].max()) < math.log(2 / (tokens.size + K))  # one step of lr 3e-3 moved it little
    assert first_loss["unigram"] < first_loss["zero"] - 0.5, first_loss
    assert OmegaConf.load(tmp_path / "unigram" / "config.yaml").model.output_bias_init == "unigram"
    assert "model.output_bias_init=unigram" in (tmp_path / "unigram" / "prior" / "README.md").read_text()
    assert "output bias at the start" not in (tmp_path / "zero" / "prior" / "README.md").read_text()


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.tokens"):
        load_config(PriorRunConfig, TINY)  # data.tokens is required (??? in tiny.yaml)
    with pytest.raises(ValueError, match="model.prior_type must be one of"):
        load_config(PriorRunConfig, TINY, ["data.tokens=x", "model.prior_type=diffusion"])
    with pytest.raises(ValueError, match="num_kv_heads"):
        load_config(PriorRunConfig, TINY, ["data.tokens=x", "model.num_kv_heads=1"])
    with pytest.raises(ValueError, match="model.output_bias_init must be one of"):
        load_config(PriorRunConfig, TINY, ["data.tokens=x", "model.output_bias_init=ones"])
    with pytest.raises(ValueError, match="needs model.prior_type=maskgit"):
        load_config(PriorRunConfig, TINY, ["data.tokens=x", "model.prior_type=gpt", "model.output_bias_init=unigram"])
    with pytest.raises(ConfigError, match="Did you mean 'model.label_dropout'"):
        load_config(PriorRunConfig, TINY, ["data.tokens=x", "model.label_dropuot=0.2"])
    cfg = load_config(PriorRunConfig, TINY, ["data.tokens=[a,b]"])
    assert cfg.data.token_paths == ["a", "b"]
    with pytest.raises(ValueError, match="GPT priors only"):
        load_config(PriorRunConfig, TINY, ["data.tokens=x", "sample.top_k=5"])  # tiny.yaml is MaskGIT
    with pytest.raises(ValueError, match=r"sample.top_p must be in \(0, 1\]"):
        load_config(PriorRunConfig, TINY, ["data.tokens=x", "model.prior_type=gpt", "sample.top_p=0"])
    with pytest.raises(ValueError, match="sample.top_k must be >= 1"):
        load_config(PriorRunConfig, TINY, ["data.tokens=x", "model.prior_type=gpt", "sample.top_k=0"])


def test_gpt_sample_grid_uses_top_k(token_dir, tmp_path):
    """sample.top_k=1 is greedy decoding: the logged grid no longer depends on the sampling seed."""
    def grid(name, *options):
        train(tmp_path / name, token_dir, "model.prior_type=gpt", "train.max_steps=2", "train.warmup_steps=0",
              "train.image_log_every=2", "train.checkpoint_every=0", "sample.num_images=4", *options)
        return (tmp_path / name / "images" / "samples_step0000002.png").read_bytes()

    greedy = grid("greedy0", "sample.top_k=1", "sample.seed=0")
    assert grid("greedy1", "sample.top_k=1", "sample.seed=1") == greedy
    assert grid("sampled1", "sample.seed=1") != greedy


def test_all_prior_configs_load_with_the_paper_recipes():
    names = {p.stem for p in (ROOT / "configs" / "prior").glob("*.yaml")}
    assert {"tiny", "builtin", "imagenet_maskgit_b", "imagenet_gpt_b"} <= names
    maskgit = load_config(PriorRunConfig, ROOT / "configs" / "prior" / "imagenet_maskgit_b.yaml", ["data.tokens=t"])
    assert (maskgit.model.prior_type, maskgit.model.num_layers, maskgit.model.num_heads, maskgit.model.hidden_size,
            maskgit.model.hidden_size * maskgit.model.mlp_ratio) == ("maskgit", 24, 16, 768, 3072)
    assert (maskgit.train.lr, maskgit.train.betas, maskgit.train.weight_decay) == (1e-4, (0.9, 0.96), 0.045)
    assert maskgit.train.batch_size * maskgit.train.expected_num_processes == 256
    assert (maskgit.model.codebook_size, maskgit.model.grid_size, maskgit.model.label_dropout) == (16384, 16, 0.1)
    gpt = load_config(PriorRunConfig, ROOT / "configs" / "prior" / "imagenet_gpt_b.yaml", ["data.tokens=t"])
    assert (gpt.model.prior_type, gpt.model.num_layers, gpt.model.num_heads, gpt.model.hidden_size) == ("gpt", 12, 12, 768)
    assert (gpt.train.lr, gpt.train.betas, gpt.train.weight_decay, gpt.model.label_dropout) == (1e-4, (0.9, 0.95), 0.05, 0.1)
    builtin = load_config(PriorRunConfig, ROOT / "configs" / "prior" / "builtin.yaml")
    assert builtin.data.tokenizer and builtin.model.prior_type == "maskgit"


def llamagen_gpt_parameter_count(dim: int, layers: int, vocab_size: int, num_classes: int) -> int:
    """Parameters of LlamaGen's class-conditional GPT (autoregressive/models/gpt.py, n_kv_head = n_head,
    class_dropout_prob > 0): per layer wqkv 3 d^2 + wo d^2 + SwiGLU w1, w3, w2 3 d h with
    h = find_multiple(int(2 * 4d / 3), 256), two RMSNorms 2d; plus token embedding and output head V d each,
    the class table (C + 1) d and the final RMSNorm d."""
    hidden = int(2 * 4 * dim / 3)
    hidden = hidden if hidden % 256 == 0 else hidden + 256 - hidden % 256
    per_layer = 4 * dim * dim + 3 * dim * hidden + 2 * dim
    return layers * per_layer + 2 * vocab_size * dim + (num_classes + 1) * dim + dim


def test_gpt_b_config_is_llamagen_gpt_b():
    from prior.train import build_prior

    gpt = load_config(PriorRunConfig, ROOT / "configs" / "prior" / "imagenet_gpt_b.yaml", ["data.tokens=t"])
    with torch.device("meta"):  # the 110.9M parameters are never allocated
        prior = build_prior(gpt.model, gpt.model.codebook_size, (gpt.model.grid_size,) * 2, gpt.model.num_classes)
    expected = llamagen_gpt_parameter_count(768, 12, 16384, 1000)
    assert expected == 110_888_448  # LlamaGen's "GPT-B 111M"
    assert sum(p.numel() for p in prior.parameters()) == expected
    assert prior.transformer.config.intermediate_size == 2048



DDP_SETTINGS = ["train.max_steps=4", "train.batch_size=4", "train.expected_num_processes=2", "train.image_log_every=2",
                "train.progress_bar=false"]


@pytest.fixture(scope="module")
def ddp_run(token_dir, tmp_path_factory):
    """An uninterrupted 2-process run of 4 steps (tests/scripts/train_check_ranks_in_sync.py): (folder, process)."""
    from ddp import run_ddp  # tests/ddp.py: the working 2-process CPU launch recipe

    output_dir = tmp_path_factory.mktemp("ddp") / "run"
    proc = run_ddp(ROOT / "tests" / "scripts" / "train_check_ranks_in_sync.py", "prior", "--config", str(TINY),
                   f"data.tokens={token_dir}", f"train.output_dir={output_dir}", *DDP_SETTINGS)
    return output_dir, proc


@pytest.mark.slow
def test_two_process_cpu_ddp_run(ddp_run):
    from prior.maskgit import MaskGITPrior

    output_dir, proc = ddp_run
    assert "2 process(es), global batch 8" in proc.stdout
    assert "RANKS IN SYNC: ['ema', 'model']" in proc.stdout  # bit-identical weights on both ranks
    assert (output_dir / "checkpoints" / "step_0000004" / "random_states_1.pkl").is_file()
    assert (output_dir / "images" / "samples_step0000004.png").is_file()
    prior = MaskGITPrior.from_pretrained(str(output_dir / "prior"))
    assert prior.codebook_size == K and prior.num_classes == CLASSES


@pytest.mark.slow
def test_signal_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(ddp_run, token_dir, tmp_path):
    """SIGUSR1 reaches process 0 only: both processes stop after the same step, the checkpoint holds both ranks'
    states, both exit 75, and a 2-process `--resume latest` ends with the uninterrupted run's weights."""
    from ddp import ddp_command, run_ddp, run_until_signal

    output_dir = tmp_path / "run"
    args = ["--config", str(TINY), f"data.tokens={token_dir}", f"train.output_dir={output_dir}", *DDP_SETTINGS]
    cmd, env = ddp_command(ROOT / "tests" / "scripts" / "train_wait_for_signal.py", "prior", *args,
                           env={"LGQ_WAIT_AT_STEP": "1"})
    proc = run_until_signal(cmd, signal.SIGUSR1, env)
    assert proc.returncode != 0  # the launcher reports its workers' exit code 75 as a failure
    waiting = next(line for line in proc.stdout.splitlines() if line.startswith("WAITING ")).split()
    assert int(waiting[2]) == proc.launched_pid  # workers are the launcher's children (README: pkill -USR1 -P)
    assert proc.stdout.count("preempted (SIGUSR1): stopped after step 3") == 1, proc.stdout  # printed by process 0
    assert proc.stderr.count("exitcode  : 75") >= 1, proc.stderr[-4000:]
    checkpoint = output_dir / "checkpoints" / "step_0000003"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step_0000003"]
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    resumed = run_ddp(ROOT / "tests" / "scripts" / "train_check_ranks_in_sync.py", "prior", *args, "--resume", "latest")
    assert "RANKS IN SYNC: ['ema', 'model']" in resumed.stdout and "at step 3" in resumed.stdout
    reference = load_file(str(ddp_run[0] / "prior" / "diffusion_pytorch_model.safetensors"))
    result = load_file(str(output_dir / "prior" / "diffusion_pytorch_model.safetensors"))
    assert reference.keys() == result.keys() and all(torch.equal(reference[k], result[k]) for k in reference)
