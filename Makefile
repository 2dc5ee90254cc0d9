# tunebench: the commands of the README. Everything runs from a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install: a plain PyPI pin. On a GPU machine it brings CUDA; set TORCH=
# to keep a torch you already have.
TORCH ?= torch==2.13.0

.PHONY: install test demo compare bench bench-memory clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

# Optimizer state per parameter and the memory plan against measured peaks (GPT-2 small and medium
# shapes, a few steps each; on a GPU also medium with bf16 + checkpointing + 8-bit AdamW).
bench-memory: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/memory.py

clean:
	rm -rf runs reports .cache
