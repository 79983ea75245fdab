"""Token storage (prior/tokens.py) and extraction (prior/extract.py): round trips, errors, resume, faults, DDP."""
import errno
import json
import os
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prior.extract import CHUNK_DIR, extract_tokens, main, parse_config
from prior.tokens import (
    TokenDataset,
    check_class_labels,
    save_token_directory,
    token_dtype,
    tokenizer_fingerprint,
    validate_token_directory,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write(path, n=5, K=1024, grid=(2, 3), tokenizer_hash="abc", **extra):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, K, size=(n, *grid))
    labels = rng.integers(0, 10, size=n)
    save_token_directory(path, tokens, labels, codebook_size=K, num_classes=10, tokenizer_hash=tokenizer_hash, **extra)
    return tokens, labels


# ----------------------------------------------------------------------------- storage
def test_storage_round_trip_and_memory_mapping(tmp_path):
    tokens, labels = write(tmp_path / "a")
    assert np.load(tmp_path / "a" / "tokens.npy", mmap_mode="r").dtype == np.uint16
    ds = TokenDataset(tmp_path / "a", expected_tokenizer_hash="abc", codebook_size=1024, grid_size=(2, 3))
    assert len(ds) == 5 and ds.num_classes == 10 and ds.grid_size == (2, 3)
    for i in range(5):
        grid, label = ds[i]
        assert grid.dtype == torch.int64 and label.dtype == torch.int64
        assert torch.equal(grid, torch.from_numpy(tokens[i])) and label.item() == labels[i]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    assert torch.equal(torch.cat([b for b, _ in loader]), torch.from_numpy(tokens))


def test_large_codebooks_use_int32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    tokens, _ = write(tmp_path / "big", K=70000)
    stored = np.load(tmp_path / "big" / "tokens.npy", mmap_mode="r")
    assert stored.dtype == np.int32 and np.array_equal(stored, tokens)


def test_several_directories_read_together_and_augmentation_stride(tmp_path):
    t1, _ = write(tmp_path / "a", n=4, augmentations=["none", "hflip"])
    t2, _ = write(tmp_path / "b", n=6, augmentations=["none", "hflip"])
    ds = TokenDataset([tmp_path / "a", tmp_path / "b"])
    assert len(ds) == 10 and torch.equal(ds[5][0], torch.from_numpy(t2[1]))
    originals = TokenDataset([tmp_path / "a", tmp_path / "b"], use_augmentations=False)
    assert len(originals) == 5
    assert torch.equal(originals[1][0], torch.from_numpy(t1[2])) and torch.equal(originals[3][0], torch.from_numpy(t2[2]))


def test_code_counts_count_the_grids_the_data_set_yields(tmp_path):
    t1, _ = write(tmp_path / "a", n=4, K=50, augmentations=["none", "hflip"])
    t2, _ = write(tmp_path / "b", n=6, K=50, augmentations=["none", "hflip"])
    everything = TokenDataset([tmp_path / "a", tmp_path / "b"]).code_counts()
    assert everything.shape == (50,) and everything.sum() == 10 * 6
    assert np.array_equal(everything, np.bincount(np.concatenate([t1, t2]).reshape(-1), minlength=50))
    originals = TokenDataset([tmp_path / "a", tmp_path / "b"], use_augmentations=False)
    yielded = torch.stack([originals[i][0] for i in range(len(originals))]).reshape(-1).numpy()
    assert np.array_equal(originals.code_counts(), np.bincount(yielded, minlength=50))
    # read in chunks that do not divide the rows: the same counts
    assert np.array_equal(TokenDataset([tmp_path / "a", tmp_path / "b"]).code_counts(chunk_grids=3), everything)
    assert np.array_equal(originals.code_counts(chunk_grids=2), originals.code_counts())


