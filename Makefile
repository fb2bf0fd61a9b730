# lorafleet: `make demo` runs the whole user path on the embedded defaults; `make test` runs the
# suite (lint and types included). Both create .venv and install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# One resolve: the CPU torch pin in requirements-dev.txt holds for every dependency.
	$(PY) -m pip install -q -r requirements-dev.txt -e .
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy api shared worker cli bench

test: install lint
	# Files run in parallel (most tests wait on real servers and worker processes).
	$(VENV)/bin/pytest -q -p no:cacheprovider -n 3 --dist loadgroup

demo: install
	$(PY) -m cli demo

bench: install
	$(PY) -m bench.engine
	$(PY) -m bench.service

clean:
	rm -rf $(VENV) data adapters
