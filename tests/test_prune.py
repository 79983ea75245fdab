"""tokenizer/prune.py: codebook pruning with index remapping, on tiny tokenizers and synthetic images (CPU).

Bit-identity when only never-used codes go (every quantizer with an explicit codebook), the nearest-kept-code
map when used codes go, the keep rules, the FSQ/LFQ refusal, the command's export and report, 2 processes, and
tokenizer -> prune -> extract -> both priors -> pipeline end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import DataConfig, build_image_dataset
from tokenizer.model import LGQTokenizer
from tokenizer.prune import (check_prunable, count_code_usage, decoder_codes, evaluate_pruning, main,
                             old_to_new_map, prune_tokenizer, remap_tokens, select_codes)

K = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_tokenizer(quantizer: str = "lgq", options: dict | None = None, codebook_size: int = K) -> LGQTokenizer:
    torch.manual_seed(0)
    return LGQTokenizer(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_dim=4,
                        codebook_size=codebook_size, attention_resolutions="none", quantizer=quantizer,
                        quantizer_options=options or {}).eval()


def data_args(n: int = 12) -> list[str]:
    return ["--data.name", "synthetic", "--data.image_size", "16", "--data.num_images", str(n), "--data.num_classes", "3"]


def dataset(n: int = 12):
    return build_image_dataset(DataConfig(name="synthetic", image_size=16, num_images=n, num_classes=3,
                                          random_flip=False), "train")


def all_images(data) -> torch.Tensor:
    return torch.stack([data[i][0] for i in range(len(data))])


EXPLICIT = [("lgq", {}), ("vq", {}), ("vq", {"codebook_dim": 2, "l2_normalize": True, "ema": True, "reseed_dead": True}),
            ("simvq", {}), ("ibq", {})]


@pytest.mark.parametrize("quantizer,options", EXPLICIT, ids=["lgq", "vq", "vq_lowdim_l2_ema", "simvq", "ibq"])
def test_removing_only_unused_codes_keeps_tokens_and_reconstructions_bit_identical(quantizer, options, tmp_path):
    source = tiny_tokenizer(quantizer, options)
    data = dataset()
    counts = count_code_usage(source, data, batch_size=5, progress=False)
    assert int(counts.sum()) == len(data) * 8 * 8
    kept = select_codes(counts)  # min_count 1: exactly the used codes
    assert torch.equal(kept, (counts > 0).nonzero().squeeze(1)) and 2 <= kept.numel() < K
    mapping = old_to_new_map(decoder_codes(source.quantizer), kept)
    prune_tokenizer(source, kept, {"old_to_new": mapping.tolist()}).save_pretrained(tmp_path / "pruned")
    pruned = LGQTokenizer.from_pretrained(tmp_path / "pruned").eval()
    assert pruned.codebook_size == kept.numel() and pruned.config.codebook_pruning["old_to_new"] == mapping.tolist()
    # the kept codes are the source's codes, exactly (SimVQ: the effective codes W b_k)
    assert torch.equal(decoder_codes(pruned.quantizer), decoder_codes(source.quantizer)[kept])
    images = all_images(data)
    old, new = source.encode(images), pruned.encode(images)
    assert torch.equal(new, mapping[old])
    assert torch.equal(pruned.decode(new), source.decode(old))
    report = evaluate_pruning(source, pruned, kept, mapping, data, batch_size=5, progress=False)
    assert report["bit_identical"] and report["identical_images"] == len(data)
    assert report["psnr_pruned"] == report["psnr_source"] == report["psnr_remapped"]
    assert report["tokens_on_another_code"] == 0 and report["tokens_where_reencoding_and_map_differ"] == 0


@pytest.mark.parametrize("quantizer", ["lgq", "vq", "simvq", "ibq"])
def test_removed_used_codes_go_to_the_nearest_kept_code(quantizer):
    source = tiny_tokenizer(quantizer)
    data = dataset()
    counts = count_code_usage(source, data, batch_size=12, progress=False)
    kept = select_codes(counts, keep=3)
    codes = decoder_codes(source.quantizer)
    mapping = old_to_new_map(codes, kept)
    for k in range(K):  # brute force: every code -> the kept code closest to it (kept codes -> themselves)
        distances = [float(((codes[k].double() - codes[j].double()) ** 2).sum()) for j in kept.tolist()]
        assert int(mapping[k]) == int(np.argmin(distances)), k
    pruned = prune_tokenizer(source, kept)
    images = all_images(data)
    old = source.encode(images)
    report = evaluate_pruning(source, pruned, kept, mapping, data, batch_size=5, progress=False)
    from common.metrics import psnr, to_uint8

    real = to_uint8(images)
    expected_remapped = psnr(real, to_uint8(pruned.decode(mapping[old])), max_db=100.0).double().mean()
    expected_source = psnr(real, to_uint8(source.decode(old)), max_db=100.0).double().mean()
    assert report["psnr_remapped"] == pytest.approx(float(expected_remapped), abs=1e-9)
    assert report["psnr_change_remapped_db"] == pytest.approx(float(expected_remapped - expected_source), abs=1e-9)
    assert not report["bit_identical"]
    assert report["tokens_on_another_code"] == int((~torch.isin(old, kept)).sum())
    assert 0 <= int(pruned.encode(images).max()) < 3


@pytest.mark.parametrize("quantizer,options", [("fsq", {"levels": [4, 4, 4]}), ("lfq", {})])
def test_implicit_codebooks_are_refused_with_the_reason(quantizer, options, tmp_path):
    source = tiny_tokenizer(quantizer, options)
    with pytest.raises(ValueError, match="codebook is implicit"):
        check_prunable(source)
    with pytest.raises(ValueError, match=f"cannot prune a {quantizer.upper()} tokenizer"):
        prune_tokenizer(source, torch.arange(4))
    source.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="implicit"):
        main(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "out"), *data_args()])
    assert not (tmp_path / "out").exists()


def test_keep_rules():
    counts = torch.tensor([5, 0, 7, 1, 7, 0, 2, 3])
    assert select_codes(counts).tolist() == [0, 2, 3, 4, 6, 7]
    assert select_codes(counts, min_count=3).tolist() == [0, 2, 4, 7]
    assert select_codes(counts, min_count=0).tolist() == list(range(8))
    assert select_codes(counts, keep=3).tolist() == [0, 2, 4]  # 7, 7, 5
    assert select_codes(counts, keep=4).tolist() == [0, 2, 4, 7]
    assert select_codes(counts, keep_fraction=0.3).tolist() == [0, 2, 4]  # ceil(2.4) = 3
    assert select_codes(torch.tensor([1, 1, 1, 1]), keep=2).tolist() == [0, 1]  # ties: lower index first
    with pytest.raises(ValueError, match="at most one keep rule"):
        select_codes(counts, min_count=1, keep=3)
    with pytest.raises(ValueError, match="keep must lie in"):
        select_codes(counts, keep=1)
    with pytest.raises(ValueError, match="keep_fraction"):
        select_codes(counts, keep_fraction=0.0)
    with pytest.raises(ValueError, match="needs at least 2 codes"):
        select_codes(counts, min_count=8)


def test_remap_tokens_for_old_token_files():
    old_to_new = [0, 0, 1, 2, 1]
    tokens = np.array([[0, 1], [4, 3]], dtype=np.uint16)
    remapped = remap_tokens(tokens, old_to_new)
    assert remapped.dtype == np.uint16 and remapped.tolist() == [[0, 0], [1, 2]]
    assert remap_tokens(torch.tensor(tokens.astype(np.int64)), old_to_new).tolist() == [[0, 0], [1, 2]]


def test_prune_command_writes_the_export_the_map_and_the_report(tmp_path, capsys):
    source = tiny_tokenizer("lgq")
    source.save_pretrained(tmp_path / "tok")
    report = main(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "pruned"), "--batch-size", "5",
                   *data_args()])
    printed = capsys.readouterr().out
    assert "PSNR source" in printed and "12 / 12 reconstructions bit-identical" in printed
    counts = torch.tensor(report["counts"])
    assert counts.numel() == K and int(counts.sum()) == 12 * 64
    pruned = LGQTokenizer.from_pretrained(tmp_path / "pruned").eval()
    record = pruned.config.codebook_pruning
    kept = torch.tensor(record["kept_old_indices"])
    assert pruned.codebook_size == record["codebook_size"] == int((counts > 0).sum()) == kept.numel()
    assert record["source_codebook_size"] == K and record["rule"] == "min_count=1" and record["removed_used_codes"] == 0
    assert torch.equal(torch.tensor(record["old_to_new"])[kept], torch.arange(kept.numel()))
    assert list((tmp_path / "pruned").glob("*.safetensors"))
    written = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
    assert written["evaluation"]["bit_identical"] and written["evaluation"]["psnr_change_db"] == 0.0
    assert written["counted"]["num_tokens"] == 12 * 64 and written["old_to_new"] == record["old_to_new"]
    images = all_images(dataset())
    assert torch.equal(pruned.decode(pruned.encode(images)), source.decode(source.encode(images)))
    # the output is not overwritten by accident; keep_fraction on the same tokenizer, report elsewhere
    with pytest.raises(FileExistsError, match="overwrite"):
        main(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "pruned"), *data_args()])
    report = main(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "pruned"), "--keep-fraction", "0.25",
                   "--overwrite", "--report", str(tmp_path / "r.json"), *data_args()])
    assert report["codebook_size"] == 16 and LGQTokenizer.from_pretrained(tmp_path / "pruned").codebook_size == 16
    assert json.loads((tmp_path / "r.json").read_text())["rule"].startswith("keep_fraction=0.25")


def test_command_line_errors_name_the_problem(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    with pytest.raises(Exception, match="at most one keep rule"):
        main(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "o"), "--keep", "3", "--min-count", "2",
              *data_args()])
    with pytest.raises(Exception, match="split must be one of"):
        main(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "o"), "--split", "test", *data_args()])


@pytest.mark.slow
def test_two_processes_count_like_one(tmp_path):
    """7 images over 2 processes (4 + 3: uneven shards): the reduced counts and PSNRs equal one process's."""
    from ddp import ROOT, run_ddp

    tiny_tokenizer("vq").save_pretrained(tmp_path / "tok")
    args = ["--tokenizer", str(tmp_path / "tok"), "--batch-size", "2", "--keep", "5", *data_args(7)]
    run_ddp(ROOT / "tests" / "scripts" / "ddp_prune.py", *args, "--output", str(tmp_path / "two"),
            env={"EXPECT_WORLD_SIZE": "2"}, timeout=300)
    two = json.loads((tmp_path / "two" / "pruning_report.json").read_text())
    one = main([*args, "--output", str(tmp_path / "one")])
    assert two["num_processes"] == 2 and two["counts"] == one["counts"] and sum(one["counts"]) == 7 * 64
    assert two["old_to_new"] == one["old_to_new"]
    for key in ("psnr_source", "psnr_pruned", "psnr_remapped"):
        assert two["evaluation"][key] == pytest.approx(one["evaluation"][key], abs=1e-9)
    assert two["evaluation"]["num_images"] == 7