def test_empty_truncated_and_incomplete_directories_are_reported(tmp_path):
    save_token_directory(tmp_path / "empty", np.zeros((0, 2, 2), np.int64), np.zeros(0, np.int64), codebook_size=8)
    with pytest.raises(ValueError, match="empty"):
        TokenDataset(tmp_path / "empty")
    write(tmp_path / "trunc")
    path = tmp_path / "trunc" / "tokens.npy"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        TokenDataset(tmp_path / "trunc")
    write(tmp_path / "zero")
    (tmp_path / "zero" / "labels.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        TokenDataset(tmp_path / "zero")
    write(tmp_path / "count")
    meta = json.loads((tmp_path / "count" / "meta.json").read_text())
    meta["count"] = 7
    (tmp_path / "count" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="meta.json says"):
        TokenDataset(tmp_path / "count")
    write(tmp_path / "nometa")
    (tmp_path / "nometa" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="resume"):
        TokenDataset(tmp_path / "nometa")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenDataset(tmp_path / "missing")


def test_refuses_to_mix_tokenizers_and_checks_expectations(tmp_path):
    write(tmp_path / "a", tokenizer_hash="one")
    write(tmp_path / "b", tokenizer_hash="two")
    with pytest.raises(ValueError, match="different tokenizers"):
        TokenDataset([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="expected two"):
        TokenDataset(tmp_path / "a", expected_tokenizer_hash="two")
    with pytest.raises(ValueError, match="K=1024"):
        TokenDataset(tmp_path / "a", codebook_size=512)
    with pytest.raises(ValueError, match="grid"):
        TokenDataset(tmp_path / "a", grid_size=4)
    write(tmp_path / "c", K=512, tokenizer_hash="one")
    with pytest.raises(ValueError, match="codebook_size"):
        TokenDataset([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        save_token_directory(tmp_path / "bad", np.full((1, 2, 2), 1024), np.zeros(1), codebook_size=1024)


def test_class_label_validation():
    assert check_class_labels([0, 3], 4).tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        check_class_labels([4], 4)
    with pytest.raises(ValueError, match="integers"):
        check_class_labels(torch.tensor([1.0]), 4)


# ----------------------------------------------------------------------------- extraction
class PoolTokenizer(nn.Module):
    """Stand-in tokenizer: average-pool by f, mix channels, bucket the value into K levels."""

    def __init__(self, K=32, f=4, seed=0):
        super().__init__()
        self.codebook_size, self.downsample_factor = K, f
        self.mix = nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(seed)))
        self.calls = 0
        self.fail_after = None

    @torch.no_grad()
    def encode(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        pooled = nn.functional.avg_pool2d(images, self.downsample_factor)
        value = torch.sigmoid(torch.einsum("bchw,c->bhw", pooled, self.mix) * 3)
        return (value * self.codebook_size).long().clamp(0, self.codebook_size - 1)


def image_set(n=23, size=16):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.arange(n) % 5)


def test_extraction_round_trip_with_flip(tmp_path):
    tok, data = PoolTokenizer(), image_set()
    meta = extract_tokens(tok, data, tmp_path / "out", batch_size=4, chunk_size=5, flip=True, show_progress=False,
                          meta_extra={"num_classes": 5})
    assert meta["count"] == 46 and meta["num_images"] == 23 and meta["augmentations"] == ["none", "hflip"]
    assert meta["tokenizer_hash"] == tokenizer_fingerprint(tok)
    assert not (tmp_path / "out" / CHUNK_DIR).exists()
    images, labels = data.tensors
    ds = TokenDataset(tmp_path / "out", expected_tokenizer_hash=tokenizer_fingerprint(tok))
    stored = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(stored[0::2], tok.encode(images)) and torch.equal(stored[1::2], tok.encode(images.flip(-1)))
    assert not torch.equal(stored[0::2], stored[1::2])
    assert torch.equal(torch.stack([ds[i][1] for i in range(len(ds))]), labels.repeat_interleave(2))
    # a second run with the same settings is a no-op; another tokenizer is refused
    tok.calls = 0
    extract_tokens(tok, data, tmp_path / "out", batch_size=4, chunk_size=5, flip=True, show_progress=False,
                   meta_extra={"num_classes": 5})
    assert tok.calls == 0
    with pytest.raises(ValueError, match="another tokenizer"):
        extract_tokens(PoolTokenizer(seed=1), data, tmp_path / "out", chunk_size=5, flip=True, show_progress=False,
                       meta_extra={"num_classes": 5})


def test_interrupted_extraction_resumes_without_duplicates_or_gaps(tmp_path):
    data = image_set()
    reference = PoolTokenizer()
    extract_tokens(reference, data, tmp_path / "ref", batch_size=2, chunk_size=4, show_progress=False)

    tok = PoolTokenizer()
    tok.fail_after = 5  # batches of 2, chunks of 4 images: chunks 0 and 1 complete, chunk 2 half done
    with pytest.raises(KeyboardInterrupt):
        extract_tokens(tok, data, tmp_path / "out", batch_size=2, chunk_size=4, show_progress=False)
    chunks = sorted(p.name for p in (tmp_path / "out" / CHUNK_DIR).glob("chunk_*.npz"))
    assert chunks == ["chunk_000000.npz", "chunk_000001.npz"]
    assert not (tmp_path / "out" / "meta.json").exists()
    (tmp_path / "out" / CHUNK_DIR / "chunk_000002.npz.tmp999").write_bytes(b"half")  # a torn write
    with pytest.raises(FileNotFoundError, match="resume"):
        TokenDataset(tmp_path / "out")

    # a different tokenizer must not continue these chunks
    with pytest.raises(ValueError, match="refusing to mix"):
        extract_tokens(PoolTokenizer(seed=3), data, tmp_path / "out", batch_size=2, chunk_size=4, show_progress=False)

    tok.fail_after, tok.calls = None, 0
    extract_tokens(tok, data, tmp_path / "out", batch_size=2, chunk_size=4, show_progress=False)
    assert tok.calls == 8  # 23 - 8 = 15 images left in batches of 2 (chunks of 4 -> 2+2, 2+2, 2+2, 2+1)
    assert np.array_equal(np.load(tmp_path / "out" / "tokens.npy"), np.load(tmp_path / "ref" / "tokens.npy"))
    assert np.array_equal(np.load(tmp_path / "out" / "labels.npy"), data.tensors[1].numpy())


class DiskFullFile:
    """A file object that writes ``room`` bytes, then raises ENOSPC the way a full disk does (mid-write)."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk_while_writing(monkeypatch, name_part: str, room: int = 100) -> None:
    """From now on, the next file written through common.files.atomic_write whose name contains ``name_part``
    hits a full disk after ``room`` bytes."""
    import builtins

    import common.files

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return DiskFullFile(file, room) if "w" in mode and name_part in str(path) else file

    monkeypatch.setattr(common.files, "open", open_on_a_full_disk, raising=False)


@pytest.mark.parametrize("file_name", ["chunk_000002", "tokens.npy"])
def test_disk_full_while_a_chunk_or_the_token_file_is_written_keeps_what_was_written(file_name, tmp_path,
                                                                                       monkeypatch):
    """The disk fills up while chunk 2 (or, at the merge, tokens.npy) is written: the error names the file and the
    cause, no partial file is left, the finished chunks stay intact, and a re-run with space completes exactly."""
    data = image_set()
    extract_tokens(PoolTokenizer(), data, tmp_path / "ref", batch_size=2, chunk_size=4, show_progress=False)
    out = tmp_path / "out"
    fill_disk_while_writing(monkeypatch, file_name)
    with pytest.raises(OSError, match=rf"could not write .*{file_name}.*No space left on device \(ENOSPC\)\. "
                                      r"The partial file was removed") as caught:
        extract_tokens(PoolTokenizer(), data, out, batch_size=2, chunk_size=4, show_progress=False, keep_chunks=True)
    assert caught.value.errno == errno.ENOSPC
    written = sorted(p.name for p in (out / CHUNK_DIR).iterdir())
    expected_chunks = 2 if file_name.startswith("chunk") else 6
    assert written == [f"chunk_{c:06d}.npz" for c in range(expected_chunks)] + ["job.json"]
    assert not (out / "tokens.npy").exists() and not (out / "meta.json").exists()
    for c in range(expected_chunks):  # the chunks written before the disk filled up are complete
        with np.load(out / CHUNK_DIR / f"chunk_{c:06d}.npz") as chunk:
            assert chunk["tokens"].shape[0] == min(4, 23 - 4 * c)
    monkeypatch.undo()  # space freed
    extract_tokens(PoolTokenizer(), data, out, batch_size=2, chunk_size=4, show_progress=False)
    assert np.array_equal(np.load(out / "tokens.npy"), np.load(tmp_path / "ref" / "tokens.npy"))


@pytest.mark.parametrize("file_name", ["tokens.npy", "labels.npy", "meta.json"])
@pytest.mark.parametrize("keep", [0.0, 0.05, 0.5, 0.99])
def test_truncated_token_files_raise_an_error_naming_the_file(file_name, keep, tmp_path):
    """A token directory whose tokens.npy, labels.npy or meta.json was cut short (at 0, 5, 50 or 99% of its bytes)
    is refused by TokenDataset, and so by prior training, with an error naming that file: never garbage tokens."""
    write(tmp_path / "tokens", n=20)
    path = tmp_path / "tokens" / file_name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        TokenDataset(tmp_path / "tokens")


def test_command_line_parsing(tmp_path, capsys):
    cfg = parse_config(["--tokenizer", "T", "--data.name", "synthetic", "--flip", "--batch-size", "8", "output=O",
                        "--data.image_size=16"])
    assert (cfg.tokenizer, cfg.output, cfg.flip, cfg.batch_size) == ("T", "O", True, 8)
    assert cfg.data.name == "synthetic" and cfg.data.image_size == 16
    cfg = parse_config(["--tokenizer", "T", "--output", "O", "--flip", "--data.name", "synthetic"])
    assert cfg.flip and cfg.data.name == "synthetic" and cfg.batch_size == 64
    with pytest.raises(ValueError, match="batch_size"):  # the typo is named with the closest key
        parse_config(["--tokenizer", "T", "--output", "O", "--batch_sise", "3"])
    with pytest.raises(ValueError, match="split"):
        parse_config(["tokenizer=T", "output=O", "split=test"])
    assert parse_config(["tokenizer=T", "output=O", "split=val_unseen_photos"]).split == "val_unseen_photos"
    with pytest.raises(ValueError, match="split"):  # only builtin has that split
        parse_config(["tokenizer=T", "output=O", "split=val_unseen_photos", "data.name=synthetic"])
    with pytest.raises(ValueError, match="glyphs"):  # a mirrored character is not its class
        parse_config(["--tokenizer", "T", "--output", "O", "--flip", "--data.name", "glyphs"])
    with pytest.raises(SystemExit) as exit_info:  # --help lists every key with its default (it used to raise)
        parse_config(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "chunk_size" in help_text and "data.image_size" in help_text and "(required)" in help_text


def tiny_lgq_tokenizer(path):
    from tokenizer.model import LGQTokenizer

    torch.manual_seed(0)
    model = LGQTokenizer(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, latent_dim=4,
                         codebook_size=64, attention_resolutions=None).eval()
    model.save_pretrained(path)
    return model


def synthetic_args(n=10):
    return ["--data.name", "synthetic", "--data.image_size", "16", "--data.num_images", str(n),
            "--data.num_classes", "3"]


def lgq_reference(model, n=10):
    from common.data import DataConfig, build_image_dataset

    data = build_image_dataset(DataConfig(name="synthetic", image_size=16, num_images=n, num_classes=3,
                                          random_flip=False), "train")
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    return model.encode(images), model.encode(images.flip(-1)), labels


@pytest.mark.slow
def test_extraction_command_with_a_tiny_lgq_tokenizer(tmp_path):
    model = tiny_lgq_tokenizer(tmp_path / "tok")
    meta = main(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "out"), "--batch-size", "4",
                 "--chunk-size", "3", "--flip", *synthetic_args()])
    assert meta["grid_size"] == [4, 4] and meta["codebook_size"] == 64 and meta["num_classes"] == 3
    assert meta["data_config"]["random_flip"] is False and meta["image_size"] == 16
    grids, flipped, labels = lgq_reference(model)
    ds = TokenDataset(tmp_path / "out", expected_tokenizer_hash=tokenizer_fingerprint(model))
    assert meta["class_names"] == ds.class_names == ["shape_0", "shape_1", "shape_2"]  # the data set's classes
    stored = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(stored[0::2], grids) and torch.equal(stored[1::2], flipped)
    assert torch.equal(torch.stack([ds[i][1] for i in range(0, len(ds), 2)]), labels)


@pytest.mark.slow
def test_two_process_extraction_encodes_every_image_exactly_once(tmp_path):
    from ddp import ROOT, run_ddp

    model = tiny_lgq_tokenizer(tmp_path / "tok")
    run_ddp(ROOT / "tests" / "scripts" / "ddp_extract.py", "--tokenizer", str(tmp_path / "tok"),
            "--output", str(tmp_path / "out"), "--chunk-size", "2", "--batch-size", "2", "--keep-chunks",
            *synthetic_args(11), env={"EXPECT_WORLD_SIZE": "2"})
    meta = validate_token_directory(tmp_path / "out")
    assert meta["num_processes"] == 2 and meta["count"] == 11
    ranks = [int(np.load(p)["rank"]) for p in sorted((tmp_path / "out" / CHUNK_DIR).glob("chunk_*.npz"))]
    assert ranks == [0, 1, 0, 1, 0, 1]
    firsts = [int(np.load(p)["first_image"]) for p in sorted((tmp_path / "out" / CHUNK_DIR).glob("chunk_*.npz"))]
    assert firsts == [0, 2, 4, 6, 8, 10]
    grids, _, labels = lgq_reference(model, 11)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "out" / "tokens.npy").astype(np.int64)), grids)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "out" / "labels.npy")), labels)


@pytest.mark.slow
def test_two_process_uneven_resumed_extraction_finishes_with_every_image_once(tmp_path, monkeypatch):
    """13 images in chunks of 2 = 7 chunks. An interrupted 1-process run leaves chunks 0 and 1; the 2-process
    resume splits the 5 missing chunks 3 / 2, so the ranks make different numbers of LGQ encode calls (the
    layout that used to deadlock on the quantizer's all-reduce)."""
    from ddp import ROOT, run_ddp
    from tokenizer.model import LGQTokenizer

    model = tiny_lgq_tokenizer(tmp_path / "tok")
    encode, calls = LGQTokenizer.encode, []

    def interrupted_encode(self, images):
        calls.append(images.shape[0])
        if len(calls) > 2:
            raise KeyboardInterrupt("simulated interruption")
        return encode(self, images)

    monkeypatch.setattr(LGQTokenizer, "encode", interrupted_encode)
    arguments = ["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "out"), "--chunk-size", "2",
                 "--batch-size", "2", "--keep-chunks", *synthetic_args(13)]
    with pytest.raises(KeyboardInterrupt):
        main(arguments)
    monkeypatch.undo()
    chunk_dir = tmp_path / "out" / CHUNK_DIR
    done = {p.name: p.stat().st_mtime_ns for p in chunk_dir.glob("chunk_*.npz")}
    assert sorted(done) == ["chunk_000000.npz", "chunk_000001.npz"]

    run_ddp(ROOT / "tests" / "scripts" / "ddp_extract.py", *arguments, env={"EXPECT_WORLD_SIZE": "2"}, timeout=240)
    meta = validate_token_directory(tmp_path / "out")
    assert meta["num_processes"] == 2 and meta["count"] == 13 and meta["num_images"] == 13
    chunks = sorted(chunk_dir.glob("chunk_*.npz"))
    assert {p.name: p.stat().st_mtime_ns for p in chunks[:2]} == done  # finished chunks are not re-encoded
    assert [int(np.load(p)["rank"]) for p in chunks] == [0, 0, 0, 1, 0, 1, 0]
    assert [int(np.load(p)["first_image"]) for p in chunks] == list(range(0, 13, 2))
    grids, _, labels = lgq_reference(model, 13)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "out" / "tokens.npy").astype(np.int64)), grids)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "out" / "labels.npy")), labels)
