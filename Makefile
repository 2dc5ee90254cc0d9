# tunebench: the commands of the README. Everything runs from a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install: a plain PyPI pin. On a GPU machine it brings CUDA; set TORCH=
# to keep a torch you already have.
TORCH ?= torch==2.13.0

.PHONY: install test demo compare bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

# Training and evaluation speed against transformers.Trainer -> reports/bench/bench.json and a table.
# About 2 hours on a 2-core CPU; BENCH_ARGS=--quick is a smoke run of a few minutes.
BENCH_ARGS ?=
bench: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/speed.py $(BENCH_ARGS)

clean:
	rm -rf runs reports .cache
