"""Training scripts run as a user runs them, for the kill-and-resume tests (tests/test_tokenizer_train.py,
tests/test_stream_training.py): the environment, a checked subprocess run, and the tensors a run ends with."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from ddp import ROOT  # tests/ddp.py

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the project root (ENV); fail the test with its output unless it exits 0."""
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def final_state(output_dir: Path, step: int = 8, export: bool = False) -> dict[str, torch.Tensor]:
    """Weights of the tokenizer run's checkpoint at ``step`` (generator ``model.safetensors``, discriminator
    ``model_1.safetensors``) and, with ``export``, of the exported EMA tokenizer."""
    checkpoint = Path(output_dir) / "checkpoints" / f"step_{step:07d}"
    tensors = {}
    for name in ("model.safetensors", "model_1.safetensors"):
        tensors.update({f"{name}/{k}": v for k, v in load_file(str(checkpoint / name)).items()})
    if export:
        exported = load_file(str(Path(output_dir) / "tokenizer" / "diffusion_pytorch_model.safetensors"))
        tensors.update({f"export/{k}": v for k, v in exported.items()})
    return tensors


def kill_after_checkpoint(cmd: list[str], step: int = 4) -> None:
    """Run ``cmd`` (tests/scripts/train_tokenizer_pause_after_checkpoint.py with its options), which prints
    "PAUSED" once the checkpoint of ``step`` is written, and SIGKILL it there: a preemption without warning."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "LGQ_PAUSE_AFTER_STEP": str(step)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("PAUSED"):
                break
        else:
            raise AssertionError(f"run ended before the checkpoint: {proc.stderr.read()[-4000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
