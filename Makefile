# Two commands on a fresh machine with only python3 (>= 3.10): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.versavit-installed
CONFIG ?= configs/tiny.yaml

.PHONY: setup demo test lint bench clean

# torch==2.13.0 goes in first: a bare `torch` requirement would pull a multi-GB CUDA build on a
# CPU machine (a GPU box gets PyPI's CUDA build of the same version). The stamp makes set-up
# idempotent and instant once done; it is redone when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/versavit pipeline run --local --config $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/data_loader.py

clean:
	rm -rf $(VENV) runs .pytest_cache
