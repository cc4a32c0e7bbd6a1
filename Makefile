PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: serve test bench lint clean

# `make serve` needs only requirements.txt (what Spaces installs) and the package. TORCH_INDEX takes torch
# from another index first: TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build on Linux,
# where PyPI's is the CUDA one (gigabytes).
TORCH_INDEX ?=

$(VENV)/.app: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "gptgen needs Python >= 3.11 \
	(its pinned numpy, pandas and fastapi do); $(PYTHON) is $$($(PYTHON) --version 2>&1). Name a newer one: \
	make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)" --index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Tests add the peers they compare against (transformers; llama-cpp-python, which pip compiles from
# source: ~10 minutes once) and Playwright, which drives the system's chromium (apt install chromium).
$(VENV)/.test: $(VENV)/.app requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

serve: $(VENV)/.app
	$(PY) -m gptgen serve $(ARGS)

test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) benchmarks/train.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/quality.py --minutes 1.5
	$(PY) benchmarks/app.py
	$(PY) benchmarks/serve_load.py --soak-minutes 5

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
