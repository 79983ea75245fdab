"""Pre-extract token grids for prior training: ``python -m prior.extract`` (also under ``accelerate launch``).

    accelerate launch -m prior.extract --tokenizer runs/tok/export --data.name imagefolder \
        --data.root /data/imagenet --data.image_size 256 --output tokens/imagenet_train --flip

Arguments are the fields of ``ExtractConfig`` as ``--key value`` / ``--flag`` or ``key=value``
(``--batch-size 8`` == ``batch_size=8``; the style of every command, ``common/cli.py``);
``--config FILE.yaml`` merges a YAML file first; ``--help`` lists every key with its default.

How the work is split and resumed: the data set (deterministic transform, no random flip) is cut
into fixed chunks of ``chunk_size`` consecutive images. After a barrier every process lists the same
missing chunks m_0 < m_1 < ...; process r encodes m_r, m_{r+W}, m_{r+2W}, ... (a fresh run: chunk c
on process c mod W). Each finished chunk is written atomically (temporary file + rename) to
``OUTPUT/_chunks/``. A restarted run (any number of processes) skips the chunks that exist, so an
interruption loses at most the chunk being encoded and never duplicates or drops an image.
Processes may encode different numbers of batches (the chunks need not divide evenly): encoding
calls no collective (the tokenizer runs in eval mode, where quantizers use local statistics, see
``Quantizer.syncs_across_processes``); the only collectives are the barriers every process reaches.
A second extraction command on the same output waits for the first (``common.files.file_lock(OUTPUT)``,
taken by the main process; its other processes wait at a barrier, within the process group's timeout) and then
finds the finished directory. When all chunks exist the main process concatenates them in index order into the
token directory format of ``prior/tokens.py`` (``tokens.npy``, ``labels.npy``, then ``meta.json``) and removes
``_chunks/``.
A stream (``data.name=webdataset``, or ``hf`` with ``data.streaming=true``; ``common/data/stream.py``) has no
image index: there chunk c is shard c, read whole in stored order (``chunk_size`` is not used), so the same
rules give every image of every shard exactly once, whatever the shard sizes.
``--flip`` stores the grid of the horizontally flipped image right after each image's grid.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import MISSING
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from common.cli import make_parser, parse_command_line
from common.config import load_config
from common.data import DataConfig, build_image_dataset, is_stream
from common.files import atomic_write, file_lock
from common.training import end_process_group, make_accelerator
from prior.tokens import (LABELS_FILE, META_FILE, TOKENS_FILE, build_meta, normalize_grid_size, read_meta,
                          save_npy_atomic, token_dtype, tokenizer_fingerprint, validate_token_directory, write_meta)
from tokenizer.model import LGQTokenizer

CHUNK_DIR = "_chunks"
JOB_FILE = "job.json"
AUGMENTATIONS = {False: ["none"], True: ["none", "hflip"]}


@dataclass
class ExtractConfig:
    """tokenizer: folder written by LGQTokenizer.save_pretrained. output: token directory to create.
    split: a split of the data set (``data.splits()``, e.g. "train" | "val"). flip: also store horizontally
    flipped grids (refused for data sets whose classes are not mirror-symmetric, e.g. glyphs). batch_size: images per encode
    call. chunk_size: images per resumable chunk. keep_chunks: keep OUTPUT/_chunks after merging.
    overwrite: replace a complete token directory made with other settings."""

    tokenizer: str = MISSING
    output: str = MISSING
    split: str = "train"
    flip: bool = False
    batch_size: int = 64
    chunk_size: int = 1024
    keep_chunks: bool = False
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig.unresolved)

    def validate(self) -> None:
        self.data.check_split(self.split)
        if self.flip and self.data.name == "glyphs":
            raise ValueError("flip=true with data.name='glyphs': a mirrored character is not an image of its "
                             "class; extract without flip")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


# ----------------------------------------------------------------------------- chunks
def chunk_path(output: Path, index: int) -> Path:
    return output / CHUNK_DIR / f"chunk_{index:06d}.npz"


def _save_chunk(path: Path, tokens: np.ndarray, labels: np.ndarray, first_image: int, rank: int) -> None:
    with atomic_write(path) as f:
        np.savez(f, tokens=tokens, labels=labels, first_image=np.int64(first_image), rank=np.int64(rank))


def _load_chunk(path: Path, expected_rows: int, grid: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as chunk:
            tokens, labels = chunk["tokens"], chunk["labels"]
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"chunk {path} is unreadable ({err}); delete it and re-run to re-encode it") from err
    if tokens.shape[0] != expected_rows or labels.shape != (expected_rows,):
        raise ValueError(f"chunk {path} holds {tokens.shape[0]} grids, expected {expected_rows}; delete it and re-run")
    if grid is not None and tuple(tokens.shape[1:]) != tuple(grid):
        raise ValueError(f"chunk {path} has grid {tokens.shape[1:]}, expected {grid}")
    return tokens, labels


def _chunk_rows(path: Path) -> int:
    try:
        with np.load(path) as chunk:
            return int(chunk["labels"].shape[0])
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"chunk {path} is unreadable ({err}); delete it and re-run to re-encode it") from err


def _job_record(num_images: int, chunk_size: int, augmentations: list[str], tokenizer_hash: str,
                extra: dict) -> dict:
    return {"num_images": num_images, "chunk_size": chunk_size, "augmentations": augmentations,
            "tokenizer_hash": tokenizer_hash, **extra}


def _same_job(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- core
@torch.no_grad()
def encode_batch(tokenizer, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Grids [B*A, h, w]: for each image its grid, then (flip) the grid of images.flip(-1)."""
    grids = [tokenizer.encode(images)]
    if flip:
        grids.append(tokenizer.encode(images.flip(-1)))
    return torch.stack(grids, dim=1).flatten(0, 1)


