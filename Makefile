# Two commands: `make quickstart` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: quickstart test gpu-test bench clean

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[data,notebooks,dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/megafold quickstart

test: $(STAMP)
	bash scripts/browser_deps.sh
	$(PY) -m pytest -q --durations=25

# On a machine with a GPU (no install: run from source).
gpu-test:
	PYTHONPATH=. python3 -m pytest -q -m gpu

bench:
	PYTHONPATH=. python3 benchmarks/kernels.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
