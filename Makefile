# One command each: `make train` (set up, then run the main job on the embedded default) and
# `make test` (set up, then run the test suite). Only a Python >= 3.10 is needed beforehand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny_arith.yaml
OUTPUT ?= runs/tiny_arith
# More `treerpo train` flags: make train ARGS=--overwrite (train again into the same folder).
ARGS ?=

.PHONY: setup test train lint clean

# torch is installed first and pinned exactly: any other version pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,data,gguf]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

train: setup
	$(VENV)/bin/treerpo train $(CONFIG) --output $(OUTPUT) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
