"""Fill shared caches from a process that starts each one at the same moment as its siblings (concurrency tests).

    python tests/scripts/fill_cache_at_once.py WORK_DIR NUM_PROCESSES KIND [KIND ...]

KIND, each into WORK_DIR/<kind>: classifier (eval.classifier.load_or_train_classifier), tokens
(prior.extract.extract_tokens with the tiny tokenizer saved in WORK_DIR/tok) or prune (tokenizer.prune's command
on WORK_DIR/tok). Before each KIND the process writes WORK_DIR/barrier-<kind>/<pid> and waits until
NUM_PROCESSES such files exist (a file barrier: every process is ready), then asks for the cache and prints one
line ``RESULT {"kind": ..., "trained": ..., "digest": sha256 of the cache's files}``.
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path


def digest(folder: Path) -> str:
    """sha256 over (relative path, bytes) of every file under ``folder`` but the pruning report (it holds a time)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("pruning_report")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def wait_for_siblings(barrier_dir: Path, count: int) -> None:
    barrier_dir.mkdir(parents=True, exist_ok=True)
    (barrier_dir / str(os.getpid())).touch()
    while len(list(barrier_dir.iterdir())) < count:
        time.sleep(0.01)


def fill(kind: str, work: Path) -> bool | None:
    from common.data import DataConfig, build_image_dataset

    target, source = work / kind, str(work / "tok")
    data = dict(name="synthetic", image_size=16, num_images=32, num_val_images=8, num_classes=2)
    if kind == "classifier":
        from eval.classifier import ClassifierTrainConfig, load_or_train_classifier

        recipe = ClassifierTrainConfig(epochs=2, batch_size=16, widths=(8, 16), feature_dim=8)
        return load_or_train_classifier(target, DataConfig(**data), recipe, progress=False)[2]
    if kind == "tokens":
        from prior.extract import extract_tokens
        from tokenizer.model import LGQTokenizer

        dataset = build_image_dataset(DataConfig(**{**data, "random_flip": False}), "train")
        extract_tokens(LGQTokenizer.from_pretrained(source).eval(), dataset, target, batch_size=8, chunk_size=8,
                       show_progress=False)
        return None
    if kind == "prune":
        from tokenizer.prune import main as prune

        prune(["--tokenizer", source, "--output", str(target), "--data.name", "synthetic", "--data.image_size", "16",
               "--data.num_images", "8", "--data.num_classes", "2"])
        return None
    raise ValueError(f"unknown kind {kind!r}")


def main(work: str, count: str, *kinds: str) -> None:
    import torch

    import importlib

    for module in ("eval.classifier", "prior.extract", "tokenizer.prune"):  # imported before the barriers
        importlib.import_module(module)
    torch.set_num_threads(1)
    for kind in kinds:
        wait_for_siblings(Path(work) / f"barrier-{kind}", int(count))
        trained = fill(kind, Path(work))
        print("RESULT " + json.dumps({"kind": kind, "trained": trained, "digest": digest(Path(work) / kind)}),
              flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
