"""Shared caches filled by two real processes started at the same moment (a file barrier): both succeed and get
the same content, the first writer builds and the other loads it (common.files.file_lock / publish_folder)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.files import publish_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fill_cache_at_once.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def tiny_tokenizer_folder(path: Path) -> Path:
    from tokenizer.model import LGQTokenizer

    torch.manual_seed(0)
    LGQTokenizer(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_dim=4, codebook_size=16,
                 attention_resolutions="none").save_pretrained(path)
    return path


@pytest.mark.slow
def test_two_processes_fill_each_cache_at_the_same_moment(tmp_path):
    """Two processes ask at once for the classifier cache, a token directory and a pruned export (in that order):
    every request succeeds in both, with identical files; the classifier is trained once and loaded once."""
    from prior.tokens import TokenDataset
    from tokenizer.model import LGQTokenizer

    tiny_tokenizer_folder(tmp_path / "tok")
    kinds = ["classifier", "tokens", "prune"]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "2", *kinds], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"a process failed\n{out[-2000:]}\n{err[-4000:]}"
        for line in out.splitlines():
            if line.startswith("RESULT "):
                row = json.loads(line[len("RESULT "):])
                results[row["kind"]].append(row)
    for kind in kinds:
        assert len(results[kind]) == 2 and results[kind][0]["digest"] == results[kind][1]["digest"], kind
    assert sorted(r["trained"] for r in results["classifier"]) == [False, True]  # one trained, one waited + loaded
    assert len(TokenDataset(tmp_path / "tokens")) == 32 and not (tmp_path / "tokens" / "_chunks").exists()
    assert LGQTokenizer.from_pretrained(tmp_path / "prune").config.codebook_pruning["source_codebook_size"] == 16
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary folder left


def test_publish_folder_first_writer_wins_or_replaces(tmp_path):
    def folder(name: str, text: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
        return tmp_path / name

    assert publish_folder(folder("a.tmp1", "first"), tmp_path / "a")
    assert not publish_folder(folder("a.tmp2", "second"), tmp_path / "a")  # a rename onto a full folder fails
    assert (tmp_path / "a" / "f").read_text() == "first" and not (tmp_path / "a.tmp2").exists()
    assert publish_folder(folder("a.tmp3", "third"), tmp_path / "a", replace=True)
    assert (tmp_path / "a" / "f").read_text() == "third" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_lock_is_held_sees_another_processes_lock_and_its_release(tmp_path):
    from common.files import lock_is_held

    target = tmp_path / "runs" / "run"
    assert not lock_is_held(target)  # nobody holds it (the probe takes and releases it)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom common.files import file_lock\n"
                               f"with file_lock({str(target)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
                              cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_is_held(target) and lock_is_held(target)  # probing does not take it over
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not lock_is_held(target)