def extract_tokens(
    tokenizer: torch.nn.Module,
    dataset,
    output: str | os.PathLike,
    *,
    accelerator=None,
    batch_size: int = 64,
    chunk_size: int = 1024,
    flip: bool = False,
    num_workers: int = 0,
    tokenizer_path: str | None = None,
    tokenizer_hash: str | None = None,
    meta_extra: dict | None = None,
    keep_chunks: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Encode every image of ``dataset`` once (plus its flip) into the token directory ``output``.

    ``tokenizer`` needs ``encode(images) -> [B, h, w]`` and ``codebook_size``; ``dataset`` yields
    (image [3, S, S] in [-1, 1], label). Works in one process or under accelerate (see module doc).
    Returns the meta dictionary of the finished directory.
    """
    accelerator = accelerator or Accelerator()
    output = Path(output)
    rank, world = accelerator.process_index, accelerator.num_processes
    augmentations = AUGMENTATIONS[bool(flip)]
    stream = is_stream(dataset)
    num_images = None if stream else len(dataset)  # a stream's count is known once its shards are read
    if num_images == 0:
        raise ValueError("the data set is empty: nothing to extract")
    if tokenizer_hash is None:
        tokenizer_hash = tokenizer_fingerprint(tokenizer)
    K = int(tokenizer.codebook_size)
    extra = dict(meta_extra or {})
    if stream:  # chunk c = shard c
        job = _job_record(None, None, augmentations, tokenizer_hash, {**extra, "shards": dataset.shard_names})
    else:
        job = _job_record(num_images, int(chunk_size), augmentations, tokenizer_hash, extra)

    # one extraction job per output at a time: the main process of a second job (another command on the same
    # --output) waits here for the lock, its other processes at the barrier; then it finds the finished directory
    with file_lock(output, enabled=accelerator.is_main_process):
        accelerator.wait_for_everyone()
        if _already_extracted(output, job, overwrite, accelerator):
            return validate_token_directory(output)
        chunk_dir = _prepare_chunk_folder(output, job, tokenizer_hash, overwrite, accelerator)

        # --- this process's share of the missing chunks (listed by every process between two barriers)
        num_chunks = dataset.num_shards if stream else math.ceil(num_images / chunk_size)
        missing = [c for c in range(num_chunks) if not chunk_path(output, c).is_file()]
        accelerator.wait_for_everyone()  # nobody writes a chunk before every process has listed them
        _encode_chunks(tokenizer, dataset, output, missing[rank::world], chunk_size=chunk_size, batch_size=batch_size,
                       flip=flip, num_workers=num_workers, accelerator=accelerator, show_progress=show_progress)
        accelerator.wait_for_everyone()

        # --- merge (main process), in chunk = image order
        if accelerator.is_main_process:
            merge_chunks(output, num_images, chunk_size, augmentations, K, job, num_chunks=num_chunks,
                         tokenizer_path=tokenizer_path, tokenizer_hash=tokenizer_hash, num_processes=world, **extra)
            if not keep_chunks:
                shutil.rmtree(chunk_dir, ignore_errors=True)
        accelerator.wait_for_everyone()
    return validate_token_directory(output)


def _already_extracted(output: Path, job: dict, overwrite: bool, accelerator) -> bool:
    """True when ``output`` is a finished directory of the same job (nothing to do); a finished directory of
    another job is refused unless ``overwrite``. Every process decides alike (no collective)."""
    if not (output / META_FILE).is_file():
        return False
    meta = read_meta(output)
    if _same_job(meta.get("job", {}), job):
        accelerator.print(f"{output} is already complete ({meta['count']} grids); nothing to do")
        return True
    if not overwrite:
        raise ValueError(
            f"{output} already holds tokens made with other settings or another tokenizer "
            f"(tokenizer {meta.get('tokenizer_hash')}); choose another --output or pass overwrite=true"
        )
    return False


def _prepare_chunk_folder(output: Path, job: dict, tokenizer_hash: str, overwrite: bool, accelerator) -> Path:
    """The chunk folder of ``job``, ready to resume: chunks of another job are refused (or, with
    ``overwrite``, removed with the old results), half-written files deleted, the job recorded. Every process
    passes the same two barriers."""
    chunk_dir = output / CHUNK_DIR
    job_file = chunk_dir / JOB_FILE
    previous = json.loads(job_file.read_text()) if job_file.is_file() else None
    restart = previous is not None and not _same_job(previous, job)
    if restart and not overwrite:  # every process decides alike: no process is left waiting
        raise ValueError(
            f"{chunk_dir} holds chunks of an interrupted extraction with other settings or another "
            f"tokenizer (tokenizer {previous.get('tokenizer_hash')}, now {tokenizer_hash}); refusing "
            "to mix them: delete the folder or pass overwrite=true"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite and (output / META_FILE).is_file():
            for name in (META_FILE, TOKENS_FILE, LABELS_FILE):
                (output / name).unlink(missing_ok=True)
        if restart:
            shutil.rmtree(chunk_dir)
        chunk_dir.mkdir(parents=True, exist_ok=True)
        for stale in chunk_dir.glob("*.tmp*"):  # half-written files of an interrupted run
            stale.unlink(missing_ok=True)
        job_file.write_text(json.dumps(job, indent=2, sort_keys=True, default=str))
    accelerator.wait_for_everyone()
    return chunk_dir


def _encode_chunks(tokenizer, dataset, output: Path, chunks: Sequence[int], *, chunk_size: int, batch_size: int,
                   flip: bool, num_workers: int, accelerator, show_progress: bool) -> None:
    """Encode the images of ``chunks`` (chunk c = images [c * chunk_size, (c + 1) * chunk_size)) and write each
    chunk atomically; the tokenizer runs in eval mode (no collective inside encode) and its mode is restored."""
    K = int(tokenizer.codebook_size)
    stream = is_stream(dataset)
    num_images = None if stream else len(dataset)
    num_views = len(AUGMENTATIONS[bool(flip)])
    progress = None
    if show_progress and accelerator.is_main_process:
        pending_images = None if stream else sum(min(chunk_size, num_images - c * chunk_size) for c in chunks)
        progress = tqdm(total=pending_images, desc=f"encode (process 0 of {accelerator.num_processes})", unit="img")
    was_training = bool(getattr(tokenizer, "training", False))
    if was_training:  # eval mode: no dropout, no quantizer updates, no collectives inside encode
        tokenizer.eval()
    for c in chunks:
        if stream:  # one shard: one reader (a worker decodes while this process encodes)
            start, source, workers = -1, dataset.shard_items(c), min(num_workers, 1)
        else:
            start, stop = c * chunk_size, min((c + 1) * chunk_size, num_images)
            source, workers = Subset(dataset, range(start, stop)), num_workers
        loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers)
        grids, labels = [], []
        for images, batch_labels in loader:
            batch_grids = encode_batch(tokenizer, images.to(accelerator.device), flip)
            if batch_grids.numel() and (int(batch_grids.min()) < 0 or int(batch_grids.max()) >= K):
                raise ValueError(f"tokenizer returned indices outside [0, {K})")
            grids.append(batch_grids.cpu().numpy().astype(token_dtype(K)))
            labels.append(torch.as_tensor(batch_labels).long().repeat_interleave(num_views).numpy())
            if progress is not None:
                progress.update(images.shape[0])
        if not grids:  # an empty shard (warned about by the stream): an empty chunk
            grids, labels = [np.zeros((0, 0, 0), token_dtype(K))], [np.zeros(0, np.int64)]
        _save_chunk(chunk_path(output, c), np.concatenate(grids), np.concatenate(labels), start,
                    accelerator.process_index)
    if progress is not None:
        progress.close()
    if was_training:
        tokenizer.train()


def merge_chunks(output: Path, num_images: int | None, chunk_size: int, augmentations: list[str], codebook_size: int,
                 job: dict, *, num_chunks: int | None = None, **meta_fields: Any) -> dict:
    """Concatenate chunk_000000 .. chunk_{C-1} into tokens.npy / labels.npy, then write meta.json.

    ``num_images=None`` (a stream): C = ``num_chunks`` (one per shard) and each chunk holds the images its shard
    had; else C = ceil(num_images / chunk_size)."""
    A = len(augmentations)
    if num_images is not None:
        num_chunks = math.ceil(num_images / chunk_size)
    missing = [c for c in range(num_chunks) if not chunk_path(output, c).is_file()]
    if missing:
        raise RuntimeError(f"cannot merge: chunks {missing[:10]} of {num_chunks} are missing in {output / CHUNK_DIR}")
    if num_images is None:
        rows_of = [_chunk_rows(chunk_path(output, c)) for c in range(num_chunks)]
        num_images = sum(rows_of) // A
        if num_images == 0:
            raise ValueError(f"the {num_chunks} shards hold no readable image: nothing to extract")
    else:
        rows_of = [(min((c + 1) * chunk_size, num_images) - c * chunk_size) * A for c in range(num_chunks)]
    first = next(c for c in range(num_chunks) if rows_of[c])
    first_tokens, _ = _load_chunk(chunk_path(output, first), rows_of[first], None)
    grid = normalize_grid_size(first_tokens.shape[1:])
    count = num_images * A
    dtype = token_dtype(codebook_size)
    labels_out = np.empty(count, dtype=np.int64)
    with atomic_write(output / TOKENS_FILE) as f:  # streamed chunk by chunk: a full disk is an OSError, not SIGBUS
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": (count, *grid)})
        offset = 0
        for c, rows in enumerate(rows_of):
            if rows == 0:  # an empty shard
                continue
            tokens, labels = _load_chunk(chunk_path(output, c), rows, grid)
            f.write(np.ascontiguousarray(tokens, dtype=dtype).tobytes())
            labels_out[offset: offset + rows] = labels
            offset += rows
    save_npy_atomic(output / LABELS_FILE, labels_out)
    meta = build_meta(codebook_size=codebook_size, grid_size=grid, count=count, num_images=num_images,
                      augmentations=augmentations, job=job, **meta_fields)
    write_meta(output, meta)
    return meta


# ----------------------------------------------------------------------------- command line
def parse_config(argv: Sequence[str]) -> ExtractConfig:
    """The command line (common.cli style: ``--key value`` / ``key=value`` / ``--flag`` for ExtractConfig's keys,
    ``--config FILE.yaml``, ``--help`` listing every key with its default) -> ExtractConfig."""
    parser = make_parser("python -m prior.extract", __doc__.split("\n\n")[0], ExtractConfig)
    args, overrides = parse_command_line(parser, argv, ExtractConfig)
    return load_config(ExtractConfig, args.config or None, overrides)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    data_cfg = dataclasses.replace(cfg.data, random_flip=False)  # the only augmentation is the explicit flip
    accelerator = make_accelerator()
    tokenizer = LGQTokenizer.from_pretrained(cfg.tokenizer).to(accelerator.device).eval()
    dataset = build_image_dataset(data_cfg, split=cfg.split)
    meta_extra = {
        "image_size": data_cfg.image_size,
        "split": cfg.split,
        "data_config": dataclasses.asdict(data_cfg),
        "num_classes": int(getattr(dataset, "num_classes")),
        "class_names": [str(name) for name in getattr(dataset, "class_names", None) or []] or None,
        "downsample_factor": int(tokenizer.downsample_factor),
    }
    meta = extract_tokens(
        tokenizer, dataset, cfg.output, accelerator=accelerator, batch_size=cfg.batch_size,
        chunk_size=cfg.chunk_size, flip=cfg.flip, num_workers=data_cfg.num_workers,
        tokenizer_path=os.path.abspath(cfg.tokenizer), meta_extra=meta_extra,
        keep_chunks=cfg.keep_chunks, overwrite=cfg.overwrite,
    )
    accelerator.print(f"token directory {cfg.output}: {meta['count']} grids {meta['grid_size']} "
                      f"(K={meta['codebook_size']}, augmentations {meta['augmentations']})")
    end_process_group()
    return meta


if __name__ == "__main__":
    main()
