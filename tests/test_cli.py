"""One command-line style: --help with config keys for every command, --print-config, entry points, shipped configs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common import cli

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.mark.parametrize("command, key", [
    ("tokenizer.train", "train.max_steps"),
    ("prior.train", "model.prior_type"),
    ("prior.extract", "chunk_size"),
    ("eval.reconstruction", "data.image_size"),
    ("eval.gen_fid", "data.root"),
    ("experiments.study", "model.quantizer"),
    ("pipelines.assemble", "--mask-schedule"),
    ("experiments.demo", "--output-dir"),
])
def test_every_command_has_help_listing_its_keys(command, key, capsys):
    module = __import__(command, fromlist=["main"])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert key in text and "usage:" in text
    if "." in key and not key.startswith("--"):  # config keys are listed with their defaults
        assert "configuration keys" in text


def test_config_keys_as_key_value_or_dashed_options(capsys):
    from tokenizer.train import main

    assert main(["--config", "configs/tokenizer/tiny.yaml", "--print-config", "--train.max_steps", "7",
                 "train.lr=0.001", "--train.progress-bar=false", "--resume", "latest"]) is None
    printed = capsys.readouterr().out
    assert "max_steps: 7" in printed and "lr: 0.001" in printed and "progress_bar: false" in printed
    assert "resume: latest" in printed
    with pytest.raises(SystemExit):  # a bare word is neither an option nor key=value
        main(["--print-config", "max_steps"])
    with pytest.raises(ValueError, match="train.max_steps"):  # typos are named with the closest key
        main(["--print-config", "--train.max_stepz", "3"])


def test_prior_train_print_config(capsys):
    from prior.train import main

    assert main(["--config", "configs/prior/builtin.yaml", "--print-config", "model.prior_type=gpt"]) is None
    printed = capsys.readouterr().out
    assert "prior_type: gpt" in printed and "tracker: tensorboard" in printed


def test_config_paths_resolve_to_the_shipped_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    found = cli.resolve_config_path("configs/tokenizer/builtin.yaml")
    assert found.is_file() and found.parts[-2:] == ("tokenizer", "builtin.yaml")
    assert cli.resolve_config_path("configs/nope.yaml") == Path("configs/nope.yaml")
    (tmp_path / "configs" / "tokenizer").mkdir(parents=True)
    (tmp_path / "configs" / "tokenizer" / "builtin.yaml").write_text("train: {}\n")
    assert cli.resolve_config_path("configs/tokenizer/builtin.yaml") == Path("configs/tokenizer/builtin.yaml")


def test_entry_points_run_the_module_mains(capsys):
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(cli.COMMANDS)
    for name, target in scripts.items():
        module, attr = target.split(":")
        assert module == "common.cli" and callable(getattr(cli, attr)), name
    assert cli.run("tokenizer.train", ["--config", "configs/tokenizer/tiny.yaml", "--print-config"]) == 0
    assert "quantizer:" in capsys.readouterr().out


@pytest.mark.slow
def test_wheel_ships_configs_and_runs_without_the_source_tree(tmp_path):
    """Build the wheel from a copy of the tracked files, unpack it (what pip install puts in site-packages) and
    run commands from an empty folder with only the unpacked wheel on the path: the configs must come from it."""
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([PYTHON, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("lgq-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "common/configs/tokenizer/builtin.yaml" in names and "common/configs/prior/builtin.yaml" in names
        assert "common/configs/tokenizer/glyphs.yaml" in names and "common/configs/prior/glyphs.yaml" in names
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        assert "lgq-train-tokenizer = common.cli:train_tokenizer" in entry_points
        archive.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    check = ("import common.cli, experiments.demo; from common.cli import resolve_config_path as r; "
             "print(common.cli.__file__); d = experiments.demo.DEMO_DATASETS[experiments.demo.DEFAULT_DEMO_DATASET]; "
             "print(r(d['tokenizer_config'])); print(r(d['prior_config']))")
    out = subprocess.run([PYTHON, "-c", check], cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    paths = out.split()
    assert all(p.startswith(str(site)) for p in paths), paths  # the installed package, not the checkout
    run = subprocess.run([PYTHON, "-c", "import sys; from common.cli import train_tokenizer; sys.exit(train_tokenizer())",
                          "--config", "configs/tokenizer/builtin.yaml", "--print-config"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "name: builtin" in run.stdout and "codebook_size: 1024" in run.stdout
