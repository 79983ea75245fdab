# Two entry points (see README): `make demo` and `make test` (everything, what CI runs); `make test-fast` skips
# the tests marked slow (multi-process and end-to-end runs).
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install; override for your CUDA, e.g. make TORCH_SPEC="torch torchvision" demo
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_DISABLE_TELEMETRY := 1
OFFLINE_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline

.PHONY: env demo app test test-fast bench gpu-check
env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,app]"
	touch $@

demo: env
	$(PY) -m experiments.demo $(ARGS)

# the Gradio page (Generate, Tokenize) on the demo's pipeline: http://127.0.0.1:7860 (ARGS="--pipeline FOLDER")
app: env
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m pipelines.app $(ARGS)

test: env
	$(OFFLINE_ENV) $(PY) -m pytest -q $(ARGS)

test-fast: env
	$(OFFLINE_ENV) $(PY) -m pytest -q -m "not slow" $(ARGS)

bench: env
	$(PY) -m experiments.bench_quantizers $(ARGS)

# one-shot check of every stage on one CUDA GPU (README "Checking a GPU machine"); refuses without CUDA
gpu-check: env
	$(PY) scripts/gpu_check.py $(ARGS)