def test_prune_extract_priors_and_pipeline_end_to_end(tmp_path):
    from pipelines import LGQPipeline
    from pipelines.assemble import main as assemble
    from prior.extract import main as extract
    from prior.tokens import TokenDataset
    from prior.train import main as train_prior

    tiny_tokenizer("lgq").save_pretrained(tmp_path / "tok")
    report = main(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "pruned"), "--keep", "12",
                   *data_args(16)])
    assert report["codebook_size"] == 12
    meta = extract(["--tokenizer", str(tmp_path / "pruned"), "--output", str(tmp_path / "tokens"), "--batch-size", "8",
                    *data_args(16)])
    assert meta["codebook_size"] == 12
    tokens = TokenDataset(tmp_path / "tokens")
    assert int(max(int(tokens[i][0].max()) for i in range(len(tokens)))) < 12
    tiny = Path(__file__).resolve().parents[1] / "configs" / "prior" / "tiny.yaml"
    for prior_type in ("maskgit", "gpt"):
        train_prior(["--config", str(tiny), f"data.tokens={tmp_path / 'tokens'}", f"model.prior_type={prior_type}",
                     f"train.output_dir={tmp_path / prior_type}", "train.max_steps=3", "train.log_every=1",
                     "train.checkpoint_every=0", "train.image_log_every=0", "train.progress_bar=false",
                     "train.batch_size=4"])
        assemble(["--tokenizer", str(tmp_path / "pruned"), "--prior", str(tmp_path / prior_type / "prior"),
                  "--output", str(tmp_path / f"pipe_{prior_type}")])
        pipe = LGQPipeline.from_pretrained(tmp_path / f"pipe_{prior_type}")
        assert pipe.prior.codebook_size == pipe.tokenizer.codebook_size == 12
        assert pipe.tokenizer.config.codebook_pruning["source_codebook_size"] == K
        grids = pipe([0, 2], generator=torch.Generator().manual_seed(0), output_type="latent").images
        assert grids.shape == (2, 8, 8) and 0 <= int(grids.min()) and int(grids.max()) < 12
        images = pipe([1], generator=torch.Generator().manual_seed(0), output_type="np").images
        assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
