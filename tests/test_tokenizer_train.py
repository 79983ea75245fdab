"""`tokenizer/train.py` end to end on tiny synthetic data (CPU): learning, exact resume after SIGKILL,
export, configs, and a real 2-process DDP run."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch

from common.config import load_config
from training_runs import ENV, final_state, kill_after_checkpoint, run  # tests/training_runs.py
from ddp import run_ddp, run_until_signal  # tests/ddp.py (pytest puts tests/ on sys.path)
from tokenizer.config import TokenizerRunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tokenizer" / "tiny.yaml"
# smaller than tiny.yaml: 16 px, 2x downsampling, GAN from step 2, EMA, grad accumulation
FAST = ["data.image_size=16", "data.num_images=32", "model.channel_multipliers=[1,2]", "model.base_channels=8",
        "model.latent_dim=4", "model.codebook_size=64", "loss.gan_start_step=2", "loss.disc_channels=8",
        "train.batch_size=4", "train.grad_accum_steps=2", "train.max_steps=8", "train.warmup_steps=2",
        "train.checkpoint_every=4", "train.log_every=2", "train.image_log_every=4", "train.progress_bar=false",
        "eval.num_val_images=4", "eval.quantizer_init_batches=1"]


def train_command(script: Path, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(script), "--config", str(TINY), *FAST, f"train.output_dir={output_dir}", *extra]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(train_command(ROOT / "tokenizer" / "train.py", output_dir))
    return output_dir


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(uninterrupted_run, tmp_path):
    output_dir = tmp_path / "run"
    script = ROOT / "tests" / "scripts" / "train_tokenizer_pause_after_checkpoint.py"
    kill_after_checkpoint(train_command(script, output_dir), step=4)
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_0000004"]

    resumed = run(train_command(ROOT / "tokenizer" / "train.py", output_dir, "--resume", "latest"))
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
    reference, result = final_state(uninterrupted_run, export=True), final_state(output_dir, export=True)
    assert reference.keys() == result.keys()
    different = [k for k in reference if not torch.equal(reference[k], result[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_and_resume_equals_uninterrupted_run(uninterrupted_run, tmp_path):
    from common.training import PREEMPTED_EXIT_CODE

    output_dir = tmp_path / "run"
    script = ROOT / "tests" / "scripts" / "train_wait_for_signal.py"
    # process 0 gets SIGUSR1 during step 1 (0-based), learns of it in step 2's all-reduce, stops after step 2
    proc = run_until_signal([sys.executable, str(script), "tokenizer", *train_command(script, output_dir)[2:]],
                            signal.SIGUSR1, {**ENV, "LGQ_WAIT_AT_STEP": "1"})
    assert proc.returncode == PREEMPTED_EXIT_CODE == 75, proc.stderr[-4000:]
    assert "preempted (SIGUSR1): stopped after step 3" in proc.stdout
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_0000003"]
    assert not (output_dir / "tokenizer").exists()  # nothing exported from an unfinished run

    resumed = run(train_command(ROOT / "tokenizer" / "train.py", output_dir, "--resume", "latest"))
    assert "step_0000003 at step 3" in resumed.stdout
    assert "replayed the data stream from step 0 to step 3" in resumed.stdout
    reference, result = final_state(uninterrupted_run, export=True), final_state(output_dir, export=True)
    different = [k for k in reference if not torch.equal(reference[k], result[k])]
    assert reference.keys() == result.keys() and not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.mark.slow
def test_uninterrupted_run_learns_logs_and_exports(uninterrupted_run):
    from tokenizer.model import LGQTokenizer

    tokenizer = LGQTokenizer.from_pretrained(str(uninterrupted_run / "tokenizer")).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    indices = tokenizer.encode(images)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.int64
    assert tokenizer.decode(indices).shape == (2, 3, 16, 16)
    assert sorted(p.name for p in (uninterrupted_run / "images").glob("*.png")) == [
        "val_reconstructions_step0000004.png", "val_reconstructions_step0000008.png"]
    saved = load_config(TokenizerRunConfig, uninterrupted_run / "config.yaml")
    assert saved.train.max_steps == 8 and saved.model.codebook_size == 64
    card = (uninterrupted_run / "tokenizer" / "README.md").read_text()  # the export's model card
    for text in ("LGQ image tokenizer, K = 64", "| codebook size K | 64 |", "| token grid | 8 x 8 at 16 px",
                 "| optimisation steps | 8 |", "PSNR (dB)", "at step 8 with the training weights", "synthetic",
                 "LGQTokenizer.from_pretrained", "license: apache-2.0", "| pre-quantizer norm | groupnorm_layernorm |",
                 "| temperature schedule | tau linear 1 -> 0.1 over the whole run"):
        assert text in card, text


@pytest.mark.slow
def test_tiny_training_lowers_reconstruction_loss(tmp_path):
    from tokenizer.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same as the subprocess runs; the 2 cores are shared
    try:
        trainer = main(["--config", str(TINY), *FAST, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=20",
                        "train.grad_accum_steps=1", "train.log_every=1", "train.checkpoint_every=0",
                        "train.image_log_every=0", "loss.gan_start_step=100", "eval.num_val_images=0"])
    finally:
        torch.set_num_threads(threads)
    history = dict(trainer.history)
    assert sorted(history) == list(range(1, 21))
    l1 = [history[s]["l1"] for s in range(1, 21)]
    assert sum(l1[-4:]) < 0.85 * sum(l1[:4]), [round(v, 4) for v in l1]
    for key in ("loss", "quantizer", "quantizer/tau", "lr/model", "codebook/active_codes", "codebook/perplexity",
                "images_per_sec", "quantizer/latent_spread", "quantizer/codebook_spread", "quantizer/ste_gain",
                "pre_norm/gamma_rms"):
        assert key in history[20], key
    assert history[20]["quantizer/tau"] < history[1]["quantizer/tau"]  # LGQ temperature anneals with the step
    assert 1 <= history[20]["codebook/active_codes"] <= 64


@pytest.mark.slow
def test_vq_with_its_default_data_driven_init_uses_more_than_a_tenth_of_the_codebook(tmp_path):
    """VQ's codebook starts from encoder latents (init="random", the default): after a tiny run the exported
    tokenizer uses > 10% of K = 128 codes on the training images (a N(0, 1) codebook collapsed to a few codes)."""
    from common.data import DataConfig, build_image_dataset
    from tokenizer.model import LGQTokenizer
    from tokenizer.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["--config", str(TINY), "model.quantizer=vq", "model.base_channels=8", "data.num_images=32",
              f"train.output_dir={tmp_path / 'run'}", "train.max_steps=10", "train.checkpoint_every=0",
              "train.image_log_every=0", "train.progress_bar=false", "loss.gan_start_step=100",
              "eval.num_val_images=0", "eval.quantizer_init_batches=2"])
        tokenizer = LGQTokenizer.from_pretrained(tmp_path / "run" / "tokenizer").eval()
        assert tokenizer.quantizer.init == "random" and not tokenizer.quantizer.needs_init
        dataset = build_image_dataset(DataConfig(name="synthetic", image_size=32, num_images=32), "train")
        batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
        tokens = tokenizer.encode(batch)
    finally:
        torch.set_num_threads(threads)
    active = int(torch.unique(tokens).numel())
    assert active > 0.1 * 128, active


def test_all_tokenizer_configs_load_and_imagenet_recipes_differ_only_in_quantizer():
    configs = sorted((ROOT / "configs" / "tokenizer").glob("*.yaml"))
    names = {p.stem for p in configs}
    assert {"tiny", "builtin", "imagenet_base", "imagenet_lgq", "imagenet_vq", "imagenet_fsq", "imagenet_simvq",
            "imagenet_lfq", "imagenet_ibq"} <= names
    base = ROOT / "configs" / "tokenizer" / "imagenet_base.yaml"
    recipes = {}
    for name in ("lgq", "vq", "fsq", "simvq", "lfq", "ibq"):
        cfg = load_config(TokenizerRunConfig, [base, ROOT / "configs" / "tokenizer" / f"imagenet_{name}.yaml"],
                          ["data.root=/data/imagenet"])
        assert cfg.model.quantizer == name and cfg.model.codebook_size == 16384
        assert cfg.train.output_dir.endswith(name)
        cfg.model.quantizer, cfg.model.quantizer_options, cfg.train.output_dir = "-", {}, "-"
        recipes[name] = cfg
    assert all(cfg == recipes["lgq"] for cfg in recipes.values())
    builtin = load_config(TokenizerRunConfig, ROOT / "configs" / "tokenizer" / "builtin.yaml")
    assert builtin.data.name == "builtin" and builtin.loss.perceptual_weight == 0.0


@pytest.mark.slow
def test_two_process_cpu_ddp_run(tmp_path):
    output_dir = tmp_path / "ddp"
    proc = run_ddp(ROOT / "tests" / "scripts" / "train_check_ranks_in_sync.py", "tokenizer", "--config", str(TINY),
                   *FAST, f"train.output_dir={output_dir}", "train.max_steps=4", "train.expected_num_processes=2", "train.image_log_every=0")
    assert "2 process(es), global batch 16" in proc.stdout
    assert "RANKS IN SYNC: ['discriminator', 'ema', 'model']" in proc.stdout
    assert (output_dir / "checkpoints" / "step_0000004" / "random_states_1.pkl").is_file()
    from tokenizer.model import LGQTokenizer

    tokenizer = LGQTokenizer.from_pretrained(str(output_dir / "tokenizer"))
    assert all(torch.isfinite(p).all() for p in tokenizer.parameters())


@pytest.mark.parametrize("name", ["lgq", "vq", "fsq", "simvq", "lfq"])
@pytest.mark.parametrize("codebook_size", [4096, 65536])
def test_imagenet_recipes_change_codebook_size_with_one_override(name, codebook_size):
    """`model.codebook_size=K` alone must give a valid quantizer of size K for every recipe."""
    from tokenizer.quantizers import build_quantizer

    base = ROOT / "configs" / "tokenizer" / "imagenet_base.yaml"
    cfg = load_config(TokenizerRunConfig, [base, ROOT / "configs" / "tokenizer" / f"imagenet_{name}.yaml"],
                      ["data.root=/data/imagenet", f"model.codebook_size={codebook_size}"])
    quantizer = build_quantizer(cfg.model.quantizer, dim=8, codebook_size=cfg.model.codebook_size,
                                **dict(cfg.model.quantizer_options))
    assert quantizer.codebook_size == codebook_size
