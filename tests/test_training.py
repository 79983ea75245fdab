"""Engine tests (common/training.py) on a toy model: schedule, weight-decay groups, exact resume,
NaN guard, atomic checkpoints, keep-last-N, export."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from common.config import TrainConfig
from common.training import (
    CheckpointWriteError, NonFiniteLossError, Trainer, build_optimizer, checkpoint_problem, list_checkpoints,
    lr_factor, parameter_groups, read_history, resolve_resume_path,
)


class ToyModel(ModelMixin, ConfigMixin):
    """Linear -> dropout -> LayerNorm -> linear, plus a 'codebook' and a progress hook."""

    @register_to_config
    def __init__(self, dim: int = 4, hidden: int = 8):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(0.2)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        self.codebook = nn.Parameter(torch.randn(3, hidden))
        self.progress_seen: list[float] = []
        self.steps_seen: list[tuple] = []

    def set_progress(self, progress: float) -> None:
        self.progress_seen.append(progress)

    def set_training_step(self, step: int, max_steps: int, steps_per_epoch: int | None = None) -> None:
        self.steps_seen.append((step, max_steps, steps_per_epoch))
        self.set_progress(min(1.0, step / max_steps))

    def forward(self, x):
        h = self.norm(self.drop(self.inp(x)))
        return self.out(h + 0.1 * self.codebook.mean(0))


class NoisyDataset(torch.utils.data.Dataset):
    """Fixed points; random sign flip from torch's global RNG (like a random-flip augmentation)."""

    def __init__(self, n: int = 28, dim: int = 4):  # 7 batches per epoch: checkpoints fall mid-epoch
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        sign = 1.0 if bool(torch.rand(()) < 0.5) else -1.0
        return self.x[i] * sign, 0


def make_cfg(tmp_path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=8, batch_size=4, grad_accum_steps=2, lr=1e-2,
                  warmup_steps=2, weight_decay=0.1, ema_decay=0.9, log_every=2, checkpoint_every=3,
                  keep_checkpoints=2, mixed_precision="no", progress_bar=False)
    values.update(overrides)
    return TrainConfig(**values)


