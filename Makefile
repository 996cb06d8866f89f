# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install poslab, run the quickstart
#   make test   create the same .venv and run the tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,hf,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m poslab demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check poslab tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/pe_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
