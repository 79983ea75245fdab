"""scripts/gpu_check.py: refuses without CUDA, names a failing stage, and its tiny --dry-run runs every stage on CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
STAGES = ["tokenizer", "extract", "maskgit_b", "gpt_b", "sample_maskgit_b", "sample_gpt_b", "gen_fid", "quantizers"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_without_cuda_and_protects_foreign_output_folders(tmp_path, monkeypatch):
    gpu_check = load_script()
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--dry-run"):
        gpu_check.main(["--output", str(tmp_path / "out")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not written by gpu_check"):
        gpu_check.main(["--dry-run", "--output", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_failing_stage_stops_the_check_and_is_named(tmp_path, monkeypatch):
    gpu_check = load_script()

    def broken(*args):
        raise ValueError("simulated failure")

    monkeypatch.setattr(gpu_check, "stage_tokenizer", broken)
    with pytest.raises(gpu_check.StageFailed, match="stage 'tokenizer' failed: ValueError: simulated failure"):
        gpu_check.main(["--dry-run", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_cpu(tmp_path, inception_weights_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--output", str(tmp_path / "out"), "--tokenizer-steps", "2",
           "--prior-steps", "2", "--extract-images", "16", "--fid-samples", "4",
           "--inception-weights", str(inception_weights_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] and report["environment"]["device"] == "cpu"
    stages = {row["stage"]: row for row in report["stages"]}
    assert list(stages) == STAGES
    assert stages["tokenizer"]["steps"] == 2 and stages["tokenizer"]["s_per_step"] > 0
    assert stages["extract"]["images"] == 16 and stages["gen_fid"]["fid"] is not None
    assert [(b["quantizer"], b["K"]) for b in stages["quantizers"]["bench"]] == [("lgq", 64), ("lfq", 256)]
    assert "| stage | steps | images | s/step | img/s | peak MiB | wall s |" in proc.stdout
