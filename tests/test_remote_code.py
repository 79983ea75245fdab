"""diffusers' generic loader on a saved LGQPipeline folder, in a Python environment without this repository:
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (pipelines/remote_code.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipelines import LGQPipeline
from pipelines import remote_code
from prior.scheduler import MaskGITScheduler
from test_pipeline import K, sample, tiny_gpt, tiny_maskgit, tiny_tokenizer

# packages of this repository's environment that a diffusers user need not have: the folder's code must not import
# them (diffusers itself imports torchvision and accelerate when they are installed, so those cannot be hidden)
NOT_NEEDED = ["omegaconf", "torch_fidelity", "lpips", "webdataset", "datasets", "skimage", "matplotlib", "tensorboard"]

LOAD_SCRIPT = textwrap.dedent('''
    import importlib, json, sys
    for name in ("tokenizer", "prior", "pipelines", "common"):   # this repository is not importable here
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise SystemExit(f"{name} is importable: the test environment is not clean")
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    hidden = [name for name in NOT_NEEDED if name not in sys.modules]

    class Hide:  # these packages are not installed, as far as the folder's code can tell
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in hidden:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Hide())
    folder, labels, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    try:
        DiffusionPipeline.from_pretrained(folder)
    except ValueError as err:
        assert "trust_remote_code" in str(err), err
    else:
        raise SystemExit("loaded remote code without trust_remote_code=True")
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    by_name = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_lgq", trust_remote_code=True)
    results = {}
    for key, loaded in (("generic", pipe), ("custom_pipeline", by_name)):
        assert type(loaded).__name__ == "LGQPipeline" and type(loaded).__module__.startswith("diffusers_modules"), \\
            type(loaded)
        assert not loaded.prior.training and not loaded.tokenizer.training
        images = loaded(labels, generator=torch.Generator().manual_seed(3), output_type="np", **options).images
        results[key] = images.tolist()
    results["classes"] = [type(pipe.tokenizer).__name__, type(pipe.prior).__name__, type(pipe.scheduler).__name__]
    results["hidden"] = hidden
    print(json.dumps(results))
''').replace("NOT_NEEDED", repr(NOT_NEEDED))


@pytest.fixture(scope="module")
def python_without_this_repository(tmp_path_factory) -> Path:
    """A fresh virtual environment that sees this environment's site-packages through a ``.pth`` path line (which
    does not run the editable install's own ``.pth`` inside it): diffusers, torch and transformers, not lgq."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "lgq_test_dependencies.pth").write_text("".join(f"{path}\n" for path in paths))
    return python


def run_outside(python: Path, folder: Path, tmp_path: Path, labels: list[int], **options) -> dict:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([str(python), "-c", LOAD_SCRIPT, str(folder), json.dumps(labels), json.dumps(options)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("prior_factory", [tiny_maskgit, tiny_gpt], ids=["maskgit", "gpt"])
def test_diffusers_generic_loader_without_this_repository(prior_factory, python_without_this_repository, tmp_path):
    prior = prior_factory()
    scheduler = MaskGITScheduler(codebook_size=K) if prior_factory is tiny_maskgit else None
    pipe = LGQPipeline(tokenizer=tiny_tokenizer(), prior=prior, scheduler=scheduler)
    options = {"num_inference_steps": 4} if pipe.uses_scheduler else {"top_k": 8}
    expected = sample(pipe, labels=(0, 1, 3), seed=3, **options)
    pipe.save_pretrained(tmp_path / "pipeline")
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_lgq", "LGQPipeline"]
    assert index["prior"] == ["lgq_component", type(prior).__name__]
    for component in ("tokenizer", "prior", "scheduler"):
        assert (tmp_path / "pipeline" / component / "lgq_component.py").is_file()

    results = run_outside(python_without_this_repository, tmp_path / "pipeline", tmp_path, [0, 1, 3], **options)
    assert results["classes"] == ["LGQTokenizer", type(prior).__name__, type(pipe.scheduler).__name__]
    assert set(results["hidden"]) >= {"omegaconf", "lpips", "torch_fidelity"}
    for key in ("generic", "custom_pipeline"):
        np.testing.assert_array_equal(np.asarray(results[key], dtype=np.float32), expected)
    # the repository's own loader reads the same folder with its own classes
    np.testing.assert_array_equal(sample(LGQPipeline.from_pretrained(tmp_path / "pipeline"), seed=3, **options),
                                  expected)


def test_folders_saved_before_the_remote_code_still_load(tmp_path):
    pipe = LGQPipeline(tokenizer=tiny_tokenizer(), prior=tiny_maskgit(), scheduler=MaskGITScheduler(codebook_size=K))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.update(_class_name="LGQPipeline", tokenizer=["tokenizer.model", "LGQTokenizer"],
                 prior=["prior.maskgit", "MaskGITPrior"], scheduler=["prior.scheduler", "MaskGITScheduler"])
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for code in list(tmp_path.glob("*.py")) + list(tmp_path.glob("*/lgq_component.py")):
        code.unlink()
    np.testing.assert_array_equal(sample(LGQPipeline.from_pretrained(tmp_path), seed=2), sample(pipe, seed=2))


def test_bundle_imports_only_what_a_diffusers_user_has(tmp_path):
    bundle = remote_code.collect_bundle()
    assert {"pipelines.pipeline_lgq", "tokenizer.model", "prior.gpt", "prior.maskgit",
            "tokenizer.quantizers.lgq", "tokenizer.quantizers.fsq"} <= set(bundle)  # registry strings followed
    assert "pipelines.remote_code" not in bundle and not any(name.startswith(("eval", "experiments")) for name in bundle)
    absolute = re.compile(r"^\s*(from|import)\s+(common|tokenizer|prior|pipelines)\b", flags=re.MULTILINE)
    for module in bundle.values():
        assert not absolute.search(module.source), module.name


def test_bundler_rejects_module_level_imports_a_user_may_not_have(tmp_path, monkeypatch):
    package = tmp_path / "common"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "needs_lpips.py").write_text("import math\nimport lpips\n")
    (package / "lazy_lpips.py").write_text("def f():\n    import lpips\n    return lpips\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "common" or m.startswith("common.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ValueError, match="lpips"):
        remote_code.bundle_module("common.needs_lpips")
    assert "import lpips" in remote_code.bundle_module("common.lazy_lpips").source
