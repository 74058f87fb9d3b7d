# lnscope: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine use e.g. `make run TORCH_SPEC="torch>=2.6"`.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
PAIR ?= tiny
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# pip's notes about this machine's local package mirrors are noise; its errors are not.
QUIET := { grep -v "^WARNING: Location" || true; }
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

# Browser tests drive Debian's chromium through Playwright (never `playwright install`).
CHROMIUM ?= $(shell command -v chromium 2>/dev/null || echo /usr/bin/chromium)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint install browser circuit-tracer tiny-models bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Re-installs whenever pyproject.toml changes; torch is installed first so the
# project's range never pulls a different build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)" 2>&1 | $(QUIET)
	$(PIP) install -e ".[test,cluster]" 2>&1 | $(QUIET)
	$(BIN)/python -c "import lnscope.analysis, lnscope.server, transformer_lens, fastapi"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/lnscope serve --host $(HOST) --port $(PORT) --pair $(PAIR)

browser:
	@test -x "$(CHROMIUM)" || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@test -x "$(CHROMIUM)" || { echo "chromium is missing at $(CHROMIUM)"; exit 1; }

# circuit-tracer (the reference for our attribution graphs) needs TransformerLens < 4, so it lives
# in its own venv; tests/test_circuits.py compares graphs through it. Skipped if it cannot install.
CT_VENV ?= .venv-ct
CT_SPEC ?= circuit-tracer==0.5.0
$(CT_VENV)/.installed:
	$(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(TORCH_SPEC)" "$(CT_SPEC)" 2>&1 | $(QUIET)
	$(CT_VENV)/bin/python -c "import circuit_tracer, transformer_lens; transformer_lens.HookedTransformer"
	touch $@

circuit-tracer:
	@$(MAKE) --no-print-directory $(CT_VENV)/.installed || { rm -rf $(CT_VENV); \
		echo "circuit-tracer did not install: the comparison test will be skipped"; }

lint: install
	$(BIN)/ruff check .

test: install lint browser circuit-tracer
	LNSCOPE_CHROMIUM="$(CHROMIUM)" LNSCOPE_CIRCUIT_TRACER_PYTHON="$(abspath $(CT_VENV))/bin/python" \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

# Rebuilds models/tiny and its transcoders from nothing (seeded; ~70 min on 2 CPU cores).
# CI uses the shipped files.
TC_ARGS ?= --activation topk --k 32 --n-tokens 150000 --quiet
tiny-models: install
	$(BIN)/lnscope build-tiny --out models/tiny --work-dir build/tiny-work --pretrain-minutes 80
	for role in original ln_free control; do $(BIN)/lnscope train-transcoders tiny --role $$role $(TC_ARGS) || exit 1; done
	$(BIN)/lnscope build-tiny --out models/tiny --card-only

bench: install
	$(BIN)/python bench/analyses.py

clean:
	rm -rf $(VENV) $(CT_VENV) .pytest_cache build *.egg-info
