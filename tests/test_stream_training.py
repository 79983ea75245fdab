"""Streams in the stages: a tokenizer trained on WebDataset shards resumes bit-identically after SIGKILL
(common/data/stream.py says which samples a resumed run sees), and token extraction from a stream encodes every
image exactly once with 2 processes, an uneven shard layout and a resumed extraction."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training_runs import final_state, kill_after_checkpoint, run  # tests/training_runs.py
from ddp import run_ddp  # tests/ddp.py
from test_data_sources import index_of, write_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "tokenizer" / "tiny.yaml"), "data.image_size=16", "data.num_classes=3",
        "model.channel_multipliers=[1,2]", "model.base_channels=8", "model.latent_dim=4", "model.codebook_size=64",
        "loss.gan_start_step=2", "loss.disc_channels=8", "train.batch_size=4", "train.grad_accum_steps=2",
        "train.max_steps=8", "train.warmup_steps=2", "train.checkpoint_every=4", "train.log_every=2",
        "train.progress_bar=false", "eval.num_val_images=4", "eval.quantizer_init_batches=1", "train.num_workers=2"]
UNEVEN = [10, 7, 9, 6, 3]  # images per shard: 35 images in 5 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder / "train", UNEVEN)
    write_shards(folder / "val", [5], start=40)
    return {"train": str(folder / "train" / "part-{000..004}.tar"), "val": str(folder / "val" / "part-000.tar")}


def wds_options(shards) -> list[str]:
    return ["data.name=webdataset", f"data.shards={shards['train']}", f"data.val_shards={shards['val']}",
            "data.shuffle_buffer=8"]


@pytest.mark.slow
def test_webdataset_training_killed_and_resumed_equals_uninterrupted_run(shards, tmp_path):
    train = ROOT / "tokenizer" / "train.py"
    reference = tmp_path / "reference"
    out = run([sys.executable, str(train), *TINY, *wds_options(shards), f"train.output_dir={reference}"])
    assert "a stream of images in 5 shards for training" in out.stdout

    output_dir = tmp_path / "run"
    script = ROOT / "tests" / "scripts" / "train_tokenizer_pause_after_checkpoint.py"
    cmd = [sys.executable, str(script), *TINY, *wds_options(shards), f"train.output_dir={output_dir}"]
    kill_after_checkpoint(cmd, step=4)
    resumed = run([sys.executable, str(train), *TINY, *wds_options(shards), f"train.output_dir={output_dir}",
                   "--resume", "latest"])
    assert "resumed from" in resumed.stdout
    expected, result = final_state(reference), final_state(output_dir)
    different = [k for k in expected if not torch.equal(expected[k], result[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"

    # another data seed gives another stream, hence other weights: the comparison above can fail
    other = tmp_path / "other"
    run([sys.executable, str(train), *TINY, *wds_options(shards), "data.seed=1", f"train.output_dir={other}"])
    changed = final_state(other)
    assert any(not torch.equal(expected[k], changed[k]) for k in expected)


EXTRACT_LAYOUT = [10, 7, 0, 9, 6, 3]  # images per shard, one empty: 35 images in 6 shards


@pytest.mark.slow
def test_two_process_resumed_extraction_from_uneven_shards_encodes_every_image_once(tmp_path, monkeypatch):
    """A 1-process extraction interrupted in shard 1 leaves chunk 0 (= shard 0); 2 processes resume and share
    the 5 missing shards 3 / 2 (different image counts per process); the merged tokens are every image of every
    shard once, in shard order, equal to encoding them directly."""
    from common.data import DataConfig, build_image_dataset
    from prior.extract import CHUNK_DIR, main
    from prior.tokens import validate_token_directory
    from test_tokens import tiny_lgq_tokenizer
    from tokenizer.model import LGQTokenizer

    write_shards(tmp_path / "shards", EXTRACT_LAYOUT)
    pattern = str(tmp_path / "shards" / "part-{000..005}.tar")
    model = tiny_lgq_tokenizer(tmp_path / "tok")
    data = ["--data.name", "webdataset", "--data.shards", pattern, "--data.num_classes", "3",
            "--data.image_size", "16"]
    arguments = ["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "out"), "--batch-size", "4",
                 "--keep-chunks", *data]
    encode, calls = LGQTokenizer.encode, []

    def interrupted_encode(self, images):
        calls.append(images.shape[0])
        if len(calls) > 3:  # shard 0 (10 images) is 3 calls
            raise KeyboardInterrupt("simulated interruption")
        return encode(self, images)

    monkeypatch.setattr(LGQTokenizer, "encode", interrupted_encode)
    with pytest.raises(KeyboardInterrupt):
        main(arguments)
    monkeypatch.undo()
    chunk_dir = tmp_path / "out" / CHUNK_DIR
    done = {p.name: p.stat().st_mtime_ns for p in chunk_dir.glob("chunk_*.npz")}
    assert sorted(done) == ["chunk_000000.npz"]

    run_ddp(ROOT / "tests" / "scripts" / "ddp_extract.py", *arguments, env={"EXPECT_WORLD_SIZE": "2"}, timeout=240)
    meta = validate_token_directory(tmp_path / "out")
    assert meta["count"] == meta["num_images"] == sum(EXTRACT_LAYOUT) and meta["num_processes"] == 2
    chunks = sorted(chunk_dir.glob("chunk_*.npz"))
    assert {p.name: p.stat().st_mtime_ns for p in chunks[:1]} == done  # finished shards are not re-encoded
    assert [int(np.load(p)["rank"]) for p in chunks] == [0, 0, 1, 0, 1, 0]
    assert [np.load(p)["labels"].shape[0] for p in chunks] == EXTRACT_LAYOUT

    stream = build_image_dataset(DataConfig(name="webdataset", shards=pattern, num_classes=3, image_size=16,
                                            random_flip=False), "train")
    items = [item for shard in range(stream.num_shards) for item in stream.iter_shard(shard)]
    assert [index_of(image) for image, _ in items] == list(range(sum(EXTRACT_LAYOUT)))  # every image, once, in order
    images = torch.stack([image for image, _ in items])
    tokens = torch.from_numpy(np.load(tmp_path / "out" / "tokens.npy").astype(np.int64))
    assert torch.equal(tokens, model.encode(images))
    labels = np.load(tmp_path / "out" / "labels.npy")
    assert labels.tolist() == [label for _, label in items] == [i % 3 for i in range(sum(EXTRACT_LAYOUT))]



def source_options(source: str, tmp_path: Path, shards: dict[str, str]) -> list[str]:
    if source == "webdataset":
        return wds_options(shards)
    import datasets
    from test_data_sources import hf_split

    folder = tmp_path / "hf_saved"
    datasets.DatasetDict({"train": hf_split(24), "validation": hf_split(6, start=24)}).save_to_disk(str(folder))
    return ["data.name=hf", f"data.root={folder}"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["webdataset", "hf"])
def test_two_process_stages_end_to_end_on_shards_and_hf_datasets(source, shards, tmp_path):
    """With 2 processes: a tokenizer trained on WebDataset shards / a Hugging Face save_to_disk folder, interrupted
    after its step-4 checkpoint (the later checkpoint and the export removed) and resumed to the same weights; its
    tokens extracted by 2 processes (every image once); a prior trained on them; the pipeline samples."""
    import shutil

    from pipelines import LGQPipeline
    from pipelines.assemble import main as assemble
    from prior.tokens import validate_token_directory
    from prior.train import main as train_prior

    options = source_options(source, tmp_path, shards)
    output_dir = tmp_path / "tokenizer_run"
    train = ROOT / "tokenizer" / "train.py"
    first = run_ddp(train, *TINY, *options, f"train.output_dir={output_dir}", timeout=300)
    assert "2 process(es)" in first.stdout
    finished = final_state(output_dir)
    shutil.rmtree(output_dir / "checkpoints" / "step_0000008")  # as if the job had been killed after step 4
    shutil.rmtree(output_dir / "tokenizer")
    second = run_ddp(train, *TINY, *options, f"train.output_dir={output_dir}", "--resume", "latest", timeout=300)
    assert "resumed from" in second.stdout and "step_0000004" in second.stdout
    resumed = final_state(output_dir)
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)

    data = [f"--{option.replace('=', ' ', 1)}" for option in options]
    data = [part for option in data for part in option.split(" ", 1)]
    run_ddp(ROOT / "tests" / "scripts" / "ddp_extract.py", "--tokenizer", str(output_dir / "tokenizer"), "--output",
            str(tmp_path / "tokens"), "--batch-size", "4", "--data.image_size", "16", "--data.num_classes", "3", *data,
            env={"EXPECT_WORLD_SIZE": "2"}, timeout=240)
    meta = validate_token_directory(tmp_path / "tokens")
    assert meta["count"] == meta["num_images"] == (sum(UNEVEN) if source == "webdataset" else 24)

    train_prior(["--config", str(ROOT / "configs" / "prior" / "tiny.yaml"), f"data.tokens={tmp_path / 'tokens'}",
                 f"train.output_dir={tmp_path / 'prior_run'}", "train.max_steps=3", "train.log_every=1",
                 "train.checkpoint_every=0", "train.image_log_every=0", "train.progress_bar=false",
                 "train.batch_size=4", "train.warmup_steps=1"])
    assemble(["--tokenizer", str(output_dir / "tokenizer"), "--prior", str(tmp_path / "prior_run" / "prior"),
              "--output", str(tmp_path / "pipe")])
    pipe = LGQPipeline.from_pretrained(tmp_path / "pipe")
    images = pipe([0, 2], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def streamed_hf_shards(tmp_path: Path) -> tuple[list[str], list[int]]:
    """(options, rows per stored shard) of a Hugging Face save_to_disk folder streamed with data.streaming=true:
    images 0..34 in 5 arrow files (HFImageStream's shards)."""
    import datasets

    from test_data_sources import hf_split

    folder = tmp_path / "hf_stream"
    datasets.DatasetDict({"train": hf_split(35), "validation": hf_split(6, start=35)}).save_to_disk(
        str(folder), num_shards={"train": 5, "validation": 1})
    train = datasets.load_from_disk(str(folder))["train"]
    rows = [datasets.Dataset.from_file(f["filename"]).num_rows for f in train.cache_files]
    return ["data.name=hf", f"data.root={folder}", "data.streaming=true", "data.shuffle_buffer=8"], rows


@pytest.mark.slow
@pytest.mark.parametrize("source", ["webdataset", "hf-streaming"])
def test_each_of_two_processes_trains_on_its_own_shards(source, shards, tmp_path):
    """Process r of 2 reads shards r, r + 2, ... (common/data/stream.py), through its own DataLoader workers: the
    images it trains on come from its shards only, and together the processes read every shard. (accelerate would
    otherwise dispatch: process 0 reading every batch from its own shards and broadcasting them.) The same for
    WebDataset shards and for the arrow files of a streamed Hugging Face dataset."""
    import json

    options, rows = (wds_options(shards), UNEVEN) if source == "webdataset" else streamed_hf_shards(tmp_path)
    assert len(rows) == 5
    record = tmp_path / "seen"
    run_ddp(ROOT / "tests" / "scripts" / "train_record_stream_images.py", *TINY, *options,
            f"train.output_dir={tmp_path / 'run'}", env={"LGQ_IMAGES_RECORD": str(record)}, timeout=300)
    starts = np.cumsum([0, *rows])
    shard_of = {i: s for s in range(len(rows)) for i in range(starts[s], starts[s + 1])}
    read = {rank: {shard_of[i] for i in json.loads((record / f"rank_{rank}.json").read_text())} for rank in (0, 1)}
    assert read[0] and read[0] <= {0, 2, 4}, read
    assert read[1] and read[1] <= {1, 3}, read
    # 8 steps x 2 micro-batches x 4 images per process: every shard of each process's share is reached
    assert read[0] | read[1] == set(range(len(rows))), read