def run_toy(cfg: TrainConfig, fail_at_step: int | None = None, nan_at_step: int | None = None):
    torch.manual_seed(cfg.seed)
    model = ToyModel()
    loader = torch.utils.data.DataLoader(NoisyDataset(), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    trainer = Trainer(cfg)
    (prepared,) = trainer.setup({"model": model}, {"model": build_optimizer(model, cfg)}, loader, ema_model="model")

    def training_step(batch, step):
        if fail_at_step is not None and step == fail_at_step:
            raise KeyboardInterrupt("simulated crash")
        x, _ = batch
        loss = (prepared(x) - x.flip(-1)).pow(2).mean()
        if nan_at_step is not None and step == nan_at_step:
            loss = loss * float("nan")
        trainer.backward(loss)
        return {"loss": loss.detach(), "mse": loss.detach()}

    logs = trainer.fit(training_step)
    return trainer, logs


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lr_factor_warmup_then_cosine_to_min():
    W, S, r = 4, 20, 0.1
    assert [lr_factor(s, W, S, "cosine", r) for s in range(W)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(W, W, S, "cosine", r) == pytest.approx(1.0)
    assert lr_factor(S - 1, W, S, "cosine", r) == pytest.approx(r)
    middle = W + (S - W - 1) / 2
    assert lr_factor(middle, W, S, "cosine", r) == pytest.approx(r + (1 - r) * 0.5)
    values = [lr_factor(s, W, S, "cosine", r) for s in range(W, S)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_factor(15, W, S, "constant", r) == 1.0
    assert lr_factor(0, 0, S, "cosine", r) == pytest.approx(1.0)


def test_no_weight_decay_on_codebook_norm_bias():
    model = ToyModel()
    groups = parameter_groups(model, weight_decay=0.05)
    ids = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert ids[id(model.codebook)] == 0.0
    assert ids[id(model.norm.weight)] == 0.0 and ids[id(model.inp.bias)] == 0.0
    assert ids[id(model.inp.weight)] == 0.05 and ids[id(model.out.weight)] == 0.05
    assert len(ids) == len(list(model.parameters()))


def test_resume_after_crash_is_bit_identical(tmp_path):
    reference, _ = run_toy(make_cfg(tmp_path / "a"))
    ref_model, ref_ema = state(reference.unwrap()), state(reference.ema.module)
    assert reference.unwrap().progress_seen[:3] == pytest.approx([0.0, 1 / 8, 2 / 8])
    # the schedule hook sees (step, max_steps, optimiser steps per epoch): 7 batches per epoch / 2 accumulated
    assert reference.unwrap().steps_seen[:3] == [(0, 8, 3), (1, 8, 3), (2, 8, 3)]

    with pytest.raises(KeyboardInterrupt):
        run_toy(make_cfg(tmp_path / "b"), fail_at_step=4)  # dies after the step-3 checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run" / "checkpoints")] == ["step_0000003"]
    resumed, _ = run_toy(make_cfg(tmp_path / "b", resume="latest"))
    assert resumed.resumed_from.name == "step_0000003"
    for key, value in ref_model.items():
        assert torch.equal(value, state(resumed.unwrap())[key]), key
    for key, value in ref_ema.items():
        assert torch.equal(value, state(resumed.ema.module)[key]), key
    # the EMA differs from the raw weights and the training really moved them
    assert not torch.equal(ref_model["out.weight"], ref_ema["out.weight"])
    # history.jsonl: the crashed run had logged step 4 after its step-3 checkpoint; the resumed run drops that
    # row and logs it again, so the file equals the uninterrupted run's (timings aside)
    def logged(run_dir):
        return [(row["step"], row["loss"], row["lr/model"]) for row in read_history(run_dir / "run")]

    assert [s for s, _, _ in logged(tmp_path / "a")] == [2, 4, 6, 8]
    assert logged(tmp_path / "b") == logged(tmp_path / "a")
    assert [s for s, _ in resumed.history] == [4, 6, 8]


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"step 5: loss=nan, mse=nan.*step_0000004"):
        run_toy(cfg, nan_at_step=5)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    names = [p.name for p in list_checkpoints(ckpt_dir)]
    assert names == ["step_0000002", "step_0000004"]
    from safetensors.torch import load_file

    weights = load_file(str(ckpt_dir / "step_0000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    # the run resumes from the intact checkpoint
    trainer, logs = run_toy(make_cfg(tmp_path, checkpoint_every=2, resume="latest"))
    assert trainer.step == 8 and math.isfinite(logs["loss"])


def test_checkpoint_is_atomic_and_keeps_last_n(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=5, checkpoint_every=1, keep_checkpoints=2, ema_decay=0.0)
    trainer, _ = run_toy(cfg)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_0000004", "step_0000005"]
    assert (ckpt_dir / "step_0000005" / "trainer_state.json").is_file()

    def crash_mid_save(output_dir, **kwargs):
        from pathlib import Path
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    real_save = trainer.accelerator.save_state
    trainer.accelerator.save_state = crash_mid_save
    trainer.progress.step = 6
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_0000004", "step_0000005"]
    assert not (ckpt_dir / ".tmp_step_0000006").exists()  # the partial folder is removed
    (ckpt_dir / ".tmp_step_0000006").mkdir()  # a leftover of a killed process is ignored ...
    trainer.accelerator.save_state = real_save
    trainer.save_checkpoint()  # ... and replaced by the next save
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_0000005", "step_0000006"]
    assert not (ckpt_dir / ".tmp_step_0000006").exists()


def test_resume_latest_skips_truncated_or_incomplete_newest_checkpoints(tmp_path, capsys):
    reference, _ = run_toy(make_cfg(tmp_path / "a", checkpoint_every=2, keep_checkpoints=4))
    ckpt_dir = tmp_path / "a" / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_0000002", "step_0000004", "step_0000006",
                                                            "step_0000008"]
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(ckpt_dir))
    model_file = ckpt_dir / "step_0000008" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])  # truncated
    (ckpt_dir / "step_0000006" / "optimizer.bin").unlink()  # missing a file
    (ckpt_dir / "step_0000004" / "trainer_state.json").write_text('{"step": 4, "fil')  # cut while written
    assert "model.safetensors has" in checkpoint_problem(ckpt_dir / "step_0000008")
    with pytest.raises(ValueError, match="incomplete: optimizer.bin is missing"):
        resolve_resume_path(str(ckpt_dir / "step_0000006"), ckpt_dir)
    capsys.readouterr()
    resumed, _ = run_toy(make_cfg(tmp_path / "a", checkpoint_every=2, keep_checkpoints=4, resume="latest"))
    printed = capsys.readouterr().out
    assert resumed.resumed_from.name == "step_0000002"
    for step, problem in ((8, "model.safetensors has"), (6, "optimizer.bin is missing"),
                          (4, "trainer_state.json is unreadable")):
        assert f"skipped the incomplete checkpoint {ckpt_dir / f'step_{step:07d}'} ({problem}" in printed, printed
    # re-training steps 2..8 rewrites the three checkpoints; the weights equal the uninterrupted run's
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(ckpt_dir))
    assert all(torch.equal(v, state(resumed.unwrap())[k]) for k, v in state(reference.unwrap()).items())


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    """The disk fills up while the optimizer state of the step-6 checkpoint is written (after the model file):
    every earlier checkpoint stays complete, nothing partial is left, the error names the step, the cause and the
    intact checkpoint, and the run resumes from it."""
    import errno

    import accelerate.checkpointing

    real_save = accelerate.checkpointing.save

    def save_until_disk_full(obj, f, *args, **kwargs):
        if "step_0000006" in str(f) and "optimizer" in str(f):
            with open(f, "wb") as fh:
                fh.write(b"\0" * 64)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_until_disk_full)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint of step 6 .*No space left on device \(ENOSPC\).*"
                                                   r"newest intact checkpoint is .*step_0000004") as caught:
        run_toy(make_cfg(tmp_path, checkpoint_every=2, keep_checkpoints=4))
    assert caught.value.errno == errno.ENOSPC
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_0000002", "step_0000004"]
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(ckpt_dir))
    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)  # space freed
    trainer, _ = run_toy(make_cfg(tmp_path, checkpoint_every=2, keep_checkpoints=4, resume="latest"))
    assert trainer.resumed_from.name == "step_0000004" and trainer.step == 8


