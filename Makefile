# Two commands on a fresh machine with only python3 (>= 3.10): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.versavit-installed
CONFIG ?= configs/tiny.yaml
# The lock of the interpreter that builds the venv: requirements/lock-py3.X.txt (`make lock`).
PYVER  := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK   := requirements/lock-py$(PYVER).txt
LOCK_PYTHONS := 3.10 3.11 3.12 3.13
PIP_VERSION := 26.3
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test lint imports bench lock clean screenshots

# torch==2.13.0 goes in first, with pip: a bare `torch` requirement would pull a multi-GB CUDA build
# on a CPU machine (a GPU box gets PyPI's CUDA build of the same version). Then everything else
# exactly as locked (--no-deps: the lock is complete, and leaves out what requirements/overrides.txt drops), installed
# by uv at the lock's own version (11 s here against pip's 2.5 min; it
# keeps the torch already installed; bytecode compiled at install, as pip does: with
# PYTHONDONTWRITEBYTECODE set, every process would otherwise recompile mlflow, transformers, ... and
# the suite took 1.5x as long), then versavit itself without dependencies. The stamp makes
# set-up idempotent and instant once done; it is redone when pyproject.toml or the lock changes.
UV     := $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY)
$(STAMP): pyproject.toml $(LOCK) requirements/overrides.txt
	@test -f $(LOCK) || { echo "error: no lock for Python $(PYVER) ($(LOCK)); supported: $(LOCK_PYTHONS). Use PYTHON=python3.X" >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) pip==$(PIP_VERSION)
	$(PIP) -r requirements/torch.txt
	$(PIP) -c $(LOCK) uv
	$(UV) --no-deps -r $(LOCK)
	$(UV) --no-deps -e .
	$(PY) requirements/check_installed.py
	@touch $(STAMP)

$(LOCK):
	@echo "error: no lock for Python $(PYVER) ($(LOCK)); supported: $(LOCK_PYTHONS). Use PYTHON=python3.X" >&2; exit 2

setup: $(STAMP)

demo: setup
	$(VENV)/bin/versavit pipeline run --local --config $(CONFIG)

# The layer contract (pyproject.toml [tool.importlinter]) and the suite.
test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

imports: setup
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/data_loader.py

# The MLflow UI in headless Chromium (apt-get install chromium): docs/mlflow-runs.png (runs table, saved headline
# columns) and docs/mlflow-compare.png (compare page of the two newest runs). Runs the shrunk tiny pipeline into
# SHOTS_WORKDIR until its store holds two pipeline runs (docs/screenshots.py).
SHOTS_WORKDIR ?= runs/screenshots
screenshots: setup
	$(PY) docs/screenshots.py --workdir $(SHOTS_WORKDIR)

# Re-resolve every lock from pyproject.toml, deliberately (never done by setup). Linux x86_64, the
# platform of CI and of the images; torch pinned to the version the Makefile installs. Pins already
# in a lock are kept where pyproject.toml allows them; `make lock LOCK_FLAGS=--upgrade` takes the
# newest releases instead.
LOCK_FLAGS ?=
lock: setup
	@for v in $(LOCK_PYTHONS); do \
	  echo "resolving requirements/lock-py$$v.txt"; \
	  $(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra mlflow-server --extra lmms-eval --python-version $$v \
	    --python-platform x86_64-manylinux_2_28 --override requirements/torch.txt --override requirements/overrides.txt \
	    --no-header --quiet $(LOCK_FLAGS) -o requirements/lock-py$$v.txt || exit 1; \
	done

clean:
	rm -rf $(VENV) runs .pytest_cache
