"""Token-grid storage for the priors, and input validation shared by both priors.

A *token directory* holds

    tokens.npy   [N, h, w], uint16 when K <= 65536 else int32 (np.load(..., mmap_mode="r") works)
    labels.npy   [N] int64 class labels
    meta.json    written last (its presence marks a complete directory): format version, K,
                 grid [h, w], count N, num_images, augmentations, tokenizer path + fingerprint,
                 image size, data config, split, num_classes.

With augmentations (e.g. ``["none", "hflip"]``, A of them) the grids of image i are stored at
rows i*A .. i*A + A - 1, so N = num_images * A and every grid is one training example.

``TokenDataset`` reads one or several token directories together (e.g. the shards of several
extraction runs), validates them against each other and against what the caller expects
(K, grid, tokenizer fingerprint), and detects empty or truncated files.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.files import atomic_write, write_bytes_atomic

TOKEN_FORMAT_VERSION = 1
TOKENS_FILE = "tokens.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"


# ----------------------------------------------------------------------------- validation
def normalize_grid_size(grid_size: int | Sequence[int]) -> tuple[int, int]:
    """int g -> (g, g); (h, w) -> (h, w); both >= 1."""
    if isinstance(grid_size, (int, np.integer)):
        grid = (int(grid_size), int(grid_size))
    else:
        grid = tuple(int(g) for g in grid_size)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid_size must be an int or (h, w) with positive entries, got {grid_size!r}")
    return grid  # type: ignore[return-value]


def check_class_labels(class_labels: Any, num_classes: int, device: torch.device | None = None,
                       null_class: int | None = None) -> torch.Tensor:
    """Class labels (int, sequence of ints, 1-D integer tensor / array) -> int64 tensor [B] (on ``device``).

    The one class-label check of the project (prior training, the priors' forward, the pipeline). With
    ``null_class`` that one extra id (the classifier-free guidance label) is accepted as well.

    Raises ValueError naming the valid range [0, num_classes) for anything else: floats, bools,
    strings, None, nested or empty sequences, out-of-range values.
    """
    valid = f"integers in [0, {num_classes}) (num_classes={num_classes})" + \
        (f" or {null_class} (the null class)" if null_class is not None else "")
    if isinstance(class_labels, (bool, np.bool_)):
        raise ValueError(f"class_labels must be {valid}, got a bool")
    if isinstance(class_labels, (int, np.integer)):
        labels = torch.tensor([int(class_labels)], dtype=torch.int64)
    elif isinstance(class_labels, (list, tuple)):
        bad = [v for v in class_labels if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))]
        if bad:
            raise ValueError(f"class_labels must be {valid}, got non-integer entries {bad[:5]!r}")
        labels = torch.tensor([int(v) for v in class_labels], dtype=torch.int64)
    elif isinstance(class_labels, (torch.Tensor, np.ndarray)):
        labels = torch.as_tensor(class_labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be {valid}, got a tensor of dtype {labels.dtype}")
        if labels.dim() == 0:
            labels = labels.reshape(1)
        labels = labels.long()
    else:
        raise ValueError(f"class_labels must be {valid} (an int, a list of ints or a LongTensor), "
                         f"got {type(class_labels).__name__}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"class_labels must be a non-empty 1-D sequence of {valid}, got shape {tuple(labels.shape)}")
    outside = (labels < 0) | (labels >= num_classes)
    if null_class is not None:
        outside &= labels != null_class
    if outside.any():
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"class_labels must be {valid}, got values in [{lo}, {hi}]")
    return labels.to(device) if device is not None else labels


def check_token_grid(tokens: torch.Tensor, codebook_size: int, grid: tuple[int, int], allow_mask: bool = False,
                     name: str = "tokens") -> torch.Tensor:
    """Tokens [B, h, w] or [B, h*w] -> int64 [B, L]; ValueError unless integer in [0, K) (or == K if allow_mask)."""
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {tokens.dtype}")
    h, w = grid
    if tokens.dim() == 3 and tuple(tokens.shape[1:]) == (h, w):
        tokens = tokens.reshape(tokens.shape[0], h * w)
    elif not (tokens.dim() == 2 and tokens.shape[1] == h * w):
        raise ValueError(f"{name} must have shape [B, {h}, {w}] or [B, {h * w}], got {tuple(tokens.shape)}")
    upper = codebook_size + 1 if allow_mask else codebook_size
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= upper:
            what = f"[0, {codebook_size}] (K={codebook_size} is the mask id)" if allow_mask else f"[0, {codebook_size})"
            raise ValueError(f"{name} must lie in {what}, got [{lo}, {hi}]")
    return tokens.long()


# ----------------------------------------------------------------------------- format
def token_dtype(codebook_size: int) -> np.dtype:
    """uint16 when every index fits (K <= 65536), else int32."""
    return np.dtype(np.uint16) if int(codebook_size) <= 65536 else np.dtype(np.int32)


def tokenizer_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's config (sorted JSON) and every state-dict tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}  # not _name_or_path etc.
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_meta(directory: str | os.PathLike, meta: dict) -> None:
    write_bytes_atomic(Path(directory) / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save through ``common.files.atomic_write``: readers never see a half-written file."""
    with atomic_write(path) as f:
        np.save(f, array)


def build_meta(*, codebook_size: int, grid_size, count: int, num_images: int | None = None,
               augmentations: Sequence[str] = ("none",), num_classes: int | None = None,
               tokenizer_path: str | None = None, tokenizer_hash: str | None = None, **extra: Any) -> dict:
    """The meta.json dictionary (extra keys such as image_size, data_config, split are kept as given)."""
    grid = normalize_grid_size(grid_size)
    augmentations = list(augmentations)
    meta = {
        "version": TOKEN_FORMAT_VERSION,
        "codebook_size": int(codebook_size),
        "grid_size": list(grid),
        "count": int(count),
        "num_images": int(num_images if num_images is not None else count // max(1, len(augmentations))),
        "augmentations": augmentations,
        "dtype": token_dtype(codebook_size).name,
        "num_classes": None if num_classes is None else int(num_classes),
        "tokenizer_path": tokenizer_path,
        "tokenizer_hash": tokenizer_hash,
    }
    meta.update(extra)
    return meta


def save_token_directory(directory: str | os.PathLike, tokens: np.ndarray | torch.Tensor,
                         labels: np.ndarray | torch.Tensor, **meta_fields: Any) -> dict:
    """Write tokens [N, h, w] and labels [N] plus meta.json (last). meta_fields go to ``build_meta``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    K = int(meta_fields["codebook_size"])
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [N, h, w], got shape {tokens.shape}")
    if labels.shape != (tokens.shape[0],):
        raise ValueError(f"labels must be [N={tokens.shape[0]}], got shape {labels.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= K):
        raise ValueError(f"tokens must lie in [0, {K}), got [{tokens.min()}, {tokens.max()}]")
    meta_fields.setdefault("grid_size", tokens.shape[1:])
    meta = build_meta(count=tokens.shape[0], **meta_fields)
    if tuple(meta["grid_size"]) != tuple(tokens.shape[1:]):
        raise ValueError(f"grid_size {meta['grid_size']} does not match tokens shape {tokens.shape}")
    save_npy_atomic(directory / TOKENS_FILE, tokens.astype(token_dtype(K), copy=False))
    save_npy_atomic(directory / LABELS_FILE, labels.astype(np.int64, copy=False))
    write_meta(directory, meta)
    return meta


def read_meta(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"token directory {directory} does not exist")
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {directory} is not a complete token directory "
            "(an interrupted extraction? re-run `python -m prior.extract` with the same --output to resume)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    missing = {"version", "codebook_size", "grid_size", "count"} - set(meta)
    if missing:
        raise ValueError(f"{path} lacks required keys {sorted(missing)}")
    if int(meta["version"]) > TOKEN_FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta['version']}; this code reads <= {TOKEN_FORMAT_VERSION}")
    return meta


def _check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The .npy header must announce ``shape``/``dtype`` and the file must hold all of its bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the extraction that wrote it did not finish")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            file_shape, _fortran, file_dtype = read_header(f)
            offset = f.tell()
    except Exception as err:  # noqa: BLE001 - any header problem is a corrupt file
        raise ValueError(f"{path} is not a valid .npy file (truncated or corrupt): {err}") from err
    if tuple(file_shape) != tuple(shape) or np.dtype(file_dtype) != dtype:
        raise ValueError(f"{path} holds {file_dtype}{tuple(file_shape)} but meta.json says {dtype}{tuple(shape)}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < expected:
        raise ValueError(f"{path} is truncated: {size} bytes, expected {expected} for {tuple(shape)} {dtype}")
    if size > expected:
        raise ValueError(f"{path} has {size - expected} trailing bytes beyond {tuple(shape)} {dtype}")


def validate_token_directory(directory: str | os.PathLike) -> dict:
    """Read meta.json and check both arrays against it (shape, dtype, byte size, non-empty)."""
    directory = Path(directory)
    meta = read_meta(directory)
    count = int(meta["count"])
    if count <= 0:
        raise ValueError(f"token directory {directory} is empty (count = {count})")
    h, w = normalize_grid_size(meta["grid_size"])
    _check_npy(directory / TOKENS_FILE, (count, h, w), token_dtype(meta["codebook_size"]))
    _check_npy(directory / LABELS_FILE, (count,), np.dtype(np.int64))
    return meta


# ----------------------------------------------------------------------------- dataset
class TokenDataset(Dataset):
    """Token grids from one or more token directories, as (tokens int64 [h, w], label int64).

    Args:
        paths: a token directory or a list of them (read together, in order).
        expected_tokenizer_hash: if given, every directory must come from that tokenizer.
        codebook_size, grid_size: if given, must match the stored K / grid.
        use_augmentations: False keeps only the un-augmented grid of each image.
    All directories must agree on tokenizer fingerprint, K, grid and num_classes.
    """

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                 expected_tokenizer_hash: str | None = None, codebook_size: int | None = None,
                 grid_size: int | Sequence[int] | None = None, use_augmentations: bool = True):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("TokenDataset needs at least one token directory")
        self.metas = [validate_token_directory(p) for p in self.paths]
        first = self.metas[0]
        for key in ("tokenizer_hash", "codebook_size", "grid_size", "num_classes", "class_names"):
            values = {json.dumps(m.get(key)) for m in self.metas}
            if len(values) > 1:
                detail = ", ".join(f"{p}: {m.get(key)}" for p, m in zip(self.paths, self.metas))
                what = "different tokenizers" if key == "tokenizer_hash" else f"different {key}"
                raise ValueError(f"refusing to mix token directories from {what} ({detail})")
        if expected_tokenizer_hash is not None and first.get("tokenizer_hash") != expected_tokenizer_hash:
            raise ValueError(
                f"tokens in {self.paths[0]} were made by tokenizer {first.get('tokenizer_hash')}, "
                f"expected {expected_tokenizer_hash}: re-extract them with this tokenizer"
            )
        self.codebook_size = int(first["codebook_size"])
        self.grid_size = normalize_grid_size(first["grid_size"])
        if codebook_size is not None and int(codebook_size) != self.codebook_size:
            raise ValueError(f"stored tokens have K={self.codebook_size}, expected {codebook_size}")
        if grid_size is not None and normalize_grid_size(grid_size) != self.grid_size:
            raise ValueError(f"stored tokens have grid {self.grid_size}, expected {normalize_grid_size(grid_size)}")
        self.num_classes = first.get("num_classes")
        self.class_names = first.get("class_names")  # names of the classes (None for directories without them)
        self.tokenizer_hash = first.get("tokenizer_hash")
        self.meta = first
        self.use_augmentations = bool(use_augmentations)
        self._strides, sizes = [], []
        for meta in self.metas:
            stride = 1 if self.use_augmentations else max(1, len(meta.get("augmentations", ["none"])))
            self._strides.append(stride)
            sizes.append(int(meta["count"]) // stride)
        self._offsets = np.cumsum([0] + sizes)
        self._arrays: list | None = None  # opened lazily (per DataLoader worker)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def _open(self) -> list:
        if self._arrays is None:
            self._arrays = [
                (np.load(p / TOKENS_FILE, mmap_mode="r"), np.load(p / LABELS_FILE, mmap_mode="r")) for p in self.paths
            ]
        return self._arrays

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def code_counts(self, chunk_grids: int = 4096) -> np.ndarray:
        """c_k = #{(n, i): t_{n,i} = k}, k = 0..K-1: how often each code occurs in the grids this data set yields
        (the un-augmented rows only when use_augmentations is False) [K] int64. Read ``chunk_grids`` grids at a time
        from the memory-mapped files, so an ImageNet-sized token set is never held in memory whole."""
        counts = np.zeros(self.codebook_size, dtype=np.int64)
        for (tokens, _), stride in zip(self._open(), self._strides):
            rows = tokens[::stride]
            for start in range(0, len(rows), chunk_grids):
                counts += np.bincount(np.asarray(rows[start:start + chunk_grids]).reshape(-1),
                                      minlength=self.codebook_size)
        return counts

    def __getitem__(self, index: int):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} token grids")
        part = int(np.searchsorted(self._offsets, index, side="right") - 1)
        row = (index - int(self._offsets[part])) * self._strides[part]
        tokens, labels = self._open()[part]
        return torch.from_numpy(np.asarray(tokens[row], dtype=np.int64)), torch.tensor(int(labels[row]), dtype=torch.long)