def test_export_saves_ema_weights_loadable_with_from_pretrained(tmp_path):
    trainer, _ = run_toy(make_cfg(tmp_path, max_steps=4))
    path = trainer.export("toy")
    reloaded = ToyModel.from_pretrained(str(path))
    ema_state = {k.removeprefix("module."): v for k, v in state(trainer.ema.module).items()}
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, ema_state[key]), key


def test_guards_on_output_dir_resume_path_and_process_count(tmp_path):
    run_toy(make_cfg(tmp_path, max_steps=3))
    with pytest.raises(ValueError, match="resume"):
        Trainer(make_cfg(tmp_path, max_steps=3))  # existing checkpoints, no resume
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    with pytest.raises(FileNotFoundError, match="nope"):
        run_toy(make_cfg(tmp_path / "c", resume=str(tmp_path / "nope")))
    AcceleratorState._reset_state(True)
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes 2"):
        Trainer(make_cfg(tmp_path / "d", expected_num_processes=2))


def test_trackers_as_accelerate_names_them(tmp_path, monkeypatch):
    from accelerate import utils as accelerate_utils
    from common.training import resolve_trackers

    assert resolve_trackers("none") == [] and resolve_trackers("tensorboard") == ["tensorboard"]
    assert "tensorboard" in resolve_trackers("all")  # tensorboard is in the default install
    assert resolve_trackers(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="unknown tracker.*'tensorbored'"):
        resolve_trackers(["tensorbored"])
    # a requested tracker whose package is missing stops the run before anything is written
    monkeypatch.setattr(accelerate_utils, "is_wandb_available", lambda: False)
    assert "wandb" not in resolve_trackers("all")
    cfg = make_cfg(tmp_path, tracker=["tensorboard", "wandb"])
    with pytest.raises(ValueError, match=r"\['wandb'\].*not installed.*pip install wandb"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_images_go_through_the_tracker_api(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(make_cfg(tmp_path, tracker=["tensorboard"]))
    grid = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
    trainer.log_media({"samples": grid, "loss": torch.tensor(0.5)}, step=3)
    trainer.end()
    events = sorted((tmp_path / "run" / "logs").glob("*/events.out.tfevents.*"))  # (hparams go to a sub-folder)
    assert len(events) == 1, events
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    assert "samples" in accumulator.Tags()["images"] and "loss" in accumulator.Tags()["scalars"]
    image = accumulator.Images("samples")[0]
    assert image.step == 3 and (image.width, image.height) == (8, 8)
    assert (tmp_path / "run" / "images" / "samples_step0000003.png").is_file()
