# Two entry points (see README.md): `make demo` runs the main job, `make test` the tests.
# Both create .venv/ at the repository root if missing and install everything into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
NPROC ?= 4

.PHONY: install demo smoke test test-unit test-distributed reference-config clean

$(INSTALLED): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

install: $(INSTALLED)

# The main job: ReMix-PPO on the tiny arithmetic model (built once and cached), one CPU process.
demo: $(INSTALLED)
	tiny=$$($(PY) -m remix_megatron.cli tiny --path-only) && \
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 -m remix_megatron.cli train configs/tiny_remix_ppo.yaml \
	    model.hf_path=$$tiny data.train_path=$$tiny/train.jsonl data.eval_path=$$tiny/heldout.jsonl

# The parallel smoke test: actor + critic ReMix updates on a synthetic batch at TP2 x PP2.
smoke: $(INSTALLED)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m remix_megatron.cli demo configs/tiny_cpu.yaml

test: $(INSTALLED)
	$(PY) -m pytest

test-unit: $(INSTALLED)
	$(PY) -m pytest -m unit

test-distributed: $(INSTALLED)
	$(PY) -m pytest -m distributed

reference-config: $(INSTALLED)
	$(PY) -m remix_megatron.cli config reference > configs/reference.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
